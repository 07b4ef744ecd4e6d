"""apply_processors: layer selection, restore handles, run-context hook lifetime."""

import re

import pytest
import torch
from helpers import RecordingCore, ScaledCore, forward

from attnpack.attn_processors import DenseCore, apply_processors, list_layers, select_layers
from attnpack.attn_processors.context import HOOK_NAME
from attnpack.toy.tiny import build_tiny_denoiser, build_tiny_pipeline, denoiser_inputs, tiny_flux_transformer


@pytest.fixture(scope="module")
def flux12():
    """FLUX with 12 single blocks: names `single_transformer_blocks.1` and `.10`, `.11` coexist."""
    return tiny_flux_transformer(num_layers=2, num_single_layers=12)


def _names(model, spec):
    return [i.name for i in select_layers(list_layers(model), spec)]


def test_select_exact_name_index_and_processor_key(flux12):
    assert _names(flux12, "single_transformer_blocks.1.attn") == ["single_transformer_blocks.1.attn"]
    assert _names(flux12, "single_transformer_blocks.1.attn.processor") == ["single_transformer_blocks.1.attn"]
    assert _names(flux12, 0) == ["transformer_blocks.0.attn"]
    assert _names(flux12, -1) == ["single_transformer_blocks.11.attn"]
    assert _names(flux12, [2, "transformer_blocks.1.attn"]) == [
        "transformer_blocks.1.attn",
        "single_transformer_blocks.0.attn",
    ]


def test_regex_integer_boundaries(flux12):
    assert _names(flux12, r"single_transformer_blocks\.1\b") == ["single_transformer_blocks.1.attn"]
    assert _names(flux12, "blocks.1") == ["transformer_blocks.1.attn", "single_transformer_blocks.1.attn"]
    assert _names(flux12, "single_transformer_blocks.(1|2)") == [
        "single_transformer_blocks.1.attn",
        "single_transformer_blocks.2.attn",
    ]
    assert _names(flux12, re.compile(r"single_transformer_blocks\.1\d")) == [
        "single_transformer_blocks.10.attn",
        "single_transformer_blocks.11.attn",
    ]
    assert _names(flux12, "blocks.1.attn") == ["transformer_blocks.1.attn", "single_transformer_blocks.1.attn"]
    assert len(_names(flux12, "single")) == 12


@pytest.mark.parametrize(
    "spec, message",
    [
        ("double_blocks.0.attn", "matches no attention layer"),
        (99, "out of range"),
        ("blocks.(", "not a valid regular expression"),
        (1.5, "must be a name, an integer index"),
        ([1.5], "must be names, integer indices or regexes"),
    ],
)
def test_unknown_layers_are_clear_errors(flux12, spec, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        apply_processors(flux12, DenseCore(), layers=spec)
    if message.startswith(("matches", "out of")):
        assert "single_transformer_blocks.11.attn" in str(info.value)  # the valid names are listed


def test_restore_brings_back_identical_processor_objects():
    pipe = build_tiny_pipeline("tiny-sdxl")
    unet = pipe.unet
    original = unet.attn_processors
    inputs = denoiser_inputs(unet)
    ref = forward(unet, inputs)
    handle = apply_processors(pipe, ScaledCore(), layers="up_blocks")
    changed = unet.attn_processors
    assert sum(changed[k] is not original[k] for k in original) == len(handle.processors) > 0
    assert all(k.startswith("up_blocks") for k in handle.processors)
    assert (forward(unet, inputs) - ref).abs().max() > 0
    handle.remove()
    after = unet.attn_processors
    assert after.keys() == original.keys() and all(after[k] is original[k] for k in original)
    torch.testing.assert_close(forward(unet, inputs), ref, atol=0, rtol=0)
    handle.remove()  # idempotent
    assert HOOK_NAME not in unet._diffusers_hook.hooks
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_stacked_handles_and_hook_refcount():
    model = build_tiny_denoiser("flux")
    original = model.attn_processors
    a = apply_processors(model, DenseCore(), layers=0)
    b = apply_processors(model, RecordingCore(), layers=[1, 2])
    assert model._diffusers_hook.get_hook(HOOK_NAME).refs == 2
    a.remove()
    assert model._diffusers_hook.get_hook(HOOK_NAME).refs == 1
    assert (
        model.attn_processors["transformer_blocks.0.attn.processor"] is original["transformer_blocks.0.attn.processor"]
    )
    assert (
        model.attn_processors["single_transformer_blocks.0.attn.processor"]
        is b.processors["single_transformer_blocks.0.attn.processor"]
    )
    b.remove()
    assert model._diffusers_hook.get_hook(HOOK_NAME) is None
    assert all(model.attn_processors[k] is original[k] for k in original)


def test_restore_leaves_layers_replaced_by_someone_else():
    model = build_tiny_denoiser("flux")
    handle = apply_processors(model, DenseCore())
    procs = model.attn_processors
    foreign = RecordingCore()
    key = "transformer_blocks.0.attn.processor"
    from attnpack.attn_processors import AttnPackProcessor

    procs[key] = AttnPackProcessor(foreign, list_layers(model)[0])
    model.set_attn_processor(dict(procs))
    handle.remove()
    assert model.attn_processors[key] is procs[key]


def test_factory_and_kinds():
    model = build_tiny_denoiser("unet-sd15")
    handle = apply_processors(model, lambda info: DenseCore() if info.kind_index % 2 == 0 else None, kinds=["self"])
    assert sorted(handle.processors) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor",
    ]
    handle.remove()
    with pytest.raises(ValueError, match="no attention layers of kind"):
        apply_processors(model, DenseCore(), kinds=["single"])


def test_rejects_unsupported_objects():
    with pytest.raises(ValueError, match="does not support denoisers of class Linear"):
        apply_processors(torch.nn.Linear(2, 2), DenseCore())
    with pytest.raises(TypeError, match="Expected a diffusers pipeline"):
        apply_processors(object(), DenseCore())
    with pytest.raises(TypeError, match="must be an attention core"):
        apply_processors(build_tiny_denoiser("flux"), "dense")


def test_processors_hold_no_parameters_and_do_not_leak_into_state_dict():
    model = build_tiny_denoiser("flux")
    keys = set(model.state_dict())
    with apply_processors(model, DenseCore()):
        assert set(model.state_dict()) == keys


def test_hook_survives_accelerate_style_rewrap():
    """If something wraps forward after our hook, removal leaves a pass-through instead of dropping their wrapper."""
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model)
    ref = forward(model, inputs)
    handle = apply_processors(model, DenseCore())
    inner = model.forward
    calls = []

    def outer(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = outer
    handle.remove()
    assert model.forward is outer
    torch.testing.assert_close(forward(model, inputs), ref, atol=0, rtol=0)
    assert calls == [1]
    again = apply_processors(model, DenseCore())  # the pass-through is switched back on, not duplicated
    assert model._diffusers_hook.get_hook(HOOK_NAME).active
    again.remove()
