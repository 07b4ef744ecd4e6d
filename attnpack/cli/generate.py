"""``attnpack generate``: one image (PNG) or video (GIF / MP4) with its parameters embedded."""

from __future__ import annotations

import argparse
import sys

from ._common import (
    add_model_args,
    add_technique_args,
    json_object,
    load_from_args,
    technique_specs,
)


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one image or video",
        description="Generate one image (PNG) or video (GIF/MP4) with the generation parameters embedded in the file.",
    )
    add_model_args(p)
    add_technique_args(p)
    p.add_argument("-p", "--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="number of frames (video models)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of video outputs")
    p.add_argument("--pipeline-kwargs", type=json_object, default={}, help="extra pipeline arguments as a JSON object")
    p.add_argument("-o", "--out", default=None, help="output file: .png for images, .gif or .mp4 for videos")
    g = p.add_argument_group(
        "context parallelism (one generation on N processes: torchrun --nproc-per-node N -m attnpack generate ...)"
    )
    g.add_argument(
        "--ulysses-degree",
        type=int,
        default=None,
        help="split each denoising step over N processes with Ulysses attention (default with --ring-degree: the "
        "number of processes / ring degree); must divide the attention heads; see docs/multi-gpu.md",
    )
    g.add_argument(
        "--ring-degree",
        type=int,
        default=None,
        help="ring-attention degree (dense attention, gna and clear; the other techniques refuse it)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._utils import check_number
    from ..io import IMAGE_SUFFIXES, MAX_FPS, VIDEO_SUFFIXES, check_output_path, save_image, save_video
    from ..pipelines.generation import GenerationSettings, run_generation
    from ..pipelines.loading import is_video_pipeline

    settings = GenerationSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        pipeline_kwargs=args.pipeline_kwargs,
    )
    settings.validate()
    check_number("--fps", args.fps, 1, MAX_FPS, integer=True)
    specs = technique_specs(args)  # validate technique options before loading the model
    if args.attention_backend is not None:
        from ..attn_processors.processor import check_attention_backend

        check_attention_backend(args.attention_backend, "--attention-backend")
    if args.out is not None:  # fail before loading anything if the output cannot be written
        check_output_path(args.out, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    parallel = args.ulysses_degree is not None or args.ring_degree is not None
    if parallel:
        from ..pipelines.parallel import check_ring_techniques, init_distributed, is_main_process

        check_ring_techniques(specs, args.ring_degree)
        init_distributed()  # before loading: each process then loads onto its own GPU
    pipe = load_from_args(args)
    video = is_video_pipeline(pipe)
    out = args.out or ("out.gif" if video else "out.png")
    out = check_output_path(out, VIDEO_SUFFIXES if video else IMAGE_SUFFIXES)
    from ..techniques import apply_techniques

    with apply_techniques(pipe, specs, args.attention_backend) as techniques:
        extra = techniques.parameters()
        if parallel:
            from ..pipelines.parallel import enable_context_parallel

            layout = enable_context_parallel(pipe, args.ulysses_degree, args.ring_degree or 1)
            extra = {**extra, "context_parallel": {"ulysses": layout.ulysses_degree, "ring": layout.ring_degree}}
        result = run_generation(pipe, settings, extra_parameters=extra)
    if parallel:
        import torch.distributed as dist

        main = is_main_process()
        dist.destroy_process_group()
        if not main:
            return 0  # every process holds the whole result; the first one writes it
    if video:
        save_video(result.images[0], out, result.parameters, fps=args.fps)
    else:
        save_image(result.images[0], out, result.parameters)
    print(f"wrote {out} ({result.seconds:.2f} s)", file=sys.stderr)
    return 0
