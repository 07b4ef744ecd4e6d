"""Draw the pictures of docs/clear.md from attnpack's CLEAR code (so they show what the kernels compute).

python docs/make_clear_figures.py        # writes docs/images/clear_window.png, clear_mask.png, clear_tiles.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnpack.io import atomic_path  # noqa: E402
from attnpack.kernels.block_sparse import grid_order  # noqa: E402
from attnpack.kernels.clear import ClearSpec, circle_tile_masks, clear_mask_mod  # noqa: E402


IMAGES = ROOT / "docs" / "images"
BG, LINE, INK = (255, 255, 255), (210, 210, 210), (25, 25, 25)
QUERY, LOCAL, TEXT_C, POOLED = (205, 45, 45), (105, 160, 225), (150, 120, 200), (95, 175, 110)
FULL, PARTIAL, QTILE, EDGE = (95, 175, 110), (245, 185, 80), (40, 80, 190), (120, 120, 120)


def _font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _canvas(width: int, height: int, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill=INK, font=_font(15))
    return img, draw


def _cells(draw, origin, grid, cell, colour_of) -> None:
    ox, oy = origin
    for y in range(grid[0]):
        for x in range(grid[1]):
            box = [ox + x * cell, oy + y * cell, ox + (x + 1) * cell, oy + (y + 1) * cell]
            draw.rectangle(box, fill=colour_of(y, x), outline=LINE)


def _legend(draw, origin, items) -> None:
    x, y = origin
    for colour, label in items:
        if colour is not None:  # None: a continuation line
            draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline=EDGE)
        draw.text((x + 18, y), label, fill=INK, font=_font(13))
        y += 20


def _save(img: Image.Image, name: str) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    with atomic_path(IMAGES / name) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    print("wrote", IMAGES / name)


def window_figure() -> Image.Image:
    """One image query's circular window (strict <) and the pooled global tokens of d = 4."""
    grid, r, d, q = (20, 20), 5, 4, (9, 9)
    spec = ClearSpec(grid, 0, r, d)
    keys = torch.arange(spec.num_keys)
    seen = clear_mask_mod(spec)(0, 0, torch.tensor(q[0] * grid[1] + q[1]), keys)
    local = seen[: spec.num_image].view(grid)
    cell = 18
    img, draw = _canvas(880, 470, f"CLEAR window: radius r = {r} tokens (dy^2 + dx^2 < r^2), pooled tokens d = {d}")
    ox, oy = 20, 60
    draw.text((ox, oy - 22), "image tokens (16 x 16 px each)", fill=INK, font=_font(13))

    def colour(y, x):
        if (y, x) == q:
            return QUERY
        return LOCAL if local[y, x] else BG

    _cells(draw, (ox, oy), grid, cell, colour)
    cx, cy = ox + (q[1] + 0.5) * cell, oy + (q[0] + 0.5) * cell
    draw.ellipse([cx - r * cell, cy - r * cell, cx + r * cell, cy + r * cell], outline=QUERY, width=2)
    # keys at distance exactly r are outside (strict): (dy, dx) = (0, 5), (3, 4), ...
    for dy, dx in [(0, 5), (5, 0), (0, -5), (-5, 0), (3, 4), (4, 3), (-3, 4), (-4, -3), (3, -4), (-3, -4), (4, -3),
                   (-4, 3)]:  # fmt: skip
        x0, y0 = ox + (q[1] + dx) * cell, oy + (q[0] + dy) * cell
        draw.line([x0 + 4, y0 + 4, x0 + cell - 4, y0 + cell - 4], fill=INK, width=2)
        draw.line([x0 + 4, y0 + cell - 4, x0 + cell - 4, y0 + 4], fill=INK, width=2)
    # pooling cells
    for y in range(0, grid[0] + 1, d):
        draw.line([ox, oy + y * cell, ox + grid[1] * cell, oy + y * cell], fill=POOLED, width=2)
    for x in range(0, grid[1] + 1, d):
        draw.line([ox + x * cell, oy, ox + x * cell, oy + grid[0] * cell], fill=POOLED, width=2)
    # the pooled tokens: one per d x d cell, all seen by every image query
    px, py, pc = 430, 90, 28
    pooled = (grid[0] // d, grid[1] // d)
    draw.text((px, py - 30), f"{pooled[0] * pooled[1]} pooled tokens (keys and values after", fill=INK, font=_font(13))
    draw.text((px, py - 14), "RoPE, weighted sum over each d x d cell)", fill=INK, font=_font(13))
    _cells(draw, (px, py + 6), pooled, pc, lambda y, x: POOLED)
    _legend(
        draw,
        (px, py + 6 + pooled[0] * pc + 18),
        [
            (QUERY, "the query token (y, x)"),
            (LOCAL, f"image keys it attends: {int(local.sum())} (~ pi r^2)"),
            (None, "x  at distance exactly r: excluded (strict <)"),
            (POOLED, "pooled keys: every image query sees all of them;"),
            (None, "text queries see none (d > 1 only)"),
            (TEXT_C, "text tokens (not drawn): seen by every query;"),
            (None, "text queries attend all text + image keys"),
        ],
    )
    return img


def mask_figure() -> Image.Image:
    """The full boolean mask for 4 text tokens, a 6 x 6 image, r = 2, d = 2 (queries = rows, keys = columns)."""
    spec = ClearSpec((6, 6), 4, 2, 2)
    q = torch.arange(spec.num_queries)[:, None]
    k = torch.arange(spec.num_keys)[None, :]
    mask = clear_mask_mod(spec)(0, 0, q, k)
    t, end = spec.text_len, spec.num_queries
    cell = 8
    img, draw = _canvas(660, 420, "CLEAR mask: 4 text + 6x6 image tokens, r = 2, d = 2 (rows: queries, columns: keys)")
    ox, oy = 20, 50

    def colour(i, j):
        if not mask[i, j]:
            return (40, 40, 40)
        if i < t or j < t:
            return TEXT_C
        return POOLED if j >= end else LOCAL

    _cells(draw, (ox, oy), (spec.num_queries, spec.num_keys), cell, colour)
    for pos in (t, end):
        draw.line([ox + pos * cell, oy - 4, ox + pos * cell, oy + spec.num_queries * cell + 4], fill=QUERY, width=2)
    draw.line([ox - 4, oy + t * cell, ox + spec.num_keys * cell + 4, oy + t * cell], fill=QUERY, width=2)
    _legend(
        draw,
        (ox + spec.num_keys * cell + 24, oy),
        [
            (TEXT_C, "text rows / columns: all visible"),
            (LOCAL, "image -> image: circle, strict <"),
            (POOLED, "image -> pooled: all visible"),
            ((40, 40, 40), "masked (incl. text -> pooled)"),
        ],
    )
    return img


def _tile_panel(draw, origin, grid, tile, radius, query_tile: int, title: str) -> None:
    order = grid_order(grid, tile)
    visited, full = circle_tile_masks(order, order, grid, radius)
    tile_of = torch.empty(grid[0] * grid[1], dtype=torch.long)
    idx = order.index[0].long()
    real = idx >= 0
    tile_of[idx[real]] = torch.arange(order.num_positions)[real] // order.tile_size
    tile_of = tile_of.view(grid)
    v, f = visited[query_tile], full[query_tile]
    n_vis, n_part = int(v.sum()), int((v & ~f).sum())
    cell = 5
    ox, oy = origin
    draw.text((ox, oy - 38), title, fill=INK, font=_font(13))
    draw.text((ox, oy - 20), f"key tiles visited {n_vis} / {order.num_tiles}, partially masked {n_part}", fill=INK,
              font=_font(13))  # fmt: skip

    def colour(y, x):
        t = int(tile_of[y, x])
        if t == query_tile:
            return QTILE
        return FULL if f[t] else PARTIAL if v[t] else BG

    _cells(draw, (ox, oy), grid, cell, colour)
    for t in range(order.num_tiles):  # tile borders
        ys, xs = torch.nonzero(tile_of == t, as_tuple=True)
        if len(ys):
            box = [ox + int(xs.min()) * cell, oy + int(ys.min()) * cell, ox + (int(xs.max()) + 1) * cell,
                   oy + (int(ys.max()) + 1) * cell]  # fmt: skip
            draw.rectangle(box, outline=EDGE)


def tiles_figure() -> Image.Image:
    """Key tiles one query tile visits: 16-token row-major tiles vs 4 x 4 boxes (32 x 64 tokens, r = 8)."""
    grid, r = (32, 64), 8
    img, draw = _canvas(720, 300, f"Key tiles visited by one query tile (blue): 32 x 64 image tokens, r = {r}")
    centre = 16 * 64 + 32
    row_major, box = grid_order(grid, 16), grid_order(grid, (4, 4))
    q_row = int(row_major.inverse()[0, centre]) // 16
    q_box = int(box.inverse()[0, centre]) // 16
    _tile_panel(draw, (20, 90), grid, 16, r, q_row, "row-major tiles of 16 tokens (FlexAttention layout)")
    _tile_panel(draw, (370, 90), grid, (4, 4), r, q_box, "2-D tiles of 4 x 4 tokens (attnpack)")
    _legend(draw, (20, 270), [(FULL, "full: no mask evaluated")])
    _legend(draw, (260, 270), [(PARTIAL, "partial: in-tile circle mask")])
    _legend(draw, (520, 270), [(BG, "not visited")])
    return img


def main() -> None:
    _save(window_figure(), "clear_window.png")
    _save(mask_figure(), "clear_mask.png")
    _save(tiles_figure(), "clear_tiles.png")


if __name__ == "__main__":
    main()
