"""Fidelity of attention techniques on the trained toy models: PSNR of images generated with each technique vs dense
attention at equal seeds, plus the evaluator's prompt adherence of those images.

Every technique registered in ``attnpack.techniques`` is measured (today ``dense``; ``gna``, ``clear`` and ``paro``
appear here as soon as their modules register). The reference is the stock pipeline (diffusers' own processors);
``dense`` must reproduce it exactly (PSNR = inf), which checks the harness itself. ``probe:window-K`` rows are plain
dense attention masked to a KxK window around each image query (text keys kept): not a technique, a measure of how
local the toy models' attention is, and the number a local technique with the same window should approach.

    python benchmarks/toy_fidelity.py                                  # all registered techniques, both toy models
    python benchmarks/toy_fidelity.py --techniques gna clear paro \\
        --options '{"gna": [{"window_size": 3}, {"window_size": 5}], "paro": {"density": 0.5}}'
    python benchmarks/toy_fidelity.py --models toy-flux --num-prompts 8 --out /tmp/fidelity.json

``--options`` maps a technique to one options dict or a list of them (a sweep), named as in its Python API; options
that do not fit the toy grids (toy-flux: 8x8 image tokens; toy-sd: 16x16 and 8x8) are reported as errors in the JSON
and on stderr, never skipped silently.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); ``inf`` when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _json_number(x: float) -> float | str:
    return "inf" if math.isinf(x) else round(x, 3)


def _prompts(num_prompts: int, seed: int) -> list[str]:
    from attnpack.toy.data import prompt_set

    per = [num_prompts // 3 + (1 if i < num_prompts % 3 else 0) for i in range(3)]
    return [p for count, n in zip((1, 2, 3), per) for p in prompt_set(count, n, seed=seed)]


def run(args: argparse.Namespace) -> dict:
    import torch

    from attnpack.attn_processors.processor import apply_processors
    from attnpack.techniques import apply_techniques, available_techniques
    from attnpack.toy.adherence import generate_images
    from attnpack.toy.attention import LocalWindowProbe
    from attnpack.toy.evaluator import evaluate_images
    from attnpack.toy.loader import load_evaluator, load_toy_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    registered = available_techniques()
    names = args.techniques or list(registered)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise SystemExit(f"unknown technique(s) {unknown}; registered: {', '.join(registered)}")
    options = json.loads(args.options) if args.options else {}
    prompts = _prompts(args.num_prompts, args.prompt_seed)
    seeds = list(range(len(prompts)))
    evaluator = load_evaluator()
    results = []
    for model in args.models:
        pipe = load_toy_pipeline(model)
        call = dict(num_inference_steps=args.steps)

        def generate(pipe=pipe, call=call):
            return [np.asarray(im) for im in generate_images(pipe, prompts, seeds, batch_size=args.batch_size, **call)]

        start = time.perf_counter()
        reference = generate()
        ref_seconds = time.perf_counter() - start
        ref_score = evaluate_images(evaluator, reference, prompts)
        print(f"{model}: reference in {ref_seconds:.1f} s, objects {ref_score['objects']:.3f}", file=sys.stderr)
        variants: list[tuple[str, dict, object]] = []
        for name in names:
            sweep = options.get(name, {})
            for opts in sweep if isinstance(sweep, list) else [sweep]:
                variants.append((name, opts, lambda p, n=name, o=opts: apply_techniques(p, [(n, o)])))
        for window in args.probe_windows:
            probe = LocalWindowProbe(window)
            variants.append(
                (
                    f"probe:window-{window}",
                    {"window": window},
                    lambda p, c=probe: apply_processors(p, c, kinds=["self", "joint", "single"]),
                )
            )
        for name, opts, apply in variants:
            row = {"model": model, "technique": name, "options": opts}
            try:
                start = time.perf_counter()
                with apply(pipe):
                    images = generate()
                row["seconds"] = round(time.perf_counter() - start, 2)
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"{model} {name} {opts}: {row['error']}", file=sys.stderr)
                results.append(row)
                continue
            values = [psnr(a, b) for a, b in zip(images, reference)]
            finite = [v for v in values if not math.isinf(v)]
            score = evaluate_images(evaluator, images, prompts)
            row.update(
                psnr_mean=_json_number(float(np.mean(finite)) if finite else math.inf),
                psnr_min=_json_number(min(values)),
                identical=sum(math.isinf(v) for v in values),
                psnr_per_image=[_json_number(v) for v in values],
                adherence={k: score[k] for k in ("objects", "relation", "cell", "exact")},
            )
            print(
                f"{model} {name} {opts}: PSNR mean {row['psnr_mean']} min {row['psnr_min']} dB, "
                f"objects {score['objects']:.3f} (dense {ref_score['objects']:.3f})",
                file=sys.stderr,
            )
            results.append(row)
        results.append(
            {
                "model": model,
                "technique": "reference (stock processors)",
                "seconds": round(ref_seconds, 2),
                "adherence": {k: ref_score[k] for k in ("objects", "relation", "cell", "exact")},
            }
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "meta": {
            "benchmark": "toy_fidelity",
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "models": args.models,
            "num_images": len(prompts),
            "prompts": prompts,
            "seeds": seeds,
            "steps": args.steps,
            "psnr": "dB over uint8 RGB images, peak 255; psnr_mean averages the non-identical images",
        },
        "results": results,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["toy-flux", "toy-sd"], choices=["toy-flux", "toy-sd"])
    parser.add_argument("--techniques", nargs="+", default=None, help="default: every registered technique")
    parser.add_argument("--options", default=None, help="JSON: technique -> options dict or list of dicts")
    parser.add_argument("--probe-windows", nargs="*", type=int, default=[3, 5], help="local-window probes (odd)")
    parser.add_argument("--num-prompts", type=int, default=24, help="images per model (1-, 2-, 3-object prompts)")
    parser.add_argument("--prompt-seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("toy_fidelity", module=sys.modules[__name__]))
