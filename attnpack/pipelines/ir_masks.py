"""Subject-mask utilities for IR-Diffusion (arXiv 2411.19261): thresholds, resizing, post-processing, boxes.

These reproduce the mask handling of the official code (``hehuiguo/DreamStory``; see
``docs/ir-diffusion.md``):

- per attention resolution: bilinear resize of a pixel mask to the token grid, min-max normalisation, Otsu
  binarisation (:func:`binarize` / :class:`SubjectMasks`);
- reference masks: the bottom sixth is zeroed (:func:`trim_bottom`);
- target masks: morphological closing clipped to the mask's bounding box (:func:`close_mask`), expansion of masks
  smaller than a minimum size to a box and removal of overlaps, smaller masks losing the overlapping pixels
  (:func:`postprocess_target_masks`, :func:`remove_overlaps`).

Masks are ``torch.bool`` tensors ``[H, W]`` (one subject) or ``[n, H, W]`` (``n`` subjects) unless stated otherwise.
Boxes are pixel coordinates ``(x0, y0, x1, y1)`` with ``x1`` / ``y1`` exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..attn_processors.ir_diffusion import mask_bbox
from ..attn_processors.processor import ObserverCore


__all__ = [
    "AttentionSubjectMaps",
    "Box",
    "SubjectMasks",
    "as_mask",
    "binarize",
    "box_mask",
    "close_mask",
    "mask_bbox",
    "otsu_threshold",
    "overlay_masks",
    "postprocess_target_masks",
    "remove_overlaps",
    "resize_mask",
    "scaled_pixels",
    "trim_bottom",
]

Box = tuple[int, int, int, int]

# official pixel sizes at 1280x768 (shorter side 768): minimum subject size and closing kernel
OFFICIAL_SHORT_SIDE = 768
OFFICIAL_MIN_MASK_SIZE = 256
OFFICIAL_CLOSE_KERNEL = 128


def scaled_pixels(official: int, height: int, width: int) -> int:
    """An official pixel size (given at 1280x768) scaled with the shorter image side: ``official * min(H, W) / 768``."""
    return max(1, round(official * min(height, width) / OFFICIAL_SHORT_SIDE))


# ------------------------------------------------------------------------------------------------- conversion
def as_mask(mask: Any, *, argument: str = "mask", size: tuple[int, int] | None = None) -> torch.Tensor:
    """A user mask (bool / 0-1 / 0-255 array or tensor, or a PIL image) as a ``bool [H, W]`` CPU tensor.

    Non-boolean values are thresholded at half their maximum. With ``size=(H, W)`` the mask is resized (nearest) to
    that size when it differs.
    """
    try:
        from PIL import Image

        if isinstance(mask, Image.Image):
            mask = np.asarray(mask.convert("L"))
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))  # a copy: PIL-backed arrays are read-only
    if not torch.is_tensor(mask):
        raise TypeError(f"`{argument}` must be a tensor, a numpy array or a PIL image, got {type(mask).__name__}.")
    mask = mask.detach().cpu()
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"`{argument}` must be a 2-D mask [H, W], got shape {tuple(mask.shape)}.")
    if mask.dtype != torch.bool:
        values = mask.float()
        peak = float(values.max()) if values.numel() else 0.0
        mask = values > (peak / 2) if peak > 0 else torch.zeros_like(values, dtype=torch.bool)
    if size is not None and tuple(mask.shape) != tuple(size):
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return mask


def box_mask(box: Sequence[int], height: int, width: int, *, argument: str = "box") -> torch.Tensor:
    """``bool [height, width]`` mask that is ``True`` inside ``box = (x0, y0, x1, y1)`` (pixels, end exclusive)."""
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box):
        raise ValueError(f"`{argument}` must be four integers (x0, y0, x1, y1) in pixels, got {box!r}.")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"`{argument}` {box!r} must satisfy 0 <= x0 < x1 <= width={width} and 0 <= y0 < y1 <= height={height}."
        )
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ------------------------------------------------------------------------------------------------- thresholds
def otsu_threshold(values: torch.Tensor, bins: int = 256, method: str = "otsu") -> float:
    """Otsu threshold of ``values`` in ``[0, 1]`` from a ``bins``-bin histogram.

    ``method="otsu"``: the textbook rule (maximise the between-class variance ``w0 w1 (mu0 - mu1)^2``); returns the
    upper edge of the last bin of the lower class, so ``values >= threshold`` is the upper class.
    ``method="dreamstory"``: the official code's variant (``MasaCtrlAttnProcessor.get_otsu_threshold``), which scores
    ``c (c - bins) (mu0 - mu)^2`` with the cumulative count ``c`` and returns ``argmax / (bins - 1)``; use it with
    ``values > threshold`` to reproduce the official masks.
    """
    x = values.detach().flatten().float()
    if method == "dreamstory":
        hist = torch.histc(x, bins=bins)  # over [min, max] of the data, as the official code
        cumsum = torch.cumsum(hist, 0)
        cummean = torch.cumsum(hist * torch.arange(bins, dtype=hist.dtype), 0) / cumsum
        score = cumsum * (cumsum - bins) * (cummean - cummean[-1]) ** 2
        return float(torch.argmax(score)) / (bins - 1)
    if method != "otsu":
        raise ValueError(f"`method` must be 'otsu' or 'dreamstory', got {method!r}.")
    hist = torch.histc(x.double(), bins=bins, min=0.0, max=1.0)
    centers = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = torch.cumsum(hist, 0)
    total = w0[-1]
    s0 = torch.cumsum(hist * centers, 0)
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    mu0 = s0 / w0.clamp_min(1)
    mu1 = (s0[-1] - s0) / w1.clamp_min(1)
    between = torch.where(valid, w0 * w1 * (mu0 - mu1) ** 2, torch.full_like(w0, -1.0))
    return (int(torch.argmax(between)) + 1) / bins


def binarize(soft: torch.Tensor, threshold: str | float = "otsu") -> torch.Tensor:
    """Binarise a soft mask ``[..., H, W]`` (any range) as the official code: min-max normalise, then threshold.

    ``threshold``: ``"otsu"`` (textbook Otsu, ``>=``), ``"dreamstory"`` (the official Otsu variant with its ``>``
    comparison and its clamp of the threshold into ``(1e-6, 1 - 1e-6)``) or a number in ``(0, 1)`` (``>``).
    A constant mask is ``True`` everywhere if positive (e.g. a full-image box) and ``False`` if zero; the official
    normalisation would turn a constant positive mask off.
    """
    if not (threshold in ("otsu", "dreamstory") or (_is_number(threshold) and 0 < threshold < 1)):
        raise ValueError(f"`threshold` must be 'otsu', 'dreamstory' or a number in (0, 1), got {threshold!r}.")
    x = soft.float()
    flat = x.reshape(-1, *x.shape[-2:])
    out = torch.zeros_like(flat, dtype=torch.bool)
    for i, raw in enumerate(flat):
        lo, hi = float(raw.min()), float(raw.max())
        if hi - lo <= 1e-12:
            out[i] = raw > 0
            continue
        m = (raw - lo) / (hi - lo + 1e-8)
        if threshold == "otsu":
            out[i] = m >= otsu_threshold(m)
        elif threshold == "dreamstory":
            out[i] = m > min(max(otsu_threshold(m, method="dreamstory"), 1e-6), 1 - 1e-6)
        else:
            out[i] = m > float(threshold)
    return out.reshape(x.shape)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, no antialias, as the official code) of ``[..., H, W]`` to ``size``;
    returns float."""
    x = mask.float()
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *size)


# ------------------------------------------------------------------------------------------------- post-processing
def trim_bottom(mask: torch.Tensor, denominator: int = 6) -> torch.Tensor:
    """Zero the bottom ``1/denominator`` of a ``[..., H, W]`` mask: rows from ``(H // d) * (d - 1)`` on, as the
    official code does for reference masks (``d = 6``). ``denominator=0`` returns the mask unchanged."""
    if not denominator:
        return mask
    out = mask.clone()
    start = (mask.shape[-2] // denominator) * (denominator - 1)
    out[..., start:, :] = False
    return out


def _window_max(x: torch.Tensor, kernel: int, pad_value: float) -> torch.Tensor:
    """Max of ``x [H, W]`` over the ``kernel x kernel`` window anchored at ``kernel // 2`` (OpenCV's anchor)."""
    a = kernel // 2
    y = F.pad(x[None, None], (a, kernel - 1 - a, a, kernel - 1 - a), value=pad_value)
    y = F.max_pool2d(y, (kernel, 1), stride=1)  # a box max is separable
    y = F.max_pool2d(y, (1, kernel), stride=1)
    return y[0, 0]


def close_mask(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Morphological closing (dilate, then erode) with a ``kernel x kernel`` square, clipped to the mask's bounding
    box: the official target-mask step (``cv2.morphologyEx(MORPH_CLOSE, ones((128, 128)))``, whose borders neither
    dilate nor erode). ``mask``: ``bool [H, W]``."""
    if kernel <= 1 or not bool(mask.any()):
        return mask.clone()
    x = mask.float()
    dilated = _window_max(x, kernel, 0.0)
    closed = -_window_max(-dilated, kernel, -1.0) > 0.5
    x0, y0, x1, y1 = mask_bbox(mask)
    clip = torch.zeros_like(mask)
    clip[y0:y1, x0:x1] = True
    return closed & clip


def remove_overlaps(masks: torch.Tensor) -> torch.Tensor:
    """Make ``masks [n, H, W]`` disjoint: in order of increasing area, each mask loses the pixels it shares with the
    others (so the smaller of two overlapping masks gives them up), as the official ``post_process_sam_mask``."""
    out = masks.clone()
    order = sorted(range(len(out)), key=lambda i: int(out[i].sum()))
    for i in order:
        others = torch.zeros_like(out[i])
        for j in range(len(out)):
            if j != i:
                others |= out[j]
        out[i] &= ~others
    return out


def postprocess_target_masks(masks: torch.Tensor, min_size: int | None, *, no_overlap: bool = True) -> torch.Tensor:
    """The official ``post_process_sam_mask`` on ``bool [n, H, W]`` target masks.

    In order of increasing area, a mask whose area is below ``min_size**2`` or whose bounding box is less than
    ``min_size`` high or wide is filled to a box centred on its bounding box, ``min_size`` (+1) pixels along each
    short side (clipped to the image), then loses the pixels it shares with the other masks; with ``no_overlap``
    every mask loses its overlap with the others. ``min_size=None`` skips the expansion.
    """
    out = masks.clone()
    n, height, width = out.shape
    order = sorted(range(n), key=lambda i: int(out[i].sum()))
    s = min_size
    for i in order:
        m = out[i]
        box = mask_bbox(m)
        if box is None:
            continue
        left, top, right, bottom = box[0], box[1], box[2] - 1, box[3] - 1  # inclusive, as the official code
        area = int(m.sum())
        if s and (area < s * s or bottom - top < s or right - left < s):
            if bottom - top < s or area < s * s:
                center = (top + bottom) // 2
                top, bottom = max(0, center - s // 2), min(height, center + s // 2)
            if right - left < s or area < s * s:
                center = (left + right) // 2
                left, right = max(0, center - s // 2), min(width, center + s // 2)
            m[top : bottom + 1, left : right + 1] = True
            for j in range(n):
                if j != i:
                    m &= ~out[j]
        if no_overlap:
            for j in range(n):
                if j != i:
                    m &= ~out[j]
        out[i] = m
    return out


# ------------------------------------------------------------------------------------------------- per-grid masks
class SubjectMasks:
    """Reference and target masks of ``n`` subjects, binarised per attention grid and cached.

    Args:
        reference: ``[n, H, W]`` reference-image masks (bool or soft), pixel resolution.
        target: ``[n, H, W]`` target-image masks, pixel resolution.
        threshold: see :func:`binarize` (official: Otsu per resolution).

    :meth:`at` returns, for a token grid ``(h, w)``, the masks ``bool [n, h * w]`` (row-major) obtained as in the
    official ``_gen_binary_mask``: bilinear resize to the grid, min-max normalisation, binarisation.
    """

    def __init__(self, reference: torch.Tensor, target: torch.Tensor, threshold: str | float = "otsu"):
        if reference.ndim != 3 or target.ndim != 3 or reference.shape[0] != target.shape[0]:
            raise ValueError(
                f"`reference` and `target` must be [n, H, W] with the same n, got {tuple(reference.shape)} and "
                f"{tuple(target.shape)}."
            )
        self.reference = reference.detach().cpu()
        self.target = target.detach().cpu()
        self.threshold = threshold
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_subjects(self) -> int:
        return self.reference.shape[0]

    def at(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reference, target)`` masks at ``grid``, each ``bool [n, h * w]`` on the CPU."""
        grid = tuple(int(g) for g in grid)
        if grid not in self._cache:
            ref = binarize(resize_mask(self.reference, grid), self.threshold).flatten(1)
            tgt = binarize(resize_mask(self.target, grid), self.threshold).flatten(1)
            self._cache[grid] = (ref, tgt)
        return self._cache[grid]

    def __repr__(self) -> str:
        h, w = self.target.shape[-2:]
        return f"SubjectMasks(n={self.num_subjects}, size={h}x{w}, threshold={self.threshold!r})"


# ------------------------------------------------------------------------------------------------- attention source
class AttentionSubjectMaps(ObserverCore):
    """Observer core that derives subject maps from the model's own attention (no extra weights).

    For the last batch row (the conditional image of a vanilla ``[uncond, cond]`` batch) and every transformer block,
    it forms the official attention-derived map ``(SA + SA^2 + ... + SA^p) CA[:, tokens] / p`` (``SA``: head-averaged
    self-attention of the block's ``attn1``, ``CA``: head-averaged cross-attention of its ``attn2`` to the subject's
    word tokens, averaged over them; ``p = 4``), without forming ``SA``: ``SA x`` is an attention call with ``x`` as
    the values. Maps are summed over blocks and over the steps whose progress lies in ``steps``, per token grid.
    The attention output itself is the processor's dense attention, unchanged.

    Args:
        token_groups: one list of prompt token positions per subject.
        steps: ``(start, end)`` fractions of the schedule to aggregate (a step counts if its middle lies inside).
        power: ``p`` (official 4).
    """

    def __init__(self, token_groups: Sequence[Sequence[int]], steps: tuple[float, float] = (0.5, 1.0), power: int = 4):
        if not token_groups or any(len(t) == 0 for t in token_groups):
            raise ValueError(
                f"`token_groups` must hold one non-empty list of token positions per subject, got {token_groups!r}."
            )
        self.token_groups = [list(t) for t in token_groups]
        self.steps = steps
        self.power = power
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # grid -> [c, h * w]
        self.counts: dict[tuple[int, int], int] = {}
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _active(self, run) -> bool:
        if run is None or run.step_index is None or not run.num_steps:
            return True
        middle = (run.step_index + 0.5) / run.num_steps  # a step counts where its middle falls
        return self.steps[0] <= middle < self.steps[1]

    def observe(self, q, k, v, call, out) -> None:
        if not self._active(call.run) or call.layout.grid is None:
            return
        block = call.layer.name.rsplit(".", 1)[0]
        scale = getattr(call.attn, "scale", q.shape[-1] ** -0.5)
        if call.layer.kind == "self":
            self._pending[block] = (q[-1:].float(), k[-1:].float(), scale)
            return
        pending = self._pending.pop(block, None)
        if call.layer.kind != "cross" or pending is None:
            return
        probs = torch.softmax(q[-1:].float() @ k[-1:].float().transpose(-1, -2) * scale, dim=-1).mean(1)[0]  # [N, T]
        x = torch.stack([probs[:, t].mean(-1) for t in self.token_groups], dim=-1)  # [N, c]
        sq, sk, sscale = pending
        heads = sq.shape[1]
        total = torch.zeros_like(x)
        for _ in range(self.power):
            values = x[None, None].expand(1, heads, *x.shape)
            x = F.scaled_dot_product_attention(sq, sk, values, scale=sscale).mean(1)[0]
            total += x
        grid = tuple(call.layout.grid)
        contribution = (total / self.power).T.cpu()
        self.sums[grid] = contribution if grid not in self.sums else self.sums[grid] + contribution
        self.counts[grid] = self.counts.get(grid, 0) + 1

    def soft_maps(self) -> torch.Tensor:
        """Layer- and step-averaged maps ``[c, h, w]`` at the finest recorded grid (coarser grids upsampled
        bilinearly, as the official code)."""
        if not self.sums:
            raise RuntimeError("no attention maps were recorded: was the core installed and the schedule covered?")
        finest = max(self.sums, key=lambda g: g[0] * g[1])
        acc = torch.zeros(len(self.token_groups), *finest)
        for grid, total in self.sums.items():
            acc += resize_mask(total.view(-1, *grid), finest)
        return acc / sum(self.counts.values())

    def masks(self, size: tuple[int, int], threshold: str | float = "otsu") -> torch.Tensor:
        """Binary subject masks ``bool [c, H, W]`` at pixel ``size``: per subject, normalised and binarised at the map's
        grid, then resized (nearest)."""
        binary = binarize(self.soft_maps(), threshold)
        return F.interpolate(binary[None].float(), size=tuple(size), mode="nearest")[0] > 0.5

    def __repr__(self) -> str:
        return f"AttentionSubjectMaps(subjects={len(self.token_groups)}, steps={self.steps})"


# ------------------------------------------------------------------------------------------------- pictures
SUBJECT_COLORS = ((230, 60, 60), (60, 120, 230), (60, 190, 90), (230, 170, 40), (170, 80, 200), (40, 190, 200))


def overlay_masks(image, masks, *, alpha: float = 0.45, boxes: bool = True):
    """A PIL image of ``image`` (PIL or ``[H, W, 3]`` float in [0, 1]) with ``masks [n, H, W]`` tinted in one colour
    per subject and, with ``boxes``, their bounding boxes outlined."""
    from PIL import Image, ImageDraw

    if not isinstance(image, Image.Image):
        image = Image.fromarray((np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8))
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    masks = torch.as_tensor(np.asarray(masks)).bool()
    for i, m in enumerate(masks):
        color = np.array(SUBJECT_COLORS[i % len(SUBJECT_COLORS)], dtype=np.float32)
        sel = m.numpy()
        base[sel] = (1 - alpha) * base[sel] + alpha * color
    out = Image.fromarray(base.round().astype(np.uint8))
    if boxes:
        draw = ImageDraw.Draw(out)
        for i, m in enumerate(masks):
            box = mask_bbox(m)
            if box is not None:
                x0, y0, x1, y1 = box
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=SUBJECT_COLORS[i % len(SUBJECT_COLORS)], width=1)
    return out
