"""The numbers of docs/toy-models.md: evaluator accuracy on held-out scenes and the toy models' prompt adherence.

Evaluator: ``scene_accuracy`` on procedural scenes of seed 5000 (no training run uses it), as clean renders and as
reconstructions through each shipped VAE (the best a generator with that VAE can do). Adherence:
``prompt_adherence`` (prompt seed 1234, image seeds 0..n-1) for 1-, 2- and 3-object prompts with each toy model's
call defaults. Writes one JSON file (default benchmarks/results/toy_adherence.json) with parameter counts, timings,
threads and the machine (package versions).

    python benchmarks/toy_adherence.py                                   # 100 prompts per count, 512 scenes
    python benchmarks/toy_adherence.py --num-prompts 20 --scenes 64 --out /tmp/toy.json

Call-argument sweeps (each ``--call`` JSON is one more adherence run with those pipeline arguments; ``--scenes 0``
skips the evaluator's own accuracy), e.g. the guidance sweep of docs/toy-models.md on prompts other than the reported
ones:

    python benchmarks/toy_adherence.py --models toy-flux --scenes 0 --counts 1 --num-prompts 200 --prompt-seed 77 \
        --image-seed 500 --threads 2 --call '{"true_cfg_scale": 3}' --call '{"true_cfg_scale": 8}' \
        --out benchmarks/results/toy_flux_guidance.json
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


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rounded(summary: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}


def _evaluator_accuracy(args: argparse.Namespace, evaluator, pipes: dict) -> dict:
    """The evaluator on held-out clean renders and on their reconstructions through each pipeline's VAE."""
    import torch

    from attnpack.toy.data import render_scene, scene_at
    from attnpack.toy.evaluator import images_to_tensor, scene_accuracy

    out: dict = {"scene_seed": args.scene_seed}
    scenes = [scene_at(args.scene_seed, i) for i in range(args.scenes)]
    clean = [render_scene(s) for s in scenes]
    tick = time.perf_counter()
    out["clean"] = _rounded(scene_accuracy(evaluator, scenes, clean))
    print("evaluator, clean:", out["clean"], flush=True)
    for name, pipe in pipes.items():
        recon = []
        with torch.no_grad():
            for start in range(0, len(clean), 64):
                x = images_to_tensor(clean[start : start + 64])  # [B, 3, 64, 64] in [-1, 1]
                y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
                recon += list(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        out[f"vae_{name}"] = _rounded(scene_accuracy(evaluator, scenes, recon))
        print(f"evaluator, {name} VAE reconstructions:", out[f"vae_{name}"], flush=True)
    out["seconds"] = round(time.perf_counter() - tick, 1)
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    from attnpack.toy.adherence import EVAL_PROMPT_SEED, prompt_adherence
    from attnpack.toy.loader import load_evaluator, load_toy_pipeline

    if args.prompt_seed is None:
        args.prompt_seed = EVAL_PROMPT_SEED
    torch.set_num_threads(args.threads)
    evaluator = load_evaluator()
    pipes = {}
    for name in args.models:  # "toy-sd" or "toy-sd@DIR" (a retrained copy in a diffusers folder)
        stage, _, path = name.partition("@")
        pipes[name] = load_toy_pipeline(stage, path=Path(path) if path else None)
    result: dict = {
        "threads": args.threads,
        "parameters": {"evaluator": _params(evaluator)},
        "adherence": {
            "prompt_seed": args.prompt_seed,
            "image_seed": args.image_seed,
            "num_prompts": args.num_prompts,
            "counts": args.counts,
        },
    }
    for name, pipe in pipes.items():
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        result["parameters"][name] = {"denoiser": _params(denoiser), "vae": _params(pipe.vae)}

    if args.scenes:
        result["evaluator"] = _evaluator_accuracy(args, evaluator, pipes)

    common = dict(
        counts=args.counts, num_prompts=args.num_prompts, prompt_seed=args.prompt_seed, image_seed=args.image_seed
    )
    for name, pipe in pipes.items():
        tick = time.perf_counter()
        report = prompt_adherence(pipe, evaluator, **common)
        result["adherence"][name] = {k: _rounded(v) for k, v in report.items()}
        result["adherence"][name]["seconds"] = round(time.perf_counter() - tick, 1)
        print(f"adherence, {name}:", json.dumps(result["adherence"][name]), flush=True)
        for call in args.call:
            report = prompt_adherence(pipe, evaluator, **common, **call)
            row = {"call": call, **{k: _rounded(v) for k, v in report.items()}}
            result["adherence"][name].setdefault("calls", []).append(row)
            print(f"adherence, {name}, {json.dumps(call)}:", json.dumps(row), flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=["toy-sd", "toy-flux"],
        help="shipped toy models, or STAGE@DIR for a retrained copy (e.g. toy-sd@toy-train/toy-sd)",
    )
    parser.add_argument("--num-prompts", type=int, default=100, help="prompts per object count (1, 2, 3)")
    parser.add_argument("--scenes", type=int, default=512, help="held-out scenes for the evaluator's accuracy")
    parser.add_argument("--scene-seed", type=int, default=5000)
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 2, 3], help="objects per prompt")
    parser.add_argument("--prompt-seed", type=int, default=None, help="default: the reported prompts (1234)")
    parser.add_argument("--image-seed", type=int, default=0, help="prompt i uses image seed IMAGE_SEED + i")
    parser.add_argument(
        "--call", action="append", type=json.loads, default=[], help="JSON of pipeline arguments: one more run each"
    )
    parser.add_argument("--threads", type=int, default=1)


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("toy_adherence", module=sys.modules[__name__]))
