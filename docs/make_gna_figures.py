"""Generate the pictures of docs/gna.md (neighborhoods, stride groups, dilation, causal windows, tiles).

    python docs/make_gna_figures.py            # writes docs/images/gna_*.png

Every picture is computed with attnpack's own pattern code (``attnpack.kernels.neighborhood.windows`` and the tile tables), so
the pictures show exactly what the kernels do.
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
from attnpack.kernels.neighborhood import normalize_neighborhood_args  # noqa: E402
from attnpack.kernels.neighborhood.windows import neighborhood_mask_mod, neighborhood_tile_masks  # noqa: E402


OUT = ROOT / "docs" / "images"
WHITE, GRID, TEXT = (255, 255, 255), (205, 205, 205), (30, 30, 30)
QUERY, NEIGH, GROUP, LEADER = (200, 40, 40), (120, 170, 230), (245, 170, 150), (150, 20, 20)
FULL, PARTIAL, QTILE = (110, 190, 120), (250, 190, 90), (70, 110, 200)
GROUP_COLORS = [(235, 235, 235), (222, 230, 245), (245, 232, 222), (228, 242, 228)]


def font(size: int = 13):
    return ImageFont.load_default(size=size)


def neighborhood(grid, window, stride=1, dilation=1, causal=False, query=(0, 0)) -> torch.Tensor:
    """bool grid: the keys ``query`` attends (from the kernels' mask_mod)."""
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    n = spec.num_tokens
    q = torch.tensor(query[0] * grid[1] + query[1])
    return neighborhood_mask_mod(spec)(None, None, q, torch.arange(n)).view(grid)


def panel(grid, cells: dict, title: str, cell: int = 16, marks=(), outlines=()) -> Image.Image:
    """A grid picture: ``cells`` maps (y, x) -> colour; ``marks``: cells with a dot; ``outlines``: (y0, x0, y1, x1,
    colour) rectangles in cell units."""
    h, w = grid
    pad, top = 8, 34
    width = max(w * cell + 2 * pad, int(font(13).getlength(title)) + 2 * pad)
    img = Image.new("RGB", (width, h * cell + top + pad), WHITE)
    d = ImageDraw.Draw(img)
    d.text((pad, 6), title, fill=TEXT, font=font(13))
    for y in range(h):
        for x in range(w):
            x0, y0 = pad + x * cell, top + y * cell
            d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=cells.get((y, x), WHITE), outline=GRID)
    for y, x in marks:
        cx, cy = pad + x * cell + cell // 2, top + y * cell + cell // 2
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=WHITE, outline=TEXT)
    for y0, x0, y1, x1, colour in outlines:
        d.rectangle([pad + x0 * cell, top + y0 * cell, pad + x1 * cell, top + y1 * cell], outline=colour, width=3)
    return img


def _wrap(text: str, width: int, f) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and f.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def row(panels, caption: str | None = None) -> Image.Image:
    gap = 14
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    f = font(12)
    lines = _wrap(caption, width - 16, f) if caption else []
    height = max(p.height for p in panels) + 17 * len(lines) + (6 if lines else 0)
    img = Image.new("RGB", (width, height), WHITE)
    x = 0
    for p in panels:
        img.paste(p, (x, 0))
        x += p.width + gap
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((8, max(p.height for p in panels) + 17 * i), line, fill=TEXT, font=f)
    return img


def colour_neighbourhood(mask: torch.Tensor, query, base=None) -> dict:
    cells = dict(base or {})
    for y, x in zip(*torch.nonzero(mask, as_tuple=True)):
        cells[(int(y), int(x))] = NEIGH
    cells[tuple(query)] = QUERY
    return cells


def save(img: Image.Image, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


# ------------------------------------------------------------------------------------------------- figures
def border_shift() -> Image.Image:
    grid, window = (11, 11), 5
    panels = []
    for q, label in (((5, 5), "centre"), ((1, 5), "near the top"), ((0, 0), "corner")):
        m = neighborhood(grid, window, query=q)
        panels.append(panel(grid, colour_neighbourhood(m, q), f"window 5, query {label}"))
    return row(panels, "At the borders the window shifts inward: every query still sees 5 x 5 keys (never padded).")


def stride_groups() -> Image.Image:
    grid, window, stride = (12, 12), 5, 3
    panels = []
    for gy, gx in ((1, 1), (0, 3)):
        group = [(gy * stride + i, gx * stride + j) for i in range(stride) for j in range(stride)]
        leader = (gy * stride + stride // 2, gx * stride + stride // 2)
        m = neighborhood(grid, window, stride, query=group[0])
        for q in group:  # every member of the group has the same window
            assert torch.equal(neighborhood(grid, window, stride, query=q), m)
        cells = colour_neighbourhood(m, leader)
        for q in group:
            cells[q] = GROUP if q != leader else LEADER
        outline = (gy * stride, gx * stride, gy * stride + stride, gx * stride + stride, TEXT)
        panels.append(panel(grid, cells, f"stride 3: group {gy},{gx}", marks=[leader], outlines=[outline]))
    return row(panels, "Queries in a stride group (boxed) share the window of their leader (dot): window 5, stride 3.")


def dilation() -> Image.Image:
    grid, window, dil = (12, 12), 3, 3
    base = {
        (y, x): GROUP_COLORS[((y % dil) * dil + x % dil) % len(GROUP_COLORS)] for y in range(12) for x in range(12)
    }
    panels = []
    for q in ((5, 4), (0, 11)):
        m = neighborhood(grid, window, dilation=dil, query=q)
        panels.append(panel(grid, colour_neighbourhood(m, q, base), f"window 3, dilation 3, query {q}"))
    return row(panels, "Dilation 3: neighborhood attention inside each interleaved sub-grid (shaded by residue).")


def causal() -> Image.Image:
    grid = (12, 12)
    panels = []
    for stride, q in ((1, (6, 6)), (1, (1, 6)), ((3, 1), (6, 6))):
        m = neighborhood(grid, (5, 5), stride, causal=(True, False), query=q)
        title = f"causal rows, stride {stride}, query {q}"
        panels.append(panel(grid, colour_neighbourhood(m, q), title))
    caption = "Causal along rows (time): the window ends at the query's row; with stride 3 it starts at leader - 4."
    return row(panels, caption)


def masks_1d() -> Image.Image:
    """N x N masks of the reference note's 1-D worked examples (rows: queries, columns: keys)."""
    configs = [
        (12, 5, 1, 1, False, "k=5"),
        (12, 5, 3, 1, False, "k=5, s=3"),
        (12, 4, 2, 1, False, "k=4, s=2"),
        (12, 5, 3, 1, True, "k=5, s=3, causal"),
        (12, 3, 1, 2, False, "k=3, d=2"),
        (10, 4, 4, 1, False, "n=10, k=s=4"),
    ]
    panels = []
    for n, k, s, d, c, label in configs:
        spec = normalize_neighborhood_args((n,), k, s, d, c)
        m = neighborhood_mask_mod(spec)(None, None, torch.arange(n)[:, None], torch.arange(n)[None, :])
        cells = {(i, j): NEIGH for i, j in zip(*torch.nonzero(m, as_tuple=True))}
        cells.update({(i, i): QUERY if m[i, i] else WHITE for i in range(n)})
        panels.append(panel((n, n), {(int(a), int(b)): v for (a, b), v in cells.items()}, label, cell=12))
    return row(panels, "1-D GNA masks (rows: queries, columns: keys; red: the query itself), n = 12 unless noted.")


def tiles() -> Image.Image:
    grid = (32, 32)
    panels = []
    for window, stride, tile, qtile_at in (((13, 21), (1, 1), (4, 8), (3, 1)), ((12, 24), (4, 8), (4, 8), (3, 1))):
        spec = normalize_neighborhood_args(grid, window, stride)
        visited, full = neighborhood_tile_masks(spec, tile, tile)
        order = grid_order(grid, tile)
        tiles_x = grid[1] // tile[1]
        q_id = qtile_at[0] * tiles_x + qtile_at[1]
        cells = {}
        for kt in range(order.num_tiles):
            colour = FULL if full[q_id, kt] else PARTIAL if visited[q_id, kt] else None
            if colour is None:
                continue
            ty, tx = divmod(kt, tiles_x)
            for y in range(ty * tile[0], (ty + 1) * tile[0]):
                for x in range(tx * tile[1], (tx + 1) * tile[1]):
                    cells[(y, x)] = colour
        # keys actually attended by the query tile's queries
        union = torch.zeros(grid, dtype=torch.bool)
        for y in range(qtile_at[0] * tile[0], (qtile_at[0] + 1) * tile[0]):
            for x in range(qtile_at[1] * tile[1], (qtile_at[1] + 1) * tile[1]):
                union |= neighborhood(grid, window, stride, query=(y, x))
        marks = [(int(y), int(x)) for y, x in zip(*torch.nonzero(union, as_tuple=True))]
        y0, x0 = qtile_at[0] * tile[0], qtile_at[1] * tile[1]
        outlines = [(y0, x0, y0 + tile[0], x0 + tile[1], QTILE)]
        n_full, n_vis = int(full[q_id].sum()), int(visited[q_id].sum())
        title = f"window {window}, stride {stride}: {n_vis} tiles, {n_full} full"
        panels.append(panel(grid, cells, title, cell=10, marks=marks, outlines=outlines))
    caption = (
        "Tiles of 4 x 8 tokens. Blue box: a query tile; green: key tiles it visits without any mask, orange: tiles "
        "needing the in-tile mask; dots: keys its queries attend. Right: window 12 x 24 with stride 4 x 8 is fully "
        "block-sparse: every visited tile is full, no mask is evaluated anywhere."
    )
    return row(panels, caption)


def main() -> None:
    save(border_shift(), "gna_border_shift.png")
    save(stride_groups(), "gna_stride_groups.png")
    save(dilation(), "gna_dilation.png")
    save(causal(), "gna_causal.png")
    save(masks_1d(), "gna_1d_masks.png")
    save(tiles(), "gna_tiles.png")


if __name__ == "__main__":
    main()
