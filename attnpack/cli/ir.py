"""``attnpack ir``: IR-Diffusion, several consistent subjects in one scene (arXiv 2411.19261).

``--subjects`` is a JSON file: a list of subjects, or an object ``{"subjects": [...], "scene": "..."}``. Each
subject has ``prompt`` (its reference image) and ``word`` (how the subject is named in its prompt and in the scene),
and optionally ``target_box`` / ``reference_box`` (pixel ``[x0, y0, x1, y1]``) or ``target_mask`` /
``reference_mask`` (paths to mask images, relative to the JSON file); give a kind for every subject or for none.

Writes the scene to ``--out`` and, next to it, ``<stem>_reference_<i>.png``, ``<stem>_layout.png`` (when a layout
pass ran) and ``<stem>_masks.png`` (references and scene with their masks and boxes), all atomically with the
generation parameters embedded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ._common import add_model_args, load_from_args


SUBJECT_KEYS = ("prompt", "word", "target_box", "reference_box", "target_mask", "reference_mask")


def register(sub) -> None:
    p = sub.add_parser(
        "ir",
        help="IR-Diffusion: several subjects, each consistent with its reference, in one scene (SDXL, SD 1.x models)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, default="tiny-sdxl")  # IR-Diffusion runs on SDXL (and SD 1.x) UNets
    p.add_argument("--subjects", required=True, help="subjects JSON file (see above)")
    p.add_argument("--scene", default=None, help="scene prompt (default: the JSON's 'scene')")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the references (default: 0)")
    p.add_argument("--layout-seed", type=int, default=None, help="noise seed of the scene (default: --seed)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; tiny models: 4)")
    p.add_argument("--guidance", type=float, default=7.0, help="guidance scale (official: 7.0)")
    p.add_argument("--height", type=int, default=None, help="official: 768 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="official: 1280 (default: the model's)")
    g = p.add_argument_group("IR-Diffusion")
    g.add_argument("--no-isolation", action="store_true", help="ablation: no Isolation Attention")
    g.add_argument("--no-reposition", action="store_true", help="ablation: extended attention without repositioning")
    g.add_argument("--no-mutual-cross-attention", action="store_true", help="ablation: no masked mutual cross-attn")
    g.add_argument("--dropout", type=float, default=0.5, help="target-query dropout of the reference attention")
    g.add_argument("--dropout-seed", type=int, default=None, help="seed of the dropout masks (default: --seed)")
    g.add_argument("--cross-attention-lambda", type=float, default=0.9, help="mutual cross-attention weight")
    g.add_argument(
        "--ir-layers",
        nargs="*",
        default=None,
        metavar="LAYER",
        help="self-attention layers with Reposition Attention (names or regexes; none given = isolation only; "
        "default: the official decoder layers)",
    )
    g.add_argument(
        "--mask-threshold", default="otsu", help="otsu, dreamstory (official variant) or a number in (0, 1)"
    )
    g.add_argument("--max-layout-attempts", type=int, default=20, help="layout seeds tried (official: 20)")
    p.add_argument("-o", "--out", default="ir.png", help="output PNG of the scene (default: ir.png)")
    p.add_argument("--no-extras", action="store_true", help="write only the scene (no references, layout, masks)")
    p.set_defaults(func=run)


def read_subjects(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """Parse a subjects JSON file into subject dicts and the optional scene prompt."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"`--subjects` file {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"`--subjects` file {str(path)!r} is not valid JSON: {exc}") from None
    scene = None
    if isinstance(data, dict):
        scene = data.get("scene")
        data = data.get("subjects")
    if not isinstance(data, list) or not data or not all(isinstance(s, dict) for s in data):
        raise ValueError(
            f'`--subjects` file {str(path)!r} must hold a non-empty list of subjects or {{"subjects": [...]}}, e.g. '
            '[{"prompt": "a photo of a corgi", "word": "corgi"}].'
        )
    for i, s in enumerate(data):
        unknown = sorted(set(s) - set(SUBJECT_KEYS))
        if unknown:
            raise ValueError(
                f"subject {i} in {str(path)!r} has unknown keys {unknown}; allowed: {list(SUBJECT_KEYS)}."
            )
        for key in ("target_mask", "reference_mask"):
            if key in s:
                s[key] = str((path.parent / s[key]).expanduser())
    if scene is not None and not isinstance(scene, str):
        raise ValueError(f"'scene' in {str(path)!r} must be a string, got {scene!r}.")
    return data, scene


def _per_subject(subjects: list[dict], key: str):
    """All subjects' ``key`` values, ``None`` if no subject has it; an error if only some have it."""
    have = [key in s for s in subjects]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"give '{key}' for every subject or for none (missing for subjects {have.count(False)}).")
    if key.endswith("_mask"):
        from PIL import Image

        out = []
        for s in subjects:
            with Image.open(s[key]) as im:
                out.append(im.convert("L").copy())
        return out
    return [tuple(s[key]) for s in subjects]


def run(args: argparse.Namespace) -> int:
    from .._utils import package_versions
    from ..io import check_output_path, save_image
    from ..pipelines.generation import check_text
    from ..pipelines.ir_diffusion import IRSubject, ir_pipeline_for
    from ..pipelines.ir_masks import overlay_masks
    from ..pipelines.loading import pipeline_defaults

    subjects, scene = read_subjects(args.subjects)
    items = [IRSubject.parse({k: s[k] for k in ("prompt", "word") if k in s}, i) for i, s in enumerate(subjects)]
    scene = args.scene if args.scene is not None else scene
    if not scene:
        raise ValueError("give the scene prompt with `--scene` (or a 'scene' entry in the subjects file).")
    check_text("scene", scene)
    if args.negative_prompt is not None:
        check_text("negative_prompt", args.negative_prompt)
    if args.attention_backend is not None:
        raise ValueError("`--attention-backend` is not supported by `attnpack ir`: its attention needs masks (SDPA).")
    threshold: str | float = args.mask_threshold
    if threshold not in ("otsu", "dreamstory"):
        try:
            threshold = float(threshold)
        except ValueError:
            raise ValueError(f"`--mask-threshold` must be otsu, dreamstory or a number, got {threshold!r}.") from None
    out = check_output_path(args.out, (".png",))
    masks = {key: _per_subject(subjects, key) for key in SUBJECT_KEYS[2:]}

    pipe = load_from_args(args)
    ir = ir_pipeline_for(pipe, args.model)
    defaults = pipeline_defaults(pipe)
    tiny = args.model.startswith("tiny-")
    options = dict(
        negative_prompt=args.negative_prompt,
        height=args.height or defaults.get("height"),
        width=args.width or defaults.get("width"),
        num_inference_steps=args.steps or (4 if tiny else 50),
        guidance_scale=args.guidance,
        seed=args.seed,
        layout_seed=args.layout_seed,
        isolation=not args.no_isolation,
        reposition=not args.no_reposition,
        mutual_cross_attention=not args.no_mutual_cross_attention,
        dropout=args.dropout,
        dropout_seed=args.dropout_seed,
        cross_attention_lambda=args.cross_attention_lambda,
        ir_layers=args.ir_layers,
        mask_threshold=threshold,
        max_layout_attempts=args.max_layout_attempts,
    )
    start = time.perf_counter()
    result = ir(
        items,
        scene,
        target_boxes=masks["target_box"],
        reference_boxes=masks["reference_box"],
        target_masks=masks["target_mask"],
        reference_masks=masks["reference_mask"],
        output_type="pil",
        **options,
    )
    seconds = time.perf_counter() - start
    first = next(iter(pipe.unet.parameters()))
    parameters = {
        "model": args.model,
        "pipeline": type(ir).__name__,
        "subjects": [{"prompt": s.get("prompt"), "word": s.get("word")} for s in subjects],
        "scene": scene,
        **{k: v for k, v in options.items() if k != "ir_layers"},
        "ir_layers": "default" if args.ir_layers is None else args.ir_layers,
        "layout_seed": result.layout_seed,
        "masks": {k: ("given" if v is not None else "automatic") for k, v in masks.items()},
        "dtype": str(first.dtype).replace("torch.", ""),
        "device": str(first.device),
        "seconds": round(seconds, 3),
        "versions": package_versions(),
    }
    save_image(result.images[0], out, {**parameters, "image": "scene"})
    written = [out]
    if not args.no_extras:
        stem = out.with_suffix("")
        for i, image in enumerate(result.reference_images):
            written.append(save_image(image, f"{stem}_reference_{i}.png", {**parameters, "image": f"reference {i}"}))
        if result.layout_images:
            written.append(
                save_image(result.layout_images[0], f"{stem}_layout.png", {**parameters, "image": "layout"})
            )
        panels = [overlay_masks(im, m[None]) for im, m in zip(result.reference_images, result.reference_masks)]
        panels.append(overlay_masks(result.images[0], result.target_masks))
        written.append(save_image(_row(panels), f"{stem}_masks.png", {**parameters, "image": "masks"}))
    print(f"wrote {', '.join(str(p) for p in written)} ({seconds:.2f} s)", file=sys.stderr)
    return 0


def _row(images):
    from PIL import Image

    width = sum(im.width for im in images) + 4 * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + 4
    return canvas
