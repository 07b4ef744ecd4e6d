"""``attnpack ui``: the Gradio web UI (needs ``pip install attnpack[ui]``)."""

from __future__ import annotations

import argparse
import sys

from ._common import DEFAULT_MODEL


def register(sub) -> None:
    from ..pipelines.loading import builtin_models

    p = sub.add_parser(
        "ui",
        help="launch the web UI",
        description="Launch the attnpack web UI (Gradio). Tabs: Generate (any technique, optionally combined with "
        "head guidance), Head guidance (presets, heads x softness grid), IR-Diffusion (several subjects in one "
        "scene), A-STAR (concepts kept apart), Benchmarks / Info (compare a technique with stock attention, what this "
        "machine runs). Local model folders and weight files load only from --allow-dir folders and only from "
        ".safetensors files; results are served from a folder the app creates, nothing else.",
    )
    p.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help=f"model selected when the page opens: built-in name ({', '.join(builtin_models())}), local diffusers "
        f"folder or Hub id (default: {DEFAULT_MODEL}); always allowed",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (default: auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--offload", choices=["model", "sequential"], default=None, help="CPU offload (needs a GPU)")
    p.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="FOLDER",
        help="folder whose model folders and weight/plan files (.safetensors) may be loaded (repeatable)",
    )
    p.add_argument("--no-hub", action="store_true", help="refuse Hub ids (no downloads from the UI)")
    p.add_argument("--max-resolution", type=int, default=2048, help="largest width/height accepted (default: 2048)")
    p.add_argument("--max-steps", type=int, default=100, help="most denoising steps accepted (default: 100)")
    p.add_argument("--max-frames", type=int, default=257, help="most video frames accepted (default: 257)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait (default: 16)")
    p.add_argument("--max-cached-models", type=int, default=1, help="pipelines kept loaded (default: 1)")
    p.add_argument(
        "--outdir",
        default=None,
        help="keep the results in a new folder attnpack-ui-<time>-<id> inside this folder (default: a temporary "
        "folder); only that new folder is served",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..ui import build_demo

    if not 1 <= args.port <= 65535:
        raise ValueError(f"`--port` must be in 1..65535, got {args.port}.")
    if args.outdir is not None:
        out = Path(args.outdir).expanduser()
        if not out.is_dir():
            raise ValueError(f"`--outdir` folder {args.outdir!r} does not exist; create it first.")
    demo = build_demo(
        default_model=args.model,
        allowed_dirs=args.allow_dir,
        allow_hub=not args.no_hub,
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        max_resolution=args.max_resolution,
        max_steps=args.max_steps,
        max_frames=args.max_frames,
        queue_size=args.queue_size,
        max_cached_models=args.max_cached_models,
        output_dir=args.outdir,
    )
    if args.share:
        print("attnpack ui: --share makes this UI reachable by anyone with the link.", file=sys.stderr)
    runtime = demo.attnpack_runtime
    if args.outdir is not None:
        print(f"attnpack ui: results are kept in {runtime.output_dir}", file=sys.stderr)
    # only the folder the UI made for its results: never the whole --outdir, whose other files anyone could fetch
    from ..ui._layout import UI_CSS

    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=runtime.served_paths,
        css=UI_CSS,
    )
    return 0
