"""Toy text-to-image models trained in-house on procedural shape scenes, and an evaluator that scores them.

- :mod:`attnpack.toy.data`: the procedural dataset (64x64 scenes of 1-3 colored shapes with captions).
- :mod:`attnpack.toy.models`: architectures (``toy-sd``: SD UNet + CLIP + VAE; ``toy-flux``: FLUX DiT + CLIP + T5 +
  VAE).
- :mod:`attnpack.toy.train`: the training script behind ``attnpack train-toy`` (accelerate, resumable).
- :mod:`attnpack.toy.evaluator`: a small detector of colored shapes; prompt-adherence scores.
- :mod:`attnpack.toy.loader`: the shipped weights; ``toy-sd`` / ``toy-flux`` as built-in model names.

Names load lazily, so importing this package is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


_EXPORTS: dict[str, str] = {
    "ToyScenes": "attnpack.toy.data",
    "Scene": "attnpack.toy.data",
    "ToyObject": "attnpack.toy.data",
    "PromptSpec": "attnpack.toy.data",
    "scene_at": "attnpack.toy.data",
    "sample_scene": "attnpack.toy.data",
    "render_scene": "attnpack.toy.data",
    "parse_prompt": "attnpack.toy.data",
    "prompt_set": "attnpack.toy.data",
    "ToyEvaluator": "attnpack.toy.evaluator",
    "Detection": "attnpack.toy.evaluator",
    "score_prompt": "attnpack.toy.evaluator",
    "evaluate_images": "attnpack.toy.evaluator",
    "scene_accuracy": "attnpack.toy.evaluator",
    "generate_images": "attnpack.toy.adherence",
    "prompt_adherence": "attnpack.toy.adherence",
    "load_toy_pipeline": "attnpack.toy.loader",
    "load_evaluator": "attnpack.toy.loader",
    "toy_model_path": "attnpack.toy.loader",
    "TrainConfig": "attnpack.toy.train",
    "default_config": "attnpack.toy.train",
    "train": "attnpack.toy.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnpack.toy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .adherence import generate_images, prompt_adherence  # noqa: F401
    from .data import (  # noqa: F401
        PromptSpec,
        Scene,
        ToyObject,
        ToyScenes,
        parse_prompt,
        prompt_set,
        render_scene,
        sample_scene,
        scene_at,
    )
    from .evaluator import Detection, ToyEvaluator, evaluate_images, scene_accuracy, score_prompt  # noqa: F401
    from .loader import load_evaluator, load_toy_pipeline, toy_model_path  # noqa: F401
    from .train import TrainConfig, default_config, train  # noqa: F401
