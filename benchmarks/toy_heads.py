"""Head guidance on toy-flux: search the heads (HeadHunter's greedy search, objective `toy-adherence`), then check
them on held-out prompts against plain toy-flux, paired seeds, judged by the toy evaluator.

The search runs on ``--search-prompts`` two-object prompts (``prompt_set(2, n, seed=7)``) x seeds 0-1 with scale 3,
softness 1, toy-flux's call defaults (20 steps, true CFG 5). The check draws ``--eval-prompts`` one- and two-object
prompts (``prompt_set(k, n, seed=1234)``, the evaluation prompts of docs/toy-models.md) with and without the found heads
(scale 3), seed i for prompt i. The found heads ship as the preset ``toy-flux/adherence`` (attnpack/presets.py).

    python benchmarks/toy_heads.py                      # -> results/toy_heads.json (never overwrites it: --force)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search-prompts", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=100, help="per object count (1 and 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> dict:
    import torch

    from attnpack import apply_head_perturbation, search_heads
    from attnpack.pipelines import load_pipeline
    from attnpack.pipelines.objectives import get_objective
    from attnpack.toy.adherence import generate_images, toy_call_defaults
    from attnpack.toy.data import prompt_set

    torch.set_num_threads(args.threads)

    pipe = load_pipeline("toy-flux", device="cpu")
    call = toy_call_defaults(pipe)
    steps = call.pop("num_inference_steps")
    prompts = prompt_set(2, args.search_prompts, seed=7)
    start = time.perf_counter()
    result = search_heads(
        pipe,
        [p for p in prompts for _ in range(2)],
        [s for _ in prompts for s in range(2)],
        objective="toy-adherence",
        rounds=args.rounds,
        top_k=args.top_k,
        scale=args.scale,
        num_inference_steps=steps,
        pipeline_kwargs=call,
    )
    search_seconds = time.perf_counter() - start
    print(f"heads {result.heads} ({search_seconds:.0f} s)", file=sys.stderr)

    objective = get_objective("toy-adherence")
    evaluation = {}
    for count in (1, 2):
        held_out = prompt_set(count, args.eval_prompts, seed=1234)
        seeds = list(range(len(held_out)))
        arms = {}
        for arm in ("stock", "guided"):
            if arm == "guided":
                with apply_head_perturbation(pipe, heads=result.heads, scale=args.scale):
                    images = generate_images(pipe, held_out, seeds, num_inference_steps=steps, **call)
            else:
                images = generate_images(pipe, held_out, seeds, num_inference_steps=steps, **call)
            scores = objective(images, held_out)
            arms[arm] = {"mean_score": sum(scores) / len(scores), "scores": scores}
        wins = sum(g > s for g, s in zip(arms["guided"]["scores"], arms["stock"]["scores"]))
        losses = sum(g < s for g, s in zip(arms["guided"]["scores"], arms["stock"]["scores"]))
        evaluation[f"{count}_objects"] = {
            "prompts": len(held_out),
            "stock": arms["stock"]["mean_score"],
            "guided": arms["guided"]["mean_score"],
            "guided_better": wins,
            "guided_worse": losses,
        }
        print(f"{count} object(s): stock {arms['stock']['mean_score']:.3f} -> guided "
              f"{arms['guided']['mean_score']:.3f} ({wins} better, {losses} worse)", file=sys.stderr)  # fmt: skip
    return {
        "heads": result.heads,
        "search": {
            "prompts": prompts,
            "seeds": [0, 1],
            "rounds": args.rounds,
            "top_k": args.top_k,
            "scale": args.scale,
            "steps": steps,
            "rounds_report": [dataclasses.asdict(r) for r in result.rounds],
            "seconds": round(search_seconds, 1),
        },
        "held_out": evaluation,
    }


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("toy_heads", module=sys.modules[__name__]))
