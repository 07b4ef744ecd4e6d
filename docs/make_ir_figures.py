"""Make the pictures of docs/ir-diffusion.md: ``python docs/make_ir_figures.py`` (CPU, about a minute).

- ``ir_reposition.png``: Reposition Attention's relocation on a synthetic reference (pixels as tokens).
- ``ir_routing.png``: attention mass of three target queries, recomputed from the keys and mask of our SDPA call.
- ``ir_masks.png`` / ``ir_results.png``: the tiny SDXL (random weights: noise images) with the built-in masks, and the
  ablations.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from attnpack.attn_processors.ir_diffusion import mask_bbox, reposition_index, reposition_tokens  # noqa: E402
from attnpack.io import save_image  # noqa: E402
from attnpack.pipelines.ir_masks import SUBJECT_COLORS, SubjectMasks, overlay_masks  # noqa: E402


OUT = Path(__file__).resolve().parent / "images"
WHITE = (255, 255, 255)


def labelled(image: Image.Image, text: str, band: int = 14) -> Image.Image:
    canvas = Image.new("RGB", (image.width, image.height + band), WHITE)
    canvas.paste(image, (0, band))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
    return canvas


def row(images, gap: int = 6) -> Image.Image:
    canvas = Image.new(
        "RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)), WHITE
    )
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def column(images, gap: int = 6) -> Image.Image:
    canvas = Image.new(
        "RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)), WHITE
    )
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def to_image(array, scale: int = 1) -> Image.Image:
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def heat(values: np.ndarray) -> np.ndarray:
    """Exact zeros black; positive values from dark purple to yellow (square-root scaled)."""
    v = np.sqrt(values / values.max()) if values.max() > 0 else values
    lo, hi = np.array([0.25, 0.05, 0.45]), np.array([1.0, 0.9, 0.1])
    out = lo + v[..., None] * (hi - lo)
    out[values == 0] = 0
    return out


def outline(im: Image.Image, mask: torch.Tensor, color, scale: int):
    box = mask_bbox(mask)
    if box is not None:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(im).rectangle((x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1), outline=color, width=1)


def fig_reposition():
    h, w, scale = 60, 100, 3
    yy, xx = np.mgrid[:h, :w]
    ref = np.full((h, w, 3), 0.55, dtype=np.float32)
    head = (yy - 17) ** 2 + (xx - 30) ** 2 <= 8**2
    body = (yy >= 25) & (yy < 52) & (xx >= 21) & (xx < 40)
    hat = (yy >= 6) & (yy < 11) & (xx >= 23) & (xx < 38)
    ref[body] = (0.85, 0.2, 0.2)
    ref[head] = (0.95, 0.78, 0.6)
    ref[hat] = (0.2, 0.35, 0.85)
    ref_mask = torch.from_numpy(head | body | hat)
    tgt_mask = torch.from_numpy(((yy - 38) / 19.0) ** 2 + ((xx - 74) / 11.0) ** 2 <= 1)
    tokens = torch.from_numpy(ref.reshape(-1, 3))
    moved = reposition_tokens(tokens, ref_mask, tgt_mask).view(h, w, 3).numpy()
    index = reposition_index(ref_mask, tgt_mask)
    relocated = torch.zeros(h * w, dtype=torch.bool)
    relocated[index >= 0] = ref_mask.flatten()[index[index >= 0]]
    panels = []
    a = overlay_masks(to_image(ref), ref_mask[None], alpha=0.0).resize((w * scale, h * scale), Image.NEAREST)
    outline(a, ref_mask, SUBJECT_COLORS[0], scale)
    panels.append(labelled(a, "reference, bbox(M^R)"))
    b = to_image(np.where(tgt_mask.numpy()[..., None], 0.8, 0.3), scale)
    outline(b, tgt_mask, SUBJECT_COLORS[1], scale)
    panels.append(labelled(b, "target mask M^T, bbox(M^T)"))
    c = to_image(moved, scale)
    outline(c, tgt_mask, SUBJECT_COLORS[1], scale)
    panels.append(labelled(c, "relocated features (0 outside)"))
    d = to_image(relocated.view(h, w).float().numpy(), scale)
    outline(d, tgt_mask, SUBJECT_COLORS[1], scale)
    panels.append(labelled(d, "relocated mask: live keys"))
    return row(panels)


def fig_routing():
    from attnpack.attn_processors import AttnPackProcessor, DenseCore, LayerInfo, RunState, TokenLayout
    from attnpack.attn_processors.ir_diffusion import STATE_KEY, IRAttnState, IsolationRepositionCore
    from attnpack.attn_processors.processor import AttentionCall

    grid, heads, d, scale = (12, 16), 2, 16, 12
    n_tok = grid[0] * grid[1]

    def rect(y0, y1, x0, x1):
        m = torch.zeros(grid, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        return m.flatten()

    target = torch.stack([rect(2, 11, 1, 7), rect(3, 10, 9, 15)])
    reference = torch.stack([rect(1, 9, 5, 11), rect(4, 12, 3, 13)])

    class Fixed:
        num_subjects = 2

        def at(self, g):
            return reference, target

    info = {}
    state = IRAttnState(masks=Fixed(), dropout_seed=1, observer=lambda *args: info.update(args[-1]))
    layer = LayerInfo("up_blocks.0.attentions.0.transformer_blocks.2.attn1", 0, "unet", "self", 0, heads, d)
    run = RunState(
        family="unet", grid=grid, step_index=0, num_steps=50, batch_size=3, roles=("reference",) * 2 + ("target",)
    )
    run.extras = {STATE_KEY: state}
    call = AttentionCall(
        None, layer, TokenLayout.self_attention(n_tok, grid), None, run, AttnPackProcessor(DenseCore(), layer)
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, heads, n_tok, d, generator=g) * 0.5 for _ in range(3))
    IsolationRepositionCore(extended=True)(q, k, v, call)
    probs = (q[2:] @ info["keys"].transpose(-1, -2) * d**-0.5).masked_fill(~info["mask"][0, 0], float("-inf"))
    probs = probs.softmax(-1).mean(1)[0]  # [N, K], head-averaged
    keep = state.keep_mask(grid, 0, torch.device("cpu"))
    queries = {
        "query in subject 1": int(torch.nonzero(target[0] & keep[0])[len(torch.nonzero(target[0] & keep[0])) // 2]),
        "query in subject 2": int(torch.nonzero(target[1] & keep[1])[3]),
        "background query": int(torch.nonzero(~target.any(0))[5]),
    }
    rows = []
    for name, p in queries.items():
        panels = []
        for block, title in ((-1, "target keys"), (0, "reference 1 keys"), (1, "reference 2 keys")):
            sel = info["key_subject"] == block
            m = torch.zeros(n_tok)
            m[info["key_position"][sel]] = probs[p, sel]
            im = to_image(heat(m.view(grid).numpy()), scale)
            for i in range(2):
                outline(im, target[i].view(grid), SUBJECT_COLORS[i], scale)
            y, x = divmod(p, grid[1])
            ImageDraw.Draw(im).ellipse((x * scale + 3, y * scale + 3, x * scale + 8, y * scale + 8), fill=WHITE)
            panels.append(labelled(im, f"{name}: {title}" if block == -1 else title))
        rows.append(row(panels))
    return column(rows)


def fig_pipeline():
    from attnpack.pipelines.ir_diffusion import IRDiffusionPipeline
    from attnpack.toy.tiny import build_tiny_pipeline

    pipe = IRDiffusionPipeline.from_pipe(build_tiny_pipeline("tiny-sdxl"))
    subjects = [{"prompt": "a photo of a red cat", "word": "cat"}, {"prompt": "a photo of a blue dog", "word": "dog"}]
    scene = "a cat and a dog on a beach"
    common = dict(height=256, width=256, num_inference_steps=4, seed=0, output_type="np")
    out = pipe(subjects, scene, **common)
    fixed = dict(
        reference_masks=list(out.reference_masks), target_masks=list(out.target_masks), layout_seed=out.layout_seed
    )
    ablations = {
        "- isolation": pipe(subjects, scene, isolation=False, **fixed, **common).images[0],
        "- reposition": pipe(subjects, scene, reposition=False, **fixed, **common).images[0],
        "- mutual cross-attn": pipe(subjects, scene, mutual_cross_attention=False, **fixed, **common).images[0],
    }
    thumb = 128
    small = lambda a: to_image(a).resize((thumb, thumb), Image.BILINEAR)  # noqa: E731
    grid_masks = SubjectMasks(torch.from_numpy(out.reference_masks), torch.from_numpy(out.target_masks)).at((16, 16))
    token_view = np.zeros((16, 16, 3), dtype=np.float32)
    for i, m in enumerate(grid_masks[1]):
        token_view[m.view(16, 16).numpy()] = np.array(SUBJECT_COLORS[i]) / 255
    masks = row(
        [
            labelled(
                overlay_masks(out.reference_images[i], out.reference_masks[i][None], alpha=0.7).resize((thumb, thumb)),
                f"reference {i + 1} + mask",
            )
            for i in range(2)
        ]
        + [
            labelled(
                overlay_masks(out.layout_images[0], out.target_masks, alpha=0.7).resize((thumb, thumb)),
                "layout + target masks",
            ),
            labelled(to_image(token_view, thumb // 16), "target masks, 16x16 grid"),
        ]
    )
    results = row(
        [labelled(small(out.reference_images[i]), f"reference {i + 1}") for i in range(2)]
        + [labelled(small(out.layout_images[0]), "vanilla layout"), labelled(small(out.images[0]), "IR-Diffusion")]
        + [labelled(small(im), name) for name, im in ablations.items()]
    )
    return masks, results


def save(image: Image.Image, name: str):
    path = OUT / name
    image = image.convert("P", palette=Image.ADAPTIVE, colors=128).convert("RGB") if image.width > 600 else image
    save_image(image, path, {"generator": "docs/make_ir_figures.py"})
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main():
    OUT.mkdir(exist_ok=True)
    torch.manual_seed(0)
    save(fig_reposition(), "ir_reposition.png")
    save(fig_routing(), "ir_routing.png")
    masks, results = fig_pipeline()
    save(masks, "ir_masks.png")
    save(results, "ir_results.png")


if __name__ == "__main__":
    main()
