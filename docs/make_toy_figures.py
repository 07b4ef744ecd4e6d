"""Figures of docs/toy-models.md: dataset samples, toy-model samples, attention maps (+ locality numbers as JSON).

    python docs/make_toy_figures.py            # writes docs/images/toy_*.png and prints the locality table

Everything is deterministic (fixed seeds) and runs on a CPU in a few minutes.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "images"
CELL = 128  # pixels per image tile
FONT = ImageFont.load_default(size=11)

SAMPLE_PROMPTS = [
    "a red circle",
    "a blue star in the top left",
    "a large yellow triangle",
    "a green square at the bottom",
    "a red circle left of a blue square",
    "a white diamond above a purple cross",
    "a yellow star, a green circle and a red square",
]
ATTENTION_PROMPT = "a red circle left of a blue square"


def _caption_tile(image: np.ndarray | Image.Image, text: str, lines: int = 3) -> Image.Image:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    tile = Image.new("RGB", (CELL, CELL + 14 * lines + 4), "white")
    tile.paste(img.convert("RGB").resize((CELL, CELL), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(textwrap.wrap(text, 22)[:lines]):
        draw.text((3, CELL + 2 + 14 * i), line, font=FONT, fill="black")
    return tile


def _grid(tiles: list[list[Image.Image]], row_labels: list[str] | None = None, pad: int = 4) -> Image.Image:
    label_w = 70 if row_labels else 0
    w = max(t.width for row in tiles for t in row)
    h = [max(t.height for t in row) for row in tiles]
    ncol = max(len(r) for r in tiles)
    canvas = Image.new("RGB", (label_w + ncol * (w + pad) + pad, sum(h) + pad * (len(tiles) + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for r, row in enumerate(tiles):
        if row_labels:
            draw.text((4, y + CELL // 2 - 6), row_labels[r], font=FONT, fill="black")
        for c, tile in enumerate(row):
            canvas.paste(tile, (label_w + pad + c * (w + pad), y))
        y += h[r] + pad
    return canvas


def _save(img: Image.Image, name: str) -> None:
    from attnpack.io import atomic_path

    OUT.mkdir(parents=True, exist_ok=True)
    with atomic_path(OUT / name) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    print(f"wrote docs/images/{name} ({(OUT / name).stat().st_size // 1024} KB)")


def dataset_figure() -> None:
    from attnpack.toy.data import render_scene, scene_at

    scenes = [scene_at(0, i) for i in range(12)]
    tiles = [_caption_tile(render_scene(s), s.caption) for s in scenes]
    _save(_grid([tiles[:6], tiles[6:]]), "toy_dataset.png")


def samples_figure(pipes: dict, evaluator) -> None:
    from attnpack.toy.adherence import generate_images
    from attnpack.toy.evaluator import score_prompt

    rows, labels = [], []
    for name, pipe in pipes.items():
        images = generate_images(pipe, SAMPLE_PROMPTS, [0] * len(SAMPLE_PROMPTS))
        dets = evaluator.detect(images)
        row = []
        for prompt, image, det in zip(SAMPLE_PROMPTS, images, dets):
            verdict = "ok" if score_prompt(prompt, det)["objects"] else "missed"
            row.append(_caption_tile(image, f"{prompt} [{verdict}]"))
        rows.append(row)
        labels.append(name)
    _save(_grid(rows, labels), "toy_samples.png")


def _colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (dark blue -> teal -> yellow)."""
    anchors = np.array([[20, 20, 60], [30, 110, 140], [80, 180, 110], [250, 230, 60]], np.float32)
    pos = np.clip(x, 0, 1) * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    t = (pos - lo)[..., None]
    return (anchors[lo] * (1 - t) + anchors[lo + 1] * t).astype(np.uint8)


def _attention_tile(probs: torch.Tensor, grid: tuple[int, int], query: int, label: str) -> Image.Image:
    row = probs[query].reshape(grid).numpy()
    img = Image.fromarray(_colormap(row / row.max())).resize((CELL, CELL), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    h, w = grid
    qy, qx = divmod(query, w)
    sy, sx = CELL / h, CELL / w
    draw.rectangle([qx * sx, qy * sy, (qx + 1) * sx - 1, (qy + 1) * sy - 1], outline=(255, 60, 60), width=2)
    return _caption_tile(img, label, lines=2)


def attention_figure(pipes: dict, evaluator) -> dict:
    """Attention of three query tokens (on each object, on the background) in several layers, mid-way through
    sampling; plus the locality of every layer over the whole run."""
    from attnpack.attn_processors.processor import apply_processors
    from attnpack.toy.adherence import generate_images
    from attnpack.toy.attention import AttentionRecorder, locality

    rows, labels, table = [], [], {}
    for name, pipe in pipes.items():
        steps = 20
        recorder = AttentionRecorder(rows=slice(1, 2) if name == "toy-sd" else None)  # SD: the conditional row
        kinds = ["self"] if name == "toy-sd" else ["joint", "single"]
        with apply_processors(pipe, recorder, kinds=kinds):
            image = generate_images(pipe, [ATTENTION_PROMPT], [0], num_inference_steps=steps)[0]
        layers = list(dict.fromkeys(layer for layer, _ in recorder.maps))
        table[name] = {}
        for layer in layers:
            grid = recorder.grids[layer]
            values = [locality(recorder.maps[(layer, s)], grid, radius=1) for s in range(steps)]
            table[name][layer] = {
                "grid": list(grid),
                "share_within_3x3": round(float(np.mean([v[0] for v in values])), 3),
                "uniform_share_within_3x3": round(values[0][1], 3),
            }
        shown = [layers[0], layers[len(layers) // 2], layers[-1]]
        row = [_caption_tile(image, f"{name}: {ATTENTION_PROMPT}", lines=3)]
        for layer in shown:
            grid = recorder.grids[layer]
            probs = recorder.maps[(layer, steps // 2)]
            qs = _queries(evaluator, image, grid)
            for label, q in qs.items():
                short = layer.replace("transformer_blocks", "tb").replace("single_", "s").replace(".attn", "")
                short = short.replace("down_blocks", "down").replace("up_blocks", "up").replace("attentions", "a")
                row.append(_attention_tile(probs, grid, q, f"{short} ({label})"))
        rows.append(row)
        labels.append(name)
    _save(_grid(rows, labels), "toy_attention.png")
    return table


def _queries(evaluator, image, grid: tuple[int, int]) -> dict[str, int]:
    """Token indices of the grid cells at the detected objects' centers and at a background corner."""
    h, w = grid
    dets = {d.name: d for d in evaluator.detect([image])[0]}
    out = {}
    for obj in ("red circle", "blue square"):
        if obj in dets:
            d = dets[obj]
            out[obj.split()[1]] = min(int(d.y * h / 64), h - 1) * w + min(int(d.x * w / 64), w - 1)
    out["background"] = (h - 1) * w + 0
    return out


def main() -> int:
    from attnpack.toy.loader import load_evaluator, load_toy_pipeline

    torch.manual_seed(0)
    evaluator = load_evaluator()
    pipes = {name: load_toy_pipeline(name) for name in ("toy-sd", "toy-flux")}
    dataset_figure()
    samples_figure(pipes, evaluator)
    table = attention_figure(pipes, evaluator)
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
