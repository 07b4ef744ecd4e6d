"""Procedural toy scenes: 64x64 images of 1-3 colored shapes with captions, deterministic from a seed.

A scene is drawn from ``numpy.random.default_rng([seed, index])``, so item ``index`` of the dataset with seed ``seed``
is the same on every machine and in every process, the dataset has any size on demand, and nothing is stored on disk.

Captions follow a small grammar whose every word is one token of the offline tokenizers
(:func:`attnpack.toy.tiny.build_clip_tokenizer` / ``build_t5_tokenizer``):

- one object: ``"a [small|large] red circle"`` optionally followed by a position, ``"... in the top left"``,
  ``"... on the left"``, ``"... at the top"``, ``"... in the center"`` (a 3x3 grid of cells);
- two objects: ``"a red circle left of a blue square"`` (``left of``, ``right of``, ``above``, ``below``: where the
  first object is relative to the second);
- three objects: ``"a red circle, a blue square and a green star"``.

:func:`parse_prompt` reads captions of this grammar back into a :class:`PromptSpec`, which the evaluator checks
images against.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "CELLS",
    "IMAGE_SIZE",
    "ToyObject",
    "Scene",
    "PromptSpec",
    "sample_scene",
    "scene_at",
    "render_scene",
    "parse_prompt",
    "cell_of",
    "ToyScenes",
    "prompt_set",
]

IMAGE_SIZE = 64

# RGB of each named color (jittered by a few levels per object)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (50, 175, 65),
    "blue": (45, 95, 225),
    "yellow": (230, 205, 50),
    "purple": (155, 70, 205),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# object radius range in pixels (center to farthest point) for each size word; a dataset can use other ranges
# (``sizes=``): the VAE was trained on smaller objects, the evaluator on the union of both
SIZES: dict[str, tuple[float, float]] = {"small": (8.0, 10.0), "large": (12.0, 14.5)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "noise", "gradient")

# 3x3 cells (row, col) -> the phrase a caption uses for an object in it
CELLS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclasses.dataclass(frozen=True)
class ToyObject:
    """One shape: ``x``, ``y`` are its center in pixels of a 64x64 image, ``radius`` its size."""

    color: str
    shape: str
    size: str
    x: float
    y: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects (in caption order), background and caption of one image."""

    objects: tuple[ToyObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    texture_seed: int
    caption: str


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: ``objects`` as ``(color, shape)`` pairs, and optionally where.

    ``relation`` is ``(i, relation, j)``: object ``i`` is ``relation`` (e.g. ``"left of"``) object ``j``.
    ``cell`` is the ``(row, col)`` of the 3x3 grid a single object is asked to be in.
    """

    objects: tuple[tuple[str, str], ...]
    relation: tuple[int, str, int] | None = None
    cell: tuple[int, int] | None = None


def cell_of(x: float, y: float, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """The ``(row, col)`` of the 3x3 grid that pixel position ``(x, y)`` falls in."""
    return min(int(y * 3 / size), 2), min(int(x * 3 / size), 2)


def _relation(a: ToyObject, b: ToyObject) -> str | None:
    """Where ``a`` is relative to ``b`` when one axis clearly dominates, else ``None``."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _describe(obj: ToyObject, with_size: bool) -> str:
    return f"a {obj.size} {obj.name}" if with_size else f"a {obj.name}"


def _check_sizes(sizes: dict | None) -> dict[str, tuple[float, float]]:
    if sizes is None:
        return SIZES
    if set(sizes) != set(SIZES) or not all(0 < float(lo) <= float(hi) <= 20 for lo, hi in sizes.values()):
        raise ValueError(
            f"`sizes` must map 'small' and 'large' to (min, max) radii in pixels within (0, 20], got {sizes!r}."
        )
    return {k: (float(lo), float(hi)) for k, (lo, hi) in sizes.items()}


def sample_scene(
    rng: np.random.Generator, num_objects: int | None = None, sizes: dict[str, tuple[float, float]] | None = None
) -> Scene:
    """Draw a random scene (1-3 objects with distinct color+shape pairs) and its caption from ``rng``.

    ``sizes`` overrides :data:`SIZES` (radius range per size word).
    """
    size_ranges = _check_sizes(sizes)
    if num_objects is None:
        num_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    if num_objects not in (1, 2, 3):
        raise ValueError(f"`num_objects` must be 1, 2 or 3, got {num_objects!r}.")
    colors, shapes = list(COLORS), list(SHAPES)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < num_objects:
        pair = (colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))])
        if pair not in pairs:
            pairs.append(pair)
    sizes = [("small", "large")[rng.integers(2)] for _ in pairs]
    radii = [float(rng.uniform(*size_ranges[s])) for s in sizes]

    def clamp(v: float, r: float) -> float:
        return float(min(max(v, r + 1.0), IMAGE_SIZE - 1.0 - r))

    cell = None
    while True:  # rejection sampling of non-overlapping positions (and a clear relation for two objects)
        if num_objects == 1:
            cell = (int(rng.integers(3)), int(rng.integers(3)))
            cx, cy = (cell[1] + 0.5) * IMAGE_SIZE / 3, (cell[0] + 0.5) * IMAGE_SIZE / 3
            xy = [(clamp(cx + rng.uniform(-5, 5), radii[0]), clamp(cy + rng.uniform(-5, 5), radii[0]))]
        else:
            xy = [(clamp(rng.uniform(0, IMAGE_SIZE), r), clamp(rng.uniform(0, IMAGE_SIZE), r)) for r in radii]
        objects = [ToyObject(c, s, z, x, y, r) for (c, s), z, (x, y), r in zip(pairs, sizes, xy, radii, strict=True)]
        ok = all(
            math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + 3.0
            for i, a in enumerate(objects)
            for b in objects[i + 1 :]
        )
        if num_objects == 2 and ok:
            ok = _relation(objects[0], objects[1]) is not None
        if ok and (num_objects != 1 or cell_of(objects[0].x, objects[0].y) == cell):
            break

    with_size = bool(rng.integers(2))
    if num_objects == 1:
        caption = _describe(objects[0], with_size)
        if rng.integers(2):
            caption += " " + CELLS[cell]
    elif num_objects == 2:
        caption = f"{_describe(objects[0], with_size)} {_relation(objects[0], objects[1])} "
        caption += _describe(objects[1], with_size)
    else:
        caption = f"{_describe(objects[0], with_size)}, {_describe(objects[1], with_size)} and "
        caption += _describe(objects[2], with_size)

    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    value = rng.uniform(25, 95)
    tint = rng.uniform(-10, 10, size=3)
    rgb = tuple(int(np.clip(value + t, 0, 255)) for t in tint)
    return Scene(tuple(objects), background, rgb, int(rng.integers(2**31)), caption)


def scene_at(
    seed: int, index: int, num_objects: int | None = None, sizes: dict[str, tuple[float, float]] | None = None
) -> Scene:
    """Scene number ``index`` of the procedural dataset with seed ``seed`` (deterministic everywhere)."""
    return sample_scene(np.random.default_rng([seed, index]), num_objects, sizes)


# ------------------------------------------------------------------------------------------------- rendering
def _background(scene: Scene, size: int) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    base = np.asarray(scene.background_rgb, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (IMAGE_SIZE / size)
    amplitude = rng.uniform(8, 18)
    kind = scene.background
    if kind == "plain":
        pattern = np.zeros((size, size), np.float32)
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(5, 12)
        pattern = np.sign(np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period))
    elif kind == "checker":
        period = rng.uniform(6, 14)
        pattern = (np.floor(xx / period) + np.floor(yy / period)) % 2 * 2 - 1
    elif kind == "noise":
        coarse = rng.uniform(-1, 1, size=(9, 9)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    else:  # gradient
        angle = rng.uniform(0, 2 * math.pi)
        pattern = ((xx - 32) * math.cos(angle) + (yy - 32) * math.sin(angle)) / 32
    return np.clip(base[None, None, :] + amplitude * pattern[..., None], 0, 255)


def _polygon(obj: ToyObject, scale: float) -> list[tuple[float, float]] | None:
    x, y, r = obj.x * scale, obj.y * scale, obj.radius * scale
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        h = r / math.sqrt(2)
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if obj.shape == "triangle":
        return [
            (x + r * math.cos(a), y - r * math.sin(a) + 0.2 * r) for a in (math.pi / 2, 7 * math.pi / 6, -math.pi / 6)
        ]
    if obj.shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), y - rad * math.sin(a) + 0.08 * r))
        return pts
    if obj.shape == "diamond":
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if obj.shape == "cross":
        a, w = 0.9 * r, 0.33 * r
        return [
            (x - w, y - a), (x + w, y - a), (x + w, y - w), (x + a, y - w), (x + a, y + w), (x + w, y + w),
            (x + w, y + a), (x - w, y + a), (x - w, y + w), (x - a, y + w), (x - a, y - w), (x - w, y - w),
        ]  # fmt: skip
    raise AssertionError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Draw ``scene`` as an ``[size, size, 3]`` uint8 RGB array (anti-aliased by ``supersample``-times drawing)."""
    big = size * supersample
    canvas = Image.fromarray(_background(scene, size).round().astype(np.uint8)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    scale = big / IMAGE_SIZE
    rng = np.random.default_rng(scene.texture_seed + 1)
    for obj in scene.objects:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter, strict=True))
        poly = _polygon(obj, scale)
        if poly is None:
            r = obj.radius * scale * 0.92
            draw.ellipse([obj.x * scale - r, obj.y * scale - r, obj.x * scale + r, obj.y * scale + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return np.asarray(canvas.reduce(supersample) if supersample > 1 else canvas)


# ------------------------------------------------------------------------------------------------- prompts
_OBJECT = r"an? (?:(?:small|large) )?(\w+) (\w+)"
_SINGLE = re.compile(rf"^{_OBJECT}(?: (in the top left|at the top|in the top right|on the left|in the center|"
                     r"on the right|in the bottom left|at the bottom|in the bottom right))?$")  # fmt: skip
_PAIR = re.compile(rf"^{_OBJECT} (left of|right of|above|below) {_OBJECT}$")
_TRIPLE = re.compile(rf"^{_OBJECT},? {_OBJECT},? and {_OBJECT}$")


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a caption of the toy grammar (see the module docstring) into a :class:`PromptSpec`.

    Raises ``ValueError`` for prompts outside the grammar or with unknown colors or shapes.
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    cells = {phrase: cell for cell, phrase in CELLS.items()}
    spec = None
    if m := _SINGLE.match(text):
        spec = PromptSpec(((m[1], m[2]),), cell=cells[m[3]] if m[3] else None)
    elif m := _PAIR.match(text):
        spec = PromptSpec(((m[1], m[2]), (m[4], m[5])), relation=(0, m[3], 1))
    elif m := _TRIPLE.match(text):
        spec = PromptSpec(((m[1], m[2]), (m[3], m[4]), (m[5], m[6])))
    if spec is None:
        raise ValueError(
            f"`prompt` {prompt!r} is not a toy caption; use e.g. 'a red circle', 'a red circle in the top left', "
            "'a red circle left of a blue square' or 'a red circle, a blue square and a green star'."
        )
    for color, shape in spec.objects:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(
                f"`prompt` {prompt!r} names {color!r} {shape!r}; toy colors are {', '.join(COLORS)} and shapes "
                f"{', '.join(SHAPES)}."
            )
    return spec


def prompt_set(num_objects: int, count: int, seed: int = 1234) -> list[str]:
    """``count`` evaluation prompts with ``num_objects`` objects (captions of fresh scenes of ``seed``)."""
    return [scene_at(seed, i, num_objects).caption for i in range(count)]


# ------------------------------------------------------------------------------------------------- torch dataset
class ToyScenes:
    """Map-style dataset of procedural scenes: item ``i`` is ``scene_at(seed, i)`` rendered.

    Each item is a dict with ``pixel_values`` (``[3, 64, 64]`` float in ``[-1, 1]``), ``caption`` and ``scene``.
    ``length`` only bounds ``len()``; any index is valid.
    """

    def __init__(
        self,
        seed: int = 0,
        length: int = 2**31 - 1,
        num_objects: int | None = None,
        sizes: dict[str, tuple[float, float]] | None = None,
    ):
        self.seed, self.length, self.num_objects = seed, length, num_objects
        self.sizes = _check_sizes(sizes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        import torch

        scene = scene_at(self.seed, int(index), self.num_objects, self.sizes)
        pixels = torch.from_numpy(render_scene(scene).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"pixel_values": pixels, "caption": scene.caption, "scene": scene}

    def batch(self, indices: Sequence[int]) -> dict:
        """Stack items ``indices`` into one batch (``pixel_values`` ``[B, 3, 64, 64]``, lists of captions/scenes)."""
        import torch

        items = [self[i] for i in indices]
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "caption": [it["caption"] for it in items],
            "scene": [it["scene"] for it in items],
        }
