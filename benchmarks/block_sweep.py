"""Block-size sweep of the block-sparse Triton kernel (GPU): which ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` is
fastest on the cases of ``benchmarks/attention.py``. Sets ``default_blocks`` (see
``attnpack/kernels/block_sparse/triton.py``); writes ``results/block-sweep-cuda.json``.

    python benchmarks/block_sweep.py flux-4k-gna hunyuan-720p-gna flux-4k-na
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
import attention  # noqa: E402
from _common import machine_info, time_fn, write_json  # noqa: E402


CONFIGS = [
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
    (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="case names of benchmarks/attention.py (CUDA cases)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "block-sweep-cuda.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sweep times the compiled Triton kernel: it needs a CUDA GPU")
    import attnpack.kernels.block_sparse.triton as bst

    dev, rows = torch.device("cuda"), []
    original = bst.default_blocks
    try:
        for name in args.cases:
            work = attention.CASES[name].build(dev, torch.bfloat16, "triton")
            d = work.dense[0].shape[-1]
            for cfg in CONFIGS:
                bst.default_blocks = lambda *a, _c=cfg: _c
                t0 = time.time()
                work.run()
                torch.cuda.synchronize()
                first = time.time() - t0
                r = time_fn(work.run, dev, warmup=2, repeats=args.repeats)
                tflops = 4 * d * work.attended_pairs / (r["median_ms"] * 1e-3) / 1e12
                rows.append(dict(case=name, blocks=list(cfg), first_call_s=round(first, 2),
                                 median_ms=round(r["median_ms"], 3), tflops_attended=round(tflops, 1)))  # fmt: skip
                print(f"{name:18s} {cfg} first {first:5.1f} s  median {r['median_ms']:9.3f} ms  {tflops:5.0f} TFLOP/s")
    finally:
        bst.default_blocks = original
    write_json(Path(args.out), {"machine": machine_info(dev), "configs": "(BLOCK_M, BLOCK_N, num_warps, num_stages)",
                                "rows": rows})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
