"""A small detector that says which colored shapes an image shows and where; it turns prompt adherence into a number.

:class:`ToyEvaluator` is a fully convolutional network trained on procedural scenes (:mod:`attnpack.toy.data`, with
blur/noise/contrast augmentation). It outputs one heat map per ``(color, shape)`` pair on a 16x16 grid (stride 4
pixels), trained CenterNet-style (focal loss on Gaussian peaks at the object centers; Zhou et al., "Objects as
Points", https://arxiv.org/abs/1904.07850). A pair is *present* when its map's peak exceeds ``threshold``; its
position is the peak, refined by the scores of the 3x3 cells around it.

Prompt adherence (:func:`score_prompt`, :func:`evaluate_images`):

- ``objects``: every ``(color, shape)`` the prompt names is detected;
- ``relation`` (two-object prompts): additionally, the first object's center is on the named side of the second's
  (``left of``: smaller x; ``above``: smaller y);
- ``cell`` (single-object prompts with a position): additionally, the object's center is in the named 3x3 cell;
- ``exact``: the named objects are detected and nothing else is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import COLORS, IMAGE_SIZE, SHAPES, PromptSpec, Scene, cell_of, parse_prompt


__all__ = [
    "ToyEvaluator",
    "Detection",
    "heatmap_targets",
    "focal_loss",
    "score_prompt",
    "evaluate_images",
    "scene_accuracy",
    "images_to_tensor",
]


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
    )


@dataclasses.dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    x: float  # center in pixels of a 64x64 image
    y: float
    score: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


class ToyEvaluator(ModelMixin, ConfigMixin):
    """Heat-map detector of toy shapes: ``[B, 3, 64, 64]`` images in ``[-1, 1]`` -> ``[B, C*S, 16, 16]`` logits.

    Channel ``c * len(shapes) + s`` is the pair ``(colors[c], shapes[s])``.
    """

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 64),
        colors: tuple[str, ...] = tuple(COLORS),
        shapes: tuple[str, ...] = SHAPES,
        threshold: float = 0.3,
        image_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.stem = nn.Sequential(_block(3, c1), _block(c1, c2, stride=2), _block(c2, c2), _block(c2, c3, stride=2))
        self.context = nn.ModuleList([_block(c3, c3, dilation=d) for d in (1, 2, 4)])
        self.head = nn.Conv2d(c3, len(colors) * len(shapes), 1)
        nn.init.constant_(self.head.bias, -4.0)  # start from "nothing here" (CenterNet's prior)

    @property
    def stride(self) -> int:
        return 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.stem(images)
        for layer in self.context:
            h = h + layer(h)
        return self.head(h)

    @torch.no_grad()
    def detect(self, images, threshold: float | None = None) -> list[list[Detection]]:
        """Detections per image (``images``: PIL images, uint8 ``[B, H, W, 3]`` arrays or ``[B, 3, H, W]`` tensors
        in ``[-1, 1]``), sorted by score."""
        threshold = self.config.threshold if threshold is None else threshold
        x = images_to_tensor(images, self.config.image_size).to(self.device, self.dtype)
        probs = torch.sigmoid(self(x).float())  # [B, K, h, w]
        b, k, h, w = probs.shape
        flat = probs.reshape(b, k, h * w)
        best, arg = flat.max(-1)
        # refine each peak with the scores of its 3x3 neighbourhood
        padded = nn.functional.pad(probs, (1, 1, 1, 1))
        rows, cols = arg // w, arg % w
        out: list[list[Detection]] = []
        shapes, colors = self.config.shapes, self.config.colors
        scale = self.config.image_size / w
        for i in range(b):
            dets = []
            for j in torch.nonzero(best[i] > threshold).flatten().tolist():
                r, c = int(rows[i, j]), int(cols[i, j])
                patch = padded[i, j, r : r + 3, c : c + 3]
                weights = patch / patch.sum()
                dy = float((weights.sum(1) * torch.tensor([-1.0, 0.0, 1.0])).sum())
                dx = float((weights.sum(0) * torch.tensor([-1.0, 0.0, 1.0])).sum())
                dets.append(
                    Detection(
                        colors[j // len(shapes)],
                        shapes[j % len(shapes)],
                        (c + 0.5 + dx) * scale,
                        (r + 0.5 + dy) * scale,
                        float(best[i, j]),
                    )
                )
            out.append(sorted(dets, key=lambda d: -d.score))
        return out


def images_to_tensor(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images / uint8 ``[B, H, W, 3]`` / float ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, 3, size, size]``."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


# ------------------------------------------------------------------------------------------------- training targets
def heatmap_targets(
    scenes: Sequence[Scene], colors: Sequence[str], shapes: Sequence[str], grid: int = 16, sigma: float = 0.8
) -> torch.Tensor:
    """CenterNet targets ``[B, C*S, grid, grid]``: a Gaussian (peak exactly 1 at the center cell) per object."""
    out = np.zeros((len(scenes), len(colors) * len(shapes), grid, grid), np.float32)
    yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32)
    cell = IMAGE_SIZE / grid
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            k = list(colors).index(obj.color) * len(shapes) + list(shapes).index(obj.shape)
            cx, cy = min(int(obj.x / cell), grid - 1), min(int(obj.y / cell), grid - 1)
            g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
            out[i, k] = np.maximum(out[i, k], g)
    return torch.from_numpy(out)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, averaged over objects (cells where ``target == 1``)."""
    p = torch.sigmoid(logits.float()).clamp(1e-5, 1 - 1e-5)
    pos = target.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** alpha * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**alpha * (1 - target) ** beta * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------------------- scoring
def score_prompt(spec: PromptSpec | str, detections: Sequence[Detection]) -> dict[str, bool | None]:
    """Check one image's detections against a prompt (see the module docstring for each key).

    ``relation`` is ``None`` for prompts without a relation, ``cell`` for prompts without a position.
    """
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    found = {(d.color, d.shape): d for d in detections}
    objects_ok = all(pair in found for pair in spec.objects)
    relation = None
    if spec.relation is not None:
        i, rel, j = spec.relation
        relation = False
        if objects_ok:
            a, b = found[spec.objects[i]], found[spec.objects[j]]
            relation = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]
    cell = None
    if spec.cell is not None:
        cell = objects_ok and cell_of(found[spec.objects[0]].x, found[spec.objects[0]].y) == spec.cell
    exact = objects_ok and set(found) == set(spec.objects)
    return {"objects": objects_ok, "relation": relation, "cell": cell, "exact": exact}


def evaluate_images(evaluator: ToyEvaluator, images, prompts: Sequence[str], batch_size: int = 64) -> dict:
    """Score ``images`` against their ``prompts``: the fraction of images passing each check of
    :func:`score_prompt` (``relation`` / ``cell`` over the prompts that have one), plus ``n`` and per-image results."""
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image.")
    results = []
    for start in range(0, len(images), batch_size):
        dets = evaluator.detect(images[start : start + batch_size])
        results += [score_prompt(p, d) for p, d in zip(prompts[start : start + batch_size], dets, strict=True)]
    summary: dict = {"n": len(results)}
    for key in ("objects", "relation", "cell", "exact"):
        values = [r[key] for r in results if r[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
    summary["per_image"] = results
    return summary


def scene_accuracy(evaluator: ToyEvaluator, scenes: Sequence[Scene], images) -> dict[str, float]:
    """Accuracy of the evaluator on images with known content (procedural scenes or their reconstructions).

    ``exact``: the detected pairs are exactly the scene's; ``recall`` / ``precision`` over objects; ``cell``: a
    detected object's center falls in the right 3x3 cell; ``position_error``: mean distance in pixels.
    """
    dets = evaluator.detect(images)
    tp = fp = fn = exact = cell_ok = 0
    errors = []
    for scene, found in zip(scenes, dets, strict=True):
        truth = {(o.color, o.shape): o for o in scene.objects}
        got = {(d.color, d.shape): d for d in found}
        exact += set(truth) == set(got)
        for pair, obj in truth.items():
            if pair in got:
                tp += 1
                d = got[pair]
                cell_ok += cell_of(d.x, d.y) == cell_of(obj.x, obj.y)
                errors.append(float(np.hypot(d.x - obj.x, d.y - obj.y)))
            else:
                fn += 1
        fp += len(set(got) - set(truth))
    return {
        "n": len(scenes),
        "exact": exact / len(scenes),
        "recall": tp / max(tp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "cell": cell_ok / max(tp, 1),
        "position_error": float(np.mean(errors)) if errors else float("nan"),
    }
