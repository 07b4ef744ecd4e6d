"""What this machine can run: versions, device, and which attention backends actually work here."""

from __future__ import annotations

import os
import platform
import warnings
from typing import Any

import torch

from ._utils import is_available, package_versions


__all__ = ["environment_report", "check_backends"]


def _device_report() -> dict[str, Any]:
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def _try_dispatch(backend: str, device: torch.device) -> tuple[bool, str]:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q = torch.randn(1, 64, 2, 64, device=device, dtype=dtype)
    try:
        out = dispatch_attention_fn(q, q, q, backend=backend)
        ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3).transpose(1, 2)
        err = (out.float() - ref.float()).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        return (True, "ok") if err <= tol else (False, f"wrong result (max error {err:.2g})")
    except Exception as exc:  # report, never crash: this is a probe
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def check_backends(device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Probe each attention backend with a small call and compare it with SDPA.

    Returns ``{name: {"ok": bool, "detail": str}}`` for ``sdpa``, ``flex``, ``triton``, ``xformers``, ``flash``,
    ``sage``.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, dict[str, Any]] = {}
    packages = {"xformers": ("xformers", "xformers"), "flash": ("flash_attn", None), "sage": ("sageattention", None)}
    for name, backend in (
        ("sdpa", "native"),
        ("flex", "flex"),
        ("xformers", "xformers"),
        ("flash", "flash"),
        ("sage", "sage"),
    ):
        if name in packages and not is_available(packages[name][0]):
            extra = packages[name][1]
            hint = f"pip install attnpack[{extra}]" if extra else f"pip install {packages[name][0]}"
            out[name] = {"ok": False, "detail": f"not installed ({hint})"}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok, detail = _try_dispatch(backend, dev)
        out[name] = {"ok": ok, "detail": detail}
    if not is_available("triton"):
        out["triton"] = {"ok": False, "detail": "not installed (pip install attnpack[triton])"}
    elif dev.type == "cuda":
        out["triton"] = {"ok": True, "detail": "compiled kernels on CUDA"}
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = {"ok": True, "detail": "interpreter mode (TRITON_INTERPRET=1): correct but slow"}
    else:
        out["triton"] = {"ok": False, "detail": "no GPU; set TRITON_INTERPRET=1 to run kernels in the interpreter"}
    return dict(
        sorted(out.items(), key=lambda kv: ["sdpa", "flex", "triton", "xformers", "flash", "sage"].index(kv[0]))
    )


def environment_report(device: str | torch.device | None = None) -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "python": platform.python_version(),
        "device": _device_report(),
        "backends": check_backends(device),
    }
