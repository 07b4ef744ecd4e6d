"""One generation on several processes with diffusers' context parallelism (launched with ``torchrun``).

:func:`enable_context_parallel` joins the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``; NCCL on CUDA, gloo on CPU), puts each process on its GPU, and calls
``transformer.enable_parallelism(config=ContextParallelConfig(...))``. attnpack techniques installed before or after
it run under it (see docs/multi-gpu.md for what works with Ulysses and ring attention), or refuse before any work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from unittest import mock

import torch


__all__ = [
    "enable_context_parallel",
    "check_ring_techniques",
    "cpu_device_count_patch",
    "init_distributed",
    "is_main_process",
]


@contextlib.contextmanager
def cpu_device_count_patch() -> Iterator[None]:
    """On a machine without accelerator, let diffusers pick a device: ``enable_parallelism`` chooses
    ``rank % torch.accelerator.device_count()``, a division by zero there. A no-op where a device exists."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def init_distributed() -> tuple[int, int]:
    """Join the process group described by ``torchrun``'s environment (once); returns ``(rank, world_size)``."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "context parallelism runs one generation on several processes: launch with "
                "`torchrun --nproc-per-node N -m attnpack ...` (RANK and WORLD_SIZE are not set)."
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def check_ring_techniques(specs, ring_degree: int | None, argument: str = "--ring-degree") -> None:
    """Refuse, before any model is loaded, techniques that cannot run under ring attention (all but dense, GNA and
    CLEAR: docs/multi-gpu.md). ``specs``: ``[(name, options), ...]``."""
    from ..attn_processors.parallel import RING_TECHNIQUES

    if ring_degree is None or ring_degree <= 1:
        return
    names = sorted({name for name, _ in specs if name != "dense" and name not in RING_TECHNIQUES})
    if names:
        raise ValueError(
            f"{', '.join(names)} cannot run under ring attention ({argument}={ring_degree}): only dense attention, "
            f"{' and '.join(RING_TECHNIQUES)} do. Use Ulysses alone (--ulysses-degree N, no ring degree) for "
            f"{', '.join(names)}."
        )


def _check_degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def enable_context_parallel(pipe, ulysses_degree: int | None = None, ring_degree: int = 1):
    """Split every denoising step of ``pipe`` over the processes of the ``torchrun`` launch (context parallelism).

    Args:
        pipe: a diffusers pipeline whose denoiser has a context-parallel plan (FLUX, Wan; dense attention also on
            other diffusers models that have one).
        ulysses_degree: Ulysses degree (default: the world size divided by ``ring_degree``). Must divide the number
            of attention heads. Every attnpack technique on FLUX and Wan runs under Ulysses.
        ring_degree: ring-attention degree (default 1). Dense attention, GNA and CLEAR run under ring attention
            (alone or with Ulysses: unified attention); PARO and head guidance refuse it. Dense layers under ring
            attention need a diffusers attention backend that returns the log-sum-exp (e.g. ``flash``, ``_native_cudnn``
            on CUDA; ``pipe.transformer.set_attention_backend(...)``).

    Returns:
        the :class:`~attnpack.attn_processors.context.ParallelLayout` of this process.

    Every process must run the same generation (same prompt, seed and settings); each ends with the whole result.
    """
    from diffusers import ContextParallelConfig

    from ..attn_processors.context import ParallelLayout
    from ..attn_processors.parallel import check_parallel_support
    from ..attn_processors.processor import resolve_denoisers

    rank, world = init_distributed()
    ring_degree = _check_degree("ring_degree", ring_degree)
    if ulysses_degree is None:
        ulysses_degree = max(world // ring_degree, 1)
    ulysses_degree = _check_degree("ulysses_degree", ulysses_degree)
    if ulysses_degree * ring_degree != world:
        raise ValueError(
            f"ulysses_degree x ring_degree must equal the number of processes: {ulysses_degree} x {ring_degree} != "
            f"{world}. Launch with `torchrun --nproc-per-node {ulysses_degree * ring_degree}` or change the degrees."
        )
    if ulysses_degree * ring_degree == 1:
        raise ValueError("context parallelism needs at least 2 processes (ulysses_degree x ring_degree >= 2).")
    models, _ = resolve_denoisers(pipe)
    for model in models:
        if getattr(model, "_cp_plan", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no context-parallel plan in diffusers; context parallelism works on "
                "FLUX and Wan (and other diffusers models that define `_cp_plan`)."
            )
        heads = getattr(model.config, "num_attention_heads", None)
        if heads is not None and heads % ulysses_degree:
            raise ValueError(
                f"ulysses_degree={ulysses_degree} must divide the {heads} attention heads of {type(model).__name__}."
            )
    if torch.cuda.is_available():
        pipe.to(f"cuda:{torch.cuda.current_device()}")
    layout = None
    for model in models:
        config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree)
        with cpu_device_count_patch():
            model.enable_parallelism(config=config)
        layout = ParallelLayout.of_model(model)
        check_parallel_support(model, layout)  # techniques installed before: refuse now, not at the first step
    return layout
