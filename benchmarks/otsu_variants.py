"""Textbook Otsu vs the official IR-Diffusion (DreamStory) variant on random smooth maps: the share of tokens the two
rules put on opposite sides, per grid (docs/ir-diffusion.md, "Deviations from the official code").

    python benchmarks/otsu_variants.py          # -> results/otsu_variants.json (never overwrites it: --force)
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--maps", type=int, default=20, help="random maps per grid")


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from attnpack.pipelines.ir_masks import binarize

    torch.manual_seed(0)
    rows = {}
    for grid in [(8, 12), (16, 16), (32, 32), (24, 40)]:
        differ = total = 0
        for _ in range(args.maps):
            coarse = torch.rand(1, 1, grid[0] // 2 + 1, grid[1] // 2 + 1)  # smooth: a bilinear upsample of noise
            m = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)[0]
            m = (m - m.min()) / (m.max() - m.min())
            differ += int((binarize(m, "otsu") != binarize(m, "dreamstory")).sum())
            total += m.numel()
        rows[f"{grid[0]}x{grid[1]}"] = {"tokens": total, "differ": differ, "share": round(differ / total, 3)}
        print(f"{grid}: {differ / total:.1%} of tokens differ", file=sys.stderr)
    return {"maps_per_grid": args.maps, "grids": rows}


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("otsu_variants", module=sys.modules[__name__]))
