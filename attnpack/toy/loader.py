"""Loading the shipped toy models and evaluator (offline, from ``attnpack/toy/weights``); built-in model names.

Importing this module registers ``toy-sd`` and ``toy-flux`` with :func:`attnpack.pipelines.loading.register_builtin`,
so ``load_pipeline("toy-flux")`` and ``attnpack generate -m toy-flux`` work (``loading.py`` imports it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


__all__ = ["WEIGHTS_DIR", "TOY_MODELS", "toy_model_path", "load_toy_pipeline", "load_evaluator"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> (description, call defaults used by attnpack's generate / batch / UI)
TOY_MODELS: dict[str, tuple[str, dict]] = {
    "toy-sd": (
        "Stable Diffusion architecture (UNet with cross-attention, CLIP, VAE) trained in-house on procedural "
        "shape scenes; 64x64",
        dict(height=64, width=64, num_inference_steps=20, guidance_scale=5.0),
    ),
    "toy-flux": (
        "FLUX.1 architecture (double/single-stream DiT, CLIP + T5, VAE) trained in-house on procedural shape "
        "scenes; 64x64",
        dict(
            height=64, width=64, num_inference_steps=20, max_sequence_length=24, true_cfg_scale=5.0, negative_prompt=""
        ),
    ),
}


def toy_model_path(name: str) -> Path:
    """Folder of the shipped toy pipeline ``name`` (``toy-sd``, ``toy-flux``) or of the ``evaluator``."""
    if name not in (*TOY_MODELS, "evaluator"):
        raise ValueError(f"Unknown toy model {name!r}; choose from {', '.join(TOY_MODELS)} or 'evaluator'.")
    path = WEIGHTS_DIR / name
    if not (path / ("config.json" if name == "evaluator" else "model_index.json")).is_file():
        raise ValueError(
            f"the weights of {name!r} are missing from {str(path)!r}; reinstall attnpack, or train them with "
            f"`attnpack train-toy all --out toy-train` and load toy-train/{name}."
        )
    return path


def load_toy_pipeline(name: str, seed: int = 0, path: str | os.PathLike | None = None):
    """Load a toy pipeline (a plain ``StableDiffusionPipeline`` / ``FluxPipeline``) from the shipped weights.

    ``seed`` is accepted for the built-in loader interface and ignored (the weights are trained). ``path`` loads a
    folder written by ``attnpack train-toy`` instead. Calls without ``height``/``width`` generate 64x64 images.
    """
    from diffusers import DiffusionPipeline

    del seed
    folder = Path(path) if path is not None else toy_model_path(name)
    with _quiet_loading():  # a built-in model loads silently, like the tiny ones (CLI errors stay one line)
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if hasattr(pipe, "default_sample_size"):  # FLUX would otherwise default to 1024 px
        pipe.default_sample_size = 64 // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off inside the block (restored after)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in saved:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in saved:
            if enabled:
                lib.enable_progress_bar()


def load_evaluator(path: str | os.PathLike | None = None, device: str | None = None):
    """The shipped :class:`~attnpack.toy.evaluator.ToyEvaluator` (or one trained into ``path``), in eval mode."""
    from .evaluator import ToyEvaluator

    model = ToyEvaluator.from_pretrained(Path(path) if path is not None else toy_model_path("evaluator"))
    return model.to(device or "cpu").eval()


def _register() -> None:
    from functools import partial

    from ..pipelines.loading import register_builtin

    for name, (description, defaults) in TOY_MODELS.items():
        register_builtin(name, partial(load_toy_pipeline, name), description, defaults)


_register()
