"""Head perturbation core: math against explicit attention matrices, head specs, layer indices, processors."""

import pytest
import torch
from head_reference import reference_perturbed_attention
from helpers import forward

from attnpack.attn_processors import AttentionCall, apply_processors, list_layers
from attnpack.attn_processors.families import TokenLayout, dense_attention
from attnpack.attn_processors.head_perturbation import (
    KINDS,
    TOKEN_SCOPES,
    HeadPerturbationCore,
    blend_heads,
    format_heads,
    install_head_perturbation,
    parse_heads,
    perturbable_layers,
    resolve_heads,
)
from attnpack.presets import PRESETS, get_preset, list_presets
from attnpack.toy.tiny import build_tiny_denoiser, denoiser_inputs, tiny_sd3_transformer


def _qkv(b, h, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scope", TOKEN_SCOPES)
@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("text_first", [False, True])
def test_blend_matches_explicit_matrices(kind, scope, u, text_first):
    n_img, n_txt = 11, 6  # odd sizes; image first (SD3) or text first (FLUX)
    q, k, v = _qkv(2, 3, n_img + n_txt, 16, seed=n_img)
    layout = TokenLayout.joint(n_img, n_txt, (1, n_img), text_first=text_first)
    out = dense_attention(q, k, v)
    ours = blend_heads(out, q, k, v, layout, u, kind, scope)
    ref = reference_perturbed_attention(q, k, v, image=layout.image, text=layout.text, u=u, kind=kind, scope=scope)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scope", TOKEN_SCOPES)
def test_blend_with_key_padding_mask(kind, scope):
    """The model's own mask (bool key padding on text tokens) reaches every target computation."""
    n_img, n_txt = 9, 5
    q, k, v = _qkv(2, 2, n_img + n_txt, 8, seed=1)
    layout = TokenLayout.joint(n_img, n_txt, None, text_first=False)
    mask = torch.ones(2, 1, 1, n_img + n_txt, dtype=torch.bool)
    mask[0, ..., -2:] = False
    out = dense_attention(q, k, v, mask)
    ours = blend_heads(out, q, k, v, layout, 0.7, kind, scope, mask=mask)
    ref = reference_perturbed_attention(
        q, k, v, image=layout.image, text=layout.text, u=0.7, kind=kind, scope=scope, mask=mask
    )
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_blend_in_query_chunks_with_query_dependent_text_mask(kind, monkeypatch):
    """Image-scope targets are computed QUERY_CHUNK image queries at a time; a per-query mask on text keys is used."""
    import attnpack.attn_processors.head_perturbation as hp

    monkeypatch.setattr(hp, "QUERY_CHUNK", 4)
    n_img, n_txt = 11, 7
    q, k, v = _qkv(2, 3, n_img + n_txt, 8, seed=7)
    layout = TokenLayout.joint(n_img, n_txt, None, text_first=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 1, n_img + n_txt, n_img + n_txt, dtype=torch.bool)
    mask[..., layout.text] = torch.rand(2, 1, n_img + n_txt, n_txt, generator=g) > 0.4
    out = dense_attention(q, k, v, mask)
    for scope in TOKEN_SCOPES:
        ours = blend_heads(out, q, k, v, layout, 0.8, kind, scope, mask=mask)
        ref = reference_perturbed_attention(
            q, k, v, image=layout.image, text=layout.text, u=0.8, kind=kind, scope=scope, mask=mask
        )
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_self_attention_layout_ignores_scope(kind):
    q, k, v = _qkv(1, 2, 13, 8, seed=2)
    layout = TokenLayout.self_attention(13, None)
    out = dense_attention(q, k, v)
    full = blend_heads(out, q, k, v, layout, 0.6, kind, "full")
    image = blend_heads(out, q, k, v, layout, 0.6, kind, "image")
    ref = reference_perturbed_attention(q, k, v, u=0.6, kind=kind)
    torch.testing.assert_close(full, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(image, full, atol=0, rtol=0)


def test_blend_reference_detects_a_wrong_target():
    """The oracle is sharp: identity and uniform targets differ, and image scope differs from full on joint layers."""
    q, k, v = _qkv(1, 2, 12, 8, seed=3)
    layout = TokenLayout.joint(8, 4, None, text_first=True)
    out = dense_attention(q, k, v)
    a = blend_heads(out, q, k, v, layout, 1.0, "identity", "full")
    b = reference_perturbed_attention(q, k, v, image=layout.image, text=layout.text, kind="identity", scope="image")
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blend_half_precision_as_accurate_as_sdpa(dtype):
    """In half precision the perturbed heads are as close to the float64 reference as plain SDPA output is."""
    q, k, v = (2 * x for x in _qkv(1, 4, 400, 64, seed=4))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    layout = TokenLayout.joint(300, 100, None, text_first=False)
    out = dense_attention(q, k, v)
    sdpa_error = (out.float() - reference_perturbed_attention(q, k, v, u=0.0).float()).abs().max()
    for kind in KINDS:
        ours = blend_heads(out, q, k, v, layout, 0.5, kind, "image")
        ref = reference_perturbed_attention(
            q, k, v, image=layout.image, text=layout.text, u=0.5, kind=kind, scope="image"
        )
        assert ours.dtype == dtype
        assert (ours.float() - ref.float()).abs().max() <= 2 * sdpa_error


class _NoBackend:
    _attention_backend = None
    _parallel_config = None


def test_core_perturbs_only_selected_heads_and_rows():
    from attnpack.attn_processors.context import RunState

    q, k, v = _qkv(3, 4, 10, 8, seed=5)
    layout = TokenLayout.self_attention(10, None)
    run = RunState(family="unet", batch_size=3, roles=("uncond", "cond", "perturbed"))
    call = AttentionCall(None, None, layout, None, run, _NoBackend())
    out = HeadPerturbationCore([1, 3], softness=1.0)(q, k, v, call)
    dense = dense_attention(q, k, v)
    torch.testing.assert_close(out[:2], dense[:2], atol=0, rtol=0)
    torch.testing.assert_close(out[2, [0, 2]], dense[2, [0, 2]], atol=0, rtol=0)
    torch.testing.assert_close(out[2, [1, 3]], v[2, [1, 3]], atol=0, rtol=0)
    everything = HeadPerturbationCore([0], softness=1.0, rows="all")(q, k, v, call)
    torch.testing.assert_close(everything[:, 0], v[:, 0], atol=0, rtol=0)
    # non-contiguous rows and heads, soft blend, against the explicit reference
    run = RunState(family="unet", batch_size=3, roles=("perturbed", "cond", "perturbed"))
    call = AttentionCall(None, None, layout, None, run, _NoBackend())
    soft = HeadPerturbationCore([0, 2, 3], softness=0.3, kind="uniform")(q, k, v, call)
    ref = reference_perturbed_attention(q, k, v, u=0.3, kind="uniform")
    torch.testing.assert_close(soft[[0, 2]][:, [0, 2, 3]], ref[[0, 2]][:, [0, 2, 3]], atol=1e-6, rtol=0)
    torch.testing.assert_close(soft[1], dense[1], atol=0, rtol=0)
    torch.testing.assert_close(soft[[0, 2], 1], dense[[0, 2], 1], atol=0, rtol=0)


def test_core_keeps_autograd_working():
    from attnpack.attn_processors.context import RunState

    q, k, v = (x.requires_grad_() for x in _qkv(2, 2, 6, 4, seed=6))
    run = RunState(family="unet", batch_size=2, roles=("cond", "perturbed"))
    call = AttentionCall(None, None, TokenLayout.self_attention(6, None), None, run, _NoBackend())
    with torch.enable_grad():
        HeadPerturbationCore([1], softness=0.5, kind="query_mean")(q, k, v, call).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------------------------------------- head specs
def test_parse_heads_forms():
    assert parse_heads("L1H10") == [(1, 10)]
    assert parse_heads(["L1H10", "l13", (2, 3), 4]) == [(1, 10), (13, None), (2, 3), (4, None)]
    assert parse_heads("L1H10, L2H0;L3") == [(1, 10), (2, 0), (3, None)]
    assert parse_heads("sd3-medium/dark") == [(1, 2), (1, 10)]


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ([], ValueError, "empty"),
        ("H1L2", ValueError, "L<layer>H<head>"),
        ("sd3/unknown", ValueError, "preset"),
        ([(1, 2, 3)], TypeError, "pair"),
        ([True], TypeError, "not a head"),
        (1.5, TypeError, "`heads`"),
    ],
)
def test_parse_heads_errors(spec, error, message):
    with pytest.raises(error, match=message):
        parse_heads(spec)


def test_resolve_heads_checks_counts():
    model = build_tiny_denoiser("sd3")  # 2 joint layers x 4 heads
    assert resolve_heads(model, ["L1H2", "L0", (1, 0)]) == {
        "transformer_blocks.0.attn": [0, 1, 2, 3],
        "transformer_blocks.1.attn": [0, 2],
    }
    with pytest.raises(ValueError, match=r"layer 2, but this SD3Transformer2DModel has 2 perturbable layers \(0..1"):
        resolve_heads(model, "L2H0")
    with pytest.raises(ValueError, match=r"head 4 of layer 1 \(transformer_blocks.1.attn\), which has 4 heads"):
        resolve_heads(model, "L1H4")
    with pytest.raises(ValueError, match="perturbable layers"):
        resolve_heads(model, "L-1H0")
    with pytest.raises(ValueError, match="head perturbation supports"):
        perturbable_layers(build_tiny_denoiser("cogvideox"))


def test_layer_index_per_family():
    """HeadHunter's layer index: SD3 joint blocks (SD3.5 attn2 excluded), FLUX global index, UNet attn1, Wan attn1."""
    sd35 = [i.name for i in perturbable_layers(build_tiny_denoiser("sd35"))]
    assert sd35 == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    flux = [i.name for i in perturbable_layers(build_tiny_denoiser("flux"))]
    assert flux == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    unet = perturbable_layers(build_tiny_denoiser("unet-sd15"))
    assert [i.name.rsplit(".", 1)[-1] for i in unet] == ["attn1"] * 4
    assert unet[3].name == "mid_block.attentions.0.transformer_blocks.0.attn1"
    wan = [i.name for i in perturbable_layers(build_tiny_denoiser("wan"))]
    assert wan == ["blocks.0.attn1", "blocks.1.attn1"]


def test_no_regex_pitfalls_with_many_blocks():
    """Layer 1 is transformer_blocks.1 only (diffusers' `blocks.1` regex also matches blocks.10 and .11)."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_config({**tiny_sd3_transformer().config, "num_layers": 12})
    with install_head_perturbation(model, "L1") as handle:
        assert list(handle.processors) == ["transformer_blocks.1.attn.processor"]
        assert handle.heads == ["L1H0", "L1H1", "L1H2", "L1H3"]
    assert format_heads(model, resolve_heads(model, "L10H1,L1H0")) == ["L1H0", "L10H1"]


def test_presets_are_valid_for_their_models():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for preset in PRESETS.values():
        if preset.model == "toy-flux":  # attnpack's own search: 6 layers x 4 heads, the script and its result named
            assert preset.heads and all(0 <= layer < 6 and 0 <= head < 4 for layer, head in preset.heads)
            assert all((root / part.strip()).is_file() for part in preset.source.split(","))
            continue
        n_layers = 24 if preset.model.endswith("stable-diffusion-3-medium-diffusers") else 57
        assert preset.heads and all(0 <= layer < n_layers and 0 <= head < 24 for layer, head in preset.heads)
        assert preset.meaning and preset.source.startswith("Fig.")
    assert get_preset("flux-dev/golden-hour").spec == ["L38H18"]
    assert {p.name for p in list_presets("sd3-medium")} == {n for n in PRESETS if n.startswith("sd3-medium/")}
    with pytest.raises(ValueError, match="Unknown head preset"):
        get_preset("nope")


# ------------------------------------------------------------------------------------------------- processors
class ExplicitHeadCore:
    """Reference core: explicit attention matrices on every row for the given heads (tests only)."""

    def __init__(self, heads, u, kind, scope):
        self.heads, self.u, self.kind, self.scope = heads, u, kind, scope

    def __call__(self, q, k, v, call):
        out = call.dense(q, k, v).clone()
        lay = call.layout
        ref = reference_perturbed_attention(
            q[:, self.heads],
            k[:, self.heads],
            v[:, self.heads],
            image=lay.image,
            text=lay.text,
            u=self.u,
            kind=self.kind,
            scope=self.scope,
            mask=call.mask,
        )
        out[:, self.heads] = ref
        return out


@pytest.mark.parametrize(
    "name, spec, kind, scope",
    [
        ("unet-sd15", "L3H1,L3H5", "identity", "full"),
        ("unet-sdxl", "L1H0", "uniform", "image"),
        ("sd3", "L0H1,L1H3", "identity", "image"),
        ("sd35", "L1H2", "query_mean", "full"),
        ("flux", "L0H1,L2H0", "uniform", "image"),
        ("flux", "L1", "identity", "full"),
        ("wan", "L1H1", "query_mean", "image"),
    ],
)
def test_processors_match_explicit_reference_on_denoisers(name, spec, kind, scope):
    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model, batch_size=2, grid=(4, 6) if name not in ("wan",) else (2, 2, 4), text_len=5)
    stock = forward(model, inputs)
    resolved = resolve_heads(model, spec)
    with install_head_perturbation(model, spec, 0.6, kind, scope, rows="all"):
        ours = forward(model, inputs)
    with apply_processors(
        model, lambda info: ExplicitHeadCore(resolved[info.name], 0.6, kind, scope) if info.name in resolved else None
    ):
        ref = forward(model, inputs)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    assert (ours - stock).abs().max() > 1e-4  # the perturbation does something
    torch.testing.assert_close(forward(model, inputs), stock, atol=0, rtol=0)  # restored


@pytest.mark.parametrize("name", ["unet-sd15", "sd35", "flux", "wan"])
def test_neutral_settings_reproduce_stock(name):
    model = build_tiny_denoiser(name)
    inputs = denoiser_inputs(model, batch_size=2)
    stock = forward(model, inputs)
    n = len(perturbable_layers(model))
    spec = [f"L{i}" for i in range(n)]
    with install_head_perturbation(model, spec, softness=0.0, rows="all"):
        torch.testing.assert_close(forward(model, inputs), stock, atol=0, rtol=0)
    with install_head_perturbation(model, spec, softness=1.0):  # no row is marked perturbed
        torch.testing.assert_close(forward(model, inputs), stock, atol=0, rtol=0)
    assert len(list_layers(model)) >= n
