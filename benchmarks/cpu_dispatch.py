"""GNA on the CPU: every correct path side by side, to check the automatic backend choice (issue 22, CPU part).

    python benchmarks/cpu_dispatch.py --threads 1 --repeats 5 --out /tmp/cpu-dispatch.json

Per case, in one process and interleaved: ``neighborhood_attention`` with ``backend=None`` (the automatic choice),
``"reference"`` (per-query gathering), ``"tiled"`` (block-sparse tiles in PyTorch), FlexAttention compiled with a
plain row-major ``BlockMask`` of 128-token blocks built from the GNA ``mask_mod`` (``torch.compile`` on the CPU:
needs a C++ compiler; its compile time is reported, not timed), and dense SDPA (not the same function: shown as the
bar a sparse path must beat). Each path is checked against the reference output before it is timed. Writes the
medians and the ratio of the automatic choice to the fastest correct path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, result_path, write_json  # noqa: E402


CASES = {
    "3d-8x32x32-w3x7x7": ((8, 32, 32), (3, 7, 7)),
    "2d-64x64-w7": ((64, 64), 7),
}


def _flex_row_major(spec, n, block=128):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnpack.kernels.neighborhood.windows import neighborhood_mask_mod

    block_mask = create_block_mask(neighborhood_mask_mod(spec), None, None, n, n, device="cpu", BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def run_case(name: str, args) -> dict:
    from attnpack.kernels import neighborhood_attention
    from attnpack.kernels.neighborhood import normalize_neighborhood_args

    grid, window = CASES[name]
    spec = normalize_neighborhood_args(grid, window)
    n = spec.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=g) for _ in range(3))

    def gna(backend):
        return lambda: neighborhood_attention(q, k, v, grid_shape=grid, window_size=window, backend=backend)

    paths = {"auto": gna(None), "reference": gna("reference"), "tiled": gna("tiled")}
    compile_s = None
    if not args.no_flex:
        t0 = time.perf_counter()
        try:
            flex = _flex_row_major(spec, n)
            flex(q, k, v)
            paths["flex-compiled-row-major"] = lambda: flex(q, k, v)
            compile_s = round(time.perf_counter() - t0, 1)
        except Exception as e:  # no compiler, unsupported torch
            compile_s = f"failed: {type(e).__name__}: {str(e)[:200]}"
    paths["dense-sdpa (not GNA)"] = lambda: F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        ref = paths["reference"]()
        errors = {p: float((fn() - ref).abs().max()) for p, fn in paths.items()}
        times = {p: [] for p in paths}
        for _ in range(args.repeats):  # interleaved: load changes hit every path alike
            for p, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[p].append((time.perf_counter() - t0) * 1e3)
    med = {p: statistics.median(t) for p, t in times.items()}
    correct = [p for p in paths if not p.startswith("dense") and errors[p] < 1e-4]
    fastest = min(correct, key=med.get)
    row = dict(case=name, grid=list(grid), window=list(spec.window), heads=args.heads, head_dim=args.head_dim,
               median_ms={p: round(t, 2) for p, t in med.items()}, max_abs_err=errors, flex_compile_s=compile_s,
               fastest_correct=fastest, auto_over_fastest=round(med["auto"] / med[fastest], 3))  # fmt: skip
    print(name, {p: round(t, 1) for p, t in med.items()}, "fastest", fastest, "auto/fastest",
          row["auto_over_fastest"], flush=True)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--out", "-o", default=str(Path(__file__).parent / "results" / "cpu-dispatch.json"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = result_path(parser, args.out, args.force)
    torch.set_num_threads(args.threads)
    results = [run_case(name, args) for name in args.cases]
    write_json(out, {"machine": machine_info(torch.device("cpu")), "threads": args.threads, "cases": results})
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
