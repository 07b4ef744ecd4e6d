"""Compile the block-sparse Triton kernel for a GPU target **without a GPU** and report what the compiler made of it:
registers, stack frame (spills), and counts of telling SASS instructions (``LDL``/``STL``: local-memory spills,
``LDG``: plain global loads, ``LDGSTS``: asynchronous copies the software pipeline issues, ``UTMALDG``: tensor-memory
(TMA) loads through tensor descriptors, ``BAR``: block-wide barriers, ``HGMMA`` / ``IGMMA`` / ``QGMMA``: Hopper's
warpgroup tensor-core instructions on fp16 / bf16, int8 and fp8 operands, ``HMMA`` / ``IMMA``: the older per-warp
fp16 and integer ones). Costs no device time; uses the
``cuobjdump`` shipped with Triton. Writes ``results/kernel-resources-sm<arch>.json`` (an existing file is kept unless
``--force``; ``--out`` another path).

    python benchmarks/kernel_resources.py --out /tmp/kr.json   # every variant below at the default blocks
    python benchmarks/kernel_resources.py --paro --out /tmp/kr-paro.json   # PARO's INT8 / FP8 kernel

Variants: how K / V rows arrive (``gathered``: through the key order inside the kernel, ``contiguous``: rows already in
tile-major order, plain pointer loads, ``tma``: the same rows through tensor descriptors) x the in-tile mask (``none``,
``gna-index``: the GNA rule on original key indices, ``gna-tile``: the tile-local separable GNA rule the kernel uses,
``clear-none`` / ``clear-index`` / ``clear-tile``: no mask and the same two for CLEAR's circle, at CLEAR's 64-token key
tiles).

``--paro``: PARO's INT8 / FP8 quantized attention kernel instead (``PARO_VARIANTS``: INT8 and FP8 PV, head dims 64
and 128, the launch defaults and a few alternatives), written to ``results/kernel-resources-sm<arch>-paro.json``.

Read with care: these are compiler facts, not timings (a kernel without spills is not necessarily faster).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

OPS = ("HGMMA", "IGMMA", "QGMMA", "IMMA", "HMMA", "LDL", "STL", "LDG", "LDGSTS", "UTMALDG", "BAR")
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "LSE": "*fp32", "QI": "*i32", "KI": "*i32",
            "TBL": "*i32", "NKV": "*i32", "NFULL": "*i32", "MP": "*i32"}  # fmt: skip
ROWS = ("gathered", "contiguous", "tma")


def masks() -> dict:
    """``name -> (mask_fn, rows_fn, tile-local?, tile args, key tile)`` for a 2-D GNA pattern in (16, 8) key tiles
    (NATTEN's Hopper tiles, 128 tokens; ``key tile`` ``None``: ``--tile``) and CLEAR in its default (8, 8) key boxes
    (64 tokens; query tiles stay ``--tile``)."""
    from attnpack.kernels.clear.triton import clear_mask_triton, clear_rows_triton, clear_tile_triton
    from attnpack.kernels.neighborhood.triton import (
        neighborhood_keys_triton,
        neighborhood_rows_triton,
        neighborhood_tile_triton,
    )

    return {
        "none": (None, None, False, None, None),
        "gna-index": (neighborhood_keys_triton, neighborhood_rows_triton, False, None, None),
        "gna-tile": (neighborhood_tile_triton, neighborhood_rows_triton, True, (1, 16, 8), None),
        "clear-none": (None, None, False, None, 64),
        "clear-index": (clear_mask_triton, None, False, None, 64),
        "clear-tile": (clear_tile_triton, clear_rows_triton, True, (8, 8), 64),
    }


def compile_variant(
    arch: int, tile: int, kv_tile: int, blocks: tuple[int, int, int, int], head_dim: int, rows: str, mask
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnpack.kernels.block_sparse.triton import _block_sparse_fwd

    bm, bn, warps, stages = blocks
    mask_fn, rows_fn, local, args, _ = mask
    gather, tma = rows == "gathered", rows == "tma"
    constexprs = dict(
        Q_TILE=tile, KV_TILE=kv_tile, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=head_dim,
        BLOCK_DV=head_dim, Q_GATHER=gather, KV_GATHER=gather, USE_TMA=tma, MASK_FN=mask_fn, MASK_ROWS_FN=rows_fn,
        MASK_LOCAL=local, MASK_ARGS=args, HAS_LSE=False, DOT_F32=False,
    )  # fmt: skip
    descs = {"QD": bm, "KD": bn, "VD": bn, "OD": bm}
    if not tma:
        constexprs.update(dict.fromkeys(descs))  # None: no descriptors
    names = list(_block_sparse_fwd.arg_names)
    signature = {}
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
        elif n in descs:
            signature[n] = f"tensordesc<bf16[1, 1, {descs[n]}, {head_dim}]>"
        else:
            signature[n] = POINTERS.get(n, "fp32" if n == "qk_scale" else "i32")
    src = ASTSource(_block_sparse_fwd, signature, {(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    return facts(kernel)


def facts(kernel) -> dict:
    """Registers, stack bytes, shared memory and the SASS counts of ``OPS`` of a compiled kernel."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([tools / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", usage.stdout)
    stack = re.search(r"STACK:(\d+)", usage.stdout)
    return dict(
        registers=int(reg[1]) if reg else None,
        stack_bytes=int(stack[1]) if stack else None,
        shared_bytes=kernel.metadata.shared,
        sass_lines=len(sass.splitlines()),
        **{op: len(re.findall(rf"\b{op}\b", sass)) for op in OPS},
    )


# PARO's quantized attention kernel (attnpack.kernels.paro.triton): (quant, head dim, BLOCK, warps, stages); BLOCK is
# the token tile (query rows and key rows of one step); None: the launch defaults of ``quantized_triton``
PARO_VARIANTS = [
    (quant, d, block, warps, stages)
    for quant in ("int8", "fp8")
    for d in (64, 128)
    for block, warps, stages in ((64, None, None), (64, 4, 3), (64, 8, 2), (128, None, None), (128, 8, 3))
]


def paro_launch(block: int, warps: int | None, stages: int | None) -> tuple[int, int]:
    """``(num_warps, num_stages)`` that ``quantized_triton`` launches for ``BLOCK`` when not given."""
    from attnpack.kernels.paro.triton import default_launch

    w, s = default_launch(block)
    return warps or w, stages or s


def compile_paro(
    arch: int, quant: str, head_dim: int, block: int, warps: int, stages: int, hints: bool = True
) -> dict:
    """Compile ``_paro_quant_attn_fwd`` as ``quantized_triton`` launches it on a GPU (bf16 output, no LSE)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnpack.kernels.paro.quant import quant_spec
    from attnpack.kernels.paro.triton import _paro_quant_attn_fwd

    spec = quant_spec(quant)
    constexprs = dict(BLOCK=block, BLOCK_D=head_dim, BLOCK_DV=head_dim, PV_MAX=spec.pv_max, PV_FP8=spec.pv_fp8,
                      UPCAST=False, RETURN_LSE=False)  # fmt: skip
    pointers = {"Q": "*i8", "K": "*i8", "V": "*fp8e4nv" if spec.pv_fp8 else "*i8", "OUT": "*bf16", "QS": "*fp32",
                "KS": "*fp32", "VS": "*fp32", "VM": "*fp32", "LSE": "*fp32", "QIDX": "*i32", "KIDX": "*i32",
                "TILES": "*i32", "NUMKV": "*i32"}  # fmt: skip
    names = list(_paro_quant_attn_fwd.arg_names)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "sm" else "i32") for n in names}
    # what a launch at the real shapes specializes (Triton marks pointers and integers divisible by 16): torch's
    # pointers, the head dims, the 64-token tile and the order strides (multiples of the tile); without these hints
    # the K / V tiles load byte by byte (masks of unknown constancy) and the software pipeline skips them
    aligned = [n for n in names if n in pointers or n in ("D", "DV", "S", "QI_STRIDE", "KI_STRIDE")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned} if hints else None
    src = ASTSource(_paro_quant_attn_fwd, signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    return facts(kernel)


def main_paro(args) -> list[dict]:
    rows = []
    for quant, d, block, warps, stages in PARO_VARIANTS:
        if (args.paro_quant and quant not in args.paro_quant) or (args.paro_defaults and (warps or stages)):
            continue
        w, s = paro_launch(block, warps, stages)
        r = compile_paro(args.arch, quant, d, block, w, s)
        default = warps is None and stages is None
        rows.append(dict(quant=quant, head_dim=d, block=block, num_warps=w, num_stages=s, default=default, **r))
        print(f"paro {quant} d{d} block {block} warps {w} stages {s}{' (default)' if default else ''}: "
              + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile", type=int, default=128, help="tokens per query / key tile")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="how K / V rows arrive")
    parser.add_argument("--masks", nargs="+", default=None, help="mask variants (default: all)")
    parser.add_argument(
        "--out", "-o", default=None, help="JSON file (default: results/kernel-resources-sm<arch>.json)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    parser.add_argument("--paro", action="store_true", help="PARO's INT8 / FP8 kernel instead (PARO_VARIANTS)")
    parser.add_argument("--paro-quant", nargs="+", choices=("int8", "fp8"), default=None, help="with --paro")
    parser.add_argument("--paro-defaults", action="store_true", help="with --paro: the launch defaults only")
    parser.add_argument("--blocks", type=int, nargs=4, default=None, metavar=("M", "N", "WARPS", "STAGES"),
                        help="blocks to compile (default: default_blocks, bf16, this tile and head dim)")  # fmt: skip
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import result_path, write_json

    from attnpack.kernels.block_sparse.triton import default_blocks

    name = f"kernel-resources-sm{args.arch}{'-paro' if args.paro else ''}.json"
    out = result_path(parser, args.out or Path(__file__).parent / "results" / name, args.force)
    if args.paro:
        import triton

        write_json(out, {"triton": triton.__version__, "arch": args.arch, "kernel": "paro", "rows": main_paro(args)})
        print("wrote", out)
        return 0
    variants = masks()
    rows = []
    for how in args.rows:
        for mask_name in args.masks or variants:
            kv_tile = variants[mask_name][4] or args.tile
            blocks = (
                tuple(args.blocks) if args.blocks else default_blocks(args.tile, kv_tile, args.head_dim, cuda=True)
            )
            r = compile_variant(args.arch, args.tile, kv_tile, blocks, args.head_dim, how, variants[mask_name])
            rows.append(dict(blocks=list(blocks), kv_tile=kv_tile, rows=how, gather=how == "gathered", mask=mask_name,
                             **r))  # fmt: skip
            print(f"blocks {blocks} {how:10s} rows, mask {mask_name:11s}: "
                  + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)  # fmt: skip
    import triton

    write_json(out, {"triton": triton.__version__, "arch": args.arch, "head_dim": args.head_dim, "tile": args.tile,
                     "rows": rows})  # fmt: skip
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
