"""Resumable checkpoints of CLEAR distillation: trainable weights and optimizer state as safetensors + JSON, checked
against the run's settings before any model is loaded; never pickle."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ...io import check_state_fields, load_state, pickle_checkpoint_error, save_state
from .config import ClearDistillConfig
from .distiller import ClearDistiller


logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "attnpack.clear_distill_checkpoint"


def _checkpoints(folder: Path, suffix: str = ".safetensors") -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f"step-*{suffix}"):
        try:
            found.append((int(p.stem.split("-")[1]), p))
        except ValueError:
            continue
    return sorted(found)


def _save_checkpoint(folder: Path, step: int, distiller: ClearDistiller, optimizer, cfg, keep: int) -> Path:
    """``step-<step>.safetensors``: trainable weights and optimizer tensors, the rest (step, optimizer structure,
    config) as JSON in its metadata (:func:`attnpack.io.save_state`); written atomically, the oldest pruned."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.safetensors"
    state = {
        "step": step,
        "trainable": {k: v.detach().cpu() for k, v in distiller.trainable_state().items()},
        "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(cfg),
    }
    save_state(path, state, CHECKPOINT_KIND)
    for _, old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


_RESUME_KEYS = ("model", "radius", "down_factor", "resolution", "optimizer")


def _read_resume_checkpoint(folder: Path, cfg: ClearDistillConfig) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder``, read and checked against ``cfg`` before any model is loaded.

    Pickle checkpoints (``step-*.pt``) of earlier versions are never loaded: alone they are an error, next to
    safetensors checkpoints they are ignored with a warning."""
    found = _checkpoints(folder)
    legacy = [p for _, p in _checkpoints(folder, ".pt")]
    if legacy and not found:
        raise pickle_checkpoint_error(legacy[-1])
    if legacy:
        logger.warning("ignoring %d pickle checkpoints in %s (never loaded): %s", len(legacy), folder, legacy[-1].name)
    if not found:
        return None
    path = found[-1][1]
    state = load_state(path, CHECKPOINT_KIND)
    check_state_fields(state, {"step": int, "trainable": dict, "optimizer": dict, "config": dict}, path)
    saved = state["config"]
    changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume from {str(path)!r}: settings changed ({diffs}). Use another output folder or --no-resume."
        )
    return path, state


def _load_checkpoint(path: Path, state: dict, distiller: ClearDistiller, optimizer) -> int:
    """Put a checkpoint read by :func:`_read_resume_checkpoint` into the student and the optimizer; its step."""
    try:
        distiller.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"cannot resume from {str(path)!r}: it does not fit this run ({exc}). Use another output folder or "
            "--no-resume."
        ) from None
    return state["step"]
