"""Shared benchmark helpers: timing, torch SDPA's best backend, peak memory in a fresh process, machine report.

Used by the scripts in this folder; every ratio is measured side by side in one run.
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


__all__ = ["time_fn", "sdpa_best", "machine_info", "result_path", "write_json", "peak_rss_child", "child_peak_rss"]


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
    from attnpack._io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0: ``echo 5 > clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def peak_rss_child(script: str | os.PathLike, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``python <script> --memory-child '<json>'`` in a fresh process and return the JSON it prints last."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, str(script), "--memory-child", json.dumps(payload)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_peak_rss(setup: Callable[[], Any], run: Callable[[Any], Any]) -> dict[str, Any]:
    """In a fresh process: resident memory before ``run(state)`` and the peak during it.

    On Linux the peak-RSS counter is reset right before the call (``/proc/self/clear_refs``), so
    ``call_peak_bytes = VmHWM after the call - VmRSS before it`` is the extra memory the call itself held at its peak
    (temporaries), inputs and imports excluded. Elsewhere it falls back to the growth of ``ru_maxrss`` (a lower
    bound when earlier phases peaked higher).
    """
    state = setup()
    import gc

    gc.collect()
    rss_before = _status_bytes("VmRSS")
    if rss_before is not None and _reset_peak_rss():
        run(state)
        peak = _status_bytes("VmHWM")
        method = "VmHWM after reset (clear_refs) - VmRSS before"
    else:
        rss_before = _maxrss_bytes()
        run(state)
        peak = _maxrss_bytes()
        method = "ru_maxrss growth (lower bound)"
    return {
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "call_peak_bytes": peak - rss_before,
        "method": method,
    }
