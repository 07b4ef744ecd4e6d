"""PARO attention speed: block-sparse (and INT8 / FP8) attention vs torch SDPA at CogVideoX and Wan 2.1 shapes.

One command on a GPU machine::

    python benchmarks/paro.py                 # writes results/paro-cuda.json (paro-cpu.json on CPU; never overwrites: --force)
    python benchmarks/paro.py --list

Built on the shared harness of ``benchmarks/attention.py`` (its ``Case`` / ``Workload`` / ``run_case``: our time,
the fastest torch SDPA backend on the same queries and keys, speedup, tile bound, effective TFLOP/s). For every shape
and density it runs PARO block-sparse attention without quantization (the shared Triton kernel, per-head reordering
fused into its loads) and with quantization (``paro_quant_triton``: fused permute + smooth + quantize pre-pass, then
the INT8 / FP8 kernel), and adds PARO's two targets: the efficiency ``speedup x density`` (>= 0.8 at density >= 0.2)
and the quantization gain over sparse-only (>= 1.3x). Masks come from random block masses through PARO's mask rule
(diagonal, text and last blocks kept), orders are random per head: latency does not depend on the values.

On CPU the shapes are scaled down and the PyTorch references run: that checks the plumbing, not GPU speed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attention import Case, Workload, _rand, run_case  # noqa: E402


# name -> (grid, text tokens, heads, head_dim, devices)
SHAPES = {
    "cogvideox": ((13, 30, 45), 226, 48, 64, ("cuda",)),  # CogVideoX-5B 49 x 480 x 720: 226 text + 17,550 video
    "wan720p": ((21, 45, 80), 0, 40, 128, ("cuda",)),  # Wan 2.1 14B 720p: 75,600 tokens
    "cpu-cogvideox": ((4, 12, 16), 40, 4, 64, ("cpu",)),
    "cpu-wan": ((4, 12, 20), 0, 4, 128, ("cpu",)),
}
DENSITIES = (0.5, 0.3, 0.2)
QUANTS = (None, "int8", "fp8")


def paro_pattern(grid, text, heads, density, block, device, seed=0):
    from attnpack.kernels.block_sparse import BlockSparsePattern, tile_table_from_dense
    from attnpack.kernels.paro import forced_blocks, paro_token_order, select_block_masks

    g = torch.Generator().manual_seed(seed)
    order = paro_token_order(grid, torch.randint(0, 6, (heads,), generator=g), block, text_len=text, device=device)
    t = order.num_tiles
    n_text = -(-text // block)
    mass = torch.rand(heads, t, t, generator=g)
    codes = select_block_masks(mass, [density], forced_blocks(t, range(0, n_text) if text else None))
    return BlockSparsePattern(tile_table_from_dense((codes == 0)[None].to(device)), order, order)


def paro_case(shape: str, density: float, quant: str | None, block: int) -> Case:
    grid, text, heads, head_dim, devices = SHAPES[shape]
    name = f"paro-{shape}-d{density:g}-{quant or 'sparse'}"

    def build(device: torch.device, dtype: torch.dtype, backend: str | None) -> Workload:
        from attnpack.kernels.block_sparse import block_sparse_attention

        n = text + math.prod(grid)
        q, k, v = (_rand((1, heads, n, head_dim), device, dtype, s) for s in range(3))
        pattern = paro_pattern(grid, text, heads, density, block, device)
        options = {"quant": quant} if quant else None

        def run():
            with torch.no_grad():
                return block_sparse_attention(q, k, v, pattern, backend=backend, backend_options=options)

        stats = pattern.stats()
        visited = pattern.table.visited_tiles()
        achieved = visited / (heads * pattern.table.num_q_tiles**2)
        details = dict(
            shape=shape,
            grid=list(grid),
            text_tokens=text,
            tokens=n,
            heads=heads,
            head_dim=head_dim,
            block_size=block,
            density=density,
            achieved_density=round(achieved, 4),
            quant=quant,
        )
        pairs = int(round(achieved * n * n * heads))  # tokens attended (padding aside)
        return Workload(run, (q, k, v), pairs, stats["tile_bound"], details)

    description = f"PARO {shape}, density {density:g}, " + (f"{quant} attention" if quant else "sparse only")
    return Case(name, description, devices, build)


class _ListShapes(argparse.Action):
    """``--list``: print the shapes and exit while parsing (before the runner's output check)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for name, (grid, text, heads, dim, devices) in SHAPES.items():
            print(f"{name:14s} [{', '.join(devices)}] grid {grid} + {text} text, {heads} heads x {dim}")
        parser.exit()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--shapes", nargs="*", default=None, help="default: every shape for the device")
    parser.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    parser.add_argument(
        "--quant", nargs="*", default=None, help="none int8 fp8 int4 (default: none int8, + fp8 on sm89+)"
    )
    parser.add_argument("--block-size", type=int, default=None, help="default: 64 (32 for the CPU shapes)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--list", action=_ListShapes, help="list the shapes and exit")


def run(args: argparse.Namespace) -> dict:
    from attnpack._utils import parse_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = parse_dtype(args.dtype or ("bf16" if gpu else "fp32"))
    shapes = args.shapes or [s for s, spec in SHAPES.items() if device.type in spec[4]]
    quants = [None if q == "none" else q for q in args.quant] if args.quant else [None, "int8"]
    if args.quant is None and gpu and torch.cuda.get_device_capability(device) >= (8, 9):
        quants.append("fp8")
    results = []
    for shape in shapes:
        block = args.block_size or (64 if gpu else 32)
        for density in args.densities:
            sparse_time = None
            for quant in quants:
                if quant is None:
                    backend = "triton" if gpu else "reference"
                else:
                    backend = "paro_quant_triton" if gpu else "paro_quant_reference"
                r = run_case(paro_case(shape, density, quant, block), device, dtype, backend, args.repeats)
                r["bound_inverse_density"] = round(1 / r["achieved_density"], 3)
                r["efficiency"] = round(r["speedup_over_sdpa"] * r["achieved_density"], 3)
                if quant is None:
                    sparse_time = r["time_ms"]
                elif sparse_time is not None:
                    r["gain_over_sparse"] = round(sparse_time / r["time_ms"], 3)
                results.append(r)
                print(
                    f"{r['case']:34s} {r['time_ms']:10.3f} ms  sdpa[{r['sdpa_backend']}] {r['sdpa_time_ms']:10.3f} ms"
                    f"  speedup {r['speedup_over_sdpa']:6.2f}x  1/density {r['bound_inverse_density']:5.2f}x"
                    f"  efficiency {r['efficiency']:5.2f}"
                    + (f"  gain over sparse {r['gain_over_sparse']:5.2f}x" if "gain_over_sparse" in r else ""),
                    flush=True,
                )
    return {"cases": results}


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("paro", module=sys.modules[__name__]))
