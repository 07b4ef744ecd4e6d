"""A-STAR on the trained toy-sd: prompt adherence of two- and three-object prompts with and without it.

The images come from ``AStarPipeline`` built on toy-sd's components; the stock arm runs the same pipeline with both
loss weights at 0, which reproduces ``StableDiffusionPipeline`` exactly (tests/test_astar.py), so both arms share
prompts (``prompt_set``, seed 1234), image seeds (0..n-1), scheduler, steps and guidance (toy-sd's call defaults:
20 steps, CFG 5). The concepts are the prompt's objects as phrases (``"red circle"``, ``"blue square"``). The
evaluator judges every image (``evaluate_images``); the JSON also holds the mean overlap of the two concepts'
cross-attention maps (max-normalised, ``sum(min) / sum(a + b)``) over steps 1.. for two-object prompts.

    python benchmarks/toy_astar.py                                     # 100 prompts per count
    python benchmarks/toy_astar.py --num-prompts 20 --out /tmp/toy_astar.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = {
    "stock": dict(segregation_weight=0.0, retention_weight=0.0),
    "astar": {},  # the paper's loss weights (1, 1) and diffusers' A&E step size (scale_factor 20)
    "astar-scale-50": dict(scale_factor=50.0),
}


def _overlap(maps):
    m = maps / maps.flatten(-2).amax(-1)[..., None, None].clamp_min(1e-8)
    a, b = m[:, :, 0], m[:, :, 1]
    return float((a.minimum(b).sum((-1, -2)) / (a + b).sum((-1, -2)))[1:].mean())


def run(args: argparse.Namespace) -> dict:
    import torch

    from attnpack.pipelines.astar import AStarPipeline
    from attnpack.toy.adherence import EVAL_PROMPT_SEED, toy_call_defaults
    from attnpack.toy.data import parse_prompt, prompt_set
    from attnpack.toy.evaluator import evaluate_images
    from attnpack.toy.loader import load_evaluator, load_toy_pipeline

    torch.set_num_threads(args.threads)
    evaluator = load_evaluator()
    base = load_toy_pipeline("toy-sd")
    pipe = AStarPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in toy_call_defaults(base).items() if k not in ("height", "width")}
    result: dict = {
        "model": "toy-sd",
        "threads": args.threads,
        "prompt_seed": EVAL_PROMPT_SEED,
        "num_prompts": args.num_prompts,
        "call": call,
        "arms": {name: kwargs for name, kwargs in ARMS.items() if name in args.arms},
        "results": {},
    }
    for count in args.counts:
        prompts = prompt_set(count, args.num_prompts, seed=EVAL_PROMPT_SEED)
        for name in args.arms:
            tick = time.perf_counter()
            images, overlaps = [], []
            for i, prompt in enumerate(prompts):
                out = pipe(
                    prompt,
                    concepts=[f"{color} {shape}" for color, shape in parse_prompt(prompt).objects],
                    height=64,
                    width=64,
                    generator=torch.Generator().manual_seed(i),
                    return_attention_maps=count == 2,
                    **call,
                    **ARMS[name],
                )
                images += out.images
                if count == 2:
                    overlaps.append(_overlap(out.attention_maps))
            summary = evaluate_images(evaluator, images, prompts)
            summary.pop("per_image")
            summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}
            summary["seconds"] = round(time.perf_counter() - tick, 1)
            if overlaps:
                summary["map_overlap"] = round(sum(overlaps) / len(overlaps), 4)
            result["results"][f"{count}:{name}"] = summary
            print(f"{count} objects, {name}: {json.dumps(summary)}", flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--threads", type=int, default=1)


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("toy_astar", module=sys.modules[__name__]))
