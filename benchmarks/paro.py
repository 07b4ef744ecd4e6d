"""PARO attention speed: block-sparse (and INT8 / FP8) attention vs torch SDPA at CogVideoX and Wan 2.1 shapes.

One command on a GPU machine::

    python benchmarks/paro.py --device cuda --out benchmarks/results/paro_cuda.json

For every shape and density it times, in one run and on the same inputs: torch SDPA (dense, its best backend), PARO
block-sparse attention without quantization (the shared Triton kernel, per-head reordering fused into its loads), and
PARO with quantized attention (``paro_quant_triton``: permute + smooth + quantize pre-pass, then the INT8 / FP8 kernel).
Reported: milliseconds (median), speedup vs SDPA, the bound ``1 / achieved density``, the efficiency
``speedup * density`` (the target is >= 0.8 at density >= 0.2) and the gain of quantization over sparse-only (target
>= 1.3x). Masks come from random block masses through PARO's mask rule (diagonal, text and last blocks kept), orders
are random per head: latency does not depend on the values.

On CPU (``--device cpu``, the default without CUDA) the shapes are scaled down and the PyTorch references run: that
checks the script and the plumbing, it says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnpack.kernels.block_sparse import BlockSparsePattern, block_sparse_attention, tile_table_from_dense  # noqa: E402
from attnpack.kernels.paro import forced_blocks, paro_token_order, select_block_masks  # noqa: E402


# name -> (grid, text tokens, heads, head_dim)
SHAPES = {
    "cogvideox": ((13, 30, 45), 226, 48, 64),  # CogVideoX-5B, 49 frames 480x720: 226 text + 17,550 video tokens
    "wan": ((21, 45, 80), 0, 40, 128),  # Wan 2.1 14B 720p: 75,600 tokens
}
SMALL_SHAPES = {
    "cogvideox": ((4, 12, 16), 40, 4, 64),
    "wan": ((4, 12, 20), 0, 4, 128),
}


def make_pattern(grid, text, heads, density, block, device, seed=0) -> BlockSparsePattern:
    g = torch.Generator().manual_seed(seed)
    orders = torch.randint(0, 6, (heads,), generator=g)
    order = paro_token_order(grid, orders, block, text_len=text, device=device)
    t = order.num_tiles
    n_text = -(-text // block)
    mass = torch.rand(heads, t, t, generator=g)
    codes = select_block_masks(mass, [density], forced_blocks(t, range(0, n_text) if text else None))
    return BlockSparsePattern(tile_table_from_dense((codes == 0)[None].to(device)), order, order)


def timeit(fn, device, warmup, iters) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(shape, name, args, device, dtype, block, quants, sparse_backend, quant_backend, warmup, iters):
    grid, text, heads, dim = shape
    n = text + math.prod(grid)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(args.batch, heads, n, dim, generator=g).to(device, dtype) for _ in range(3))

    def run(pattern, backend, quant=None):
        options = {"quant": quant} if quant else None
        return timeit(
            lambda: block_sparse_attention(q, k, v, pattern, backend=backend, backend_options=options),
            device,
            warmup,
            iters,
        )

    rows = []
    with torch.no_grad():
        t_sdpa = timeit(lambda: F.scaled_dot_product_attention(q, k, v), device, warmup, iters)
        full = make_pattern(grid, text, heads, 1.0, block, device)
        dense_quant = {quant: run(full, quant_backend, quant) for quant in quants}
        for density in [float(d) for d in args.densities.split(",")]:
            pattern = make_pattern(grid, text, heads, density, block, device)
            achieved = pattern.table.visited_tiles() / (heads * pattern.table.num_q_tiles**2)
            t_sparse = run(pattern, sparse_backend)
            row = {
                "shape": name,
                "tokens": n,
                "heads": heads,
                "head_dim": dim,
                "batch": args.batch,
                "density": density,
                "achieved_density": achieved,
                "sdpa_ms": t_sdpa,
                "sparse_ms": t_sparse,
                "sparse_speedup": t_sdpa / t_sparse,
                "bound": 1.0 / achieved,
                "sparse_efficiency": t_sdpa / t_sparse * achieved,
            }
            for quant in quants:
                t_q = run(pattern, quant_backend, quant)
                row[f"{quant}_ms"] = t_q
                row[f"{quant}_speedup"] = t_sdpa / t_q
                row[f"{quant}_gain_over_sparse"] = t_sparse / t_q
                row[f"{quant}_dense_ms"] = dense_quant[quant]
                row[f"{quant}_dense_speedup"] = t_sdpa / dense_quant[quant]
            rows.append(row)
            print(
                f"{name:9s} N={n:6d} density {density:.2f} (achieved {achieved:.3f}): SDPA {t_sdpa:9.2f} ms | "
                f"sparse {t_sparse:9.2f} ms {t_sdpa / t_sparse:5.2f}x (bound {1 / achieved:4.2f}x, "
                f"efficiency {t_sdpa / t_sparse * achieved:4.2f}) | "
                + " | ".join(
                    f"{qn} {row[f'{qn}_ms']:9.2f} ms {row[f'{qn}_speedup']:5.2f}x "
                    f"(+{row[f'{qn}_gain_over_sparse']:4.2f}x over sparse)"
                    for qn in quants
                ),
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--shapes", default="cogvideox,wan")
    parser.add_argument("--densities", default="0.5,0.3,0.2")
    parser.add_argument("--quant", default=None, help="comma list of int8, fp8, int4 (default: int8, + fp8 on sm89+)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (2 = CFG batch)")
    parser.add_argument("--block-size", type=int, default=None, help="default: 64 (32 with --small)")
    parser.add_argument("--small", action="store_true", help="scaled-down shapes (default on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/paro_<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if not gpu:
        dtype = torch.float32
    small = args.small or not gpu
    shapes = SMALL_SHAPES if small else SHAPES
    block = args.block_size or (32 if small else 64)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters if args.iters is not None else (20 if gpu else 3)
    quants = args.quant.split(",") if args.quant else ["int8"]
    if args.quant is None and gpu and torch.cuda.get_device_capability(device) >= (8, 9):
        quants.append("fp8")
    sparse_backend = None if gpu else "reference"
    quant_backend = "paro_quant_triton" if gpu else "paro_quant_reference"

    results = []
    for name in args.shapes.split(","):
        results += bench_shape(
            shapes[name], name, args, device, dtype, block, quants, sparse_backend, quant_backend, warmup, iters
        )
    report = {
        "benchmark": "paro",
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dtype": str(dtype).replace("torch.", ""),
        "small_shapes": small,
        "block_size": block,
        "backends": {"sparse": sparse_backend or "auto", "quant": quant_backend},
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"paro_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def _version(name: str) -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001
        return "-"


if __name__ == "__main__":
    sys.exit(main())
