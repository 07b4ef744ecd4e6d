"""attnpack: attention techniques for Hugging Face diffusers pipelines.

Heavy modules (diffusers, transformers) load on first use of a public name, so ``import attnpack`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__


# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # core machinery
    "apply_processors": "attnpack.attn_processors._apply",
    "ProcessorHandle": "attnpack.attn_processors._apply",
    "AttnPackProcessor": "attnpack.attn_processors._apply",
    "AttentionCall": "attnpack.attn_processors._apply",
    "DenseCore": "attnpack.attn_processors._apply",
    "list_layers": "attnpack.attn_processors._apply",
    "set_attention_backend": "attnpack.attn_processors._apply",
    "LayerInfo": "attnpack.attn_processors._families",
    "TokenLayout": "attnpack.attn_processors._families",
    "RunState": "attnpack.attn_processors._context",
    "current_run": "attnpack.attn_processors._context",
    "run_overrides": "attnpack.attn_processors._context",
    # pipelines
    "load_pipeline": "attnpack.pipelines.loading",
    "builtin_models": "attnpack.pipelines.loading",
    "GenerationSettings": "attnpack.pipelines.generation",
    "run_generation": "attnpack.pipelines.generation",
    # head-level perturbation guidance
    "apply_head_perturbation": "attnpack.pipelines.guidance",
    "HeadPerturbationGuidance": "attnpack.pipelines.guiders",
    "search_heads": "attnpack.pipelines.head_search",
    "presets": "attnpack.presets",
    # outputs
    "save_image": "attnpack._io",
    "save_video": "attnpack._io",
    "read_parameters": "attnpack._io",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attnpack' has no attribute {name!r}")
    value = importlib.import_module(module)
    if module != f"{__name__}.{name}":  # a name defined in the module (else: the submodule itself)
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from . import presets
    from ._io import read_parameters, save_image, save_video
    from .attn_processors._apply import (
        AttentionCall,
        AttnPackProcessor,
        DenseCore,
        ProcessorHandle,
        apply_processors,
        list_layers,
        set_attention_backend,
    )
    from .attn_processors._context import RunState, current_run, run_overrides
    from .attn_processors._families import LayerInfo, TokenLayout
    from .pipelines.generation import GenerationSettings, run_generation
    from .pipelines.guidance import apply_head_perturbation
    from .pipelines.guiders import HeadPerturbationGuidance
    from .pipelines.head_search import search_heads
    from .pipelines.loading import builtin_models, load_pipeline
