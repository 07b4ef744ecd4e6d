"""Prompt adherence of a text-to-image pipeline on toy prompts, measured with the toy evaluator.

>>> from attnpack.toy import load_toy_pipeline, load_evaluator, prompt_adherence
>>> pipe = load_toy_pipeline("toy-flux")
>>> report = prompt_adherence(pipe, load_evaluator(), num_prompts=64)
>>> report["1"]["objects"], report["2"]["objects"], report["3"]["objects"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data import prompt_set
from .evaluator import ToyEvaluator, evaluate_images


__all__ = ["toy_call_defaults", "generate_images", "prompt_adherence", "EVAL_PROMPT_SEED"]

EVAL_PROMPT_SEED = 1234  # prompt_set seed of the reported numbers (no training run uses it as data seed)


def toy_call_defaults(pipe) -> dict[str, Any]:
    """Call defaults of a toy pipeline: those recorded by ``load_pipeline``, else the toy model's (by class)."""
    from ..pipelines.loading import pipeline_defaults
    from .loader import TOY_MODELS

    recorded = pipeline_defaults(pipe)
    if recorded:
        return recorded
    name = "toy-flux" if "Flux" in type(pipe).__name__ else "toy-sd"
    return dict(TOY_MODELS[name][1])


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 32,
    *,
    progress: bool | str = False,
    **call_kwargs,
):
    """One PIL image per ``(prompt, seed)``; image ``i`` depends only on ``prompts[i]`` and ``seeds[i]`` (its own
    CPU generator), not on the batching. ``call_kwargs`` override :func:`toy_call_defaults`. ``progress``: a bar
    over the images (a string names it)."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt.")
    kwargs = {**toy_call_defaults(pipe), **call_kwargs}
    images = []
    bar = tqdm(total=len(prompts), unit="img", desc=progress if isinstance(progress, str) else "images",
               disable=not progress)  # fmt: skip
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        extra = dict(kwargs)
        if isinstance(extra.get("negative_prompt"), str):
            extra["negative_prompt"] = [extra["negative_prompt"]] * len(chunk)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        images += list(pipe(prompt=chunk, generator=generators, output_type="pil", **extra).images)
        bar.update(len(chunk))
    bar.close()
    return images


def prompt_adherence(
    pipe,
    evaluator: ToyEvaluator,
    *,
    counts: Sequence[int] = (1, 2, 3),
    num_prompts: int = 200,
    prompt_seed: int = EVAL_PROMPT_SEED,
    image_seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    **call_kwargs,
) -> dict[str, dict]:
    """Generate ``num_prompts`` toy prompts with 1, 2 and 3 objects and score the images with ``evaluator``.

    Returns ``{"1": summary, "2": ..., "3": ...}`` with the fractions of :func:`~attnpack.toy.evaluator.
    evaluate_images` (``objects``, ``relation``, ``cell``, ``exact``) and ``n``; per-image results are dropped.
    Prompt ``i`` uses image seed ``image_seed + i``. ``progress``: a bar per object count (on by default: 100 prompts
    take minutes on a CPU).
    """
    out: dict[str, dict] = {}
    for count in counts:
        prompts = prompt_set(count, num_prompts, seed=prompt_seed)
        seeds = [image_seed + i for i in range(num_prompts)]
        where = f"adherence, {count} object{'s' if count > 1 else ''}" if progress else False
        images = generate_images(pipe, prompts, seeds, batch_size=batch_size, progress=where, **call_kwargs)
        summary = evaluate_images(evaluator, images, prompts)
        summary.pop("per_image")
        out[str(count)] = summary
    return out
