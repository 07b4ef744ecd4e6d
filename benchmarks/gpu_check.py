"""One prepared GPU check for issues 22 and 23: the GPU tests, then the benchmark table, in one call of under 8 minutes.

    python benchmarks/gpu_check.py                 # on a CUDA GPU (H100 / H200): tests + table -> JSON
    python benchmarks/gpu_check.py --tiny          # anywhere: tiny shapes (the Triton interpreter on CPU), no tests

Steps:

1. the GPU tests of the kernels (``tests/test_gna_triton.py`` with its full-size FLUX / HunyuanVideo rows,
   ``tests/test_block_sparse_triton.py``, the Triton cases of ``tests/test_clear_kernel.py``, ``tests/test_paro_kernels.py``
   with its full-size CogVideoX / Wan INT8 / FP8 rows: every kernel variant on
   the real hardware) in a subprocess with a time limit (``--test-budget-s``); pass / fail counts and the output's
   tail go to the JSON;
2. the table of issue 22 (then issue 23's PARO rows, below): ``flux-4k-gna``, ``hunyuan-720p-gna``, ``flux-4k-na``, ``hunyuan-720p-na``,
   ``flux-1024-na``, CLEAR 4096^2 r16 and CLEAR 1024^2 (r8, r16, r32), bf16, 24 heads x 128. Per case, timed side by
   side in this process: the public call (``neighborhood_attention`` / ``clear_attention`` with default options:
   tokens permuted into tile-major order, tensor-descriptor loads), the same kernel with the gathers fused into its
   loads (``permute=False``, the kernel before issue 22's change of default), and torch SDPA's fastest backend on
   the same queries and all keys. Ratios: ``speedup`` = SDPA / ours, ``fraction_of_tile_bound`` = speedup / tile
   bound.
3. issue 23's PARO rows (``paro-cogvideox-d0.3``: 13x30x45 + 226 text, 48 heads x 64; ``paro-wan720p-d0.3``:
   21x45x80, 40 heads x 128; random per-head orders and a density-0.3 block mask, 64-token tiles, bf16): sparse-only
   (the block-sparse kernel) vs the INT8 and FP8 kernel (pre-pass included) and two INT8 launch alternatives (3
   stages; 8 warps), each with its ``gain_over_sparse`` (target >= 1.3x) and cosine against sparse-only.

The JSON (``results/gpu-check-<device>.json``, kept if it exists unless ``--force``) is rewritten after every case,
so a run cut short keeps what it measured; cases not reached within ``--budget-s`` are listed as such. Records the
device, torch / triton / diffusers versions and every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

# issue 22's table (case names of benchmarks/attention.py and benchmarks/clear.py)
TABLE = [
    "flux-4k-gna",
    "hunyuan-720p-gna",
    "flux-4k-na",
    "hunyuan-720p-na",
    "flux-1024-na",
    "flux-4096-clear-r16",
    "flux-1024-clear-r8",
    "flux-1024-clear-r16",
    "flux-1024-clear-r32",
]
# issue 23: PARO sparse-only vs the INT8 / FP8 kernel at density 0.3 (shape names of benchmarks/paro.py)
PARO_TABLE = ["paro-cogvideox-d0.3", "paro-wan720p-d0.3"]
# launch alternatives of the INT8 kernel timed next to its defaults (quantized_triton's num_warps / num_stages)
PARO_LAUNCHES = {"int8-stages3": ("int8", None, 3), "int8-warps8": ("int8", 8, None)}
TEST_FILES = [
    "tests/test_gna_triton.py",
    "tests/test_block_sparse_triton.py",
    "tests/test_clear_kernel.py",
    "tests/test_paro_kernels.py",
]
VARIANTS = {"fused-gather": {"permute": False}}  # timed next to the public call (default options)


def run_tests(budget_s: float) -> dict:
    """The kernel tests in a fresh process (no interpreter: on a GPU they run there), within ``budget_s``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES, "-k", "triton or gpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}
    seconds = round(time.perf_counter() - t0, 1)
    return dict(command=" ".join(cmd[1:]), returncode=rc, timed_out=rc is None, seconds=seconds, counts=counts,
                tail=output[-3000:])  # fmt: skip


@dataclasses.dataclass
class Tiny:
    """A tiny stand-in of a table case (``--tiny``): same code path, interpreter-sized shapes."""

    kind: str
    grid: tuple
    window: object = None
    stride: object = 1
    text: int = 0
    radius: int = 0


TINY = {
    "flux-4k-gna": Tiny("gna", (16, 16), 8, 4),
    "flux-4k-na": Tiny("gna", (16, 16), 5),
    "flux-1024-na": Tiny("gna", (8, 16), 5, text=12),
    "hunyuan-720p-na": Tiny("gna", (2, 8, 8), (2, 3, 3)),
    "flux-1024-clear-r8": Tiny("clear", (8, 8), text=16, radius=3),
}


def build(name: str, device, dtype, tiny: bool):
    """``(workload, pattern)`` of a case: the public call and the block-sparse pattern it runs."""
    import attention
    import clear  # noqa: F401  (registers the CLEAR cases)

    from attnpack.kernels.clear import ClearSpec, clear_pattern
    from attnpack.kernels.neighborhood import cached_neighborhood_pattern, normalize_neighborhood_args

    if not tiny:
        work = attention.CASES[name].build(device, dtype, "triton")
        d = work.details
        if "radius" in d:
            pattern = clear_pattern(ClearSpec(tuple(d["grid"]), d["text_tokens"], d["radius"], d["down_factor"]))
        else:
            spec = normalize_neighborhood_args(d["grid"], d["window"], d["stride"], d["dilation"], d["causal"])
            pattern = cached_neighborhood_pattern(spec, num_extra=d["text_tokens"], device=device)
        return work, pattern.to(device)
    t = TINY[name]
    if t.kind == "gna":
        case = attention.gna_case(name, "tiny", (device.type,), t.grid, t.window, t.stride, text=t.text, heads=2,
                                  head_dim=32)  # fmt: skip
        work = case.build(device, dtype, "triton")
        spec = normalize_neighborhood_args(t.grid, t.window, t.stride)
        pattern = cached_neighborhood_pattern(spec, num_extra=t.text, device=device)
    else:
        case = clear.clear_case(t.grid[0] * 16, t.radius, 1, devices=(device.type,), heads=2, head_dim=32, text=t.text,
                                name=name)  # fmt: skip
        work = case.build(device, dtype, "triton")
        pattern = clear_pattern(ClearSpec(t.grid, t.text, t.radius, 1))
    return work, pattern.to(device)


def run_paro_case(name: str, device, dtype, repeats: int, tiny: bool) -> dict:
    """Sparse-only PARO (the block-sparse kernel, orders fused into its loads) vs the INT8 / FP8 kernel (pre-pass
    included) and the INT8 launch alternatives, on the same random per-head orders and block mask; ``gain`` =
    sparse-only time / quantized time (issue 23's target: >= 1.3), ``cosine`` against the sparse-only output."""
    import math

    import torch
    from _common import time_fn
    from paro import SHAPES, paro_pattern

    from attnpack.kernels.block_sparse import block_sparse_attention
    from attnpack.kernels.paro.metrics import fidelity
    from attnpack.kernels.paro.triton import quantized_triton

    shape, density = name.removeprefix("paro-").rsplit("-d", 1)
    density = float(density)
    if tiny:
        grid, text, heads, head_dim, block = (2, 4, 8), 8, 2, 32, 16
    else:
        (grid, text, heads, head_dim, _), block = SHAPES[shape], 64
    n = text + math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
    pattern = paro_pattern(grid, text, heads, density, block, device)
    fp8 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
    runs = {"sparse": lambda: block_sparse_attention(q, k, v, pattern, backend="triton")}
    for quant in ("int8", "fp8") if fp8 else ("int8",):
        runs[quant] = lambda quant=quant: quantized_triton(q, k, v, pattern, quant=quant)
    for label, (quant, warps, stages) in PARO_LAUNCHES.items():
        runs[label] = lambda quant=quant, w=warps, s=stages: quantized_triton(
            q, k, v, pattern, quant=quant, num_warps=w, num_stages=s
        )
    timing = dict(warmup=1, repeats=repeats)
    result = dict(case=name, tiny=tiny, dtype=str(dtype).replace("torch.", ""), grid=list(grid), text_tokens=text,
                  heads=heads, head_dim=head_dim, block_size=block, density=density)  # fmt: skip
    outs = {}
    with torch.no_grad():
        for label, fn in runs.items():
            t0 = time.perf_counter()
            outs[label] = fn()  # first call: compiles
            first = time.perf_counter() - t0
            ms = time_fn(fn, device, **timing)["median_ms"]
            result[label] = dict(time_ms=round(ms, 4), first_call_s=round(first, 2))
    sparse_ms = result["sparse"]["time_ms"]
    for label in runs:
        if label != "sparse":
            result[label]["gain_over_sparse"] = round(sparse_ms / result[label]["time_ms"], 3)
            result[label]["cosine_vs_sparse"] = fidelity(outs["sparse"].float(), outs[label].float())["cosine"]
    return result


def run_case(name: str, device, dtype, repeats: int, tiny: bool) -> dict:
    import torch
    from _common import sdpa_best, time_fn

    from attnpack.kernels.block_sparse import block_sparse_attention
    from attnpack.kernels.block_sparse.naive import masked_attention, pattern_mask

    work, pattern = build(name, device, dtype, tiny)
    q, k, v = work.dense
    timing = dict(warmup=1, repeats=repeats)
    t0 = time.perf_counter()
    out = work.run()  # first call: compiles
    first_call_s = time.perf_counter() - t0
    rows = {"default": time_fn(work.run, device, **timing)["median_ms"]}
    for label, options in VARIANTS.items():

        def run(options=options):
            with torch.no_grad():
                return block_sparse_attention(q, k, v, pattern, backend="triton", backend_options=options)

        other = run()
        rows[label] = time_fn(run, device, **timing)["median_ms"]
        rows[label + "_max_abs_diff_vs_default"] = float((other.float() - out.float()).abs().max())
    sdpa_name, sdpa = sdpa_best(q, k, v, device, **timing)
    result = dict(case=name, tiny=tiny, dtype=str(dtype).replace("torch.", ""), first_call_s=round(first_call_s, 2),
                  sdpa_backend=sdpa_name, sdpa_ms=round(sdpa["median_ms"], 4), tile_bound=round(work.tile_bound, 3),
                  **work.details)  # fmt: skip
    for label in ["default", *VARIANTS]:
        speedup = sdpa["median_ms"] / rows[label]
        result[label] = dict(time_ms=round(rows[label], 4), speedup=round(speedup, 3),
                             fraction_of_tile_bound=round(speedup / work.tile_bound, 3))  # fmt: skip
        if label != "default":
            result[label]["max_abs_diff_vs_default"] = rows[label + "_max_abs_diff_vs_default"]
    if tiny:  # small enough for the dense oracle
        ref = masked_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), pattern_mask(pattern))
        result["max_abs_err_vs_oracle"] = float((out.cpu().double() - ref).abs().max())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes anywhere (interpreter on CPU); no tests")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of the table (default: all)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-budget-s", type=float, default=120.0)
    parser.add_argument("--budget-s", type=float, default=400.0, help="stop starting new cases after this (total)")
    parser.add_argument("--paro-reserve-s", type=float, default=120.0, help="part of --budget-s kept for PARO rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", "-o", default=None, help="JSON (default: results/gpu-check-<device>.json)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if args.tiny and "torch" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
    import torch
    from _common import machine_info, result_path, write_json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.error("no CUDA GPU here: run with --tiny to check the script on tiny shapes")
    slug = "tiny" if args.tiny else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    out = result_path(parser, args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{slug}.json", args.force)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = args.cases or (list(TINY) + PARO_TABLE if args.tiny else TABLE + PARO_TABLE)
    report = dict(machine=machine_info(device), command=" ".join(sys.argv), tests=None, cases=[], not_run=[])
    if not (args.tiny or args.skip_tests):
        report["tests"] = run_tests(args.test_budget_s)
        print("tests:", report["tests"]["counts"], "timed out" if report["tests"]["timed_out"] else "", flush=True)
        write_json(out, report)
    for name in names:
        # issue 22's rows leave --paro-reserve-s of the budget to the PARO rows still to come
        later_paro = any(n.startswith("paro-") for n in names[names.index(name) + 1 :]) and not name.startswith(
            "paro-"
        )
        budget = args.budget_s - (args.paro_reserve_s if later_paro else 0.0)
        if time.perf_counter() - t_start > budget:
            report["not_run"].append(name)
            continue
        try:
            run = run_paro_case if name.startswith("paro-") else run_case
            r = run(name, device, dtype, args.repeats, args.tiny)
        except Exception as e:  # one failing case must not lose the others
            r = dict(case=name, error=f"{type(e).__name__}: {e}"[:2000])
        report["cases"].append(r)
        write_json(out, report)
        if "error" in r:
            print(f"{name:22s} ERROR {r['error'][:200]}", flush=True)
        elif name.startswith("paro-"):
            cols = [f"{k} {r[k]['time_ms']:9.3f} ms" + (f" {r[k]['gain_over_sparse']:5.2f}x" if k != "sparse" else "")
                    for k in r if isinstance(r[k], dict)]  # fmt: skip
            print(f"{name:22s} " + " | ".join(cols), flush=True)
        else:
            cols = [
                f"{k} {r[k]['time_ms']:9.3f} ms {r[k]['speedup']:6.2f}x ({r[k]['fraction_of_tile_bound']:.0%} of "
                f"{r['tile_bound']}x)"
                for k in ["default", *VARIANTS]
            ]
            print(f"{name:22s} sdpa[{r['sdpa_backend']}] {r['sdpa_ms']:9.3f} ms | " + " | ".join(cols), flush=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out, report)
    print(f"wrote {out} ({report['seconds']} s)")
    return 0


def _has_cuda() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


if __name__ == "__main__":
    sys.exit(main())
