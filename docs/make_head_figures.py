"""Figures for docs/head-guidance.md, from the built-in tiny SD3 model (random weights: the images are noise).

    python docs/make_head_figures.py

Writes docs/images/head_grid.png (heads x softness), docs/images/head_grid_diff.png (the same, as the difference
from the unguided image) and docs/images/head_search_round.png (a search contact sheet).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import attnpack
from attnpack.toy.tiny import build_tiny_pipeline


OUT = Path(__file__).parent / "images"
HEADS = ["L0H0", "L0H3", "L1H1", "L1H2", "L1"]
SOFTNESS = [0.0, 0.25, 0.5, 0.75, 1.0]
KW = dict(height=64, width=64, max_sequence_length=32, guidance_scale=1.0, num_inference_steps=8)
PROMPT = "a photo of a red cat on the beach"
CELL = 80


def _image(pipe, heads=None, softness=1.0):
    generator = torch.Generator().manual_seed(0)
    if heads is None:
        return pipe(PROMPT, generator=generator, **KW).images[0]
    with attnpack.apply_head_perturbation(pipe, heads, scale=3.0, softness=softness):
        return pipe(PROMPT, generator=generator, **KW).images[0]


def _grid(cells: list[list[Image.Image]], rows: list[str], cols: list[str], title: str) -> Image.Image:
    left, top = 70, 38
    sheet = Image.new("RGB", (left + len(cols) * (CELL + 4), top + len(rows) * (CELL + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for c, label in enumerate(cols):
        draw.text((left + c * (CELL + 4) + 4, top - 14), label, fill="black")
    for r, label in enumerate(rows):
        draw.text((4, top + r * (CELL + 4) + CELL // 2 - 6), label, fill="black")
        for c, im in enumerate(cells[r]):
            sheet.paste(im.resize((CELL, CELL), Image.NEAREST), (left + c * (CELL + 4), top + r * (CELL + 4)))
    return sheet


def _diff(image: Image.Image, base: Image.Image, gain: float = 8.0) -> Image.Image:
    delta = np.abs(np.asarray(image, np.float32) - np.asarray(base, np.float32)) * gain
    return Image.fromarray(np.clip(delta, 0, 255).astype(np.uint8))


def _save(image: Image.Image, name: str) -> None:
    """PNG with a 128-colour palette: noise images compress badly, and docs images stay under 200 KB."""
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(OUT / name, optimize=True)


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline("tiny-sd3")
    base = _image(pipe)
    cells = [[_image(pipe, h, u) for u in SOFTNESS] for h in HEADS]
    cols = [f"u = {u}" for u in SOFTNESS]
    rows = [h if h != "L1" else "L1 (all)" for h in HEADS]
    title = "tiny SD3 (random weights), scale 3, identity, full scope: heads (rows) x softness (columns)"
    _save(_grid(cells, rows, cols, title), "head_grid.png")
    diffs = [[_diff(im, base) for im in row] for row in cells]
    _save(_grid(diffs, rows, cols, "the same, |image - unguided image| x 8"), "head_grid_diff.png")

    with tempfile.TemporaryDirectory() as tmp:
        attnpack.search_heads(
            pipe,
            [PROMPT, "a blue house in the city"],
            [0, 1],
            "-brightness",
            rounds=1,
            top_k=2,
            candidates="L0,L1",
            num_inference_steps=4,
            pipeline_kwargs={k: v for k, v in KW.items() if k != "num_inference_steps"},
            output_dir=tmp,
            progress=False,
        )
        sheet = Image.open(Path(tmp) / "round_00.png").convert("RGB")
        _save(sheet.resize((sheet.width * 3 // 4, sheet.height * 3 // 4)), "head_search_round.png")
    for name in ("head_grid.png", "head_grid_diff.png", "head_search_round.png"):
        print(name, (OUT / name).stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main()
