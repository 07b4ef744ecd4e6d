"""PARO fidelity table: outputs vs dense attention for sparse-only, quantized-only and combined settings, with and
without reordering, on planted-structure attention inputs and on the tiny CogVideoX / Wan / FLUX pipelines.

    python benchmarks/paro_fidelity.py            # CPU, a few minutes; writes benchmarks/results/paro_fidelity.json

Metrics (``attnpack.kernels.paro.fidelity``): cosine similarity, relative L2 and PSNR (peak = range of the dense
output). Planted inputs: attention outputs of one call. Tiny pipelines (random weights): final latents of a 4-step
generation, PARO vs dense with the same seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnpack.kernels.block_sparse import BlockSparsePattern, block_sparse_attention, tile_table_from_dense  # noqa: E402
from attnpack.kernels.paro import (  # noqa: E402
    OrderSearch,
    block_statistics,
    fidelity,
    forced_blocks,
    paro_token_order,
    planted_qkv,
    select_block_masks,
)


DENSITIES = (0.5, 0.3, 0.2)
SETTINGS = (
    [(d, None) for d in DENSITIES] + [(1.0, "int8"), (1.0, "fp8"), (1.0, "int4")] + [(d, "int8") for d in DENSITIES]
)
PIPELINES = {
    "tiny-cogvideox": dict(height=128, width=128, num_frames=13, max_sequence_length=16),
    "tiny-wan": dict(height=128, width=128, num_frames=13, max_sequence_length=16),
    "tiny-flux": dict(height=256, width=256, max_sequence_length=32),
}


def planted_rows(grid=(6, 12, 16), text=32, block=32, seed=0) -> list[dict]:
    orders = list(range(6))
    q, k, v = planted_qkv(grid, orders, head_dim=64, text_len=text, seed=seed)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    search = OrderSearch(grid, len(orders), block)
    search.update(q, k, span=slice(text, None))
    chosen = search.select(0.5)
    rows = []
    for reorder, head_orders in (("no", [0] * len(orders)), ("yes", chosen.tolist())):
        order = paro_token_order(grid, head_orders, block, text_len=text)
        mass = block_statistics(q, k, [order], sum_only=True)[0].sum
        n_text = -(-text // block)
        codes = select_block_masks(mass, DENSITIES[::-1], forced_blocks(order.num_tiles, range(0, n_text)))
        for density, quant in SETTINGS:
            level = None if density == 1.0 else DENSITIES[::-1].index(density)
            keep = torch.ones_like(codes, dtype=torch.bool) if level is None else codes <= level
            pattern = BlockSparsePattern(tile_table_from_dense(keep[None]), order, order)
            backend, opts = ("reference", None) if quant is None else ("paro_quant_reference", {"quant": quant})
            out = block_sparse_attention(q, k, v, pattern, backend=backend, backend_options=opts)
            rows.append(
                {
                    "input": f"planted {grid} + {text} text, {len(orders)} heads",
                    "reorder": reorder,
                    "density": density,
                    "quant": quant,
                    "achieved_density": keep.float().mean().item(),
                    **fidelity(dense, out),
                }
            )
    rows.append({"input": "planted", "planted_orders": orders, "recovered_orders": chosen.tolist()})
    return rows


def pipeline_rows(name: str, steps: int = 4, block: int = 16) -> list[dict]:
    from attnpack.pipelines.paro_calibrate import calibrate_paro, measure_paro_fidelity
    from attnpack.toy.tiny import build_tiny_pipeline

    kwargs = PIPELINES[name]
    pipe = build_tiny_pipeline(name)
    rows = []
    for reorder in (False, True):
        plan = calibrate_paro(
            pipe,
            ["a red cat", "a blue dog"],
            steps,
            density=list(DENSITIES),
            block_size=block,
            reorder=reorder,
            **kwargs,
        )
        for row in measure_paro_fidelity(pipe, plan, "a green bird", SETTINGS, seed=1, **kwargs):
            rows.append(
                {"input": f"{name} {plan.grid} + {plan.text_len} text", "reorder": "yes" if reorder else "no", **row}
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| input | reorder | density (achieved) | quant | cosine | rel. L2 | PSNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "cosine" not in r:
            continue
        psnr = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        lines.append(
            f"| {r['input']} | {r['reorder']} | {r['density']:g} ({r['achieved_density']:.2f}) | {r['quant'] or '-'} | "
            f"{r['cosine']:.5f} | {r['rel_l2']:.4f} | {psnr} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-pipelines", action="store_true")


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    rows = planted_rows()
    if not args.skip_pipelines:
        for name in PIPELINES:
            rows += pipeline_rows(name)
    print(markdown(rows))
    return {"benchmark": "paro_fidelity", "rows": rows}


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("paro_fidelity", module=sys.modules[__name__]))
