"""Shared test helpers (recording cores, tiny fixtures)."""

from __future__ import annotations

import torch

from attnpack.attn_processors import AttentionCall


class RecordingCore:
    """Dense attention that records each call's layer, layout and run state."""

    def __init__(self):
        self.calls: list[AttentionCall] = []
        self.shapes: list[tuple] = []

    def __call__(self, q, k, v, call: AttentionCall):
        self.calls.append(call)
        self.shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return call.dense(q, k, v)

    def __repr__(self):
        return "RecordingCore()"


class ScaledCore:
    """A deliberately wrong core (output scaled): proves a parity test can fail."""

    def __init__(self, factor: float = 1.01):
        self.factor = factor

    def __call__(self, q, k, v, call):
        return call.dense(q, k, v) * self.factor


# Outputs of a model saved and loaded again (another process, another file) agree up to float summation order only:
# safetensors >= 0.8 gives memory-mapped tensors that are not 64-byte aligned and MKL then sums in another order
# (tests/test_loading.py::test_tiny_model_save_and_reload_reproduces_output has the full root cause). Weights and
# configs stay bit-identical and are compared exactly; outputs are compared within these bounds.
RELOAD_ATOL = 1e-4  # on float images in [0, 1]; measured differences 1e-7..2e-6, real regressions 8e-3 and more


def assert_same_image_after_reload(actual, expected, max_changed: float = 0.01):
    """8-bit images from a reloaded model: a value may round to the next grey level (the float output moved by
    ~1e-6 across a rounding boundary), nothing more, and at most ``max_changed`` of the values may move at all."""
    import numpy as np

    a, b = np.asarray(actual, dtype=np.int16), np.asarray(expected, dtype=np.int16)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"max difference {diff.max()} grey levels (a reload may move a value by 1 at most)"
    assert (diff > 0).mean() <= max_changed, (
        f"{(diff > 0).mean():.2%} of the values changed (at most {max_changed:.0%})"
    )


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


class _Planted:
    """Unpickling this object opens ``marker`` for writing, i.e. creates the file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path, marker):
    """Write a ``torch.save`` file at ``path`` whose unpickling creates ``marker`` (a planted malicious checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 5, "payload": _Planted(marker)}, path)
    return path


# ------------------------------------------------------------------------------------------------- multi-process
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_entry(rank, fn, world_size, port, outdir, args):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from attnpack.pipelines.parallel import cpu_device_count_patch

        with cpu_device_count_patch():
            result = fn(rank, *args)
        torch.save(result, f"{outdir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(fn, world_size: int, *args, tmp_path, timeout: float = 600) -> list:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes joined by a gloo process group on CPU (what
    ``torchrun`` sets up: MASTER_ADDR/PORT, RANK, WORLD_SIZE) and return each rank's result (``torch.save``-able).

    ``fn`` must be importable by the children (a module-level function). A failing rank fails the call; ranks that
    wait for each other forever (a collective one of them never reached) are killed after ``timeout`` seconds.
    """
    import time

    import torch.multiprocessing as mp

    outdir = tmp_path / f"ranks-{free_port()}"
    outdir.mkdir(parents=True)
    context = mp.spawn(
        _distributed_entry, args=(fn, world_size, free_port(), str(outdir), args), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes still running after {timeout} s: ranks out of step (deadlock)")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
