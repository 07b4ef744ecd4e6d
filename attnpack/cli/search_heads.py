"""``attnpack search-heads``: the HeadHunter greedy head search (see :func:`attnpack.search_heads`).

Runs in one process or under ``accelerate launch`` / ``torchrun`` (each process scores a slice of the candidates;
the pipeline is placed on each process's device). Resumable: rerun the same command to continue from ``--state``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_model_args, json_object, load_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "search-heads",
        help="find attention heads for perturbation guidance (HeadHunter)",
        description="Greedy cumulative search for the attention heads whose perturbation guidance maximises an "
        "objective (HeadHunter, arXiv 2506.10978). Writes heads.txt, heads.json, report.md and one contact sheet "
        "per round to --outdir; resumes from --state.",
    )
    add_model_args(p, default="tiny-flux")
    g = p.add_argument_group("prompts")
    g.add_argument("-p", "--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts", default=None, help="a .txt file with one prompt per line")
    g.add_argument("--seeds", default="0", help="comma-separated seeds, paired with the prompts (default: 0)")
    s = p.add_argument_group("search")
    s.add_argument(
        "--objective",
        default="pickscore",
        help="pickscore, pickscore:<path or hub id>, clip, clip:<path or hub id>, brightness, saturation, contrast, "
        "sharpness (prefix - to minimise) (default: pickscore)",
    )
    s.add_argument("--rounds", type=int, default=5, help="search rounds R (default: 5)")
    s.add_argument("--top-k", type=int, default=3, help="heads added per round k (default: 3)")
    s.add_argument("--candidates", default=None, help="heads to consider, e.g. 'L0,L1,L2H5' (default: all)")
    s.add_argument("--scale", type=float, default=3.0, help="perturbation guidance scale (default: 3.0)")
    s.add_argument("--softness", type=float, default=1.0, help="SoftPAG u during the search (default: 1.0)")
    s.add_argument("--kind", default="identity", help="identity, uniform or query_mean (default: identity)")
    s.add_argument("--token-scope", default="full", help="full or image (default: full)")
    s.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    s.add_argument("--guidance", type=float, default=None, help="pipeline guidance_scale (HeadHunter SD3: 0)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--pipeline-kwargs", type=json_object, default={}, help="extra pipeline arguments (JSON object)")
    s.add_argument("--state", default=None, help="JSON state file (default: <outdir>/state.json)")
    s.add_argument("-o", "--outdir", required=True, help="output folder")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ValueError(f"`--prompts` file {args.prompts!r} does not exist.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give prompts with -p/--prompt (repeatable) or --prompts FILE.")
    return prompts


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"`--seeds` must be comma-separated integers, got {text!r}.") from None


def run(args: argparse.Namespace) -> int:
    from ..pipelines.head_search import search_heads
    from ..pipelines.objectives import get_objective

    prompts, seeds = _prompts(args), _seeds(args.seeds)
    get_objective(args.objective)  # fail on a bad name before loading the model
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"`--outdir` {args.outdir!r} is a file; give a folder.")
    if args.device is None:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # the same process group as the search (see there)
        if state.num_processes > 1:
            args.device = str(state.device)
    pipe = load_from_args(args)
    kwargs = dict(args.pipeline_kwargs)
    for key, value in (("guidance_scale", args.guidance), ("height", args.height), ("width", args.width)):
        if value is not None:
            kwargs[key] = value
    result = search_heads(
        pipe,
        prompts,
        seeds,
        args.objective,
        rounds=args.rounds,
        top_k=args.top_k,
        candidates=args.candidates,
        scale=args.scale,
        softness=args.softness,
        num_inference_steps=args.steps,
        kind=args.kind,
        token_scope=args.token_scope,
        pipeline_kwargs=kwargs,
        state_path=args.state or outdir / "state.json",
        output_dir=outdir,
        progress=not args.no_progress,
    )
    print(",".join(result.heads))
    print(f"wrote {outdir / 'heads.txt'} and {outdir / 'report.md'}", file=sys.stderr)
    return 0
