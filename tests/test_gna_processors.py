"""GNAAttnProcessor / apply_gna on tiny FLUX, SD3/SD3.5, Wan, HunyuanVideo and CogVideoX models."""

from __future__ import annotations

import pytest
import torch
from helpers import forward

import attnpack
from attnpack.attn_processors import apply_processors, list_layers
from attnpack.attn_processors.gna import GNAAttnProcessor, apply_gna, rescale_window
from attnpack.kernels.neighborhood import normalize_neighborhood_args
from attnpack.kernels.neighborhood.naive import neighborhood_mask
from attnpack.techniques import apply_techniques, get_technique, parse_options
from attnpack.toy.tiny import build_tiny_denoiser, build_tiny_pipeline, denoiser_inputs


FAMILIES = ["flux", "sd3", "sd35", "wan", "hunyuan_video", "cogvideox"]
GRIDS = {
    "flux": (4, 6),
    "sd3": (4, 6),
    "sd35": (4, 6),
    "wan": (2, 4, 6),
    "hunyuan_video": (2, 4, 6),
    "cogvideox": (3, 2, 2),
}


class OracleCore:
    """Dense attention with the GNA mask written out: text rows see everything, image rows see all text keys plus
    their brute-force neighborhood (and the model's own key-padding mask)."""

    def __init__(self, grid, window, stride=1, dilation=1, causal=False):
        self.spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)

    def __call__(self, q, k, v, call):
        lay = call.layout
        s = self.spec
        na = neighborhood_mask(s.grid, s.window, s.stride, s.dilation, s.causal)
        mask = torch.zeros(lay.num_queries, lay.num_keys, dtype=torch.bool)
        if lay.text is not None:
            mask[lay.text, :] = True
        if lay.key_text is not None:
            mask[lay.image, lay.key_text] = True
        mask[lay.image, lay.key_image] = na
        if call.mask is not None:
            mask = mask[None, None] & call.mask.bool()
        return call.dense(q, k, v, mask=mask)


def _inputs(name, model, batch_size=2):
    return denoiser_inputs(model, batch_size=batch_size, grid=GRIDS[name])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_full_window_leaves_outputs_unchanged(name, backend):
    model = build_tiny_denoiser(name)
    inputs = _inputs(name, model)
    stock = forward(model, inputs)
    with apply_gna(model, window_size=-1, backend=backend) as handle:
        ours = forward(model, inputs)
    assert handle.processors and all(isinstance(p, GNAAttnProcessor) for p in handle.processors.values())
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(forward(model, inputs), stock, atol=0, rtol=0)  # restored


SPARSE = {
    "flux": dict(window_size=(3, 3), stride=(1, 2)),
    "sd3": dict(window_size=(2, 5), dilation=(2, 1)),
    "sd35": dict(window_size=(3, 4), is_causal=(True, False)),
    "wan": dict(window_size=(-1, 3, 3), dilation=(1, 1, 2)),
    "hunyuan_video": dict(window_size=(2, 3, 3), stride=(1, 3, 1)),
    "cogvideox": dict(window_size=(2, 2, 2), is_causal=(True, False, False)),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_window_matches_dense_masked_oracle(name):
    model = build_tiny_denoiser(name)
    inputs = _inputs(name, model)
    stock = forward(model, inputs)
    cfg = SPARSE[name]
    grid = GRIDS[name]
    window = tuple(n if w == -1 else w for w, n in zip(cfg["window_size"], grid))
    oracle = OracleCore(grid, window, cfg.get("stride", 1), cfg.get("dilation", 1), cfg.get("is_causal", False))
    with apply_processors(model, oracle, kinds=("self", "joint", "single")):
        expect = forward(model, inputs)
    with apply_gna(model, **cfg):
        ours = forward(model, inputs)
    assert (expect - stock).abs().max() > 1e-4  # the window matters: the comparison can fail
    torch.testing.assert_close(ours, expect, atol=1e-5, rtol=0)


def test_wan_cross_attention_is_left_alone():
    model = build_tiny_denoiser("wan")
    with apply_gna(model, window_size=3) as handle:
        names = {k.rsplit(".processor", 1)[0] for k in handle.processors}
    assert names == {i.name for i in list_layers(model) if i.kind == "self"}


def test_single_frame_video_runs_dense():
    model = build_tiny_denoiser("wan")
    inputs = denoiser_inputs(model, grid=(1, 4, 6))
    stock = forward(model, inputs)
    with apply_gna(model, window_size=(2, 3, 3)):
        torch.testing.assert_close(forward(model, inputs), stock, atol=1e-5, rtol=0)


def test_dense_layers_keep_their_stock_processor():
    model = build_tiny_denoiser("flux")
    inputs = _inputs("flux", model)
    stock = forward(model, inputs)
    original = dict(model.attn_processors)
    with apply_gna(model, window_size=3, dense_layers=["transformer_blocks.0.attn", 1]) as handle:
        assert (
            model.attn_processors["transformer_blocks.0.attn.processor"]
            is original["transformer_blocks.0.attn.processor"]
        )
        assert list(handle.processors) == ["single_transformer_blocks.1.attn.processor"]
    with pytest.raises(ValueError, match="'gna' leaves no attention layer to install on"):  # a silent no-op (issue 19)
        apply_gna(model, window_size=3, dense_layers=".*")
    assert all(model.attn_processors[k] is original[k] for k in original)
    torch.testing.assert_close(forward(model, inputs), stock, atol=0, rtol=0)
    with pytest.raises(ValueError, match="`dense_layers` entry 'nope' matches no attention layer"):
        apply_gna(model, window_size=3, dense_layers="nope")


def _sparse_steps(monkeypatch, pipe, **kwargs):
    import attnpack.attn_processors.gna as mod
    from attnpack.kernels.neighborhood import neighborhood_attention_spec as original

    steps = []

    def spy(*args, **kw):
        steps.append(attnpack.current_run().step_index)
        return original(*args, **kw)

    monkeypatch.setattr(mod, "neighborhood_attention_spec", spy)
    with apply_gna(pipe, window_size=3, **kwargs):
        pipe("a cat", num_inference_steps=4, height=64, width=64, max_sequence_length=32, output_type="np")
    return sorted(set(steps))


def test_dense_steps_keep_the_first_steps_dense(monkeypatch):
    pipe = build_tiny_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    for dense_steps, expect in [(0, [0, 1, 2, 3]), (1, [1, 2, 3]), (0.5, [2, 3]), (0.3, [2, 3])]:
        assert _sparse_steps(monkeypatch, pipe, dense_steps=dense_steps) == expect, dense_steps


def test_dense_steps_fraction_needs_a_schedule():
    model = build_tiny_denoiser("flux")
    with apply_gna(model, window_size=3, dense_steps=0.5), pytest.raises(ValueError, match="fraction of the schedule"):
        forward(model, _inputs("flux", model))


def test_base_size_rescaling_follows_cosmos_rule():
    # Cosmos-Predict2 2B layer 0: window (-1, 12, 24), stride (1, 4, 8), base (-1, 44, 80)
    w, s = (-1, 12, 24), (1, 4, 8)
    assert rescale_window((24, 88, 160), w, s, (-1, 44, 80)) == ((24, 24, 48), (1, 8, 16))
    assert rescale_window((8, 11, 20), w, s, (-1, 44, 80)) == ((8, 3, 6), (1, 1, 2))
    # w' = min(max(2, round(w x / b)), x): floor at 2, capped at the axis; s' capped at w'
    assert rescale_window((4, 100), (12, 90), (4, 90), (44, 80)) == ((2, 100), (1, 100))
    assert rescale_window((7, 9), (3, 4), (3, 2), None) == ((3, 4), (3, 2))


def test_base_size_applies_at_call_time():
    """A window given for a 8x12 grid runs on the actual 4x6 grid as the halved window (oracle check)."""
    model = build_tiny_denoiser("flux")
    inputs = _inputs("flux", model)
    with apply_processors(model, OracleCore((4, 6), (3, 3), (1, 2)), kinds=("joint", "single")):
        expect = forward(model, inputs)
    with apply_gna(model, window_size=(6, 6), stride=(2, 4), base_size=(8, 12)):
        torch.testing.assert_close(forward(model, inputs), expect, atol=1e-5, rtol=0)


def test_errors():
    flux = build_tiny_denoiser("flux")
    with pytest.raises(ValueError, match="GNA supports the families"):
        apply_gna(build_tiny_denoiser("unet-sd15"), window_size=3)
    with pytest.raises(
        ValueError,
        match=r"`window_size` must be an int or a tuple of ints, one per axis of the model.s token grid \(2 here\)",
    ):
        apply_gna(flux, window_size=(3, 3, 3))
    with pytest.raises(ValueError, match=r"`window_size` must be >= 2 \(or -1 for the full axis\)"):
        apply_gna(flux, window_size=1)
    with pytest.raises(ValueError, match="`dense_steps` as a float is a fraction"):
        apply_gna(flux, window_size=3, dense_steps=2.5)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        apply_gna(flux, window_size=3, backend="cuda")
    with apply_gna(flux, window_size=9), pytest.raises(ValueError, match=r"token grid \(4, 6\).*window_size=\(9, 9\)"):
        forward(flux, _inputs("flux", flux))


def test_registered_technique_options_are_apply_gna_keywords():
    import inspect

    tech = get_technique("gna")
    params = set(inspect.signature(apply_gna).parameters) - {"pipe_or_model"}
    assert {o.name for o in tech.options} == params
    opts = parse_options(
        tech, {"window_size": "5,7", "stride": "1,2", "is_causal": "false", "dense_steps": "0.25", "base_size": "8,12"}
    )
    assert opts == {
        "window_size": (5, 7),
        "stride": (1, 2),
        "is_causal": False,
        "dense_steps": 0.25,
        "base_size": (8, 12),
    }
    assert parse_options(tech, {"dense_steps": "2"})["dense_steps"] == 2


def test_technique_applies_by_name_on_a_pipeline():
    pipe = build_tiny_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="np")
    stock = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    with apply_techniques(pipe, [("gna", {"window_size": "-1"})]):
        same = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    with apply_techniques(pipe, [("gna", {"window_size": "3", "stride": "2"})]):
        sparse = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(same - stock).max() < 1e-5
    assert abs(sparse - stock).max() > 1e-4


def test_public_names():
    assert attnpack.apply_gna is apply_gna
    assert attnpack.GNAAttnProcessor is GNAAttnProcessor
    from attnpack.kernels import neighborhood_attention

    assert attnpack.neighborhood_attention is neighborhood_attention


def test_default_window_is_half_of_each_axis():
    """Issue 21: apply_gna(pipe) runs without settings: the window is about half of each axis of the actual grid
    (odd, at least 3), the same as giving that window explicitly."""
    from attnpack.attn_processors.gna import auto_window

    assert [auto_window(n) for n in (4, 6, 8, 9, 16, 64, 128)] == [3, 3, 5, 5, 9, 33, 65]
    model = build_tiny_denoiser("flux")
    inputs = _inputs("flux", model)  # grid (4, 6)
    stock = forward(model, inputs)
    with apply_gna(model) as handle:
        auto = forward(model, inputs)
        assert "window_size=auto" in repr(next(iter(handle.processors.values())).core)
    with apply_gna(model, window_size=(3, 3)):
        explicit = forward(model, inputs)
    torch.testing.assert_close(auto, explicit, atol=0, rtol=0)
    assert (auto - stock).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"`window_size` must be >= 2"):
        apply_gna(model, window_size=0)  # 0 given by a user is no window: only None means the default


def test_a_window_covering_the_grid_is_reported(caplog):
    """Issue 21: a GNA window as large as the grid changes nothing there; it says so instead of passing silently."""
    model = build_tiny_denoiser("flux")
    inputs = _inputs("flux", model)  # grid (4, 6)
    with caplog.at_level("WARNING"), apply_gna(model, window_size=-1):
        forward(model, inputs)
    assert "covers the whole token grid (4, 6): attention stays dense here (no effect)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), apply_gna(model, window_size=3):
        forward(model, inputs)
    assert "covers the whole token grid" not in caplog.text
