"""IR-Diffusion attention memory and time: attnpack's SDPA + boolean masks vs dense explicit scores.

The dense baseline follows the official ``DreamStoryScaledAttnProcessor`` memory profile: explicit attention
probabilities for every batch row (``attn.get_attention_scores``), then, per CFG half, the explicit extended score
matrix ``[heads, N, (n + 1) N]`` with ``finfo.min`` biases (reference blocks relocated at full size, zeros
elsewhere). It computes the same attention as ours (the max abs difference is reported). ``sdpa`` is plain
attention without IR (what a vanilla run pays).

Every measurement runs in a fresh subprocess: peak RSS (``resource.getrusage(...).ru_maxrss``) after the call minus
the peak before it (inputs, model and a small warm-up already allocated; ``_common.PeakRSS(reset=False)``), plus wall
time. Memory is in MiB (``peak_mib``, ``baseline_mib``, ``dense_score_mib``, ``ours_mask_mib_max``; results before
the benchmark registry named them ``*_mb``, same unit).

Cases:
- ``layer-24x40``: one IR self-attention call at SDXL / Playground v2.5 shapes for 1280x768 (``up_blocks.0``: 960
  tokens, 20 heads x 64), 2 subjects, CFG (batch 6), fp32.
- ``layer-48x80``: the same at ``up_blocks.1`` (3840 tokens, 10 heads x 64), bf16 (the official dtype).
- ``pipeline-1024``: the whole IRDiffusionPipeline call (references + final pass, given boxes, 1 step) of the tiny
  SDXL at 1024x1024 (attention grid 64x64 = 4096 tokens, 4 heads x 16), fp32; ``sdpa`` = the plain SDXL pipeline on
  the scene prompt.

Usage: ``python benchmarks/ir_diffusion.py [--cases ...] [--out FILE]`` (default
``benchmarks/results/ir_diffusion.json``, never overwritten without ``--force``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


LAYER_CASES = {
    "layer-24x40": dict(grid=(24, 40), heads=20, head_dim=64, dtype="float32"),
    "layer-48x80": dict(grid=(48, 80), heads=10, head_dim=64, dtype="bfloat16"),
}
CASES = [*LAYER_CASES, "pipeline-1024"]
VARIANTS = ("sdpa", "ours", "dense")
N_SUBJECTS = 2


# ------------------------------------------------------------------------------------------------- dense baseline
class DenseExplicitIRCore:
    """Official-style IR self-attention with explicit score tensors (the memory baseline)."""

    def __init__(self, extended: bool):
        self.extended = extended

    def __call__(self, q, k, v, call):
        import torch

        from attnpack.attn_processors.ir_diffusion import STATE_KEY, reposition_index, reposition_tokens

        b, h, n_tok, d = q.shape
        scale = d**-0.5
        flat = lambda x: x.reshape(b * h, x.shape[2], d)  # noqa: E731
        probs = torch.baddbmm(
            torch.empty(b * h, n_tok, n_tok, dtype=q.dtype), flat(q), flat(k).transpose(1, 2), beta=0, alpha=scale
        ).softmax(-1)
        out = torch.bmm(probs, flat(v)).view(b, h, n_tok, d)
        state = None if call.run is None else call.run.extras.get(STATE_KEY)
        if state is None:
            return out
        grid = tuple(call.layout.grid)
        gm = state.grid_masks(grid, q.device)
        n = state.num_subjects
        minv = torch.finfo(q.dtype).min
        iso = torch.zeros(n_tok, n_tok, dtype=q.dtype)
        for i in range(n):
            for j in range(n):
                if i != j and state.isolation:
                    outer = gm.target[i].to(q.dtype)[:, None] @ gm.target[j].to(q.dtype)[None, :]
                    iso = iso + outer.masked_fill(outer != 0, minv)
        extended = self.extended and state.extended_active(call.run)
        keep = state.keep_mask(grid, call.run.step_index, q.device)
        for group in state.groups(call.run.roles):
            t = group.target
            keys, values, biases = [], [], []
            if extended:
                for j in range(n):
                    ref_mask, tgt_mask = gm.reference[j].view(grid), gm.target[j].view(grid)
                    index = reposition_index(ref_mask, tgt_mask)
                    relocated = torch.zeros(n_tok, dtype=torch.bool)
                    relocated[index >= 0] = gm.reference[j][index[index >= 0]]
                    query_ok = gm.target[j] & keep[j]
                    if not bool(query_ok.any()):
                        query_ok = gm.target[j]
                    keys.append(reposition_tokens(k[group.references[j]], ref_mask, tgt_mask))
                    values.append(reposition_tokens(v[group.references[j]], ref_mask, tgt_mask))
                    allowed = query_ok[:, None] & relocated[None, :]
                    biases.append(torch.zeros(n_tok, n_tok, dtype=q.dtype).masked_fill(~allowed, minv))
            keys.append(k[t])
            values.append(v[t])
            biases.append(iso)
            scores = torch.baddbmm(
                torch.cat(biases, 1).expand(h, -1, -1), q[t], torch.cat(keys, 1).transpose(1, 2), alpha=scale
            )
            out[t] = torch.bmm(scores.softmax(-1), torch.cat(values, 1))
            del scores
        return out

    def __repr__(self):
        return f"DenseExplicitIRCore(extended={self.extended})"


def apply_dense_ir(pipe_or_unet, ir_layers=None):
    """``apply_ir_diffusion`` with the dense explicit self-attention core."""
    from attnpack.attn_processors.ir_diffusion import (
        IRDiffusionAttnProcessor,
        MaskedMutualCrossCore,
        resolve_ir_layers,
    )
    from attnpack.attn_processors.processor import apply_processors, resolve_denoisers

    unet = resolve_denoisers(pipe_or_unet)[0][0]
    chosen = resolve_ir_layers(unet, ir_layers)

    def factory(info):
        if info.kind == "self":
            return DenseExplicitIRCore(extended=info.name in chosen)
        return MaskedMutualCrossCore()

    return apply_processors(pipe_or_unet, factory, processor_cls=IRDiffusionAttnProcessor, description="dense IR")


# ------------------------------------------------------------------------------------------------- layer cases
def layer_setup(case: str, seed: int = 0):
    """Inputs of one IR self-attention call: q, k, v ``[6, H, N, D]`` and the attention call."""
    import torch

    from attnpack.attn_processors import AttnPackProcessor, DenseCore, LayerInfo, RunState, TokenLayout
    from attnpack.attn_processors.ir_diffusion import STATE_KEY, IRAttnState
    from attnpack.attn_processors.processor import AttentionCall
    from attnpack.pipelines.ir_masks import SubjectMasks, box_mask

    spec = LAYER_CASES[case]
    (gh, gw), heads, d = spec["grid"], spec["heads"], spec["head_dim"]
    dtype = getattr(torch, spec["dtype"])
    n_tok = gh * gw
    # subjects as in a typical two-character scene: left and right thirds of the target, centred references
    px_h, px_w = gh * 16, gw * 16
    target = torch.stack(
        [
            box_mask((px_w // 12, px_h // 6, px_w // 2, px_h), px_h, px_w),
            box_mask((px_w // 2, px_h // 4, 11 * px_w // 12, px_h), px_h, px_w),
        ]
    )
    reference = torch.stack([box_mask((px_w // 4, px_h // 8, 3 * px_w // 4, 5 * px_h // 6), px_h, px_w)] * 2)
    state = IRAttnState(masks=SubjectMasks(reference, target), dropout_seed=seed)
    roles = (["reference"] * N_SUBJECTS + ["target"]) * 2
    info = LayerInfo("up_blocks.0.attentions.1.transformer_blocks.0.attn1", 0, "unet", "self", 0, heads, d)
    run = RunState(family="unet", grid=(gh, gw), step_index=0, num_steps=50, batch_size=6, roles=tuple(roles))
    run.extras = {STATE_KEY: state}
    call = AttentionCall(
        None, info, TokenLayout.self_attention(n_tok, (gh, gw)), None, run, AttnPackProcessor(DenseCore(), info)
    )
    g = torch.Generator().manual_seed(seed)
    # drawn directly in the target dtype: no temporary copies that would raise the baseline peak
    q, k, v = (torch.randn(6, heads, n_tok, d, generator=g, dtype=dtype) for _ in range(3))
    state.grid_masks((gh, gw), q.device)  # cached masks are per-generation state, built before the call
    return q, k, v, call


def layer_run(case: str, variant: str):
    import torch.nn.functional as F

    from attnpack.attn_processors.ir_diffusion import IsolationRepositionCore

    q, k, v, call = layer_setup(case)
    if variant == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    core = IsolationRepositionCore(True) if variant == "ours" else DenseExplicitIRCore(True)
    return lambda: core(q, k, v, call)


# ------------------------------------------------------------------------------------------------- pipeline case
def pipeline_run(variant: str, size: int = 1024):
    import torch

    from attnpack.pipelines import ir_diffusion
    from attnpack.toy.tiny import build_tiny_pipeline

    base = build_tiny_pipeline("tiny-sdxl")
    pipe = ir_diffusion.IRDiffusionPipeline.from_pipe(base)
    if variant == "dense":
        ir_diffusion.apply_ir_diffusion = apply_dense_ir
    subjects = [{"prompt": "a photo of a red cat", "word": "cat"}, {"prompt": "a photo of a blue dog", "word": "dog"}]
    scene = "a cat and a dog on a beach"
    common = dict(num_inference_steps=1, guidance_scale=7.0, output_type="np")

    def call(px):
        if variant == "sdpa":
            return base(scene, height=px, width=px, generator=torch.Generator().manual_seed(0), **common).images
        boxes = [(0, px // 6, px // 2, px), (px // 2, px // 4, px, px)]
        return pipe(
            subjects,
            scene,
            height=px,
            width=px,
            target_boxes=boxes,
            reference_boxes=[(px // 4, 0, 3 * px // 4, px)] * 2,
            **common,
        ).images

    call(64)  # warm-up at a small size: lazy initialisation is not counted
    return lambda: call(size)


# ------------------------------------------------------------------------------------------------- driver
def child(case: str, variant: str, repeats: int) -> dict:
    import torch
    from _common import PeakRSS, mib

    torch.set_grad_enabled(False)
    fn = pipeline_run(variant) if case == "pipeline-1024" else layer_run(case, variant)
    with PeakRSS(reset=False) as rss:  # ru_maxrss growth over the first call
        start = time.perf_counter()
        result = fn()
        first = time.perf_counter() - start
    times = [first]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out = {
        "peak_mib": mib(rss.call_peak_bytes),
        "baseline_mib": mib(rss.before_bytes),
        "seconds": round(statistics.median(times), 4),
    }
    if case != "pipeline-1024":
        import numpy as np

        path = Path(os.environ.get("IR_BENCH_TMP", "/tmp")) / f"ir_bench_{case}_{variant}.npy"
        np.save(path, result.float().numpy())
        out["output"] = str(path)
    return out


def theoretical(case: str) -> dict:
    """Bytes of the dense baseline's score tensors (all-row probabilities + extended scores) and of our mask."""
    if case == "pipeline-1024":
        n_tok, heads, itemsize = 64 * 64, 4, 4
    else:
        spec = LAYER_CASES[case]
        n_tok, heads = spec["grid"][0] * spec["grid"][1], spec["heads"]
        itemsize = 2 if spec["dtype"] == "bfloat16" else 4
    batch, groups = 2 * (N_SUBJECTS + 1), 2
    dense = (batch * heads * n_tok * n_tok + groups * heads * n_tok * (N_SUBJECTS + 1) * n_tok) * itemsize
    ours = n_tok * (N_SUBJECTS + 1) * n_tok  # upper bound of our boolean mask (keys compacted in practice)
    return {
        "tokens": n_tok,
        "heads": heads,
        "dense_score_mib": round(dense / 2**20, 1),
        "ours_mask_mib_max": round(ours / 2**20, 1),
    }


def memory_child(payload: dict) -> dict:
    """One (case, variant) in a fresh process (``_common.peak_rss_child``)."""
    return child(payload["case"], payload["variant"], payload["repeats"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    from _common import peak_rss_child
    from tqdm import tqdm

    report = {
        "note": "peak_mib = ru_maxrss after the call minus before it, fresh subprocess per measurement",
        "cases": [],
    }
    jobs = [(c, v) for c in args.cases for v in args.variants]
    results: dict = {}
    for case, variant in tqdm(jobs, desc="IR-Diffusion benchmark"):
        repeats = 1 if (variant == "dense" and case != "layer-24x40") else args.repeats
        results[(case, variant)] = peak_rss_child(__file__, dict(case=case, variant=variant, repeats=repeats))
    for case in args.cases:
        entry = {"case": case, **theoretical(case), "variants": {v: results[(case, v)] for v in args.variants}}
        if {"ours", "dense"} <= set(args.variants):
            ours, dense = results[(case, "ours")], results[(case, "dense")]
            entry["dense_over_ours_peak"] = round(dense["peak_mib"] / max(ours["peak_mib"], 0.1), 1)
            entry["dense_over_ours_time"] = round(dense["seconds"] / ours["seconds"], 2)
            if "output" in ours:
                a, b = np.load(ours.pop("output")), np.load(dense.pop("output"))
                entry["max_abs_diff_ours_vs_dense"] = float(np.abs(a - b).max())
        if {"ours", "sdpa"} <= set(args.variants):
            entry["ours_over_sdpa_time"] = round(
                results[(case, "ours")]["seconds"] / results[(case, "sdpa")]["seconds"], 2
            )
        for v in entry["variants"].values():
            v.pop("output", None)
        report["cases"].append(entry)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("ir_diffusion", module=sys.modules[__name__]))
