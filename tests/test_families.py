"""Family adapters with the dense core reproduce the stock diffusers processors (fp32, atol 1e-6)."""

import pytest
import torch
from helpers import RecordingCore, ScaledCore, forward

from attnpack.attn_processors import DenseCore, apply_processors, list_layers
from attnpack.toy.tiny import TINY_DENOISERS, build_tiny_denoiser, denoiser_inputs


@pytest.mark.parametrize("name", list(TINY_DENOISERS))
def test_dense_core_matches_stock_processor(name):
    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model, batch_size=2)
    stock = forward(model, inputs)
    core = RecordingCore()
    with apply_processors(model, core) as handle:
        ours = forward(model, inputs)
    assert len(handle.processors) == len(list_layers(model)) > 0
    # every installed processor actually ran (once per layer per forward)
    assert {c.layer.name for c in core.calls} == {i.name for i in list_layers(model)}
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(forward(model, inputs), stock, atol=0, rtol=0)  # restored


@pytest.mark.parametrize("name", ["unet-sd15", "sd35", "flux", "wan-i2v", "cogvideox", "hunyuan_video"])
def test_parity_check_can_fail(name):
    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model)
    stock = forward(model, inputs)
    with apply_processors(model, ScaledCore(1.05)):
        ours = forward(model, inputs)
    assert (ours - stock).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["unet-sd15", "unet-sdxl", "sd3", "sd35", "flux", "wan", "wan-i2v", "cogvideox"])
def test_fused_projections_are_used_and_match(name):
    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model, batch_size=2)
    stock = forward(model, inputs)
    model.fuse_qkv_projections()
    used = []
    for module in model.modules():
        for attr in ("to_qkv", "to_kv", "to_added_qkv", "to_added_kv"):
            sub = getattr(module, attr, None)
            if isinstance(sub, torch.nn.Linear):
                sub.register_forward_hook(lambda *_a, attr=attr: used.append(attr))
    with apply_processors(model, DenseCore()):
        ours = forward(model, inputs)
    assert used, "fused projection layers were not used"
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_layer_kinds_and_indices():
    flux = build_tiny_denoiser("flux")
    kinds = [(i.name, i.kind, i.index, i.kind_index) for i in list_layers(flux)]
    assert kinds == [
        ("transformer_blocks.0.attn", "joint", 0, 0),
        ("single_transformer_blocks.0.attn", "single", 1, 0),
        ("single_transformer_blocks.1.attn", "single", 2, 1),
    ]
    sd35 = list_layers(build_tiny_denoiser("sd35"))
    assert [(i.name, i.kind) for i in sd35] == [
        ("transformer_blocks.0.attn", "joint"),
        ("transformer_blocks.0.attn2", "self"),
        ("transformer_blocks.1.attn", "joint"),
    ]
    unet = list_layers(build_tiny_denoiser("unet-sd15"))
    assert [i.kind for i in unet] == ["self", "cross"] * 4
    assert [i.kind_index for i in unet if i.kind == "self"] == [0, 1, 2, 3]
    hunyuan = list_layers(build_tiny_denoiser("hunyuan_video"))
    assert all("token_refiner" not in i.name for i in hunyuan)  # the text refiner keeps its stock processor
    assert all(i.heads == 2 and i.head_dim == 10 for i in hunyuan)


def _record_layouts(name, **input_kwargs):
    model = build_tiny_denoiser(name)
    core = RecordingCore()
    with apply_processors(model, core):
        forward(model, denoiser_inputs(model, **input_kwargs))
    return core


def test_token_layouts_per_family():
    flux = _record_layouts("flux", grid=(3, 5), text_len=7)
    for call in flux.calls:  # text first, then the image grid, in double and single blocks
        lay = call.layout
        assert (lay.text, lay.image, lay.grid, lay.text_first) == (slice(0, 7), slice(7, 22), (3, 5), True)
    sd3 = _record_layouts("sd35", grid=(3, 5), text_len=7)
    joint = [c.layout for c in sd3.calls if c.layer.kind == "joint"]
    assert all((lay.image, lay.text, lay.grid) == (slice(0, 15), slice(15, 22), (3, 5)) for lay in joint)
    self_attn = [c.layout for c in sd3.calls if c.layer.kind == "self"]
    assert self_attn and all(lay.text is None and lay.grid == (3, 5) for lay in self_attn)
    hv = _record_layouts("hunyuan_video", grid=(2, 3, 4), text_len=6)
    for call in hv.calls:  # video first, text last; the padding mask reaches the core
        assert (call.layout.image, call.layout.text, call.layout.grid) == (slice(0, 24), slice(24, 30), (2, 3, 4))
        assert call.mask is not None and call.mask.dtype == torch.bool
    cog = _record_layouts("cogvideox", grid=(3, 2, 3), text_len=5)
    assert cog.calls[0].layout.text == slice(0, 5) and cog.calls[0].layout.grid == (3, 2, 3)
    wan = _record_layouts("wan", grid=(2, 3, 2), text_len=6)
    by_kind = {c.layer.kind: c.layout for c in wan.calls}
    assert by_kind["self"].grid == (2, 3, 2) and not by_kind["self"].is_cross
    assert by_kind["cross"].is_cross and by_kind["cross"].num_keys == 6 and by_kind["cross"].grid == (2, 3, 2)
    unet = _record_layouts("unet-sd15", grid=(8, 12), text_len=5)
    grids = {(c.layer.kind, c.layout.grid) for c in unet.calls}
    assert grids == {("self", (8, 12)), ("cross", (8, 12)), ("self", (4, 6)), ("cross", (4, 6))}


def test_qkv_are_post_rope_and_norm_flux():
    """The q/k handed to the core are exactly what the stock FLUX processor feeds to attention."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, grid=(2, 3), text_len=4)
    seen_stock = []
    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def spy(query, key, value, **kw):
        seen_stock.append((query.clone(), key.clone(), value.clone()))
        return native(query=query, key=key, value=value, **kw)

    _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE] = spy
    try:
        forward(model, inputs)
    finally:
        _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE] = native
    core = RecordingCore()
    seen_ours = []

    def capture(q, k, v, call):
        seen_ours.append((q.transpose(1, 2).clone(), k.transpose(1, 2).clone(), v.transpose(1, 2).clone()))
        return core(q, k, v, call)

    with apply_processors(model, capture):
        forward(model, inputs)
    assert len(seen_ours) == len(seen_stock) == 3
    for ours, stock in zip(seen_ours, seen_stock):
        for a, b in zip(ours, stock):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["unet-sd15", "sd3", "cogvideox"])
def test_attention_backend_reaches_families_that_bypass_the_dispatcher(name):
    """Stock UNet/SD3/CogVideoX processors never call the dispatcher; attnpack's processors do."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from attnpack.attn_processors import set_attention_backend

    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model)
    stock = forward(model, inputs)
    math_fn = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    calls = []

    def spy(**kw):
        calls.append(1)
        return math_fn(**kw)

    _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH] = spy
    try:
        model.set_attention_backend("_native_math")  # diffusers' own API: a no-op for the stock processors
        forward(model, inputs)
        assert calls == []
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        with set_attention_backend(model, "_native_math"):
            ours = forward(model, inputs)
        assert len(calls) == len(list_layers(model))
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    finally:
        _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH] = math_fn


def test_set_attention_backend_rejects_unknown_and_unusable():
    from attnpack.attn_processors import set_attention_backend

    model = build_tiny_denoiser("flux")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        set_attention_backend(model, "turbo")
    from attnpack._utils import is_available

    if not is_available("flash_attn"):
        with pytest.raises(ValueError, match="not usable here"):
            set_attention_backend(model, "flash")


@pytest.mark.parametrize("name", ["unet-sd15", "sd3"])
def test_attention_backend_keeps_technique_processors(name):
    """`set_attention_backend` after a technique routes the technique's processors to the backend instead of
    replacing them with dense ones (`attnpack generate -t ... --attention-backend ...`)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from attnpack.attn_processors import set_attention_backend

    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model)
    layers = list_layers(model)
    with apply_processors(model, ScaledCore(1.5), layers=[0]) as technique:
        expected = forward(model, inputs)
        with set_attention_backend(model, "_native_math"):
            procs = model.attn_processors
            ours = forward(model, inputs)
            assert procs[f"{layers[0].name}.processor"] is technique.processors[f"{layers[0].name}.processor"]
            assert all(type(procs[f"{i.name}.processor"].core) is DenseCore for i in layers[1:])
            math = AttentionBackendName._NATIVE_MATH
            assert all(procs[f"{i.name}.processor"]._attention_backend == math for i in layers)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
        assert model.attn_processors[f"{layers[0].name}.processor"].core.factor == 1.5
