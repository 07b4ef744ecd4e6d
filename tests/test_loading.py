"""load_pipeline: built-in tiny models, local folders, argument checks."""

import json

import numpy as np
import pytest
import torch
from helpers import RELOAD_ATOL

from attnpack.pipelines import builtin_models, load_pipeline
from attnpack.toy.tiny import TINY_MODELS


def _generate(pipe, name):
    kwargs = dict(TINY_MODELS[name][2])
    out = pipe(
        "a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    )
    return out.frames if hasattr(out, "frames") else out.images


def _tensors(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every module component, keyed ``component.name``."""
    out = {}
    for comp, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            out.update({f"{comp}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return out


def _configs(pipe) -> dict[str, object]:
    """What each component is built from: model and scheduler configs, tokenizer vocabularies."""
    out = {}
    for comp, obj in pipe.components.items():
        if obj is None:
            out[comp] = None
        elif hasattr(obj, "get_vocab"):
            out[comp] = (type(obj).__name__, obj.get_vocab(), obj.model_max_length)
        else:
            config = obj.config.to_dict() if hasattr(obj.config, "to_dict") else dict(obj.config)
            # bookkeeping, not architecture: names, versions, which fields were defaults, the load dtype
            config = {
                k: v
                for k, v in config.items()
                if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")
            }
            out[comp] = (type(obj).__name__, json.loads(json.dumps(config, sort_keys=True, default=str)))  # tuples
    return out


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def saved_and_reloaded(request, tmp_path_factory):
    name = request.param
    pipe = load_pipeline(name, device="cpu")
    assert pipe._attnpack_model == name
    folder = tmp_path_factory.mktemp("saved") / name
    pipe.save_pretrained(folder)
    return name, pipe, load_pipeline(str(folder), device="cpu")


def test_tiny_model_save_and_reload_keeps_every_weight_and_config(saved_and_reloaded):
    """What a reload guarantees exactly: the same components, classes, configs, vocabularies and tensors (values,
    dtypes, shapes), bit for bit."""
    _, pipe, reloaded = saved_and_reloaded
    assert _configs(reloaded) == _configs(pipe)
    before, after = _tensors(pipe), _tensors(reloaded)
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


def test_tiny_model_save_and_reload_reproduces_output(saved_and_reloaded):
    """A reloaded model gives the same output up to float summation order, not bit for bit.

    Root cause (found for issue 18 on torch 2.13.0+cpu with MKL, safetensors 0.8.0, diffusers 0.42.1): since
    safetensors 0.8, ``safetensors.torch.load_file`` (which diffusers' ``load_state_dict`` calls) returns zero-copy
    views into the memory-mapped file instead of fresh copies, and diffusers keeps those views as the parameters. A
    tensor then starts at its offset in the file, which is only element-aligned (``data_ptr() % 64`` is 4..60 for
    every reloaded tiny-flux transformer tensor; PyTorch's own allocations are 64-byte aligned). MKL's sgemm takes
    another code path for an unaligned operand and sums in another order: ``F.linear`` of a 1-row input with a
    64x77 weight differs by 3.8e-6 between an aligned and a 4-byte-offset copy of the same weight. The weights and
    configs are identical (test above); cloning the reloaded tensors into fresh memory makes the output bit-identical
    again (test below). Measured difference after 2 steps: 1.7e-6 (tiny-flux), 1.2e-7 (tiny-wan), on [0, 1] images.

    The tolerance (1e-4, 60x the measured difference) still catches real reload regressions; each was tried in a
    scratch run on tiny-flux: the transformer reloaded in bf16 (max difference 8e-3), a scheduler config field changed
    on save (``shift`` 3.0: 1.3e-1), and the second text encoder dropped / re-initialised (4e-1).
    """
    name, pipe, reloaded = saved_and_reloaded
    first = _generate(pipe, name)
    assert np.isfinite(first).all()
    np.testing.assert_allclose(_generate(reloaded, name), first, rtol=0, atol=RELOAD_ATOL)


def test_reloaded_weights_in_fresh_memory_reproduce_output_bit_for_bit(saved_and_reloaded):
    """The only difference a reload makes is where the tensors live (see the test above): copied into fresh,
    64-byte-aligned allocations, the reloaded model computes exactly what the original did."""
    name, pipe, reloaded = saved_and_reloaded
    for module in reloaded.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in list(module.parameters()) + list(module.buffers()):
                tensor.data = tensor.data.clone()
    np.testing.assert_array_equal(_generate(reloaded, name), _generate(pipe, name))


def test_tiny_models_are_deterministic_per_seed():
    a = load_pipeline("tiny-flux", device="cpu", seed=3).transformer.state_dict()
    b = load_pipeline("tiny-flux", device="cpu", seed=3).transformer.state_dict()
    c = load_pipeline("tiny-flux", device="cpu", seed=4).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_dtype_and_names():
    pipe = load_pipeline("tiny-sd3", dtype="bf16", device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16
    assert set(TINY_MODELS) <= set(builtin_models())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="tiny-nope"), "Unknown built-in model 'tiny-nope'. Built-in models: tiny-sd15"),
        (dict(model="./no/such/dir"), "is neither a built-in model"),
        (dict(model="tiny-flux", dtype="float8"), "`dtype` must be one of auto"),
        (dict(model="tiny-flux", offload="disk"), "`offload` must be one of"),
        (dict(model="tiny-flux", device="tpu"), "`device` must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_pipeline(**kwargs)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="has no model_index.json"):
        load_pipeline(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_offload_needs_accelerator():
    with pytest.raises(ValueError, match="needs an accelerator"):
        load_pipeline("tiny-flux", offload="model")


@pytest.mark.parametrize(
    "offload, method", [("model", "enable_model_cpu_offload"), ("sequential", "enable_sequential_cpu_offload")]
)
def test_offload_runs_on_the_given_device(offload, method, monkeypatch):
    """`device="cuda:1"` with offload puts the offloaded modules on GPU 1 (one process per GPU), not GPU 0."""
    import diffusers

    from attnpack.pipelines import loading

    calls = []
    monkeypatch.setattr(loading, "_resolve_device", lambda device: torch.device(device))
    monkeypatch.setattr(diffusers.DiffusionPipeline, method, lambda self, **kw: calls.append(kw))
    load_pipeline("tiny-sd15", dtype="fp32", device="cuda:1", offload=offload)
    assert calls == [{"device": torch.device("cuda:1")}]


def test_builtin_models_answer_a_plain_call_with_their_defaults(tmp_path):
    """Issue 21: `load_pipeline(name)(prompt)` uses the settings the built-in model was made for; what the caller
    passes wins; the class keeps its diffusers name and save_pretrained writes the plain diffusers class."""
    import json

    pipe = load_pipeline("tiny-flux", device="cpu")
    assert type(pipe).__name__ == "FluxPipeline"
    seen = []
    original = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]))
        return original(*args, **kwargs)

    pipe.transformer.forward = spy
    pipe("a red cat", num_inference_steps=1)
    pipe("a red cat", num_inference_steps=1, height=32, width=32, max_sequence_length=16)
    assert seen == [(16, 32), (4, 16)]  # 64x64 px -> 4x4 tokens and 32 text tokens by default; the caller's win
    pipe.transformer.forward = original
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
