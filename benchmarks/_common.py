"""Shared benchmark helpers: timing, torch SDPA's best backend, peak memory in a fresh process, machine report, and
the output policy (``result_path``, ``write_json``) that ``_registry.main`` applies to every benchmark.

Used by the scripts in this folder; every ratio is measured side by side in one run. Memory is measured in bytes
(``PeakRSS``, ``child_peak_rss``) and reported in MiB (``mib``; JSON keys end in ``_mib``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


__all__ = [
    "time_fn",
    "sdpa_best",
    "machine_info",
    "result_path",
    "write_json",
    "mib",
    "rss_bytes",
    "maxrss_bytes",
    "PeakRSS",
    "peak_rss_child",
    "child_peak_rss",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Median / min time of ``fn()`` in milliseconds (CUDA: ``triton.testing.do_bench`` when available)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            times = do_bench(fn, warmup=25 * warmup, rep=100 * repeats, return_mode="all")
            return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def sdpa_best(q, k, v, device: torch.device, **timing) -> tuple[str, dict[str, float]]:
    """Time torch SDPA with each backend usable on ``device``; return the fastest ``(name, timing)``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    candidates = [("default", None)]
    if device.type == "cuda":
        candidates += [
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ]
    best: tuple[str, dict[str, float]] | None = None
    for name, backend in candidates:

        def run(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            run()
        except RuntimeError:
            continue  # backend not usable for these shapes / dtype
        t = time_fn(run, device, **timing)
        if best is None or t["median_ms"] < best[1]["median_ms"]:
            best = (name, t)
    assert best is not None, "torch SDPA has no usable backend"
    return best


def machine_info(device: torch.device) -> dict[str, Any]:
    from attnpack._utils import package_versions

    info: dict[str, Any] = {"python": platform.python_version(), "versions": package_versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info.update(device=f"CPU: {cpu}", cores=os.cpu_count(), torch_threads=torch.get_num_threads())
    return info


def result_path(parser, out: str | os.PathLike, force: bool) -> Path:
    """The output path of a benchmark; an existing file (a committed result) is kept unless ``--force``."""
    out = Path(out)
    if out.exists() and not force:
        parser.error(f"{out} exists (a committed result?); pass --force to overwrite it, or -o another path")
    return out


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename)."""
    from attnpack.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def mib(n_bytes: float, ndigits: int | None = 1) -> float:
    """``n_bytes`` in MiB (2**20 bytes), the unit of every memory key (``*_mib``) in the benchmark JSONs."""
    value = n_bytes / 2**20
    return value if ndigits is None else round(value, ndigits)


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``VmRSS``); ``None`` where ``/proc`` is missing."""
    return _status_bytes("VmRSS")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0: ``echo 5 > clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def maxrss_bytes() -> int:
    """Peak resident memory of this process so far (``getrusage(RUSAGE_SELF).ru_maxrss``, in bytes)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class PeakRSS:
    """Peak resident memory of this process while a ``with`` block runs (run it in a fresh process).

    ``reset=True``: on Linux the kernel's peak counter is reset on entry (``/proc/self/clear_refs``), so
    ``peak_bytes`` is VmHWM at exit, ``before_bytes`` VmRSS on entry (after ``gc.collect()``) and
    ``call_peak_bytes = peak - before`` the extra memory the block held at its peak (temporaries), what was resident
    before excluded. Elsewhere it falls back to the growth of ``ru_maxrss``.

    ``reset=False``: the growth of ``ru_maxrss`` (the process's lifetime peak) over the block: ``before_bytes`` and
    ``peak_bytes`` are ``ru_maxrss`` on entry and at exit. A lower bound when an earlier phase peaked higher; the
    semantics of the A-STAR and IR-Diffusion benchmarks.

    ``method`` says which one was used.
    """

    def __init__(self, reset: bool = True):
        self.reset = reset
        self.before_bytes = self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        before = rss_bytes() if self.reset else None
        if before is not None and _reset_peak_rss():
            self.before_bytes, self.method = before, "VmHWM after reset (clear_refs) - VmRSS before"
        else:
            self.before_bytes, self.method = maxrss_bytes(), "ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_bytes("VmHWM") if self.method.startswith("VmHWM") else None
        self.peak_bytes = maxrss_bytes() if peak is None else peak

    @property
    def call_peak_bytes(self) -> int:
        return self.peak_bytes - self.before_bytes


def peak_rss_child(
    script: str | os.PathLike, payload: dict[str, Any], *, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python <script> --memory-child '<json>'`` in a fresh process and return the JSON it prints last.

    ``env``: extra environment variables for the child (e.g. ``MALLOC_MMAP_THRESHOLD_``). A failing child raises
    ``RuntimeError`` with the end of its stderr.
    """
    root = str(Path(__file__).resolve().parent.parent)
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = root + os.pathsep + child_env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, str(script), "--memory-child", json.dumps(payload)],
        capture_output=True,
        text=True,
        env=child_env,
        cwd=root,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --memory-child {json.dumps(payload)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_peak_rss(setup: Callable[[], Any], run: Callable[[Any], Any]) -> dict[str, Any]:
    """In a fresh process: resident memory before ``run(state)`` and the peak during it (``PeakRSS(reset=True)``).

    On Linux the peak-RSS counter is reset right before the call (``/proc/self/clear_refs``), so
    ``call_peak_bytes = VmHWM after the call - VmRSS before it`` is the extra memory the call itself held at its peak
    (temporaries), inputs and imports excluded. Elsewhere it falls back to the growth of ``ru_maxrss`` (a lower
    bound when earlier phases peaked higher).
    """
    state = setup()
    with PeakRSS(reset=True) as mem:
        run(state)
    return {
        "rss_before_bytes": mem.before_bytes,
        "peak_rss_bytes": mem.peak_bytes,
        "call_peak_bytes": mem.call_peak_bytes,
        "method": mem.method,
    }
