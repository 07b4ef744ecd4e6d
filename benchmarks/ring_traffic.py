"""GNA under ring attention at Wan 2.1 720p: the key shards each ring rank's queries visit, and the share of the other
ranks' key tokens it receives (`attnpack.attn_processors.parallel.ring_key_reads`; an all-gather receives 100 %).
Counted from the block-sparse pattern with the GPU's default tiles: no GPU, no timing (docs/multi-gpu.md).

    python benchmarks/ring_traffic.py      # -> results/ring-traffic-wan720p.json (never overwrites it: --force)
"""

from __future__ import annotations

import argparse
import sys


GRID = (21, 45, 80)  # Wan 2.1 at 720p, 81 frames: latent 21 x 90 x 160, patches (1, 2, 2)
WINDOWS = {  # name -> (window_size, stride, base_size) as apply_gna takes them
    "3 frames": ((3, 15, 15), (1, 1, 1), None),
    "5 frames": ((5, 15, 15), (1, 1, 1), None),
    "7 frames": ((7, 15, 15), (1, 1, 1), None),
    "default (about half of each axis)": (None, (1, 1, 1), None),
    "Cosmos-Predict2 (every frame)": ((-1, 12, 24), (1, 4, 8), (-1, 44, 80)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ring-degree", type=int, default=8, help="ring ranks (each owns 1 / degree of the tokens)")


def run(args: argparse.Namespace) -> dict:
    from attnpack.attn_processors.gna import AUTO_WINDOW, rescale_window
    from attnpack.attn_processors.parallel import ring_key_reads
    from attnpack.kernels.neighborhood import cached_neighborhood_pattern, normalize_neighborhood_args
    from attnpack.kernels.neighborhood.windows import default_tile_shape

    tile = default_tile_shape(GRID, "cuda")
    rows = {}
    for name, (window, stride, base) in WINDOWS.items():
        window, stride = rescale_window(GRID, window or (AUTO_WINDOW,) * 3, stride, base)
        spec = normalize_neighborhood_args(GRID, window, stride)
        reads = ring_key_reads(cached_neighborhood_pattern(spec, q_tile=tile), args.ring_degree)
        shards = [len(r.shards) for r in reads]
        fractions = [round(r.remote_fraction, 3) for r in reads]
        rows[name] = {
            "window": list(window),
            "stride": list(stride),
            "shards_visited": shards,
            "mean_shards_visited": sum(shards) / len(shards),
            "remote_fraction": fractions,
            "mean_remote_fraction": round(sum(r.remote_fraction for r in reads) / len(reads), 3),
        }
        print(f"{name}: window {window}: {rows[name]['mean_shards_visited']:.2f} of {args.ring_degree} shards, "
              f"{rows[name]['mean_remote_fraction']:.0%} of remote keys", file=sys.stderr)  # fmt: skip
    return {"grid": list(GRID), "tile": list(tile), "ring_degree": args.ring_degree, "windows": rows}


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("ring_traffic", module=sys.modules[__name__]))
