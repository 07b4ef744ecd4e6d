"""``attnpack convert-paro-plan``: official PAROAtten plan files in, an attnpack PARO plan (.safetensors) out.

Only the denoiser's config and layer structure are read (a Hub id or folder downloads no weights). The official
files are read with ``torch.load(..., weights_only=True)`` only; see :mod:`attnpack.pipelines.paro_official`.
"""

from __future__ import annotations

import argparse


def _grid(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be F,H,W (three integers), got {text!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be F,H,W (three positive integers), got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser(
        "convert-paro-plan",
        help="convert official PAROAtten plans (permute_plan.pth, sparse_plan.pth) into an attnpack PARO plan",
        description="Convert the permute_plan.pth / sparse_plan.pth of the official PAROAtten release "
        "(github.com/jamescsq47/PAROAtten) into an attnpack PARO plan that runs as calibrated (joint block tiling, "
        "the official mask schedule). Files are read with torch.load(weights_only=True) only.",
    )
    p.add_argument("-m", "--model", required=True, help="the CogVideoX or Wan 2.1 model the plan is for (Hub id, "
                   "diffusers folder or built-in name); only its config is read")  # fmt: skip
    p.add_argument("--revision", default=None, help="Hub revision")
    p.add_argument("--permute", required=True, help="official permute_plan.pth")
    p.add_argument("--sparse", required=True, help="official sparse_plan.pth")
    p.add_argument("--grid", type=_grid, default=None, help="latent token grid F,H,W (default: the official "
                   "pipeline's, CogVideoX 13,30,45 / Wan 21,45,80)")  # fmt: skip
    p.add_argument("--text-len", type=int, default=None, help="text tokens before the video (default: CogVideoX 226, "
                   "Wan 0)")  # fmt: skip
    p.add_argument("--steps", type=int, default=30, help="denoising steps of the plan (default: 30)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block (default: 64, the official kernel's)")
    p.add_argument("--quant", default="none", help="default quantization of the plan: none, int8, fp8, int4")
    p.add_argument("--apply-empty", action="store_true", help="apply the 'empty' head flags (the official "
                   "pipelines do not)")  # fmt: skip
    p.add_argument(
        "--buckets",
        type=int,
        default=None,
        help="num_timestep_for_sparse_mask of the official TimestepCallback (default: all masks of the file)",
    )
    p.add_argument("-o", "--out", required=True, help="plan file to write (.safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_path
    from ..pipelines.loading import load_denoiser_structure
    from ..pipelines.paro_official import convert_official_paro_plan, read_official_paro_plans

    out = check_output_path(args.out, (".safetensors",))
    read_official_paro_plans(args.permute, args.sparse)  # damaged files fail before any model is read
    model = load_denoiser_structure(args.model, revision=args.revision)
    plan = convert_official_paro_plan(
        model,
        args.permute,
        args.sparse,
        grid=args.grid,
        text_len=args.text_len,
        num_inference_steps=args.steps,
        block_size=args.block_size,
        quant=args.quant,
        apply_empty=args.apply_empty,
        buckets=args.buckets,
    )
    plan.save(out)
    print(
        f"wrote {out}: {len(plan.layers)} layers x {plan.heads} heads, grid {plan.grid} + {plan.text_len} text "
        f"tokens, {plan.num_blocks} blocks per side, {plan.num_buckets} masks, density {plan.density:.3f}"
    )
    return 0
