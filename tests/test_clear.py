"""CLEAR on FLUX: stock parity at full radius, an oracle processor, official-format checkpoints, restore, registry."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from clear_oracle import OracleCore
from helpers import forward
from safetensors.torch import save_file

import attnpack
from attnpack.attn_processors import apply_processors
from attnpack.attn_processors.clear_weights import CLEAR_PARAM_PATTERNS, save_clear_checkpoint
from attnpack.toy.tiny import build_tiny_denoiser, build_tiny_pipeline, denoiser_inputs, tiny_flux_transformer


def official_checkpoint(model, down_factor=1, seed=0, layers=None) -> dict[str, torch.Tensor]:
    """A checkpoint in the official key format, written the way the official distill.py selects parameters."""
    g = torch.Generator().manual_seed(seed)
    state = {
        name: torch.randn(p.shape, generator=g).to(torch.bfloat16)
        for name, p in model.named_parameters()
        if any(pat in name for pat in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out."))
    }
    if down_factor > 1:
        for name in layers or [k[: -len(".processor")] for k in model.attn_processors]:
            d = down_factor
            state[f"{name}.processor.spatial_weight"] = torch.rand(1, 1, 1, d, 1, d, 1, generator=g).to(torch.bfloat16)
    return state


def _save(tmp_path, state, name="ckpt.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


# ------------------------------------------------------------------------------------------------- parity
def test_full_radius_reproduces_stock_flux():
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, grid=(5, 6), text_len=7, batch_size=2)
    ref = forward(model, inputs)
    with attnpack.apply_clear(model, radius=7, backend="reference") as handle:  # 7^2 = 49 > 4^2 + 5^2
        assert all(type(p).__name__ == "ClearAttnProcessor" for p in model.attn_processors.values())
        out = forward(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert handle.removed
    with attnpack.apply_clear(model, radius=6):  # 36 < 41: no longer everything
        assert (forward(model, inputs) - ref).abs().max() > 1e-4


def test_full_radius_pipeline_reproduces_stock_images():
    pipe = build_tiny_pipeline("tiny-flux")
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np", max_sequence_length=8)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    with attnpack.apply_clear(pipe, radius=6):  # 64 px -> 4 x 4 tokens
        out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert abs(out - ref).max() < 1e-5


@pytest.mark.parametrize("radius,d,proportional", [(2, 1, False), (3, 1, True), (2, 2, False), (1, 3, True)])
def test_processor_equals_oracle(radius, d, proportional):
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, grid=(6, 9) if d == 3 else (6, 8), text_len=5, batch_size=2)
    with attnpack.apply_clear(model, radius=radius, down_factor=d, proportional_attention=proportional) as handle:
        pooling = handle.clear.pooling
        weights = {}
        if d > 1:
            assert all(torch.equal(w, torch.full_like(w, 1 / d**2)) for w in pooling.weights)  # init: average
            with torch.no_grad():
                for w in pooling.weights:
                    w.uniform_()
            weights = {name: pooling.weight(name).detach() for name in pooling.layer_names}
        out = forward(model, inputs)
    with apply_processors(model, OracleCore(radius, d, weights, proportional)):
        ref = forward(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - forward(model, inputs)).abs().max() > 1e-4  # differs from stock FLUX


def test_switching_resolutions_back_and_forth():
    model = build_tiny_denoiser("flux")
    grids = [(4, 6), (6, 4), (4, 6), (5, 5)]
    refs = []
    for grid in grids:
        with apply_processors(model, OracleCore(2)):
            refs.append(forward(model, denoiser_inputs(model, grid=grid)))
    with attnpack.apply_clear(model, radius=2) as handle:
        for grid, ref in zip(grids, refs):
            torch.testing.assert_close(forward(model, denoiser_inputs(model, grid=grid)), ref, atol=1e-5, rtol=0)
        assert handle.clear.cache.builds == 3 and len(handle.clear.cache) == 3


def test_nothing_leaks_into_the_state_dict_and_remove_restores():
    model = build_tiny_denoiser("flux")
    keys = set(model.state_dict())
    original = model.attn_processors
    handle = attnpack.apply_clear(model, radius=2, down_factor=2)
    assert set(model.state_dict()) == keys and len(handle.clear.pooling.weights) == 3
    handle.remove()
    assert all(model.attn_processors[k] is original[k] for k in original)


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("d", [1, 2])
def test_official_checkpoint_changes_exactly_the_listed_parameters(tmp_path, d):
    model = build_tiny_denoiser("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = official_checkpoint(model, d)
    path = _save(tmp_path, state)
    inputs = denoiser_inputs(model, grid=(4, 6), text_len=5)
    handle = attnpack.apply_clear(model, radius=2, down_factor=d, weights=path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    listed = {k for k in state if not k.endswith("spatial_weight")}
    assert changed == listed and len(listed) == 4 * 2 + 2 * 3 * 2  # double: q k v out; 2 singles: q k v (w + b)
    for k in listed:
        assert torch.equal(after[k], state[k].float())
    assert handle.clear.report.missing == [] and sorted(handle.clear.report.loaded) == sorted(state)
    if d > 1:
        for name in handle.clear.pooling.layer_names:
            assert torch.equal(handle.clear.pooling.weight(name), state[f"{name}.processor.spatial_weight"].float())
    out = forward(model, inputs)
    handle.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit-exact restore

    # the official procedure: load_state_dict(strict=False) onto a copy, then the same attention
    official = copy.deepcopy(model)
    result = official.load_state_dict({k: v for k, v in state.items() if k in listed}, strict=False)
    assert result.unexpected_keys == []
    weights = {k[: -len(".processor.spatial_weight")]: v.float() for k, v in state.items() if "spatial" in k}
    with apply_processors(official, OracleCore(2, d, weights)):
        ref = forward(official, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_missing_keys_are_reported(tmp_path, caplog):
    model = build_tiny_denoiser("flux")
    state = official_checkpoint(model)
    dropped = sorted(k for k in state if k.startswith("single_transformer_blocks.1."))
    path = _save(tmp_path, {k: v for k, v in state.items() if k not in dropped})
    with caplog.at_level(logging.WARNING):
        handle = attnpack.apply_clear(model, weights=path)
    assert sorted(handle.clear.report.missing) == dropped
    assert "lack 6 keys" in caplog.text
    handle.remove()


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    model = build_tiny_denoiser("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from diffusers import FluxTransformer2DModel

    smaller = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    other_size = official_checkpoint(smaller)
    more_blocks = official_checkpoint(tiny_flux_transformer(num_layers=2))
    cases = [
        (other_size, 1, "different model size: .*checkpoint \\(16,\\) vs transformer \\(32,\\)"),
        (more_blocks, 1, "keys this FLUX transformer's CLEAR weights do not have: transformer_blocks.1.attn"),
        (official_checkpoint(model, 4), 1, "trained with down_factor=4; pass down_factor=4"),
        (official_checkpoint(model, 1), 2, "has no pooling weights .* trained with down_factor=1"),
        (official_checkpoint(model, 2), 4, "pooling weights for d=\\[2\\], but down_factor=4"),
        ({"proj_out.weight": model.proj_out.weight.detach().clone()}, 1, "other parameters of this transformer"),
    ]
    for state, d, match in cases:
        with pytest.raises(ValueError, match=match):
            attnpack.apply_clear(model, down_factor=d, weights=_save(tmp_path, state))
    with pytest.raises(ValueError, match="does not exist"):
        attnpack.apply_clear(model, weights=tmp_path / "nope.safetensors")
    # nothing was changed by the failed calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in model.attn_processors.values())


def test_fused_projections_are_refused(tmp_path):
    model = build_tiny_denoiser("flux")
    path = _save(tmp_path, official_checkpoint(model))
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        attnpack.apply_clear(model, weights=path)


def test_saved_checkpoint_uses_the_official_keys_and_reloads(tmp_path):
    model = build_tiny_denoiser("flux")
    with attnpack.apply_clear(model, radius=2, down_factor=2) as handle:
        with torch.no_grad():
            for w in handle.clear.pooling.weights:
                w.uniform_()
        path = save_clear_checkpoint(tmp_path / "w.safetensors", model, handle.clear.pooling, metadata={"radius": 2})
        pooled = {n: handle.clear.pooling.weight(n).detach().clone() for n in handle.clear.pooling.layer_names}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["radius"] == "2" and f.metadata()["format"] == "clear"
    expect = {n for n, _ in model.named_parameters() if any(p in n for p in CLEAR_PARAM_PATTERNS)}
    expect |= {f"{n}.processor.spatial_weight" for n in pooled}
    assert keys == expect
    with attnpack.apply_clear(model, radius=2, down_factor=2, weights=path) as handle:
        assert all(torch.equal(handle.clear.pooling.weight(n), w) for n, w in pooled.items())


# ------------------------------------------------------------------------------------------------- API
def test_argument_errors():
    model = build_tiny_denoiser("flux")
    for kwargs, match in [
        (dict(radius=0), r"`radius` must be an integer in 1\.\.4096, got radius=0"),
        (dict(radius=100000), r"`radius` must be an integer in 1\.\.4096, got radius=100000"),
        (dict(radius=2.5), r"`radius` must be an integer in 1\.\.4096, got radius=2\.5"),
        (dict(down_factor=0), r"`down_factor` must be an integer in 1\.\.64"),
        (dict(backend="cuda"), "`backend` must be one of"),
        (dict(q_tile=(0, 4)), "`q_tile`"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            attnpack.apply_clear(model, **kwargs)
    with pytest.raises(ValueError, match="FLUX.1 transformers .* only, got SD3Transformer2DModel"):
        attnpack.apply_clear(build_tiny_denoiser("sd3"))
    with attnpack.apply_clear(model, radius=2, down_factor=2):
        with pytest.raises(ValueError, match="must divide the image token grid"):
            forward(model, denoiser_inputs(model, grid=(3, 4)))


def test_registered_technique_and_cli(tmp_path):
    from attnpack.cli import main
    from attnpack.techniques import get_technique

    tech = get_technique("clear")
    assert [o.name for o in tech.options] == ["radius", "down_factor", "weights", "proportional_attention", "backend"]
    out = tmp_path / "c.png"
    args = ["generate", "-m", "tiny-flux", "-p", "cat", "--steps", "2", "-t", "clear"]
    args += ["--opt", "radius=2", "--opt", "down_factor=2"]
    assert main([*args, "-o", str(out)]) == 0
    params = attnpack.read_parameters(out)
    assert params["techniques"] == [{"name": "clear", "radius": 2, "down_factor": 2}]
    assert params["processors"] == {"ClearAttnProcessor[ClearCore(radius=2, down_factor=2)]": 3}


def test_default_radius_is_sized_to_the_grid(caplog):
    """Issue 21: radius unset = a quarter of the grid's shorter side, at least 4 (16 at FLUX 1024 px, the official
    default); a radius covering the whole grid says so once (it changes nothing there)."""
    from attnpack.attn_processors.clear import auto_radius

    assert [auto_radius((h, w)) for h, w in ((8, 8), (64, 64), (64, 128), (128, 96))] == [4, 16, 16, 24]
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, grid=(8, 8))
    stock = forward(model, inputs)
    with attnpack.apply_clear(model):
        auto = forward(model, inputs)
    with attnpack.apply_clear(model, radius=4):
        explicit = forward(model, inputs)
    torch.testing.assert_close(auto, explicit, atol=0, rtol=0)
    assert (auto - stock).abs().max() > 1e-4
    with caplog.at_level("WARNING"), attnpack.apply_clear(model, radius=16):
        forward(model, inputs)
    assert "CLEAR radius=16 covers the whole 8x8 token grid: attention stays dense here (no effect)" in caplog.text
