"""Sparse attention kernels vs torch SDPA, measured side by side in one run; results as JSON.

    python benchmarks/attention.py                      # every case for this machine's device (CUDA or CPU)
    python benchmarks/attention.py --cases flux-4k-gna hunyuan-720p-gna --backend flex
    python benchmarks/attention.py --list

Per case: our time, torch SDPA's time (the fastest SDPA backend usable here, on the same queries and keys), the
speedup, the tile-bound speedup (query tiles x key tiles / key tiles visited) and the fraction of it reached, the
effective TFLOP/s (4 * D * attended pairs / time) and, for memory cases, peak memory of the call measured in a fresh
process against the size of one N x N float32 matrix.

Adding a case (CLEAR, PARO, ...): write ``build(device, dtype) -> Workload`` and register it with
``CASES["my-case"] = Case("my-case", "what it is", ("cuda",), build)``; :class:`Workload` says what to time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import child_peak_rss, machine_info, peak_rss_child, sdpa_best, time_fn, write_json  # noqa: E402


@dataclasses.dataclass
class Workload:
    """What a case times.

    Attributes:
        run: our kernel call (no arguments).
        dense: ``(q, k, v)`` for the torch SDPA baseline computing the same queries against all keys.
        attended_pairs: (query, key) pairs our kernel must compute, summed over batch and heads.
        tile_bound: speedup bound from tiles visited (``None`` if not tile-based).
        details: shapes and settings, copied to the JSON.
        memory: optional payload for a fresh-process peak-memory measurement (see ``memory_child``).
    """

    run: Callable[[], Any]
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    attended_pairs: int
    tile_bound: float | None
    details: dict[str, Any]
    memory: dict[str, Any] | None = None


@dataclasses.dataclass
class Case:
    name: str
    description: str
    devices: tuple[str, ...]
    build: Callable[[torch.device, torch.dtype, str | None], Workload]


CASES: dict[str, Case] = {}


def _rand(shape, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------- GNA cases
def _gna_pairs(spec) -> int:
    """Exact number of (query, key) pairs in the GNA pattern: the product over axes of the per-axis window sums."""
    from attnpack.kernels.neighborhood.windows import axis_windows

    total = 1
    for n, k, s, d, c in zip(spec.grid, spec.window, spec.stride, spec.dilation, spec.causal):
        _, start, end = axis_windows(n, k, s, d, c)
        total *= int((end - start).sum())
    return total


def gna_case(
    name: str,
    description: str,
    devices: tuple[str, ...],
    grid: tuple[int, ...],
    window,
    stride=1,
    dilation=1,
    is_causal=False,
    *,
    text: int = 0,
    batch: int = 1,
    heads: int = 24,
    head_dim: int = 128,
    memory: bool = False,
) -> Case:
    """A GNA case: ``neighborhood_attention`` on ``grid`` (plus ``text`` extra keys) vs SDPA over all keys."""

    def build(device: torch.device, dtype: torch.dtype, backend: str | None) -> Workload:
        from attnpack.kernels import neighborhood_attention
        from attnpack.kernels.neighborhood import cached_neighborhood_pattern, normalize_neighborhood_args

        spec = normalize_neighborhood_args(grid, window, stride, dilation, is_causal)
        n = spec.num_tokens
        q, k, v = (_rand((batch, heads, n, head_dim), device, dtype, s) for s in range(3))
        ek, ev = (_rand((batch, heads, text, head_dim), device, dtype, s) for s in (3, 4)) if text else (None, None)
        kwargs = dict(
            grid_shape=grid,
            window_size=window,
            stride=stride,
            dilation=dilation,
            is_causal=is_causal,
            additional_keys=ek,
            additional_values=ev,
            backend=backend,
        )

        def run():
            with torch.no_grad():
                return neighborhood_attention(q, k, v, **kwargs)

        pattern = cached_neighborhood_pattern(spec, num_extra=text, device=device)
        dense_k = k if ek is None else torch.cat([k, ek], dim=2)
        dense_v = v if ev is None else torch.cat([v, ev], dim=2)
        stats = pattern.stats()
        details = dict(
            grid=list(grid),
            window=list(spec.window),
            stride=list(spec.stride),
            dilation=list(spec.dilation),
            causal=list(spec.causal),
            text_tokens=text,
            batch=batch,
            heads=heads,
            head_dim=head_dim,
            tokens=n,
            tiles=f"{pattern.q_tile}x{pattern.kv_tile} tokens",
            masked_tile_fraction=round(stats["masked_fraction"], 4),
            fully_block_sparse=stats["fully_block_sparse"],
        )
        mem = None
        if memory:
            mem = dict(kind="gna", grid=list(grid), window=window, batch=batch, heads=heads, head_dim=head_dim)
        pairs = (_gna_pairs(spec) + n * text) * batch * heads
        return Workload(run, (q, dense_k, dense_v), pairs, stats["tile_bound"], details, mem)

    return Case(name, description, devices, build)


for _case in (
    gna_case("flux-1024-na", "FLUX 1024^2: 64x64 image tokens + 512 text keys, window 33", ("cuda",), (64, 64), 33,
             text=512),
    gna_case("flux-4k-na", "FLUX 4K: 256x256 tokens, window 80 (NATTEN docs' NA row)", ("cuda",), (256, 256), 80),
    gna_case("flux-4k-gna", "FLUX 4K: 256x256 tokens, window 80, stride 16 (GNA paper)", ("cuda",), (256, 256), 80,
             16),
    gna_case("hunyuan-720p-na", "HunyuanVideo 720p: 30x48x80 tokens, window (18,24,24)", ("cuda",), (30, 48, 80),
             (18, 24, 24)),
    gna_case("hunyuan-720p-gna", "HunyuanVideo 720p: 30x48x80, window (18,24,24), stride (16,8,8) (GNA paper)",
             ("cuda",), (30, 48, 80), (18, 24, 24), (16, 8, 8)),
    gna_case("cpu-small-na", "small CPU case: 32x32 tokens + 64 text keys, window 9, 4 heads x 64", ("cpu",),
             (32, 32), 9, text=64, heads=4, head_dim=64),
    gna_case("cpu-memory-128", "reference backend, 128x128 tokens, window 13, 1 head x 64: peak memory vs N x N",
             ("cpu",), (128, 128), 13, heads=1, head_dim=64, memory=True),
):  # fmt: skip
    CASES[_case.name] = _case


# ------------------------------------------------------------------------------------------------- memory
def memory_child(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS of one reference-backend call (inputs allocated before measuring)."""
    from attnpack.kernels import neighborhood_attention

    torch.set_num_threads(payload["threads"])
    grid, window = tuple(payload["grid"]), payload["window"]
    n = math.prod(grid)
    shape = (payload["batch"], payload["heads"], n, payload["head_dim"])

    def setup():
        q, k, v = (_rand(shape, torch.device("cpu"), torch.float32, s) for s in range(3))
        small = tuple(min(8, g) for g in grid)  # warm up code paths (allocator, imports) on a small problem
        x = q[:, :, : math.prod(small)]
        neighborhood_attention(x, x, x, grid_shape=small, window_size=3, backend="reference")
        return q, k, v

    def run(state):
        with torch.no_grad():
            neighborhood_attention(*state, grid_shape=grid, window_size=window, backend=payload["backend"])

    result = child_peak_rss(setup, run)
    result["n_by_n_float32_bytes"] = n * n * 4
    return result


# ------------------------------------------------------------------------------------------------- main
def run_case(case: Case, device: torch.device, dtype: torch.dtype, backend: str | None, repeats: int) -> dict:
    work = case.build(device, dtype, backend)
    if backend == "reference":  # per-query gathering: no tiles, only the FLOP bound applies
        work.tile_bound = None
    timing = dict(warmup=2, repeats=repeats)
    ours = time_fn(work.run, device, **timing)
    sdpa_name, sdpa = sdpa_best(*work.dense, device, **timing)
    q = work.dense[0]
    head_dim = q.shape[-1]
    dense_pairs = q.shape[0] * q.shape[1] * q.shape[2] * work.dense[1].shape[2]
    speedup = sdpa["median_ms"] / ours["median_ms"]
    result = dict(
        case=case.name,
        description=case.description,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        backend=backend,
        time_ms=round(ours["median_ms"], 4),
        sdpa_backend=sdpa_name,
        sdpa_time_ms=round(sdpa["median_ms"], 4),
        speedup_over_sdpa=round(speedup, 3),
        tile_bound_speedup=None if work.tile_bound is None else round(work.tile_bound, 3),
        fraction_of_tile_bound=None if work.tile_bound is None else round(speedup / work.tile_bound, 3),
        flop_bound_speedup=round(dense_pairs / work.attended_pairs, 3),
        effective_tflops=round(4 * head_dim * work.attended_pairs / (ours["median_ms"] * 1e-3) / 1e12, 4),
        sdpa_tflops=round(4 * head_dim * dense_pairs / (sdpa["median_ms"] * 1e-3) / 1e12, 4),
        repeats=ours["repeats"],
        **work.details,
    )
    if work.memory is not None and device.type == "cpu":
        mem = peak_rss_child(Path(__file__), {**work.memory, "backend": backend, "threads": torch.get_num_threads()})
        result.update(
            call_peak_memory_mib=round(mem["call_peak_bytes"] / 2**20, 1),
            rss_before_call_mib=round(mem["rss_before_bytes"] / 2**20, 1),
            n_by_n_float32_mib=round(mem["n_by_n_float32_bytes"] / 2**20, 1),
            memory_method=mem["method"],
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        work.run()
        result["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: every case for the device)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument(
        "--backend",
        nargs="*",
        default=None,
        help="kernel backend(s) (default: triton on CUDA; reference and tiled on CPU)",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/attention-<device>.json)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        import json

        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.list:
        for case in CASES.values():
            print(f"{case.name:20s} [{', '.join(case.devices)}] {case.description}")
        return 0
    from attnpack._utils import parse_dtype

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    backends = args.backend or (["triton"] if device.type == "cuda" else ["reference", "tiled"])
    names = args.cases or [c.name for c in CASES.values() if device.type in c.devices]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; --list shows them")
    results = []
    for name, backend in itertools.product(names, backends):
        result = run_case(CASES[name], device, dtype, backend, args.repeats)
        print(
            f"{name:20s} {backend:9s} {result['time_ms']:10.3f} ms  sdpa[{result['sdpa_backend']}] "
            f"{result['sdpa_time_ms']:10.3f} ms  speedup {result['speedup_over_sdpa']:6.2f}x  "
            f"tile bound {result['tile_bound_speedup'] or '-'}x  eff. {result['effective_tflops']} TFLOP/s"
            + (
                f"  call peak {result['call_peak_memory_mib']} MiB vs N x N fp32 {result['n_by_n_float32_mib']} MiB"
                if "call_peak_memory_mib" in result
                else ""
            ),
            flush=True,
        )
        results.append(result)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"attention-{device.type}.json")
    write_json(out, {"machine": machine_info(device), "cases": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
