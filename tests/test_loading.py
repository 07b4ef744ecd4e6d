"""load_pipeline: built-in tiny models, local folders, argument checks."""

import numpy as np
import pytest
import torch

from attnpack.pipelines import builtin_models, load_pipeline
from attnpack.pipelines._tiny import TINY_MODELS


def _generate(pipe, name):
    kwargs = dict(TINY_MODELS[name][2])
    out = pipe(
        "a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    )
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_save_and_reload_reproduces_output(name, tmp_path):
    pipe = load_pipeline(name, device="cpu")
    assert pipe._attnpack_model == name
    first = _generate(pipe, name)
    assert np.isfinite(first).all()
    pipe.save_pretrained(tmp_path / name)
    reloaded = load_pipeline(str(tmp_path / name), device="cpu")
    np.testing.assert_array_equal(_generate(reloaded, name), first)


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
