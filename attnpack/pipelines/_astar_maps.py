"""A-STAR losses and attention-map processing (pure functions; no pipeline state).

Paper: Agarwal et al., "A-STAR: Test-time Attention Segregation and Retention for Text-to-image Synthesis", ICCV 2023,
https://arxiv.org/abs/2306.14544. Eq. 2 (segregation) and Eq. 3 (retention) are implemented exactly as published; the
choices the paper leaves open (token renormalisation, smoothing, max-normalisation, the binarisation rule) are options
documented in ``docs/a-star.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._utils import check_number


__all__ = [
    "segregation_loss",
    "retention_loss",
    "binarize_maps",
    "otsu_thresholds",
    "gaussian_kernel",
    "smooth_maps",
    "concept_maps",
    "concept_token_indices",
    "prompt_token_count",
    "prompt_tokens",
    "render_attention_maps",
    "save_attention_maps",
    "step_size_schedule",
    "layout_masks_to_grid",
    "TOKEN_NORMALIZATIONS",
]

TOKEN_NORMALIZATIONS = ("sum", "softmax", "none")
_EPS = 1e-8


def _check_maps(maps: torch.Tensor, argument: str = "maps") -> None:
    if not torch.is_tensor(maps) or maps.ndim < 3:
        shape = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
        raise ValueError(f"`{argument}` must be a tensor [..., K, h, w] (K concepts), got {shape}.")


# ------------------------------------------------------------------------------------------------- losses
def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """Segregation loss, A-STAR Eq. 2: overlap between the attention maps of every pair of concepts.

    ``L_seg = sum_{m > n} sum_ij min(A_m[ij], A_n[ij]) / sum_ij (A_m[ij] + A_n[ij])``. Each pair term lies in
    ``[0, 0.5]``: ``0`` for disjoint maps, ``0.5`` for identical maps.

    Args:
        maps: ``[..., K, h, w]`` non-negative attention maps of ``K`` concepts (leading dims are batch dims).

    Returns:
        ``[...]`` the loss per batch element (a scalar tensor for ``[K, h, w]``); ``0`` when ``K < 2``.
    """
    _check_maps(maps)
    k = maps.shape[-3]
    if k < 2:
        return maps.sum(dim=(-3, -2, -1)) * 0.0
    first, second = torch.triu_indices(k, k, offset=1, device=maps.device)
    a, b = maps[..., first, :, :], maps[..., second, :, :]  # [..., P, h, w]
    overlap = torch.minimum(a, b).sum(dim=(-2, -1))
    total = (a + b).sum(dim=(-2, -1)).clamp_min(_EPS)
    return (overlap / total).sum(dim=-1)


def retention_loss(maps: torch.Tensor, prev_masks: torch.Tensor | None) -> torch.Tensor:
    """Retention loss, A-STAR Eq. 3: keep each concept's attention inside its mask from the previous step.

    ``L_ret = sum_m [1 - sum_ij min(A_m[ij], B_m[ij]) / sum_ij (A_m[ij] + B_m[ij])]``. With a binary mask each term
    lies in ``[0.5, 1]``; a map equal to its mask gives ``1 - |B| / (2 |B|) = 0.5``.

    Args:
        maps: ``[..., K, h, w]`` attention maps at the current step.
        prev_masks: ``[..., K, h, w]`` binary masks ``B`` (from the previous step, or user layout masks); detached
            here. ``None`` (no previous step yet) gives a zero loss.

    Returns:
        ``[...]`` the loss per batch element.
    """
    _check_maps(maps)
    if prev_masks is None:
        return maps.sum(dim=(-3, -2, -1)) * 0.0
    if tuple(prev_masks.shape) != tuple(maps.shape):
        raise ValueError(
            f"`prev_masks` must have the shape of `maps` {tuple(maps.shape)}, got {tuple(prev_masks.shape)}."
        )
    masks = prev_masks.detach().to(device=maps.device, dtype=maps.dtype)
    inside = torch.minimum(maps, masks).sum(dim=(-2, -1))
    total = (maps + masks).sum(dim=(-2, -1)).clamp_min(_EPS)
    return (1.0 - inside / total).sum(dim=-1)


# ------------------------------------------------------------------------------------------------- binarisation
def otsu_thresholds(maps: torch.Tensor) -> torch.Tensor:
    """Exact Otsu threshold of each map (maximal between-class variance over all splits of its sorted values).

    Args:
        maps: ``[..., h, w]``.

    Returns:
        ``[...]`` thresholds ``t``: the foreground is ``map > t``. A constant map gets a threshold below its value
        (everything is foreground).
    """
    flat = maps.detach().float().flatten(-2)  # [..., n]
    values, _ = flat.sort(dim=-1)
    n = values.shape[-1]
    if n < 2:
        return values[..., 0] - 1.0
    csum = values.cumsum(dim=-1)
    k = torch.arange(1, n, device=values.device, dtype=values.dtype)  # size of the low class
    mu0 = csum[..., :-1] / k
    mu1 = (csum[..., -1:] - csum[..., :-1]) / (n - k)
    between = (k / n) * (1.0 - k / n) * (mu0 - mu1) ** 2
    valid = values[..., :-1] < values[..., 1:]  # split only between distinct values
    between = torch.where(valid, between, torch.full_like(between, -1.0))
    best = between.argmax(dim=-1, keepdim=True)
    threshold = values.gather(-1, best).squeeze(-1)
    constant = ~valid.any(dim=-1)
    return torch.where(constant, values[..., 0] - 1.0, threshold)


def binarize_maps(maps: torch.Tensor, rule: str | float = "otsu") -> torch.Tensor:
    """Binary masks of the high-attention regions, ``[..., h, w]`` -> boolean ``[..., h, w]``.

    Args:
        maps: attention maps.
        rule: ``"otsu"`` (per-map Otsu threshold, :func:`otsu_thresholds`) or a fraction ``f`` in ``(0, 1]``: pixels
            ``>= f * max`` of their map. The paper does not specify the rule.
    """
    if isinstance(rule, str):
        if rule != "otsu":
            raise ValueError(f"`binarize` must be 'otsu' or a fraction of the max in (0, 1], got {rule!r}.")
        return maps.detach() > otsu_thresholds(maps)[..., None, None].to(maps.dtype)
    if isinstance(rule, bool) or not isinstance(rule, (int, float)) or not 0.0 < float(rule) <= 1.0:
        raise ValueError(f"`binarize` must be 'otsu' or a fraction of the max in (0, 1], got {rule!r}.")
    peak = maps.detach().amax(dim=(-2, -1), keepdim=True)
    return maps.detach() >= float(rule) * peak


# ------------------------------------------------------------------------------------------------- map processing
def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Normalised 2-D Gaussian ``exp(-(x^2 + y^2) / (2 sigma^2))``, ``[kernel_size, kernel_size]`` float32.

    Attend-and-Excite's ``GaussianSmoothing`` uses ``exp(-((x - mu) / (2 sigma))^2)``, i.e. an effective sigma of
    ``sigma * sqrt(2)``; pass ``sigma=0.5 * 2 ** 0.5`` to reproduce its kernel.
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be a positive odd integer, got {kernel_size!r}.")
    if not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"`sigma` must be a positive number, got {sigma!r}.")
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2.0 * float(sigma) ** 2))
    kernel = g[:, None] * g[None, :]
    return (kernel / kernel.sum()).float()


def smooth_maps(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian smoothing of ``[..., h, w]`` maps with reflect padding (replicate where a side is too short)."""
    kernel = gaussian_kernel(kernel_size, sigma).to(maps.device, maps.dtype)
    pad = kernel_size // 2
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1])
    if pad:
        mode = "reflect" if min(shape[-2], shape[-1]) > pad else "replicate"
        x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, kernel[None, None]).reshape(shape)


def concept_maps(
    attention: torch.Tensor,
    token_groups: Sequence[Sequence[Sequence[int]]],
    text_lengths: Sequence[int],
    *,
    token_normalization: str = "sum",
    smoothing: bool = True,
    kernel_size: int = 3,
    sigma: float = 0.5,
    max_normalize: bool = True,
) -> torch.Tensor:
    """Per-concept maps from head- and layer-averaged cross-attention probabilities.

    For each sample: keep the prompt's text tokens (positions ``1 .. n``: without the start token, the end token and
    padding), renormalise over them (``"sum"``: divide by their sum; ``"softmax"``: ``softmax(100 A)`` as
    Attend-and-Excite; ``"none"``), average the maps of each concept's tokens (multi-token words), smooth
    (:func:`smooth_maps`) and divide by the map's maximum.

    Args:
        attention: ``[B, h, w, N_k]`` probabilities (``N_k`` = 77 text positions).
        token_groups: per sample, per concept, the token positions (0 = start token) of the concept.
        text_lengths: per sample, the number ``n`` of prompt tokens between the start and end tokens.

    Returns:
        ``[B, K, h, w]`` float32 maps.
    """
    if token_normalization not in TOKEN_NORMALIZATIONS:
        raise ValueError(f"`token_normalization` must be one of {TOKEN_NORMALIZATIONS}, got {token_normalization!r}.")
    if attention.ndim != 4 or len(token_groups) != attention.shape[0] or len(text_lengths) != attention.shape[0]:
        raise ValueError(
            f"`attention` [B, h, w, N] must have one entry of `token_groups` and `text_lengths` per row, got "
            f"{tuple(attention.shape)}, {len(token_groups)} and {len(text_lengths)}."
        )
    out = []
    for sample, groups, n in zip(attention.float(), token_groups, text_lengths):
        text = sample[..., 1 : n + 1]  # [h, w, n]
        if token_normalization == "sum":
            text = text / text.sum(dim=-1, keepdim=True).clamp_min(_EPS)
        elif token_normalization == "softmax":
            text = torch.softmax(text * 100.0, dim=-1)
        maps = torch.stack([text[..., [i - 1 for i in group]].mean(dim=-1) for group in groups])  # [K, h, w]
        if smoothing:
            maps = smooth_maps(maps, kernel_size, sigma)
        if max_normalize:
            maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
        out.append(maps)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------- tokens
def prompt_token_count(tokenizer, prompt: str) -> int:
    """Number of prompt tokens between the start and end tokens (after truncation to the model's length)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return len(ids) - 2


def _describe_tokens(tokenizer, ids: Sequence[int]) -> str:
    return ", ".join(f"{i}: {t}" for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(ids))))


def concept_token_indices(tokenizer, prompt: str, concepts: Sequence[str]) -> list[list[int]]:
    """Token positions (0 = start token) of each concept word or phrase in ``prompt``.

    A concept may span several tokens (a word the tokenizer splits, or several words); its first whole-word,
    case-insensitive occurrence in the prompt is used.

    Raises:
        ValueError: a concept does not occur in the prompt (the message lists the prompt's tokens).
    """
    if isinstance(concepts, str) or not isinstance(concepts, Sequence) or not concepts:
        raise TypeError(f"`concepts` must be a non-empty list of words, got {concepts!r}.")
    max_len = tokenizer.model_max_length
    try:
        enc = tokenizer(prompt, truncation=True, max_length=max_len, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # tokenizers without offsets: match token sequences
        return _indices_by_token_sequence(tokenizer, prompt, concepts)
    ids = enc["input_ids"]
    out = []
    for concept in concepts:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"`concepts` entries must be non-empty strings, got {concept!r}.")
        match = re.search(rf"(?<!\w){re.escape(concept.strip())}(?!\w)", prompt, flags=re.IGNORECASE)
        positions = []
        if match is not None:
            start, end = match.span()
            positions = [i for i, (s, e) in enumerate(offsets) if s < e and s < end and e > start]
        if not positions:
            where = "is beyond the text encoder's length" if match is not None else "does not occur in the prompt"
            raise ValueError(
                f"concept {concept!r} {where} {prompt!r}; tokens: {_describe_tokens(tokenizer, ids)}. "
                "Use a word of the prompt or pass `token_indices`."
            )
        out.append(positions)
    return out


def prompt_tokens(tokenizer, prompt: str) -> list[tuple[int, str, str]]:
    """The prompt's tokens as the losses index them: ``[(position, token, word), ...]`` for positions ``1..n``.

    ``position`` is what ``token_indices`` takes (0 is the start token, not listed; nor are the end and padding
    tokens, nor tokens beyond the text encoder's length). ``token`` is the tokenizer's piece (e.g. ``"c"``, ``"at</w>"``)
    and ``word`` the prompt word it belongs to, the text a concept must contain (``""`` for tokenizers without
    character offsets).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    max_len = tokenizer.model_max_length
    try:
        enc = tokenizer(prompt, truncation=True, max_length=max_len, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc, offsets = tokenizer(prompt, truncation=True, max_length=max_len), None
    ids = enc["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\w+|[^\w\s]+", prompt)]
    out = []
    for position in range(1, len(ids) - 1):
        word = ""
        if offsets is not None:
            start, end = offsets[position]
            word = next((w for s, e, w in words if s < end and e > start), "")
        out.append((position, pieces[position], word))
    return out


def _indices_by_token_sequence(tokenizer, prompt: str, concepts: Sequence[str]) -> list[list[int]]:
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    out = []
    for concept in concepts:
        sub = tokenizer(concept.strip(), add_special_tokens=False).input_ids
        found = next((i for i in range(len(ids) - len(sub) + 1) if sub and ids[i : i + len(sub)] == sub), None)
        if found is None:
            raise ValueError(
                f"concept {concept!r} does not occur in the prompt {prompt!r}; tokens: "
                f"{_describe_tokens(tokenizer, ids)}. Use a word of the prompt or pass `token_indices`."
            )
        out.append(list(range(found, found + len(sub))))
    return out


# ------------------------------------------------------------------------------------------------- schedule, masks
def step_size_schedule(num_steps: int, scale_factor: float = 20.0, step_size=None) -> list[float]:
    """Step sizes ``alpha_t`` for ``num_steps`` denoising steps.

    Default (``step_size=None``): ``scale_factor * sqrt(linspace(1, 0.5, num_steps))``, the schedule of diffusers'
    Attend-and-Excite (20 -> 14.1 with ``scale_factor=20``); the paper does not give ``alpha_t``. A number is used at
    every step; a sequence gives one value per step.
    """
    if step_size is None:
        scale_factor = check_number("scale_factor", scale_factor, 0.0, 1e4)
        return (scale_factor * np.sqrt(np.linspace(1.0, 0.5, num_steps))).tolist()
    if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
        return [check_number("step_size", step_size, 0.0, 1e4)] * num_steps
    if isinstance(step_size, (Sequence, np.ndarray, torch.Tensor)) and len(step_size) == num_steps:
        return [check_number(f"step_size[{i}]", float(v), 0.0, 1e4) for i, v in enumerate(step_size)]
    raise ValueError(
        f"`step_size` must be None, a number or a sequence of {num_steps} numbers (one per step), got {step_size!r}."
    )


def save_attention_maps(
    maps: torch.Tensor,
    path: str | os.PathLike,
    *,
    concepts: Sequence[str] | None = None,
    sample: int = 0,
    fps: int = 4,
    **render_kwargs,
):
    """Write attention maps ``[T, B, K, h, w]`` (or ``[T, K, h, w]``) of one sample: ``.png`` grid or ``.gif``.

    The grid has one row per concept and one column per step (at most ``max_columns``, evenly spaced); the GIF one
    frame per step. Written atomically (:mod:`attnpack.io`) with the labels embedded.
    """
    from ..io import check_output_path, save_image, save_video

    path = check_output_path(path, (".png", ".gif"), argument="path")
    if maps.ndim == 5:
        if not 0 <= sample < maps.shape[1]:
            raise ValueError(f"`sample` must be in 0..{maps.shape[1] - 1}, got {sample}.")
        maps = maps[:, sample]
    parameters = {"kind": "A-STAR attention maps", "concepts": list(concepts or []), "sample": sample}
    if path.suffix.lower() == ".gif":
        frames = render_attention_maps(maps, concepts, animate=True, **render_kwargs)
        return save_video(frames, path, parameters, fps=fps)
    return save_image(render_attention_maps(maps, concepts, **render_kwargs), path, parameters)


def _as_mask_tensor(mask) -> torch.Tensor:
    if torch.is_tensor(mask):
        return mask.detach().float().cpu()
    try:
        from PIL import Image

        if isinstance(mask, Image.Image):
            return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    return torch.as_tensor(np.asarray(mask, dtype=np.float32))


def layout_masks_to_grid(layout_masks, num_concepts: int, batch: int, grid: tuple[int, int], device) -> torch.Tensor:
    """User masks -> boolean ``[B, K, h, w]`` at the map grid (area-resized, then ``>= 0.5``)."""
    if torch.is_tensor(layout_masks) or isinstance(layout_masks, np.ndarray):
        masks = _as_mask_tensor(layout_masks)
        if masks.ndim == 3:
            masks = masks[None].expand(batch, -1, -1, -1)
    elif isinstance(layout_masks, Sequence) and len(layout_masks) == num_concepts:
        items = [_as_mask_tensor(m) for m in layout_masks]
        if any(m.ndim != 2 for m in items) or len({tuple(m.shape) for m in items}) != 1:
            raise ValueError("`layout_masks` entries must be 2-D masks of one size (PIL images or [H, W] arrays).")
        masks = torch.stack(items)[None].expand(batch, -1, -1, -1)
    else:
        raise ValueError(
            f"`layout_masks` must be {num_concepts} masks (one per concept: PIL images or [H, W] arrays) or a tensor "
            f"[K, H, W] / [B, K, H, W], got {type(layout_masks).__name__}."
        )
    if masks.ndim != 4 or masks.shape[:2] != (batch, num_concepts):
        raise ValueError(
            f"`layout_masks` must have {num_concepts} masks (one per concept) for {batch} samples, "
            f"got shape {tuple(masks.shape)}."
        )
    masks = masks.float().clamp(0.0, 1.0)
    if tuple(masks.shape[-2:]) != grid:
        mode = "area" if masks.shape[-2] >= grid[0] and masks.shape[-1] >= grid[1] else "bilinear"
        masks = F.interpolate(masks, size=grid, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return (masks >= 0.5).to(device)


# ------------------------------------------------------------------------------------------------- pictures
# a perceptually ordered colour map (anchors of matplotlib's "viridis")
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float64,
)


def _colorize(values: np.ndarray) -> np.ndarray:
    """``[h, w]`` values in ``[0, 1]`` -> ``[h, w, 3]`` uint8."""
    x = np.clip(values, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def render_attention_maps(
    maps: torch.Tensor,
    concepts: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    *,
    cell: int = 64,
    max_columns: int = 10,
    animate: bool = False,
    contrast: str = "max",
):
    """Pictures of per-concept, per-step attention maps.

    Args:
        maps: ``[T, K, h, w]`` maps of one sample (``output.attention_maps[:, i]``).
        concepts: ``K`` row labels (default ``concept 0``, ...).
        steps: ``T`` step labels (default ``0 .. T-1``).
        cell: size in pixels of one upscaled map.
        max_columns: a grid shows at most this many steps, evenly spaced, always including the first and last.
        animate: return one frame per step (the ``K`` maps side by side) instead of one grid.
        contrast: ``"max"`` shows each map divided by its maximum (as the losses see it); ``"minmax"`` stretches each
            map from its minimum to its maximum (shows structure in nearly flat maps, e.g. of untrained models).

    Returns:
        a PIL image (rows = concepts, columns = steps), or a list of PIL frames when ``animate``.
    """
    from PIL import Image, ImageDraw

    if not torch.is_tensor(maps) or maps.ndim != 4:
        raise ValueError(f"`maps` must be a tensor [T, K, h, w], got {getattr(maps, 'shape', type(maps))}.")
    t, k = maps.shape[:2]
    concepts = list(concepts) if concepts is not None else [f"concept {i}" for i in range(k)]
    steps = list(steps) if steps is not None else list(range(t))
    if len(concepts) != k or len(steps) != t:
        raise ValueError(f"need {k} concept labels and {t} step labels, got {len(concepts)} and {len(steps)}.")
    if contrast not in ("max", "minmax"):
        raise ValueError(f"`contrast` must be 'max' or 'minmax', got {contrast!r}.")
    data = maps.detach().float().cpu()
    if contrast == "minmax":
        data = data - data.amin(dim=(-2, -1), keepdim=True)
    peak = data.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    data = (data / peak).numpy()

    def tile(values: np.ndarray) -> Image.Image:
        return Image.fromarray(_colorize(values)).resize((cell, cell), Image.NEAREST)

    label_w, label_h, pad = 72, 14, 2
    if animate:
        frames = []
        for ti in range(t):
            img = Image.new("RGB", (k * (cell + pad) + pad, cell + label_h * 2 + pad), "white")
            draw = ImageDraw.Draw(img)
            draw.text((pad, 1), f"step {steps[ti]}", fill="black")
            for ki in range(k):
                x = pad + ki * (cell + pad)
                img.paste(tile(data[ti, ki]), (x, label_h))
                draw.text((x, label_h + cell + 1), concepts[ki][: cell // 6], fill="black")
            frames.append(img)
        return frames
    columns = sorted({round(i * (t - 1) / max(1, min(max_columns, t) - 1)) for i in range(min(max_columns, t))})
    img = Image.new("RGB", (label_w + len(columns) * (cell + pad), label_h + k * (cell + pad)), "white")
    draw = ImageDraw.Draw(img)
    for ci, ti in enumerate(columns):
        draw.text((label_w + ci * (cell + pad), 1), f"step {steps[ti]}", fill="black")
    for ki in range(k):
        y = label_h + ki * (cell + pad)
        draw.text((2, y + cell // 2 - 5), concepts[ki][:11], fill="black")
        for ci, ti in enumerate(columns):
            img.paste(tile(data[ti, ki]), (label_w + ci * (cell + pad), y))
    return img
