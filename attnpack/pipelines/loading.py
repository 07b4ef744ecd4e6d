"""Loading pipelines: a Hub id, a local diffusers folder, or a built-in tiny model name."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from .._utils import parse_dtype
from ..toy.tiny import TINY_MODELS, build_tiny_pipeline


logger = logging.getLogger(__name__)

__all__ = [
    "load_pipeline",
    "load_denoiser_structure",
    "builtin_models",
    "is_video_pipeline",
    "pipeline_defaults",
    "OFFLOAD_MODES",
]

OFFLOAD_MODES = (None, "model", "sequential")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# built-in model name -> loader; issue #11 adds trained toy models here
_EXTRA_BUILTINS: dict[str, tuple[Any, str, dict]] = {}


def builtin_models() -> dict[str, str]:
    """Built-in model names and what they are."""
    out = {name: desc for name, (_, desc, _) in TINY_MODELS.items()}
    out.update({name: desc for name, (_, desc, _) in _EXTRA_BUILTINS.items()})
    return out


def builtin_defaults(name: str) -> dict[str, Any]:
    """The call defaults of a built-in model (sizes, steps, text length, ...), without loading it; empty otherwise."""
    if name in TINY_MODELS:
        return dict(TINY_MODELS[name][2])
    if name in _EXTRA_BUILTINS:
        return dict(_EXTRA_BUILTINS[name][2])
    return {}


def register_builtin(name: str, loader, description: str, defaults: dict | None = None) -> None:
    """Register a built-in model name: ``loader(seed) -> pipeline``."""
    _EXTRA_BUILTINS[name] = (loader, description, dict(defaults or {}))


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` must be e.g. 'cpu', 'cuda' or 'cuda:1', got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but no CUDA GPU is available here; use --device cpu.")
    return dev


def _check_model_index(index: Path) -> None:
    """A pipeline folder's ``model_index.json`` must be a JSON object naming the pipeline class (``_class_name``);
    diffusers fails with a bare ``KeyError`` otherwise."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index} is not a readable JSON file: {exc}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise ValueError(
            f"{index} does not name a pipeline class (`_class_name`): it is not a diffusers pipeline index. "
            "Write the folder with `pipe.save_pretrained(folder)`."
        )


def load_pipeline(
    model: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    offload: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    seed: int = 0,
    **from_pretrained_kwargs,
):
    """Load a diffusers pipeline.

    Args:
        model: a built-in name (``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-wan``,
            ``tiny-cogvideox``; see :func:`builtin_models`), a local folder written by ``save_pretrained``, or a Hub
            id such as ``"black-forest-labs/FLUX.1-dev"`` (downloaded by ``from_pretrained`` as usual).
        dtype: ``"auto"`` (bf16/fp16 on CUDA, fp32 on CPU), ``"fp32"``, ``"fp16"``, ``"bf16"`` or a ``torch.dtype``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (default: CUDA when available). With ``offload``, the
            accelerator the offloaded modules run on (``"cuda:1"``: GPU 1; one process per GPU under accelerate).
        offload: ``None``, ``"model"`` (``enable_model_cpu_offload``) or ``"sequential"``
            (``enable_sequential_cpu_offload``); both need an accelerator.
        variant, revision, local_files_only, **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained``.
        seed: weight seed of the built-in tiny models.

    Returns:
        the pipeline, with ``pipe._attnpack_model`` (the name it was loaded from) and ``pipe._attnpack_defaults``
        (call defaults that suit it, e.g. the tiny models' small sizes).
    """
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"`offload` must be one of None, 'model', 'sequential', got {offload!r}.")
    dev = _resolve_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    name = os.fspath(model)
    defaults: dict[str, Any] = {}
    if name in TINY_MODELS:
        pipe = build_tiny_pipeline(name, seed=seed)
        defaults = dict(TINY_MODELS[name][2])
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    elif name in _EXTRA_BUILTINS:
        loader, _, defaults = _EXTRA_BUILTINS[name]
        pipe = loader(seed)
        defaults = dict(defaults)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        path = Path(name).expanduser()
        kwargs = dict(torch_dtype=torch_dtype, variant=variant, revision=revision, **from_pretrained_kwargs)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ValueError(
                    f"`model` folder {name!r} has no model_index.json; it is not a diffusers pipeline folder "
                    "(write one with `pipe.save_pretrained(folder)`)."
                )
            _check_model_index(path / "model_index.json")
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
        elif name.startswith(("tiny-", "toy-")):
            raise ValueError(f"Unknown built-in model {name!r}. Built-in models: {', '.join(builtin_models())}.")
        elif _HUB_ID.match(name) and not path.exists():
            if local_files_only is not None:
                kwargs["local_files_only"] = local_files_only
            pipe = DiffusionPipeline.from_pretrained(name, **kwargs)
        else:
            raise ValueError(
                f"`model` {name!r} is neither a built-in model ({', '.join(builtin_models())}), an existing "
                "diffusers folder, nor a Hub id like 'org/name'."
            )
        vae = getattr(pipe, "vae", None)
        if vae is not None and torch_dtype == torch.float16 and "FLUX" in type(pipe).__name__.upper():
            logger.debug("FLUX VAE in fp16 can overflow; consider dtype='bf16'")
    if offload == "model":
        if dev.type == "cpu":
            raise ValueError("`offload='model'` needs an accelerator (CUDA); on CPU leave `offload` unset.")
        pipe.enable_model_cpu_offload(device=dev)
    elif offload == "sequential":
        if dev.type == "cpu":
            raise ValueError("`offload='sequential'` needs an accelerator (CUDA); on CPU leave `offload` unset.")
        pipe.enable_sequential_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    pipe._attnpack_model = name
    pipe._attnpack_defaults = defaults
    if defaults:  # a built-in model: a plain pipe(prompt) call gets the settings it was built / trained for
        pipe.__class__ = _with_call_defaults(type(pipe))
    return pipe


def load_denoiser_structure(model: str | os.PathLike, *, revision: str | None = None) -> torch.nn.Module:
    """A pipeline's denoiser with its config and layers but no weights, for work that reads only its structure.

    A built-in name builds the (small) model itself; a local diffusers folder or a Hub id reads only
    ``model_index.json`` and the denoiser's ``config.json`` and builds the model on the ``meta`` device (no weights
    are downloaded or allocated).
    """
    name = os.fspath(model)
    if name in TINY_MODELS or name in _EXTRA_BUILTINS:
        pipe = load_pipeline(name, device="cpu", dtype="fp32")
        return next(m for m in (getattr(pipe, k, None) for k in ("transformer", "unet")) if m is not None)
    import diffusers

    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"`model` folder {name!r} has no model_index.json; it is not a diffusers pipeline folder."
            )
        _check_model_index(index)
        data = json.loads(index.read_text(encoding="utf-8"))
        source, kwargs = str(path), {"local_files_only": True}
    elif _HUB_ID.match(name) and not name.startswith(("tiny-", "toy-")):
        data = diffusers.DiffusionPipeline.load_config(name, revision=revision)
        source, kwargs = name, {"revision": revision}
    else:
        raise ValueError(
            f"`model` {name!r} is neither a built-in model ({', '.join(builtin_models())}), an existing diffusers "
            "folder, nor a Hub id like 'org/name'."
        )
    for sub in ("transformer", "unet"):
        entry = data.get(sub)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] and hasattr(diffusers, entry[1]):
            cls = getattr(diffusers, entry[1])
            config = cls.load_config(source, subfolder=sub, **kwargs)
            with torch.device("meta"):
                return cls.from_config(config)
    raise ValueError(f"`model` {name!r} has no diffusers transformer or unet component.")


_DEFAULTED: dict[type, type] = {}


def _with_call_defaults(cls: type) -> type:
    """A subclass of the pipeline class, with the same name, whose ``__call__`` fills every argument the caller leaves
    out from ``self._attnpack_defaults`` (toy-flux: 64x64, 20 steps, 24 text tokens, true CFG 5 with an empty negative
    prompt; the tiny models: their small sizes). Without them a plain ``pipe("a red circle")`` draws noise at
    diffusers' defaults (1024 px, 512 text tokens, no CFG). What the caller passes always wins; ``save_pretrained``
    still writes the plain diffusers class."""
    if getattr(cls, "_attnpack_call_defaults", False):
        return cls
    if cls not in _DEFAULTED:
        import functools
        import inspect

        call = cls.__call__
        params = inspect.signature(call).parameters

        @functools.wraps(call)
        def __call__(self, *args, **kwargs):
            bound = inspect.signature(call).bind_partial(self, *args, **kwargs).arguments
            for key, value in pipeline_defaults(self).items():
                if key in params and key not in bound:
                    kwargs[key] = value
            prompt = bound.get("prompt")
            if (
                isinstance(kwargs.get("negative_prompt"), str)
                and isinstance(prompt, list)
                and "negative_prompt" not in bound
            ):
                kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(
                    prompt
                )  # one per prompt, as diffusers wants
            return call(self, *args, **kwargs)

        _DEFAULTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_attnpack_call_defaults": True,
                                                      "__module__": cls.__module__})  # fmt: skip
    return _DEFAULTED[cls]


def is_video_pipeline(pipe) -> bool:
    """``True`` for text-to-video pipelines (Wan, CogVideoX, HunyuanVideo, ...)."""
    import inspect

    return "num_frames" in inspect.signature(pipe.__call__).parameters


def pipeline_defaults(pipe) -> dict[str, Any]:
    """Call defaults recorded by :func:`load_pipeline` (empty for pipelines loaded elsewhere)."""
    return dict(getattr(pipe, "_attnpack_defaults", {}) or {})


# the trained toy models register their built-in names ("toy-sd", "toy-flux")
from ..toy import loader as _toy_loader  # noqa: E402, F401
