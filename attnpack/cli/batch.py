"""``attnpack batch``: many prompts, seeds and settings from a file; resumable; several GPUs through accelerate."""

from __future__ import annotations

import argparse

from ._common import DEFAULT_MODEL, add_model_args, add_technique_args, json_object


EPILOG = """\
examples:
  attnpack batch -m tiny-sd15 --prompts prompts.txt --outdir out --seeds 0-3 --steps 2
  attnpack batch --config sweep.yaml --skip-existing
  accelerate launch --multi_gpu --num_processes 4 -m attnpack batch --config sweep.yaml
  torchrun --nproc-per-node 8 -m attnpack batch --config videos.yaml --ulysses-degree 8   # each video on 8 GPUs

Outputs are {row:05d}_{seed}.png (videos: .gif or .mp4) plus metadata.jsonl; see docs/batch.md.
Exit status: 0 when every row and output succeeded, 1 when some failed (they are listed at the end),
2 for a bad command line or config file, or an output folder in use by another batch."""


def register(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="generate from a prompt file (.txt, .jsonl, .csv), resumable, multi-GPU via accelerate",
        description="Generate one output per prompt row and seed, with per-row overrides (seed, size, steps, "
        "techniques and their options), parameters embedded in each file and collected in metadata.jsonl.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML or JSON file with any of these options (command line wins)")
    p.add_argument("--prompts", help="prompt file: .txt (one per line), .jsonl or .csv (per-row overrides)")
    p.add_argument("-o", "--outdir", help="output folder (created if missing)")
    add_model_args(p)
    add_technique_args(p)
    g = p.add_argument_group("generation (run-wide; rows may override)")
    g.add_argument("--seeds", help="seeds for every row: 7, 0-7 or 0,3,5-9 (default: 0)")
    g.add_argument("--negative-prompt")
    g.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    g.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--frames", type=int, help="number of frames (video models)")
    g.add_argument("--fps", type=int, help="frames per second of video outputs (default: 8)")
    g.add_argument("--format", choices=["png", "gif", "mp4"], help="output format (default: png; videos: gif)")
    g.add_argument("--pipeline-kwargs", type=json_object, help="extra pipeline arguments as a JSON object")
    g.add_argument(
        "--skip-existing",
        action=argparse.BooleanOptionalAction,
        help="only make outputs that are missing (or were made with other settings)",
    )
    g = p.add_argument_group("context parallelism (each output made by all processes together; torchrun)")
    g.add_argument(
        "--ulysses-degree",
        type=int,
        help="split every output's denoising over N processes (Ulysses) instead of sharing the outputs among them; "
        "FLUX and Wan; see docs/multi-gpu.md",
    )
    g.add_argument(
        "--ring-degree", type=int, help="ring-attention degree (dense attention, gna and clear; see docs/multi-gpu.md)"
    )
    # "not given" must be distinguishable from a default, so that the config file can fill it
    p.set_defaults(**{a.dest: None for a in p._actions if a.dest != "help"})
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.batch import resolve_config, run_batch

    keys = (
        "prompts",
        "outdir",
        "model",
        "seeds",
        "negative_prompt",
        "steps",
        "guidance",
        "height",
        "width",
        "frames",
        "fps",
        "format",
        "dtype",
        "device",
        "offload",
        "variant",
        "revision",
        "attention_backend",
        "pipeline_kwargs",
        "skip_existing",
        "technique",
        "opt",
        "techniques",
        "ulysses_degree",
        "ring_degree",
    )
    cli = {key: getattr(args, key) for key in keys}
    config = resolve_config(cli, args.config, defaults={"model": DEFAULT_MODEL})
    summary = run_batch(config)
    return 0 if summary.ok else 1
