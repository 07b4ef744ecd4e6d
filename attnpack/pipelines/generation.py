"""One generation with recorded parameters: shared by ``attnpack generate``, ``attnpack batch`` and the UI."""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections import Counter
from typing import Any

import torch

from .._utils import check_number, package_versions
from .loading import is_video_pipeline, pipeline_defaults


__all__ = [
    "GenerationSettings",
    "GenerationResult",
    "run_generation",
    "describe_processors",
    "MAX_TEXT_CHARS",
    "check_text",
    "check_pipeline_kwargs",
]

# The longest text any entry point accepts in one field (prompts, negative prompts, the UI's text fields, technique
# options given as text): far above what the text encoders read (CLIP 77 tokens, T5 512), and small enough that a
# request cannot tie up the tokenizer (issue 20: a 12 MB batch prompt line took 83 s and 2.8 GB before this limit).
MAX_TEXT_CHARS = 4000


def check_text(name: str, value: object) -> str:
    """``value`` if it is a string of at most :data:`MAX_TEXT_CHARS` characters; else a ``ValueError`` naming the
    field ``name`` and the limit (never echoing the text). The one length check of every entry point: the command
    line, batch rows, the technique registry and the UI."""
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be text, got a {type(value).__name__}.")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"`{name}` is too long ({len(value)} characters; at most {MAX_TEXT_CHARS}); shorten it.")
    return value


@dataclasses.dataclass
class GenerationSettings:
    """User-facing generation settings; ``None`` means "the pipeline's (or built-in model's) default"."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    pipeline_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("`prompt` must be a non-empty string.")
        check_text("prompt", self.prompt)
        if self.negative_prompt is not None:
            check_text("negative_prompt", self.negative_prompt)
        check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        if self.steps is not None:
            check_number("steps", self.steps, 1, 1000, integer=True)
        if self.guidance is not None:
            check_number("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 8, 16384, integer=True)
        if self.num_frames is not None:
            check_number("num_frames", self.num_frames, 1, 4096, integer=True)
        check_pipeline_kwargs(self.pipeline_kwargs)


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
MAX_GUIDANCE = 100.0
# pipeline arguments that GenerationSettings (or attnpack itself) sets: given through pipeline_kwargs they would skip
# its checks or break what attnpack writes
_SETTINGS_ARGUMENTS = {
    "prompt": "the prompt",
    "negative_prompt": "`negative_prompt` / --negative-prompt",
    "num_inference_steps": "`steps` / --steps",
    "guidance_scale": "`guidance` / --guidance",
    "height": "`height` / --height",
    "width": "`width` / --width",
    "num_frames": "`num_frames` / --frames",
    "generator": "`seed` / --seed",
    "output_type": "nothing: attnpack writes PNG / GIF / MP4 files",
    "return_dict": "nothing: attnpack reads the pipeline output itself",
    "num_images_per_prompt": "one seed per output (several --seed values, or a batch with a seed range)",
}


def _numbers(value: Any, where: str):
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")


def check_pipeline_kwargs(kwargs: Any, pipe=None) -> dict[str, Any]:
    """Extra pipeline arguments: a dict of named arguments that the settings do not cover, with finite numbers; with
    ``pipe``, also arguments its ``__call__`` names (an unknown key is an error, never silently dropped)."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"`pipeline_kwargs` must be a JSON object with named arguments, got {kwargs!r}.")
    for key in kwargs:
        check_text("pipeline_kwargs key", key)
        if key in _SETTINGS_ARGUMENTS:
            raise ValueError(f"`pipeline_kwargs` must not set `{key}`: use {_SETTINGS_ARGUMENTS[key]} instead.")
    for where, number in _numbers(kwargs, "pipeline_kwargs"):
        check_number(where, number)
    if pipe is not None:
        params = inspect.signature(pipe.__call__).parameters
        named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        unknown = [k for k in kwargs if k not in named]
        if unknown:
            raise ValueError(
                f"`pipeline_kwargs` {', '.join(map(repr, unknown))} not taken by {type(pipe).__name__}; its arguments: "
                f"{', '.join(n for n in named if n not in _SETTINGS_ARGUMENTS and n != 'self')}."
            )
    return kwargs


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images (image pipelines) or one list of PIL frames per video
    parameters: dict[str, Any]
    seconds: float
    is_video: bool


def describe_processors(pipe) -> dict[str, int]:
    """Count the attention processors installed on the pipeline's denoiser(s), by class (and core for attnpack's)."""
    counts: Counter[str] = Counter()
    for key in ("unet", "transformer", "transformer_2"):
        model = pipe.components.get(key) if hasattr(pipe, "components") else None
        if model is None or not hasattr(model, "attn_processors"):
            continue
        for proc in model.attn_processors.values():
            core = getattr(proc, "core", None)
            counts[type(proc).__name__ + (f"[{core!r}]" if core is not None else "")] += 1
    return dict(counts)


def run_generation(pipe, settings: GenerationSettings, *, extra_parameters: dict[str, Any] | None = None):
    """Run ``pipe`` with ``settings`` (seeded CPU generator) and return images plus the parameters to embed."""
    settings.validate()
    sig = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = pipeline_defaults(pipe)
    video = is_video_pipeline(pipe)
    for name, value in (
        ("negative_prompt", settings.negative_prompt),
        ("num_inference_steps", settings.steps),
        ("guidance_scale", settings.guidance),
        ("height", settings.height),
        ("width", settings.width),
        ("num_frames", settings.num_frames),
    ):
        if value is not None:
            if name not in sig:
                raise ValueError(f"{type(pipe).__name__} does not take `{name}`.")
            kwargs[name] = value
    kwargs = {k: v for k, v in kwargs.items() if k in sig}
    kwargs.update(check_pipeline_kwargs(settings.pipeline_kwargs, pipe))
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    start = time.perf_counter()
    out = pipe(prompt=settings.prompt, generator=generator, output_type="pil", **kwargs)
    seconds = time.perf_counter() - start
    images = list(out.frames) if video else list(out.images)

    denoiser = next((pipe.components[k] for k in ("transformer", "unet") if pipe.components.get(k) is not None), None)
    first = next(iter(denoiser.parameters()), None) if denoiser is not None else None
    parameters: dict[str, Any] = {
        "model": getattr(pipe, "_attnpack_model", None) or getattr(pipe, "name_or_path", None),
        "pipeline": type(pipe).__name__,
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": settings.seed,
        "steps": kwargs.get(
            "num_inference_steps", sig["num_inference_steps"].default if "num_inference_steps" in sig else None
        ),
        "guidance": kwargs.get("guidance_scale", sig["guidance_scale"].default if "guidance_scale" in sig else None),
        "height": kwargs.get("height"),
        "width": kwargs.get("width"),
        "num_frames": kwargs.get("num_frames"),
        "pipeline_kwargs": {k: v for k, v in settings.pipeline_kwargs.items()},
        "dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "processors": describe_processors(pipe),
        "seconds": round(seconds, 3),
        "versions": package_versions(),
    }
    if extra_parameters:
        parameters.update(extra_parameters)
    return GenerationResult(images=images, parameters=parameters, seconds=seconds, is_video=video)
