"""Pipelines and pipeline helpers: model loading, tiny offline models, generation with recorded parameters."""

from .generation import GenerationResult, GenerationSettings, describe_processors, run_generation
from .loading import builtin_models, is_video_pipeline, load_pipeline


__all__ = [
    "GenerationResult",
    "GenerationSettings",
    "builtin_models",
    "describe_processors",
    "is_video_pipeline",
    "load_pipeline",
    "run_generation",
]
