"""``attnpack astar``: one A-STAR image (SD 1.x/2.x, SDXL), optionally with its attention-map grid or GIF."""

from __future__ import annotations

import argparse
import sys
import time

from ._common import add_model_args, load_from_args, set_attention_backend


def _binarize(text: str):
    if text == "otsu":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be 'otsu' or a fraction of the max in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("must be 'otsu' or a fraction of the max in (0, 1]")
    return value


def _token_group(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be a token position or comma-separated positions, e.g. 2 or 5,6"
        ) from None


def register(sub) -> None:
    p = sub.add_parser(
        "astar",
        help="A-STAR: keep several concepts apart and present (SD 1.x/2.x, SDXL)",
        description="Generate an image with A-STAR test-time attention segregation and retention "
        "(Agarwal et al., ICCV 2023). The image embeds its parameters; --maps writes the concepts' attention maps.",
    )
    add_model_args(p, default="toy-sd")  # A-STAR runs on SD-family UNets
    p.add_argument("-p", "--prompt", required=True, help="text prompt")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--concepts", nargs="+", metavar="WORD", help="words of the prompt to keep apart, e.g. cat dog")
    which.add_argument(
        "--token-indices",
        nargs="+",
        type=_token_group,
        metavar="I[,J]",
        help="token positions per concept instead of words (0 = start token; 5,6 = one concept of two tokens)",
    )
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    g = p.add_argument_group("A-STAR")
    g.add_argument("--step-size", type=float, default=None, help="constant alpha_t (default: the schedule below)")
    g.add_argument(
        "--scale-factor", type=float, default=20.0, help="alpha_t = scale * sqrt(linspace(1, 0.5, T)) (default: 20)"
    )
    g.add_argument("--max-steps-to-alter", type=int, default=None, help="update only the first N steps (default: all)")
    g.add_argument("--segregation-weight", type=float, default=1.0)
    g.add_argument("--retention-weight", type=float, default=1.0)
    g.add_argument("--binarize", type=_binarize, default="otsu", help="retention masks: otsu or a fraction of the max")
    g.add_argument("--attn-res", type=int, nargs="+", default=None, metavar="N", help="map grid: N or H W")
    g.add_argument("--token-normalization", choices=["sum", "softmax", "none"], default="sum")
    g.add_argument("--no-smoothing", action="store_true", help="skip the 3x3 Gaussian smoothing of the maps")
    g.add_argument("--sigma", type=float, default=0.5, help="Gaussian smoothing sigma (default: 0.5)")
    g.add_argument("--layout-masks", nargs="+", default=None, metavar="IMAGE", help="one mask image per concept")
    p.add_argument("-o", "--out", default="astar.png", help="output image (.png)")
    p.add_argument("--maps", default=None, help="also write the attention maps: .png grid or .gif animation")
    p.set_defaults(func=run)


# options passed to the pipeline under the same name
_SAME_NAME = (
    "concepts",
    "token_indices",
    "negative_prompt",
    "step_size",
    "scale_factor",
    "max_steps_to_alter",
    "segregation_weight",
    "retention_weight",
    "binarize",
    "token_normalization",
    "sigma",
)


def _load_masks(paths):
    from PIL import Image

    masks = []
    for path in paths:
        with Image.open(path) as im:
            masks.append(im.convert("L"))
    return masks


def run(args: argparse.Namespace) -> int:
    import torch

    from ..io import check_output_path, save_image
    from ..pipelines.astar import astar_parameters, astar_pipeline_for
    from ..pipelines.generation import GenerationSettings
    from ..pipelines.loading import pipeline_defaults

    GenerationSettings(
        args.prompt, args.negative_prompt, args.seed, args.steps, args.guidance, args.height, args.width
    ).validate()
    out = check_output_path(args.out, (".png",))
    maps_path = check_output_path(args.maps, (".png", ".gif"), argument="--maps") if args.maps else None
    if args.attn_res is not None and len(args.attn_res) not in (1, 2):
        raise ValueError(f"`--attn-res` takes N or H W, got {args.attn_res}.")
    masks = _load_masks(args.layout_masks) if args.layout_masks else None
    pipe = load_from_args(args)
    astar = astar_pipeline_for(pipe, args.model)
    defaults = pipeline_defaults(pipe)
    height, width = args.height or defaults.get("height"), args.width or defaults.get("width")
    options = {name: getattr(args, name) for name in _SAME_NAME}
    res = args.attn_res
    options["attn_res"] = None if res is None else tuple(res) if len(res) == 2 else res[0]
    options["smooth_attentions"] = not args.no_smoothing
    backend = set_attention_backend(astar, args.attention_backend)
    start = time.perf_counter()
    try:
        result = astar(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            layout_masks=masks,
            return_attention_maps=maps_path is not None,
            **options,
        )
    finally:
        if backend is not None:
            backend.remove()
    seconds = time.perf_counter() - start
    parameters = astar_parameters(
        astar,
        result,
        options,
        model=args.model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        height=height,
        width=width,
        layout_masks=list(args.layout_masks or []),
        attention_backend=args.attention_backend or "default",
        seconds=round(seconds, 3),
    )
    save_image(result.images[0], out, parameters)
    print(f"wrote {out} ({seconds:.2f} s)", file=sys.stderr)
    if maps_path is not None:
        result.save_attention_maps(maps_path)
        print(f"wrote {maps_path}", file=sys.stderr)
    return 0
