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
    "apply_processors": "attnpack.attn_processors.processor",
    "ProcessorHandle": "attnpack.attn_processors.processor",
    "AttnPackProcessor": "attnpack.attn_processors.processor",
    "AttentionCall": "attnpack.attn_processors.processor",
    "DenseCore": "attnpack.attn_processors.processor",
    "list_layers": "attnpack.attn_processors.processor",
    "set_attention_backend": "attnpack.attn_processors.processor",
    "ModifierCore": "attnpack.attn_processors.processor",
    "ObserverCore": "attnpack.attn_processors.processor",
    "in_effect": "attnpack.attn_processors.processor",
    "apply_techniques": "attnpack.techniques",
    "LayerInfo": "attnpack.attn_processors.families",
    "TokenLayout": "attnpack.attn_processors.families",
    "RunState": "attnpack.attn_processors.context",
    "current_run": "attnpack.attn_processors.context",
    "run_overrides": "attnpack.attn_processors.context",
    # CLEAR
    "apply_clear": "attnpack.attn_processors.clear",
    "ClearAttnProcessor": "attnpack.attn_processors.clear",
    # generalized neighborhood attention
    "apply_gna": "attnpack.attn_processors.gna",
    "GNAAttnProcessor": "attnpack.attn_processors.gna",
    "neighborhood_attention": "attnpack.kernels.neighborhood",
    # PARO
    "ParoAttnProcessor": "attnpack.attn_processors.paro",
    "apply_paro": "attnpack.attn_processors.paro",
    "ParoPlan": "attnpack.pipelines.paro_plan",
    "calibrate_paro": "attnpack.pipelines.paro_calibrate",
    "convert_official_paro_plan": "attnpack.pipelines.paro_official",
    # pipelines
    "load_pipeline": "attnpack.pipelines.loading",
    "builtin_models": "attnpack.pipelines.loading",
    "GenerationSettings": "attnpack.pipelines.generation",
    "run_generation": "attnpack.pipelines.generation",
    "IRDiffusionPipeline": "attnpack.pipelines.ir_diffusion",
    "IRDiffusionSDPipeline": "attnpack.pipelines.ir_diffusion",
    # head-level perturbation guidance
    "apply_head_perturbation": "attnpack.pipelines.guidance",
    "HeadPerturbationGuidance": "attnpack.pipelines.guiders",
    "search_heads": "attnpack.pipelines.head_search",
    "presets": "attnpack.presets",
    # A-STAR
    "AStarPipeline": "attnpack.pipelines.astar",
    "AStarXLPipeline": "attnpack.pipelines.astar",
    "segregation_loss": "attnpack.pipelines.astar",
    "retention_loss": "attnpack.pipelines.astar",
    # outputs
    "save_image": "attnpack.io",
    "save_video": "attnpack.io",
    "read_parameters": "attnpack.io",
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
    from .attn_processors.clear import ClearAttnProcessor, apply_clear
    from .attn_processors.context import RunState, current_run, run_overrides
    from .attn_processors.families import LayerInfo, TokenLayout
    from .attn_processors.gna import GNAAttnProcessor, apply_gna
    from .attn_processors.paro import ParoAttnProcessor, apply_paro
    from .attn_processors.processor import (
        AttentionCall,
        AttnPackProcessor,
        DenseCore,
        ModifierCore,
        ObserverCore,
        ProcessorHandle,
        apply_processors,
        in_effect,
        list_layers,
        set_attention_backend,
    )
    from .io import read_parameters, save_image, save_video
    from .kernels.neighborhood import neighborhood_attention
    from .pipelines.astar import AStarPipeline, AStarXLPipeline, retention_loss, segregation_loss
    from .pipelines.generation import GenerationSettings, run_generation
    from .pipelines.guidance import apply_head_perturbation
    from .pipelines.guiders import HeadPerturbationGuidance
    from .pipelines.head_search import search_heads
    from .pipelines.ir_diffusion import IRDiffusionPipeline, IRDiffusionSDPipeline
    from .pipelines.loading import builtin_models, load_pipeline
    from .pipelines.paro_calibrate import calibrate_paro
    from .pipelines.paro_official import convert_official_paro_plan
    from .pipelines.paro_plan import ParoPlan
    from .techniques import apply_techniques
