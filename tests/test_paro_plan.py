"""ParoPlan files: bit-packed masks, safetensors round trip, metadata checks, atomic writes, timestep buckets."""

from __future__ import annotations

import os

import pytest
import torch

from attnpack.pipelines.paro_plan import (
    ParoPlan,
    config_hash,
    mask_bits_for,
    pack_codes,
    pack_mask_rows,
    schedule_bucket,
    timestep_bucket,
    unpack_codes,
)
from attnpack.toy.tiny import build_tiny_denoiser, tiny_cogvideox_transformer


def make_plan(model=None, *, grid=(3, 4, 4), text_len=8, block_size=4, heads=2, layers=("a", "b"), seed=0, **kw):
    """A plan with random orders and random nested mask codes (no calibration)."""
    g = torch.Generator().manual_seed(seed)
    n_text = -(-text_len // block_size)
    n_grid = grid[0] * grid[1] * (grid[2] if len(grid) == 3 else 1)
    t = -(-(text_len + n_grid) // block_size) if kw.get("tiling") == "joint" else n_text + -(-n_grid // block_size)
    densities = kw.pop("densities", (0.3, 0.5))
    steps = kw.pop("num_inference_steps", 4)
    buckets = kw.pop("timestep_buckets", 2)
    n_orders = 6 if len(grid) == 3 else 2
    fields = dict(
        model_class=type(model).__name__ if model is not None else "Toy",
        config_hash=config_hash(model) if model is not None else "0" * 16,
        family="cogvideox",
        grid=grid,
        text_len=text_len,
        text_first=True,
        num_inference_steps=steps,
        block_size=block_size,
        densities=densities,
        density=densities[0],
        timestep_buckets=buckets,
        layers=layers,
        heads=heads,
        orders=torch.randint(0, n_orders, (len(layers), heads), generator=g),
    )
    n_buckets = buckets if kw.get("schedule") == "uniform" else buckets + 1
    codes = torch.randint(0, len(densities) + 1, (n_buckets, len(layers), heads, t, t), generator=g)
    fields["mask_bits"] = mask_bits_for(len(densities))
    fields["masks"] = pack_mask_rows(codes.to(torch.uint8), fields["mask_bits"])
    fields.update(kw)
    return ParoPlan(**fields)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_codes_round_trip_and_layout(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 7), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    packed = pack_codes(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes.to(torch.uint8))
    # least significant first: the first byte holds codes 0.. (8 // bits - 1)
    per = 8 // bits
    first = sum(int(c) << (i * bits) for i, c in enumerate(codes.flatten()[:per]))
    assert int(packed[0]) == first


def test_save_load_round_trip(tmp_path):
    plan = make_plan(info={"prompts": ["a cat"], "note": 1}, order_metrics=torch.rand(2, 2, 6, 2))
    path = plan.save(tmp_path / "plan.safetensors")
    assert os.listdir(tmp_path) == ["plan.safetensors"]  # no temp files
    loaded = ParoPlan.load(path)
    for field in ("model_class", "config_hash", "grid", "text_len", "text_first", "block_size", "densities"):
        assert getattr(loaded, field) == getattr(plan, field)
    assert loaded.layers == plan.layers and loaded.info == plan.info and loaded.quant == plan.quant
    assert torch.equal(loaded.orders, plan.orders) and torch.equal(loaded.mask_codes(), plan.mask_codes())
    torch.testing.assert_close(loaded.order_metrics, plan.order_metrics)
    # two density levels -> 2 bits per block on disk
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["mask_bits"] == "2"
        assert plan.num_blocks == 2 + 12  # 8 text tokens and 48 grid tokens in blocks of 4
        assert fh.get_tensor("masks").shape == (3, 2, 2 * 14 * 14 // 4)  # 3 buckets, 2 layers, 4 codes per byte


def test_masks_levels_and_density():
    plan = make_plan()
    codes = plan.mask_codes()[1, 0]
    assert torch.equal(plan.codes(1, 0), codes)
    assert torch.equal(plan.mask(1, 0, 0.3), codes <= 0)
    assert torch.equal(plan.mask(1, 0, 0.5), codes <= 1)
    assert bool(plan.mask(1, 0, 1.0).all())
    assert torch.equal(plan.mask(1, 0), plan.mask(1, 0, 0.3))  # default density
    assert plan.achieved_density(1.0) == 1.0
    assert plan.achieved_density(0.3) == pytest.approx((plan.mask_codes() == 0).float().mean().item())
    with pytest.raises(ValueError, match="not stored in this plan"):
        plan.mask(0, 0, 0.2)
    with pytest.raises(TypeError, match="density"):
        plan.level("0.3")


def test_timestep_buckets():
    # the paper's schedule: distinct masks for the first half, one shared for the later half
    assert [timestep_bucket(s, 30, 15) for s in range(30)] == list(range(15)) + [15] * 15
    assert [timestep_bucket(s, 8, 2) for s in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [timestep_bucket(s, 5, 2) for s in range(5)] == [0, 1, 2, 2, 2]
    assert [timestep_bucket(s, 4, 0) for s in range(4)] == [0] * 4  # no early buckets: all shared (bucket 0)
    # another schedule length is mapped by progress
    assert [schedule_bucket(s, 16, 8, 2) for s in range(16)] == [0] * 4 + [1] * 4 + [2] * 8


def test_load_rejects_other_files_and_damage(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an attnpack PARO plan"):
        ParoPlan.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="safetensors"):
        ParoPlan.load(junk)
    with pytest.raises(ValueError, match="PARO plan .*missing.safetensors' does not exist"):
        ParoPlan.load(tmp_path / "missing.safetensors")
    plan = make_plan()
    path = plan.save(tmp_path / "plan.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    meta["grid"] = "[3, 4, 6]"  # inconsistent with the stored masks
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="masks must be packed rows"):
        ParoPlan.load(path)
    meta.pop("layers")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="damaged"):
        ParoPlan.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "plan.safetensors"
    path.write_bytes(b"precious")
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        make_plan().save(path)
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["plan.safetensors"]


def test_inconsistent_plans_are_rejected():
    with pytest.raises(ValueError, match="orders"):
        make_plan(orders=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="orders must lie"):
        make_plan(orders=torch.full((2, 2), 6))
    with pytest.raises(ValueError, match="densities"):
        make_plan(densities=(0.5, 0.3))
    with pytest.raises(ValueError, match="density"):
        make_plan(density=0.4)


def test_check_model_and_layout_errors():
    model = build_tiny_denoiser("cogvideox")
    plan = make_plan(model, layers=("transformer_blocks.0.attn1",))
    plan.check_model(model)
    with pytest.raises(ValueError, match="config hash"):
        plan.check_model(tiny_cogvideox_transformer(text_dim=16))
    with pytest.raises(ValueError, match="calibrated on a CogVideoX"):
        plan.check_model(build_tiny_denoiser("wan"))
    plan.check_layout((3, 4, 4), 8, True)
    with pytest.raises(ValueError, match="calibrate a plan for this resolution"):
        plan.check_layout((3, 4, 6), 8, True)
    with pytest.raises(ValueError, match=r"has 16 text tokens \(plan: 8\)\. .*calibrate"):
        plan.check_layout((3, 4, 4), 16, True)
    with pytest.raises(ValueError, match=r"has token grid \(3, 4, 6\) \(plan: \(3, 4, 4\)\) and 9 text tokens"):
        plan.check_layout((3, 4, 6), 9, True)
    # only the text position differs: the message says so instead of showing two equal grids
    with pytest.raises(ValueError, match=r"has text tokens after the image tokens \(plan: before; the plan's text_fi"):
        plan.check_layout((3, 4, 4), 8, False)
