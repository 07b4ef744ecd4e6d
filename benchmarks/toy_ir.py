"""IR-Diffusion on the trained toy-sd: do two subjects stay apart (no blending) and both appear?

For ``n`` pairs of subjects with distinct colors and shapes (``random.Random(prompt_seed)``), the stock arm draws the
scene prompt ``"a <color1> <shape1> and a <color2> <shape2>"`` with toy-sd (image seed ``i``), the IR arm runs
``IRDiffusionSDPipeline`` (subjects ``"a <color> <shape>"`` with the shape as subject word, the same scene prompt,
``seed=i``, built-in attention masks, toy-sd's call defaults: 20 steps, CFG 5). The evaluator judges each final image:
**both** (both named objects detected) and **blend** (a subject's color detected on the other subject's shape). A run
whose layout never shows both subjects (``max_layout_attempts``) counts as failed, and as neither both nor blend.

    python benchmarks/toy_ir.py                      # 100 pairs -> results/toy_ir.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def subject_pairs(n: int, seed: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``n`` pairs ``((color1, shape1), (color2, shape2))`` with distinct colors and distinct shapes."""
    from attnpack.toy.data import COLORS, SHAPES

    rng, colors = random.Random(seed), list(COLORS)[:6]
    out = []
    for _ in range(n):
        (c1, c2), (s1, s2) = rng.sample(colors, 2), rng.sample(list(SHAPES), 2)
        out.append(((c1, s1), (c2, s2)))
    return out


def judge(evaluator, image, a: tuple[str, str], b: tuple[str, str]) -> dict[str, bool]:
    import numpy as np

    names = {d.name for d in evaluator.detect([np.asarray(image)])[0]}
    return {
        "both": f"{a[0]} {a[1]}" in names and f"{b[0]} {b[1]}" in names,
        "blend": bool({f"{a[0]} {b[1]}", f"{b[0]} {a[1]}"} & names),
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from attnpack.pipelines.ir_diffusion import IRDiffusionSDPipeline
    from attnpack.toy.adherence import generate_images, toy_call_defaults
    from attnpack.toy.loader import load_evaluator, load_toy_pipeline

    torch.set_num_threads(args.threads)
    evaluator, pipe = load_evaluator(), load_toy_pipeline("toy-sd")
    ir = IRDiffusionSDPipeline.from_pipe(pipe)
    ir.set_progress_bar_config(disable=True)
    call = {k: v for k, v in toy_call_defaults(pipe).items() if k in ("num_inference_steps", "guidance_scale")}
    rows, tick = [], time.perf_counter()
    for i, (a, b) in enumerate(subject_pairs(args.num_pairs, args.prompt_seed)):
        scene = f"a {a[0]} {a[1]} and a {b[0]} {b[1]}"
        stock = generate_images(pipe, [scene], [i])[0]
        row = {"scene": scene, "stock": judge(evaluator, stock, a, b)}
        try:
            out = ir(
                subjects=[{"prompt": f"a {a[0]} {a[1]}", "word": a[1]}, {"prompt": f"a {b[0]} {b[1]}", "word": b[1]}],
                scene_prompt=scene,
                seed=i,
                max_layout_attempts=args.max_layout_attempts,
                **call,
            )
            row["ir"] = judge(evaluator, out.images[0], a, b)
        except ValueError as err:  # no layout with both subjects
            row["ir"] = {"both": False, "blend": False, "failed": str(err)[:200]}
        rows.append(row)
        print(i, scene, "stock", row["stock"], "ir", row["ir"], flush=True)
    n = len(rows)
    summary = {
        arm: {
            "both": sum(r[arm]["both"] for r in rows) / n,
            "blend": sum(r[arm]["blend"] for r in rows) / n,
            "failed": sum("failed" in r[arm] for r in rows),
        }
        for arm in ("stock", "ir")
    }
    print(json.dumps(summary))
    return {
        "threads": args.threads,
        "num_pairs": n,
        "prompt_seed": args.prompt_seed,
        "call": call,
        "max_layout_attempts": args.max_layout_attempts,
        "summary": summary,
        "seconds": round(time.perf_counter() - tick, 1),
        "rows": rows,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-pairs", type=int, default=100)
    parser.add_argument("--prompt-seed", type=int, default=0)
    parser.add_argument("--max-layout-attempts", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("toy_ir", module=sys.modules[__name__]))
