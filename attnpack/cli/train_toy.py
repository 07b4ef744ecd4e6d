"""``attnpack train-toy``: train the toy VAE, evaluator, ``toy-sd`` and ``toy-flux`` (resumable, under accelerate).

Examples::

    attnpack train-toy all --out toy-train                 # everything, in dependency order (VAE first)
    attnpack train-toy toy-flux --out toy-train            # resumes from toy-train/toy-flux.ckpt if present
    accelerate launch -m attnpack train-toy toy-sd --out toy-train --mixed-precision bf16   # GPUs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


ORDER = ("vae", "evaluator", "toy-sd", "toy-flux")


def register(sub) -> None:
    p = sub.add_parser(
        "train-toy",
        help="train the toy models and their evaluator",
        description="Train the toy VAE, evaluator, toy-sd and toy-flux on procedural scenes. Each stage writes a "
        "resumable checkpoint to OUT/<stage>.ckpt and, when done, a diffusers folder OUT/<stage> with "
        "train_config.json and train_log.json next to the trained weights. A stage whose shipped weights were "
        "trained in phases (toy-sd: OUT/toy-sd.base, then OUT/toy-sd continuing from it) runs every phase; "
        "finished phases are skipped. toy-sd and toy-flux need the VAE (OUT/vae or --vae).",
    )
    p.add_argument("stages", nargs="+", metavar="STAGE", help=f"{', '.join(ORDER)}, or all")
    p.add_argument("--out", default="toy-train", help="working folder (default: toy-train)")
    p.add_argument(
        "--config",
        default=None,
        help="training config JSON (one stage), e.g. the train_config.json shipped next to the weights "
        "(default: the config of the shipped weights)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="override the number of steps of every phase (changes the result)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="override the global batch size of every phase")
    p.add_argument("--vae", default=None, help="trained VAE folder for toy-sd / toy-flux (default: OUT/vae)")
    p.add_argument("--no-resume", action="store_true", help="start over even when a checkpoint exists")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps in total (resume later)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument(
        "--score",
        type=int,
        default=None,
        metavar="N",
        help="after toy-sd / toy-flux, score N prompts per object count (1, 2, 3) with the evaluator (0: skip; "
        "default 100, or 0 with --steps: a shortened run is not worth minutes of scoring)",
    )
    p.add_argument(
        "--evaluator", default=None, help="evaluator folder for --score (default: OUT/evaluator or shipped)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _stages(names: list[str]) -> list[str]:
    if names == ["all"]:
        return list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ORDER)} or all.")
    return sorted(dict.fromkeys(names), key=ORDER.index)


def _config(args, stage: str):
    from ..toy.train import TrainConfig, with_overrides

    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"`--config` {args.config!r} is not a file.")
    cfg = TrainConfig.load(path)
    if cfg.stage != stage:
        raise ValueError(f"`--config` {args.config!r} is for stage {cfg.stage!r}, not {stage!r}.")
    return with_overrides(cfg, args.steps, args.batch_size)


def _score(folder: Path, evaluator_dir: Path | None, n: int, quiet: bool) -> dict:
    from ..io import atomic_path
    from ..toy.adherence import prompt_adherence
    from ..toy.loader import load_evaluator, load_toy_pipeline

    pipe = load_toy_pipeline(folder.name, path=folder)
    evaluator = load_evaluator(evaluator_dir)
    if not quiet:
        print(f"scoring {folder} on {n} prompts per object count ...", file=sys.stderr)
    report = prompt_adherence(pipe, evaluator, num_prompts=n)
    sub = folder / ("unet" if (folder / "unet").is_dir() else "transformer")
    log_path = sub / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log["adherence"] = report
    log["evaluator"] = str(evaluator_dir) if evaluator_dir is not None else "shipped"
    with atomic_path(log_path) as tmp:
        tmp.write_text(json.dumps(log, indent=2) + "\n")
    return report


def run(args: argparse.Namespace) -> int:
    import torch

    from ..toy.train import train, train_recipe

    stages = _stages(args.stages)
    if args.config is not None and len(stages) != 1:
        raise ValueError("`--config` applies to one stage; give exactly one STAGE with it.")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"`--threads` must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    score = args.score if args.score is not None else (0 if args.steps is not None else 100)
    if score < 0:
        raise ValueError(f"`--score` must be >= 0, got {score}.")
    for stage in stages:
        common = dict(
            vae=args.vae,
            resume=not args.no_resume,
            stop_after=args.stop_after,
            mixed_precision=args.mixed_precision,
            cpu=args.cpu,
            progress=not args.quiet,
        )
        if args.config is not None:
            summaries = [train(stage, out, config=_config(args, stage), **common)]
        else:  # every phase of the recipe of the shipped weights
            summaries = train_recipe(stage, out, steps=args.steps, batch_size=args.batch_size, **common)
        for summary in summaries:
            print(json.dumps(summary), file=sys.stderr)
        summary = summaries[-1]
        if summary["exported"] is None:
            print(f"{summary['name']}: stopped at step {summary['steps_done']}; run again to resume.", file=sys.stderr)
            return 0
        if stage in ("toy-sd", "toy-flux") and score > 0:
            if args.evaluator is not None:
                evaluator_dir = Path(args.evaluator)
                if not (evaluator_dir / "config.json").is_file():
                    raise ValueError(f"`--evaluator` {args.evaluator!r} holds no evaluator (no config.json).")
            else:  # the one trained here, else the shipped one
                evaluator_dir = out / "evaluator" if (out / "evaluator" / "config.json").is_file() else None
            report = _score(Path(summary["exported"]), evaluator_dir, score, args.quiet)
            print(json.dumps({stage: report}), file=sys.stderr)
    return 0
