"""Compile the block-sparse Triton kernel for a GPU target **without a GPU** and report what the compiler made of it:
registers, stack frame (spills), and counts of telling SASS instructions (``LDL``/``STL``: local-memory spills,
``LDG``: plain global loads, ``LDGSTS``: asynchronous copies the software pipeline issues, ``HGMMA``: Hopper
tensor-core instructions). Costs no device time; uses the ``cuobjdump`` shipped with Triton. Writes
``results/kernel-resources-sm90.json``.

    python benchmarks/kernel_resources.py            # the default blocks, gathered vs contiguous, with / without mask

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

OPS = ("HGMMA", "HMMA", "LDL", "STL", "LDG", "LDGSTS", "UTMALDG")
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "LSE": "*fp32", "QI": "*i32", "KI": "*i32",
            "TBL": "*i32", "NKV": "*i32", "NFULL": "*i32", "MP": "*i32"}  # fmt: skip


def compile_variant(
    arch: int, tile: int, blocks: tuple[int, int, int, int], head_dim: int, gather: bool, mask
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnpack.kernels.block_sparse.triton import _block_sparse_fwd

    bm, bn, warps, stages = blocks
    mask_fn, rows_fn = mask
    constexprs = dict(
        Q_TILE=tile, KV_TILE=tile, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=head_dim,
        BLOCK_DV=head_dim, Q_GATHER=gather, KV_GATHER=gather, MASK_FN=mask_fn, MASK_ROWS_FN=rows_fn, HAS_LSE=False,
        DOT_F32=False,
    )  # fmt: skip
    names = list(_block_sparse_fwd.arg_names)
    signature = {}
    for n in names:
        signature[n] = "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32")
    src = ASTSource(_block_sparse_fwd, signature, {(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile", type=int, default=128, help="tokens per query / key tile")
    parser.add_argument("--out", default=None, help="JSON file (default: results/kernel-resources-sm<arch>.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_json

    from attnpack.kernels.block_sparse.triton import default_blocks
    from attnpack.kernels.neighborhood.triton import neighborhood_keys_triton, neighborhood_rows_triton

    blocks = default_blocks(args.tile, args.tile, args.head_dim, cuda=True)
    masks = {"none": (None, None), "gna": (neighborhood_keys_triton, neighborhood_rows_triton)}
    rows = []
    for gather in (True, False):
        for mask_name, mask in masks.items():
            r = compile_variant(args.arch, args.tile, blocks, args.head_dim, gather, mask)
            rows.append(dict(blocks=list(blocks), gather=gather, mask=mask_name, **r))
            print(f"blocks {blocks} {'gathered' if gather else 'contiguous'} rows, mask {mask_name:4s}: "
                  + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)  # fmt: skip
    import triton

    out = Path(args.out or Path(__file__).parent / "results" / f"kernel-resources-sm{args.arch}.json")
    write_json(out, {"triton": triton.__version__, "arch": args.arch, "head_dim": args.head_dim, "tile": args.tile,
                     "rows": rows})  # fmt: skip
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
