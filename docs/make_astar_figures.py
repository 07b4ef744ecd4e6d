"""Make the pictures of docs/a-star.md (run from the repository root: ``python docs/make_astar_figures.py``).

- ``docs/images/astar_losses.png``: what Eq. 2 and Eq. 3 measure, on synthetic 16x16 maps (our loss functions).
- ``docs/images/astar_maps_tiny.png``: per-concept attention maps per step from the tiny random SD 1.5 pipeline,
  without (loss weights 0) and with A-STAR. Random weights: the maps are noise-like, the picture shows the output
  format, not the method's effect.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from attnpack import AStarPipeline, retention_loss, segregation_loss
from attnpack.pipelines._astar_maps import _colorize, binarize_maps, render_attention_maps
from attnpack.toy.tiny import build_tiny_pipeline


OUT = Path(__file__).resolve().parent / "images"
CELL = 96
SETTINGS = dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64, attn_res=8, output_type="np")


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _blob(cy: float, cx: float, size: int = 16, radius: float = 3.0) -> torch.Tensor:
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    m = torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
    return m / m.max()


def _tile(values: torch.Tensor) -> Image.Image:
    return Image.fromarray(_colorize(values.numpy())).resize((CELL, CELL), Image.NEAREST)


def _row(maps: list[torch.Tensor], titles: list[str], caption: str) -> Image.Image:
    pad, head = 6, 30
    img = Image.new("RGB", (max(len(maps) * (CELL + pad) + pad, 600), CELL + head + 18), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 2), caption, fill="black")
    for i, (m, title) in enumerate(zip(maps, titles)):
        x = pad + i * (CELL + pad)
        img.paste(_tile(m), (x, head))
        draw.text((x, head + CELL + 3), title, fill="black")
    return img


def _stack(images: list[Image.Image]) -> Image.Image:
    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def losses_figure() -> Image.Image:
    bear, turtle = _blob(7, 6), _blob(8, 9)
    apart = _blob(8, 12)
    rows = []
    for other, name in ((turtle, "overlapping"), (apart, "segregated")):
        maps = torch.stack([bear, other])
        seg = segregation_loss(maps).item()
        rows.append(
            _row(
                [bear, other, torch.minimum(bear, other)],
                ["A_bear", "A_turtle", "min(A_bear, A_turtle)"],
                f"Eq. 2, {name}: L_seg = sum min / sum (A_m + A_n) = {seg:.3f}   (0 = disjoint, 0.5 = identical)",
            )
        )
    previous = _blob(8, 8)
    mask = binarize_maps(previous[None], "otsu")[0].float()
    for current, name in ((_blob(8, 8), "kept"), (_blob(9, 11) * 0.6, "decayed and drifted")):
        ret = retention_loss(current[None], mask[None]).item()
        rows.append(
            _row(
                [previous, mask, current, torch.minimum(current, mask)],
                ["A at step t", "B_t (Otsu)", "A at step t-1", "min(A, B)"],
                f"Eq. 3, {name}: L_ret = 1 - sum min(A, B) / sum (A + B) = {ret:.3f}   (0.5 = A equals B)",
            )
        )
    return _stack(rows)


def tiny_maps_figure() -> Image.Image:
    base = build_tiny_pipeline("tiny-sd15")
    pipe = AStarPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for weight, title in ((0.0, "loss weights 0 (= plain SD)"), (1.0, "A-STAR (weights 1, alpha 20 -> 14.1)")):
        options = dict(segregation_weight=weight, retention_weight=weight, return_attention_maps=True)
        out = pipe("a bear and a turtle", concepts=["bear", "turtle"], generator=_seed(), **options, **SETTINGS)
        maps = out.attention_maps[:, 0]
        grid = render_attention_maps(maps, out.concepts, cell=48, max_columns=10, contrast="minmax")
        head = Image.new("RGB", (grid.width, 16), "white")
        spread = (maps.amax(dim=(-2, -1)) - maps.amin(dim=(-2, -1))).mean().item()
        text = f"tiny random SD 1.5, 8x8 maps, {title}; min-max stretched (mean max-min {spread:.2f})"
        ImageDraw.Draw(head).text((2, 2), text, fill="black")
        rows.append(_stack([head, grid]))
    return _stack(rows)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, make in (("astar_losses.png", losses_figure), ("astar_maps_tiny.png", tiny_maps_figure)):
        path = OUT / name
        make().save(path, optimize=True)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
