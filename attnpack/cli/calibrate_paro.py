"""``attnpack calibrate-paro``: calibrate a PARO plan (token orders + block masks) and write a report.

The report folder holds ``paro_orders.png`` (the chosen axis order of every layer and head as a heat map),
``report.json`` and ``report.md`` (achieved densities, order counts, and the fidelity of PARO generations against
dense ones for the first prompt). Progress is checkpointed next to the plan (``<out>.partial.safetensors``): rerun
the same command to resume after an interruption.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import add_model_args, json_object, load_from_args


# one colour per order index (colour-blind friendly Okabe-Ito palette)
ORDER_COLORS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0)]


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate-paro",
        help="calibrate PARO token orders and block-sparse masks for a model",
        description="Calibrate a PARO plan (per-head token orders, static block-sparse masks) on CogVideoX, Wan or "
        "FLUX with dense generations of a few prompts, save it as .safetensors and write a report.",
    )
    add_model_args(p, default="tiny-flux")
    g = p.add_argument_group("calibration")
    g.add_argument("-p", "--prompt", action="append", default=[], help="calibration prompt (repeatable; paper: 1-2)")
    g.add_argument("--prompts-file", default=None, help="text file with one prompt per line")
    g.add_argument("--steps", type=int, default=30, help="denoising steps the plan is made for (default: 30)")
    g.add_argument(
        "--density",
        action="append",
        type=float,
        default=[],
        help="fraction of blocks kept; repeat to store several nested masks, the first is the default (default: 0.3)",
    )
    g.add_argument("--block-size", type=int, default=64, help="block (kernel tile) size (default: 64)")
    g.add_argument(
        "--timestep-buckets",
        type=int,
        default=None,
        help="distinct masks over the first half of the steps, or all masks with --schedule uniform (default: one "
        "per step)",
    )
    g.add_argument("--alpha", type=float, default=0.5, help="weight of sparsity vs. incoherence (default: 0.5)")
    g.add_argument("--quant", default="int8", help="default quantization of the plan: int8, fp8, int4, none")
    g.add_argument("--mask-rule", choices=["threshold", "row"], default="threshold")
    g.add_argument(
        "--tiling",
        choices=["padded", "joint"],
        default="padded",
        help="padded: text padded to whole blocks (default); joint: blocks over the raw [text, video] sequence, as "
        "the official PAROAtten code",
    )
    g.add_argument(
        "--schedule",
        choices=["half", "uniform"],
        default="half",
        help="half: distinct masks over the first half of the steps, one after (default, the paper's); uniform: "
        "--timestep-buckets masks over all steps (the official code's)",
    )
    g.add_argument("--no-reorder", action="store_true", help="keep diffusers' token order (ablation)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--frames", type=int, default=None, help="number of frames (video models)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--pipeline-kwargs", type=json_object, default={}, help="extra pipeline arguments (JSON object)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--out", required=True, help="plan file to write (.safetensors)")
    o.add_argument("--report", default=None, help="report folder (default: <out without suffix>_report)")
    o.add_argument("--no-fidelity", action="store_true", help="skip the dense-vs-PARO fidelity generations")
    p.set_defaults(func=run)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("give at least one calibration prompt with `--prompt` or `--prompts-file`.")
    return prompts


def render_order_map(plan, cell: int = 14):
    """The chosen order of every (layer, head) of ``plan`` as a heat map with a legend (a PIL image)."""
    from PIL import Image, ImageDraw

    from ..kernels.paro import axis_order_names

    names = axis_order_names(len(plan.grid))
    orders = plan.orders.long()
    n_layers, heads = orders.shape
    left, top, legend_h = 64, 24, 24
    width = max(left + heads * cell + 8, left + len(names) * 64)
    height = top + n_layers * cell + legend_h + 8
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), f"PARO orders: {plan.model_class}, grid {tuple(plan.grid)}", fill="black")
    step = max(1, n_layers // 12)
    for layer in range(n_layers):
        y = top + layer * cell
        if layer % step == 0:
            draw.text((4, y), f"L{layer}", fill="black")
        for head in range(heads):
            x = left + head * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=ORDER_COLORS[int(orders[layer, head]) % 6])
    y = top + n_layers * cell + 6
    for i, name in enumerate(names):
        x = left + i * 64
        draw.rectangle([x, y, x + 12, y + 12], fill=ORDER_COLORS[i % 6])
        draw.text((x + 16, y), name, fill="black")
    return img


def write_report(plan, folder: Path, fidelity_rows: list[dict] | None) -> Path:
    """Write ``paro_orders.png``, ``report.json`` and ``report.md`` into ``folder`` (atomically)."""
    from ..io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "paro_orders.png") as tmp:
        render_order_map(plan).save(tmp, format="PNG")
    summary = plan.summary()
    summary["fidelity"] = fidelity_rows or []
    summary["info"] = plan.info
    with atomic_path(folder / "report.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    lines = [
        f"# PARO calibration report: {plan.model_class}",
        "",
        f"- grid {tuple(plan.grid)}, {plan.text_len} text tokens, block size {plan.block_size}, "
        f"{plan.num_blocks} blocks per side",
        f"- {len(plan.layers)} layers x {plan.heads} heads, {plan.num_inference_steps} steps, "
        f"{plan.num_buckets} mask buckets, alpha {plan.alpha}, mask rule {plan.mask_rule}",
        "- orders: " + ", ".join(f"{k} {v}" for k, v in summary["order_counts"].items()),
        "",
        "| target density | achieved density |",
        "|---|---|",
        *[f"| {d} | {a:.3f} |" for d, a in summary["densities"].items()],
        "",
        "![orders](paro_orders.png)",
    ]
    if fidelity_rows:
        lines += [
            "",
            f"Fidelity of the final latents against dense attention (prompt {plan.info.get('prompts', [''])[0]!r}):",
            "",
            "| density | quant | achieved density | cosine | rel. L2 | PSNR (dB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in fidelity_rows:
            lines.append(
                f"| {r['density']:g} | {r['quant'] or 'none'} | {r['achieved_density']:.3f} | {r['cosine']:.5f} | "
                f"{r['rel_l2']:.4f} | {r['psnr']:.2f} |"
            )
    with atomic_path(folder / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def fidelity_settings(plan) -> list[tuple[float, str | None]]:
    """Sparse-only at every stored density, quantized-only, and combined at the default density."""
    settings: list[tuple[float, str | None]] = [(d, None) for d in plan.densities]
    if plan.quant:
        settings += [(1.0, plan.quant), (plan.density, plan.quant)]
    return settings


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_path
    from ..pipelines.paro_calibrate import calibrate_paro, measure_paro_fidelity

    prompts = _prompts(args)
    out = check_output_path(args.out, (".safetensors",))
    report = Path(args.report) if args.report else out.with_name(out.stem + "_report")
    checkpoint = out.with_name(out.name + ".partial.safetensors")
    kwargs = dict(args.pipeline_kwargs)
    for name, value in (
        ("height", args.height),
        ("width", args.width),
        ("num_frames", args.frames),
        ("guidance_scale", args.guidance),
    ):
        if value is not None:
            kwargs[name] = value
    pipe = load_from_args(args)
    if checkpoint.exists():
        print(f"resuming from {checkpoint}", file=sys.stderr)
    plan = calibrate_paro(
        pipe,
        prompts,
        args.steps,
        density=args.density or 0.3,
        block_size=args.block_size,
        timestep_buckets=args.timestep_buckets,
        alpha=args.alpha,
        quant=args.quant,
        reorder=not args.no_reorder,
        mask_rule=args.mask_rule,
        tiling=args.tiling,
        schedule=args.schedule,
        seed=args.seed,
        checkpoint=checkpoint,
        **kwargs,
    )
    plan.save(out)
    checkpoint.unlink(missing_ok=True)
    rows = None
    if not args.no_fidelity:
        rows = measure_paro_fidelity(pipe, plan, prompts[0], fidelity_settings(plan), seed=args.seed)
    write_report(plan, report, rows)
    summary = plan.summary()
    dens = ", ".join(f"{d} -> {a:.3f}" for d, a in summary["densities"].items())
    print(f"wrote {out} ({len(plan.layers)} layers x {plan.heads} heads; density {dens}); report in {report}")
    return 0
