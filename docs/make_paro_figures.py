"""Make the figures of docs/paro.md (run from the repository root: ``python docs/make_paro_figures.py``).

- ``docs/images/paro_reorder.png``: attention maps of planted-structure heads in diffusers' token order and after
  PARO's reordering, with their block masses and the blocks kept at density 0.2.
- ``docs/images/paro_orders.png``: the order heat map that ``attnpack calibrate-paro`` writes in its report, here for
  planted heads (8 "layers" x 6 heads with random planted orders) so that the recovered orders can be checked.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnpack.cli.calibrate_paro import render_order_map  # noqa: E402
from attnpack.kernels.paro import (  # noqa: E402
    OrderSearch,
    axis_order_names,
    block_statistics,
    forced_blocks,
    paro_token_order,
    planted_qkv,
    select_block_masks,
)
from attnpack.pipelines.paro_plan import ParoPlan, pack_mask_rows  # noqa: E402


OUT = ROOT / "docs" / "images"
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


def colorize(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB with a viridis-like ramp."""
    pos = np.clip(x, 0, 1) * (len(VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    return (VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac).astype(np.uint8)


def log_map(p: torch.Tensor, size: int, floor: float = 1e-5) -> Image.Image:
    """An attention map as an image: log10 scale from ``floor`` to its max, average-pooled to ``size`` pixels."""
    n = p.shape[-1]
    pool = max(1, n // size)
    pooled = torch.nn.functional.avg_pool2d(p[None, None], pool)[0, 0] if pool > 1 else p
    v = torch.log10(pooled.clamp(min=floor))
    v = (v - math.log10(floor)) / (v.max() - math.log10(floor))
    return Image.fromarray(colorize(v.numpy())).resize((size, size), Image.NEAREST)


def block_map(mass: torch.Tensor, keep: torch.Tensor, size: int) -> Image.Image:
    t = mass.shape[-1]
    v = torch.log10(mass.clamp(min=1e-6))
    v = (v - v.min()) / (v.max() - v.min())
    img = Image.fromarray(colorize(v.numpy())).resize((size, size), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    cell = size / t
    for i, j in keep.nonzero().tolist():  # outline kept blocks
        draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], outline=(255, 255, 255))
    return img


def reorder_figure(grid=(6, 12, 16), block=32, heads=(2, 4), size=256) -> Path:
    names = axis_order_names(3)
    q, k, _ = planted_qkv(grid, list(heads), head_dim=64, seed=0)
    search = OrderSearch(grid, len(heads), block)
    search.update(q, k)
    chosen = search.select(0.5).tolist()
    p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)[0]  # [H, N, N]
    pad, label_h = 8, 16
    cols = 2 * len(heads)
    canvas = Image.new("RGB", (cols * (size + pad) + pad, 2 * (size + label_h + pad) + pad + 18), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (pad, 4),
        f"planted heads on a (F, H, W) = {grid} grid, {block}-token blocks; bottom: block mass, kept at density 0.2",
        fill="black",
    )
    col = 0
    for h, planted in enumerate(heads):
        for label, o in (("diffusers order FHW", 0), (f"reordered {names[chosen[h]]}", chosen[h])):
            order = paro_token_order(grid, [o], block)
            idx = order.index[0][order.index[0] >= 0].long()
            p_perm = p[h][idx][:, idx]
            mass = block_statistics(q[:, h : h + 1], k[:, h : h + 1], [order], sum_only=True)[0].sum[0]
            keep = select_block_masks(mass[None], [0.2], forced_blocks(order.num_tiles))[0] == 0
            x = pad + col * (size + pad)
            y0 = 18
            draw.text((x, y0), f"head planted {names[planted]}: {label}", fill="black")
            canvas.paste(log_map(p_perm, size), (x, y0 + label_h))
            canvas.paste(block_map(mass, keep, size), (x, y0 + label_h + size + pad + label_h))
            col += 1
    path = OUT / "paro_reorder.png"
    canvas.save(path, optimize=True)
    return path


def orders_figure(grid=(5, 8, 12), block=16, layers=8, heads=6) -> Path:
    g = torch.Generator().manual_seed(0)
    planted = torch.randint(0, 6, (layers, heads), generator=g)
    chosen = torch.zeros_like(planted)
    for layer in range(layers):
        q, k, _ = planted_qkv(grid, planted[layer].tolist(), head_dim=32, seed=layer)
        search = OrderSearch(grid, heads, block)
        search.update(q, k)
        chosen[layer] = search.select(0.5)
    t = -(-math.prod(grid) // block)
    plan = ParoPlan(
        model_class="planted heads",
        config_hash="-",
        family="cogvideox",
        grid=grid,
        text_len=0,
        text_first=True,
        num_inference_steps=2,
        block_size=block,
        densities=(0.3,),
        density=0.3,
        timestep_buckets=1,
        layers=tuple(f"layer{i}" for i in range(layers)),
        heads=heads,
        orders=chosen,
        masks=pack_mask_rows(torch.zeros(2, layers, heads, t, t, dtype=torch.uint8), 1),
        mask_bits=1,
    )
    path = OUT / "paro_orders.png"
    render_order_map(plan, cell=18).save(path, optimize=True)
    print(f"orders recovered on {int((chosen == planted).sum())} of {planted.numel()} planted heads")
    return path


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for path in (reorder_figure(), orders_figure()):
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
