"""Official PAROAtten plans: conversion, joint block tiling and the uniform mask schedule against the official
semantics reproduced here in plain torch (github.com/jamescsq47/PAROAtten, commit 3ac854f), and malformed files.

The oracle below follows the official code, not attnpack's: ``permute_qk`` / ``permute_attn_out`` of
``paroattention/cogvideox.py`` and ``wan.py`` (a reshape to ``[B, F, H, W, D]`` and a permute by a table of axis
orders), the mask preparation of ``example/pipeline_cogvideox.py`` / ``pipeline_wan.py`` (text blocks padded in
front, last block row and column forced on), the kernel's block lookup ``sparse[b, h, q_block, k_block]`` over
blocks of the raw joint sequence, and the ``TimestepCallback`` that picks the mask of the next step.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import attnpack
from attnpack.cli import main
from attnpack.kernels.paro import paro_token_order
from attnpack.pipelines.paro_plan import ParoPlan, timestep_bucket
from attnpack.toy.tiny import build_tiny_pipeline


# the official tables (paroattention/cogvideox.py, permute_qk and permute_attn_out)
OFFICIAL_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 2, 0], [1, 0, 2], [2, 1, 0], [2, 0, 1]])
OFFICIAL_INVERSES = torch.tensor([[0, 1, 2], [0, 2, 1], [2, 0, 1], [1, 0, 2], [2, 1, 0], [1, 2, 0]])

PIPELINES = {  # tiny pipeline -> (call kwargs, token grid, text tokens in self-attention)
    "tiny-cogvideox": (dict(height=64, width=64, num_frames=9, max_sequence_length=16), (3, 4, 4), 16),
    "tiny-wan": (dict(height=64, width=64, num_frames=9, max_sequence_length=16), (3, 4, 4), 0),
}
BLOCK = 5  # not a divisor of the text length: one block holds text and video tokens, the last block is partial
STEPS, BUCKETS = 4, 3


# ------------------------------------------------------------------------------------------------- the oracle
def official_permute(x, orders, n_text, grid, inverse=False):
    """``x`` ``[B, H, N, D]``: the video part of every head reordered as the official code does (or back)."""
    f, h, w = grid
    out = x.clone()
    b, _, _, d = x.shape
    for head, o in enumerate(orders.tolist()):
        dims = OFFICIAL_PERMUTATIONS[o]
        part = x[:, head, n_text:]
        if not inverse:
            out[:, head, n_text:] = part.reshape(b, f, h, w, d).permute(0, *(dims + 1).tolist(), 4).reshape(b, -1, d)
        else:
            shape = torch.tensor([b, f, h, w, d])[[0, *(dims + 1).tolist(), 4]].tolist()
            inv = OFFICIAL_INVERSES[o]
            out[:, head, n_text:] = part.reshape(*shape).permute(0, *(inv + 1).tolist(), 4).reshape(b, -1, d)
    return out


def official_block_mask(sparse, bucket, block, n_text_blocks):
    """``[H, T, T]`` bool: the file's mask of (bucket, block) prepared as the official pipelines do."""
    mask = sparse[bucket, block].bool()
    mask = F.pad(mask, pad=(n_text_blocks, 0, n_text_blocks, 0), mode="constant", value=1)
    mask[:, :, -1] = True
    mask[:, -1, :] = True
    return mask


def official_attention(q, k, v, state, block_index):
    """Attention of one official PARO layer, with the kernel's block skipping written as a dense token mask."""
    n = q.shape[2]
    n_text, grid, bs = state["text_len"], state["grid"], state["block_size"]
    orders = state["permute"][block_index]
    q, k, v = (official_permute(t, orders, n_text, grid) for t in (q, k, v))
    mask = official_block_mask(state["sparse"], state["i_timestep"], block_index, -(-n_text // bs))
    blocks = torch.arange(n) // bs
    allowed = mask[:, blocks][:, :, blocks]  # [H, N, N]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    return official_permute(out, orders, n_text, grid, inverse=True)


class OfficialCogVideoXProcessor:
    """diffusers' CogVideoXAttnProcessor2_0 with the official PARO attention (paroattention/cogvideox.py)."""

    def __init__(self, state, block_index):
        self.state, self.block_index = state, block_index

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        out = official_attention(query, key, value, self.state, self.block_index)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_seq_length, out.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


class OfficialWanProcessor:
    """diffusers' WanAttnProcessor (self-attention) with the official PARO attention (paroattention/wan.py)."""

    def __init__(self, state, block_index):
        self.state, self.block_index = state, block_index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert encoder_hidden_states is None and attention_mask is None
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, N, H, D]

        def rope(x, cos, sin):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            cos, sin = cos[..., 0::2], sin[..., 1::2]
            out = torch.empty_like(x)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x1 * sin + x2 * cos
            return out.type_as(x)

        if rotary_emb is not None:
            query, key = rope(query, *rotary_emb), rope(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = official_attention(q, k, v, self.state, self.block_index).transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out.type_as(query)))


def official_callback(state):
    """The official TimestepCallback.on_step_end: the mask bucket of the *next* step."""

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        total_steps = len(pipeline.scheduler.timesteps)
        step = step % total_steps
        state["i_timestep"] = int((step + 1) / total_steps * state["n_buckets"])
        return callback_kwargs

    return on_step_end


# ------------------------------------------------------------------------------------------------- helpers
def official_layers(name, n):
    return [
        ("transformer_blocks.{}.attn1" if name == "tiny-cogvideox" else "blocks.{}.attn1").format(i) for i in range(n)
    ]


def synthetic_official_plan(tmp_path, n_blocks, heads, side, n_buckets=BUCKETS, seed=0, density=0.4):
    """Random orders and masks, written in the official format with torch.save."""
    g = torch.Generator().manual_seed(seed)
    permute = torch.randint(0, 6, (n_blocks, heads), generator=g)
    permute.view(-1)[: min(6, permute.numel())] = torch.arange(6)[: min(6, permute.numel())]
    empty = torch.rand(n_blocks, heads, generator=g) < 0.3
    sparse = torch.rand(n_buckets, n_blocks, heads, side, side, generator=g) < density
    torch.save({"permute": permute, "empty": empty}, tmp_path / "permute_plan.pth")
    torch.save({"sparse": sparse}, tmp_path / "sparse_plan.pth")
    return tmp_path / "permute_plan.pth", tmp_path / "sparse_plan.pth", permute, sparse


def _record(pipe, names, store):
    modules = dict(pipe.transformer.named_modules())
    return [
        modules[n].register_forward_hook(lambda m, a, out, n=n: store.setdefault(n, []).append(out)) for n in names
    ]


# ------------------------------------------------------------------------------------------------- tests
def test_joint_tiling_is_the_official_cogvideox_layout():
    grid, text, bs = (13, 30, 45), 226, 64  # CogVideoX-5B at 49 x 480 x 720
    n = text + math.prod(grid)
    order = paro_token_order(grid, list(range(6)), bs, text_len=text, tiling="joint")
    assert order.num_tiles == 278 == -(-n // bs)  # attnpack's padded tiling has 279
    assert paro_token_order(grid, list(range(6)), bs, text_len=text).num_tiles == 279
    tokens = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 6, n, 1)
    expect = official_permute(tokens, torch.arange(6), text, grid)[0, :, :, 0].long()  # token at each position
    assert torch.equal(order.index[:, :n].long(), expect)
    assert bool((order.index[:, n:] == -1).all()) and order.index.shape[1] - n == 278 * 64 - n
    block3 = order.index[:, 3 * 64 : 4 * 64]
    assert int((block3 < text).sum(-1).unique()) == 34  # block 3: 34 text tokens and 30 video tokens
    with pytest.raises(ValueError, match="text tokens before"):
        paro_token_order(grid, [0], bs, text_len=text, text_first=False, tiling="joint")


@pytest.mark.parametrize("steps,buckets", [(30, 30), (30, 4), (4, 3), (22, 22), (50, 50), (7, 10)])
def test_uniform_schedule_is_the_official_callback(steps, buckets):
    official, i_timestep = [], 0  # TimestepCallback: 0 before the first step, then set after every step
    for step in range(steps):
        official.append(i_timestep)
        i_timestep = int((step + 1) / steps * buckets)
    plan = _tiny_plan(schedule="uniform", timestep_buckets=buckets, num_inference_steps=steps)
    assert [plan.bucket(s, steps) for s in range(steps)] == official
    assert plan.num_buckets == buckets


def _tiny_plan(**kw):
    from test_paro_plan import make_plan

    return make_plan(**kw)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_converted_plan_matches_the_official_semantics_per_layer(name, tmp_path):
    kwargs, grid, text = PIPELINES[name]
    pipe = build_tiny_pipeline(name)
    names = official_layers(name, 1 if name == "tiny-cogvideox" else 2)
    t = -(-(text + math.prod(grid)) // BLOCK)
    side = t - -(-text // BLOCK)
    permute_path, sparse_path, permute, sparse = synthetic_official_plan(tmp_path, len(names), 2, side)
    plan = attnpack.convert_official_paro_plan(
        pipe, permute_path, sparse_path, grid=grid, text_len=text, num_inference_steps=STEPS, block_size=BLOCK
    )
    assert (plan.tiling, plan.schedule, plan.num_blocks, plan.num_buckets) == ("joint", "uniform", t, BUCKETS)
    assert list(plan.layers) == names and plan.quant is None
    plan = ParoPlan.load(plan.save(tmp_path / "converted.safetensors"))  # through the file format

    def run(**extra):
        with torch.no_grad():
            gen = torch.Generator("cpu").manual_seed(0)
            return pipe(
                "a red cat", num_inference_steps=STEPS, generator=gen, output_type="latent", **kwargs, **extra
            )[0]

    dense = run()
    ours, official = {}, {}
    hooks = _record(pipe, names, ours)
    with attnpack.apply_paro(pipe, plan, quant="plan"):
        sparse_out = run()
    for h in hooks:
        h.remove()

    state = dict(permute=permute, sparse=sparse, text_len=text, grid=grid, block_size=BLOCK, i_timestep=0)
    state["n_buckets"] = BUCKETS
    modules = dict(pipe.transformer.named_modules())
    originals = {n: modules[n].processor for n in names}
    cls = OfficialCogVideoXProcessor if name == "tiny-cogvideox" else OfficialWanProcessor
    for i, n in enumerate(names):
        modules[n].set_processor(cls(state, i))
    hooks = _record(pipe, names, official)
    try:
        reference = run(callback_on_step_end=official_callback(state))
    finally:
        for h in hooks:
            h.remove()
        for n, p in originals.items():
            modules[n].set_processor(p)

    calls = len(official[names[0]])
    assert calls >= STEPS and all(len(ours[n]) == calls for n in names)
    for n in names:
        for a, b in zip(ours[n], official[n]):
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(x, y, atol=2e-5, rtol=0)
    torch.testing.assert_close(sparse_out, reference, atol=2e-5, rtol=0)
    assert (sparse_out - dense).abs().max() > 1e-3  # the masks matter


def test_cli_converts_and_the_plan_generates(tmp_path, capsys):
    kwargs, grid, text = PIPELINES["tiny-cogvideox"]
    t = -(-(text + math.prod(grid)) // BLOCK)
    permute_path, sparse_path, permute, sparse = synthetic_official_plan(tmp_path, 1, 2, t - 4)
    out = tmp_path / "plan.safetensors"
    argv = ["convert-paro-plan", "-m", "tiny-cogvideox", "--permute", str(permute_path), "--sparse", str(sparse_path),
            "--grid", "3,4,4", "--text-len", "16", "--block-size", str(BLOCK), "--steps", "4",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "1 layers x 2 heads" in capsys.readouterr().out
    plan = ParoPlan.load(out)
    assert torch.equal(plan.orders.long(), permute)
    expect = torch.stack([official_block_mask(sparse, b, 0, 4) for b in range(BUCKETS)])
    assert torch.equal(plan.mask_codes()[:, 0] == 0, expect)
    assert plan.density == pytest.approx(expect.float().mean().item())
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert (meta["version"], meta["tiling"], meta["schedule"]) == ("2", "joint", "uniform")
    # --apply-empty: empty heads keep only their forced blocks
    assert main(argv[:-1] + [str(tmp_path / "empty.safetensors"), "--apply-empty"]) == 0
    codes = ParoPlan.load(tmp_path / "empty.safetensors").mask_codes()[:, 0]
    empty = torch.load(permute_path, weights_only=True)["empty"][0]
    forced = official_block_mask(torch.zeros_like(sparse), 0, 0, 4)
    for h in range(2):
        assert torch.equal(codes[:, h] == 0, forced[h].expand(BUCKETS, -1, -1) if empty[h] else expect[:, h])


def test_old_plans_load_unchanged():
    from safetensors import safe_open

    for path in (
        "attnpack/toy/weights/toy-flux/paro_plan.safetensors",
        "benchmarks/results/toy-flux-paro-plan.safetensors",
    ):
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata()
        assert meta["version"] == "1" and "tiling" not in meta and "schedule" not in meta
        plan = ParoPlan.load(path)
        assert (plan.tiling, plan.schedule) == ("padded", "half")
        assert plan.num_blocks == -(-plan.text_len // plan.block_size) + -(-math.prod(plan.grid) // plan.block_size)
        assert plan.num_buckets == plan.timestep_buckets + 1
        steps = plan.num_inference_steps
        expect = [timestep_bucket(s, steps, plan.timestep_buckets) for s in range(steps)]
        assert [plan.bucket(s, steps) for s in range(steps)] == expect
        order = plan.token_order(0)
        assert order.segments[0][:2] == (0, plan.text_len)  # text in its own padded blocks
        assert order.segments[1][2] == -(-plan.text_len // plan.block_size)


def test_version_2_plans_need_their_conventions(tmp_path):
    from safetensors.torch import load_file, save_file

    plan = _tiny_plan(tiling="joint", schedule="uniform", timestep_buckets=3)
    path = plan.save(tmp_path / "p.safetensors")
    loaded = ParoPlan.load(path)
    assert (loaded.tiling, loaded.schedule, loaded.num_buckets) == ("joint", "uniform", 3)
    assert torch.equal(loaded.mask_codes(), plan.mask_codes())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    for key, bad in (("tiling", "diagonal"), ("schedule", "random")):
        broken = dict(meta)
        del broken[key]
        save_file(load_file(str(path)), str(tmp_path / "b.safetensors"), metadata=broken)
        with pytest.raises(ValueError, match=f"lacks the metadata entry '{key}'"):
            ParoPlan.load(tmp_path / "b.safetensors")
        broken[key] = bad
        save_file(load_file(str(path)), str(tmp_path / "b.safetensors"), metadata=broken)
        with pytest.raises(ValueError, match=f"b.safetensors.*{key} must be one of"):
            ParoPlan.load(tmp_path / "b.safetensors")


class NotATensor:  # a class: torch.load(weights_only=True) refuses to build it
    pass


def _malformed():
    """name -> (permute file content, sparse file content, which file the error names, what it says)."""
    side = 9  # tiny-cogvideox, grid (3, 4, 4) + 16 text tokens in 5-token blocks: 13 blocks, 4 of them text
    ok_p = {"permute": torch.zeros(1, 2, dtype=torch.int64), "empty": torch.zeros(1, 2, dtype=torch.bool)}
    ok_s = {"sparse": torch.ones(2, 1, 2, side, side, dtype=torch.bool)}
    return {
        "missing key": ({"orders": ok_p["permute"]}, ok_s, "permute_plan", "no 'permute' tensor"),
        "swapped files": (ok_s, ok_p, "permute_plan", "swapped"),
        "permute shape": ({"permute": torch.zeros(1, 2, 3, dtype=torch.int64)}, ok_s, "permute_plan", "N_head"),
        "permute dtype": ({"permute": torch.zeros(1, 2)}, ok_s, "permute_plan", "integer"),
        "permute values": ({"permute": torch.full((1, 2), 6)}, ok_s, "permute_plan", "0..5"),
        "empty shape": ({**ok_p, "empty": torch.zeros(3, dtype=torch.bool)}, ok_s, "permute_plan", "'empty'"),
        "sparse dims": (ok_p, {"sparse": torch.ones(1, 2, side, side, dtype=torch.bool)}, "sparse_plan", "T, T"),
        "sparse dtype": (
            ok_p,
            {"sparse": torch.ones(2, 1, 2, side, side, dtype=torch.complex64)},
            "sparse_plan",
            "boolean",
        ),  # fmt: skip
        "sparse values": (ok_p, {"sparse": torch.full((2, 1, 2, side, side), 0.5)}, "sparse_plan", "0 / 1"),
        "sparse side": (
            ok_p,
            {"sparse": torch.ones(2, 1, 2, side + 4, side + 4, dtype=torch.bool)},
            "sparse_plan",
            "--grid",
        ),  # fmt: skip
        "files disagree": (
            ok_p,
            {"sparse": torch.ones(2, 2, 2, side, side, dtype=torch.bool)},
            "sparse_plan",
            "not from one calibration",
        ),  # fmt: skip
        "model layers": (
            {"permute": torch.zeros(3, 2, dtype=torch.int64)},
            {"sparse": torch.ones(2, 3, 2, side, side, dtype=torch.bool)},
            "permute_plan",
            "3 transformer blocks.*has 1",
        ),  # fmt: skip
        "model heads": (
            {"permute": torch.zeros(1, 4, dtype=torch.int64)},
            {"sparse": torch.ones(2, 1, 4, side, side, dtype=torch.bool)},
            "permute_plan",
            "4 heads.*has 2",
        ),  # fmt: skip
        "not a tensor": ({"permute": 3}, ok_s, "permute_plan", "is a int, not a tensor"),
        "not a dict": ([torch.zeros(1, 2)], ok_s, "permute_plan", "holds a list"),
        "pickled object": ({"permute": NotATensor()}, ok_s, "permute_plan", "weights_only=True"),
        "text file": (b"permute = [[0, 1]]\n", ok_s, "permute_plan", "not a file written by torch.save"),
        "empty file": (b"", ok_s, "permute_plan", "is empty"),
        "safetensors file": ("safetensors", ok_s, "permute_plan", "not a file written by torch.save"),
        "missing file": (None, ok_s, "permute_plan", "does not exist"),
    }


def _write(path, content):
    if content is None:
        return
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "safetensors":
        from safetensors.torch import save_file

        save_file({"permute": torch.zeros(1, 2, dtype=torch.int64)}, str(path))
    elif isinstance(content, dict) and any(isinstance(v, NotATensor) for v in content.values()):
        with open(path, "wb") as fh:  # torch.save of an arbitrary object
            torch.save(content, fh, pickle_module=pickle)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("case", list(_malformed()))
def test_malformed_official_files_give_one_clear_error(case, tmp_path, capsys):
    permute, sparse, culprit, says = _malformed()[case]
    paths = {"permute_plan": tmp_path / "permute_plan.pth", "sparse_plan": tmp_path / "sparse_plan.pth"}
    _write(paths["permute_plan"], permute)
    _write(paths["sparse_plan"], sparse)
    pipe = build_tiny_pipeline("tiny-cogvideox")
    with pytest.raises(ValueError, match=says) as err:
        attnpack.convert_official_paro_plan(pipe.transformer, paths["permute_plan"], paths["sparse_plan"],
                                            grid=(3, 4, 4), text_len=16, block_size=BLOCK)  # fmt: skip
    message = str(err.value)
    assert str(paths[culprit]) in message or "the two files" in message
    out = tmp_path / "out.safetensors"
    argv = ["convert-paro-plan", "-m", "tiny-cogvideox", "--permute", str(paths["permute_plan"]), "--sparse",
            str(paths["sparse_plan"]), "--grid", "3,4,4", "--text-len", "16", "--block-size", str(BLOCK), "-o",
            str(out)]  # fmt: skip
    assert main(argv) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("attnpack convert-paro-plan: error:")
    assert str(paths[culprit]) in err_lines[0]
    assert not out.exists()


def test_official_files_are_not_plans(tmp_path):
    permute_path, sparse_path, _, _ = synthetic_official_plan(tmp_path, 1, 2, 9)
    pipe = build_tiny_pipeline("tiny-cogvideox")
    with pytest.raises(ValueError, match="convert-paro-plan"):
        attnpack.apply_paro(pipe, permute_path)
    with pytest.raises(ValueError, match="CogVideoX and Wan"):
        attnpack.convert_official_paro_plan(build_tiny_pipeline("tiny-flux"), permute_path, sparse_path)


def test_conversion_reads_only_the_model_config(tmp_path, capsys):
    from attnpack.pipelines.loading import load_denoiser_structure
    from attnpack.pipelines.paro_plan import config_hash

    kwargs, grid, text = PIPELINES["tiny-wan"]
    pipe = build_tiny_pipeline("tiny-wan")
    folder = tmp_path / "wan"
    pipe.save_pretrained(folder)
    skeleton = load_denoiser_structure(folder)
    assert next(skeleton.parameters()).device.type == "meta"  # no weights allocated
    assert config_hash(skeleton) == config_hash(pipe.transformer)
    permute_path, sparse_path, _, _ = synthetic_official_plan(tmp_path, 2, 2, -(-math.prod(grid) // BLOCK))
    out = tmp_path / "plan.safetensors"
    argv = ["convert-paro-plan", "-m", str(folder), "--permute", str(permute_path), "--sparse", str(sparse_path),
            "--grid", "3,4,4", "--block-size", str(BLOCK), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    plan = ParoPlan.load(out)
    assert plan.text_len == 0 and plan.num_blocks == 10  # Wan: 48 tokens, last block partial
    with attnpack.apply_paro(pipe, plan) as handle:  # the plan fits the model it was converted for
        assert len(handle.processors) == 2
    (tmp_path / "empty").mkdir()
    assert main(argv[:2] + [str(tmp_path / "empty")] + argv[3:]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_calibration_with_the_official_conventions(tmp_path):
    kwargs, grid, text = PIPELINES["tiny-cogvideox"]
    pipe = build_tiny_pipeline("tiny-cogvideox")
    plan = attnpack.calibrate_paro(pipe, ["a red cat"], STEPS, density=0.5, block_size=BLOCK, tiling="joint",
                                   schedule="uniform", timestep_buckets=BUCKETS, progress=False, **kwargs)  # fmt: skip
    t = -(-(text + math.prod(grid)) // BLOCK)
    assert (plan.tiling, plan.schedule, plan.num_blocks, plan.num_buckets) == ("joint", "uniform", t, BUCKETS)
    kept = plan.mask_codes() == 0  # [NB, L, H, T, T]
    assert bool(kept[..., :4, :].all()) and bool(kept[..., :, :4].all())  # text blocks (block 3 mixed) dense
    assert bool(kept[..., -1, :].all()) and bool(kept[..., :, -1].all())  # last block row and column
    assert not bool(kept.all())
    with pytest.raises(ValueError, match="timestep_buckets"):
        attnpack.calibrate_paro(pipe, ["a"], STEPS, schedule="uniform", timestep_buckets=STEPS + 1, **kwargs)
    with pytest.raises(ValueError, match="`tiling`"):
        attnpack.calibrate_paro(pipe, ["a"], STEPS, tiling="official", **kwargs)


@pytest.mark.parametrize("backend", ["reference", "flex", "triton", "paro_quant_reference", "paro_quant_triton"])
def test_every_backend_runs_the_joint_tiling(backend):
    """One tile holds text and grid tokens, the last tile is partial; oracle: dense attention with the block mask
    looked up through the official token positions."""
    from attnpack.kernels.block_sparse import BlockSparsePattern, block_sparse_attention, tile_table_from_dense

    grid, text, bs, heads = (3, 4, 4), 10, 16, 3
    n = text + math.prod(grid)
    orders = torch.tensor([0, 2, 5])
    order = paro_token_order(grid, orders, bs, text_len=text, tiling="joint")
    g = torch.Generator().manual_seed(0)
    t = -(-n // bs)
    mask = torch.rand(heads, t, t, generator=g) < 0.5
    mask[:, :, -1] = mask[:, -1] = mask[:, 0] = mask[:, :, 0] = True
    pattern = BlockSparsePattern(tile_table_from_dense(mask[None]), order, order)
    q, k, v = (torch.randn(2, heads, n, 32, generator=g) for _ in range(3))
    # position of every token in the official joint sequence: its block is position // bs
    positions = official_permute(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, heads, n, 1), orders,
                                 text, grid)[0, :, :, 0].long().argsort(-1)  # fmt: skip
    blocks = positions // bs
    allowed = torch.stack([mask[h][blocks[h]][:, blocks[h]] for h in range(heads)])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(32)
    expect = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    quant = backend.startswith("paro_quant")
    out = block_sparse_attention(
        q, k, v, pattern, backend=backend, backend_options={"quant": "int8"} if quant else None
    )
    torch.testing.assert_close(out, expect, atol=5e-2 if quant else 1e-5, rtol=0)


def test_legacy_torch_save_format_converts_the_same(tmp_path):
    permute_path, sparse_path, permute, sparse = synthetic_official_plan(tmp_path, 1, 2, 9)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for src in (permute_path, sparse_path):  # torch's pre-1.6 format (not a zip archive: no memory mapping)
        torch.save(torch.load(src, weights_only=True), legacy / src.name, _use_new_zipfile_serialization=False)
    model = build_tiny_pipeline("tiny-cogvideox").transformer
    plans = [
        attnpack.convert_official_paro_plan(
            model,
            folder / "permute_plan.pth",
            folder / "sparse_plan.pth",
            grid=(3, 4, 4),
            text_len=16,
            block_size=BLOCK,
        )  # fmt: skip
        for folder in (tmp_path, legacy)
    ]
    assert torch.equal(plans[0].masks, plans[1].masks) and torch.equal(plans[0].orders, plans[1].orders)


def test_fewer_buckets_than_the_file_holds(tmp_path):
    """The official callback's num_timestep_for_sparse_mask may be below the file's N_bucket: the first masks run."""
    permute_path, sparse_path, _, sparse = synthetic_official_plan(tmp_path, 1, 2, 9)
    model = build_tiny_pipeline("tiny-cogvideox").transformer
    kw = dict(grid=(3, 4, 4), text_len=16, block_size=BLOCK)
    plan = attnpack.convert_official_paro_plan(model, permute_path, sparse_path, buckets=2, **kw)
    assert plan.num_buckets == 2 and [plan.bucket(s, 4) for s in range(4)] == [0, 0, 1, 1]
    expect = torch.stack([official_block_mask(sparse, b, 0, 4) for b in range(2)])
    assert torch.equal(plan.mask_codes()[:, 0] == 0, expect)
    with pytest.raises(ValueError, match=r"`buckets` must be an integer in \[1, 3\].*sparse_plan.pth"):
        attnpack.convert_official_paro_plan(model, permute_path, sparse_path, buckets=4, **kw)
