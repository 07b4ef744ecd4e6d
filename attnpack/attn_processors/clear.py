"""CLEAR: circular local attention for FLUX, with the official weights.

Paper: Liu, Tan and Wang, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (NeurIPS 2025),
https://arxiv.org/abs/2412.16112; official code https://github.com/Huage001/CLEAR.

Every image token of FLUX.1 attends only the image tokens inside a circle of radius ``r`` around it
(``dy**2 + dx**2 < r**2``, token units), plus all text tokens; text tokens still attend everything. With
``down_factor = d > 1`` image tokens also attend ``(H/d)(W/d)`` pooled "global" tokens: the keys and values (after
qk-norm and RoPE) summed over ``d x d`` cells with a learnable per-layer weight. The same pattern runs in all 19
double-stream and 38 single-stream blocks; the distilled to_q / to_k / to_v / to_out weights (five checkpoints on the
Hub, or your own from ``attnpack distill-clear``) make the sparse model match the dense one.

Usage::

    import attnpack
    from huggingface_hub import hf_hub_download

    weights = hf_hub_download("Huage001/CLEAR", "clear_local_16.safetensors")
    with attnpack.apply_clear(pipe, radius=16, weights=weights):
        image = pipe(prompt, height=2048, width=2048).images[0]
    # leaving the block restores the original processors *and* the original attention weights

Design: processors stay plain objects (nothing leaks into ``state_dict`` / ``save_pretrained``); the pooling weights
of ``d > 1`` live in a :class:`~attnpack.attn_processors.clear_weights.ClearPooling` module held by the handle
(``handle.clear.pooling``) and load from / save to the official keys ``<layer>.processor.spatial_weight``. Patterns
and tile tables are built per resolution and cached per (grid, text length, r, d) in ``handle.clear.cache``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch

from .._utils import check_number
from ..kernels.clear import ClearPatternCache, clear_attention, resolve_clear_tiles
from .clear_weights import ClearPooling, ClearWeightsReport, load_clear_weights
from .families import family_of_model
from .processor import (
    AttentionCall,
    AttnPackProcessor,
    ProcessorHandle,
    apply_processors,
    list_layers,
    resolve_denoisers,
)


logger = logging.getLogger(__name__)

__all__ = ["ClearAttnProcessor", "ClearCore", "ClearState", "apply_clear"]

BACKENDS = ("reference", "flex", "triton")


class ClearAttnProcessor(AttnPackProcessor):
    """FLUX attention processor running CLEAR (the FLUX family adapter with a :class:`ClearCore`)."""

    technique = "clear"


@dataclasses.dataclass
class ClearState:
    """What one :func:`apply_clear` call installed (``handle.clear``).

    Attributes:
        radius / down_factor / proportional_attention / backend: the settings.
        q_tile / kv_tile: 2-D tile shapes (``None``: the defaults of :func:`attnpack.kernels.clear.default_clear_tiles`).
        cache: the :class:`~attnpack.kernels.clear.ClearPatternCache` shared by all layers.
        pooling: the learnable pooling weights (``down_factor > 1``), else ``None``.
        report: what loading ``weights`` did (``None`` without weights).
    """

    radius: int | None  # None: auto_radius of each grid
    down_factor: int
    proportional_attention: bool
    backend: str | None
    q_tile: tuple[int, int] | None = None
    kv_tile: tuple[int, int] | None = None
    cache: ClearPatternCache = dataclasses.field(default_factory=ClearPatternCache)
    pooling: ClearPooling | None = None
    report: ClearWeightsReport | None = None


class ClearCore:
    """The CLEAR attention core for one FLUX layer (``[B, H, T + h*w, D]`` in and out, text first)."""

    query_subset = True  # honours AttentionCall.queries: runs under ring attention

    def __init__(self, state: ClearState, layer_name: str):
        self.state = state
        self.layer_name = layer_name

    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        layout = call.layout
        s = self.state
        if layout.grid is None or len(layout.grid) != 2 or not layout.text_first or layout.is_cross:
            raise ValueError(
                f"CLEAR needs FLUX's [text; image] sequence with a known image token grid; layer {self.layer_name} "
                f"got {layout}. (FLUX Kontext's reference tokens and calls outside a hooked forward are not supported.)"
            )
        if call.mask is not None:
            raise ValueError(
                "CLEAR does not combine with an attention mask (the official processors ignore it); drop "
                "`attention_mask` from `joint_attention_kwargs`."
            )
        weight = s.pooling.weight(self.layer_name) if s.pooling is not None else None
        radius = auto_radius(layout.grid) if s.radius is None else s.radius
        _note_if_dense(tuple(layout.grid), radius, s.down_factor)
        return clear_attention(
            query,
            key,
            value,
            grid=layout.grid,
            text_len=layout.num_text,
            radius=radius,
            down_factor=s.down_factor,
            spatial_weight=weight,
            proportional_attention=s.proportional_attention,
            backend=s.backend,
            cache=s.cache,
            q_tile=s.q_tile,
            kv_tile=s.kv_tile,
            query_positions=call.queries,
        )

    def __repr__(self) -> str:
        s = self.state
        extra = ", proportional_attention=True" if s.proportional_attention else ""
        radius = "auto" if s.radius is None else s.radius
        return f"ClearCore(radius={radius}, down_factor={s.down_factor}{extra})"


# a radius past the grid's diagonal is dense attention already; the bound keeps r**2 inside the kernels' int32
MAX_RADIUS = 4096


def auto_radius(grid) -> int:
    """The default radius on an ``(H, W)`` token grid: a quarter of its shorter side, at least 4. FLUX at 1024 px
    (64x64 tokens) gets the official 16; toy-flux (8x8) gets 4, which restricts attention (the official 16 would
    cover its whole grid) and still draws what is asked (smaller radii do not, without distilled weights)."""
    return max(4, min(int(grid[0]), int(grid[1])) // 4)


_DENSE_NOTES: set[tuple] = set()


def _note_if_dense(grid: tuple[int, ...], radius: int, down_factor: int) -> None:
    """Say once per grid and radius when CLEAR changes nothing there: the circle covers the whole grid."""
    h, w = grid
    if down_factor == 1 and radius**2 > (h - 1) ** 2 + (w - 1) ** 2 and (grid, radius) not in _DENSE_NOTES:
        _DENSE_NOTES.add((grid, radius))
        largest = math.isqrt((h - 1) ** 2 + (w - 1) ** 2)
        logger.warning(
            "CLEAR radius=%d covers the whole %dx%d token grid: attention stays dense here (no effect). A radius of "
            "at most %d restricts it (radius unset: %d).",
            radius, h, w, largest, auto_radius(grid),
        )  # fmt: skip


MAX_DOWN_FACTOR = 64


def apply_clear(
    pipe_or_transformer,
    radius: int | None = None,
    down_factor: int = 1,
    weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    proportional_attention: bool = False,
    *,
    backend: str | None = None,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
) -> ProcessorHandle:
    """Install CLEAR on every attention layer of a FLUX pipeline or ``FluxTransformer2DModel``.

    Parameters:
        pipe_or_transformer: a FLUX pipeline (text-to-image, img2img, inpaint, ...) or its transformer.
        radius: window radius ``r`` in tokens (16 px each): image tokens attend image tokens with
            ``dy**2 + dx**2 < r**2``. The released checkpoints use 8, 16 or 32. ``None`` (default): the radius
            ``weights`` were distilled with when their metadata says, else :func:`auto_radius` of each grid (16 at
            1024x1024, the official default; 4 on toy-flux's 8x8 tokens).
        down_factor: ``d``; ``d > 1`` adds pooled global tokens (``(H/d)(W/d)`` per image, learnable ``d x d``
            weights per layer, initialised to ``1 / d**2``). The released checkpoints use 1 or 4; image sizes must
            then be multiples of ``16 * d`` pixels.
        weights: a CLEAR checkpoint in the official format (``.safetensors`` path or a state dict), e.g. one of
            ``Huage001/CLEAR``'s files or the output of ``attnpack distill-clear``. It must match ``down_factor``
            (checked). Loaded into the transformer in place; missing keys are logged and reported in
            ``handle.clear.report``; unexpected keys or shapes raise ``ValueError``.
        proportional_attention: scale the softmax by ``sqrt(log_{4608}(N) / head_dim)`` (``N = 10 (T + HW)`` for
            ``d > 1``) as the official high-resolution pipeline does.

    Other Parameters:
        backend: block-sparse kernel: ``"triton"`` (CUDA, forward), ``"flex"`` (FlexAttention; backward on CUDA),
            ``"reference"`` (pure PyTorch, differentiable, any device) or ``None`` (automatic, logged at DEBUG).
        q_tile, kv_tile: 2-D tiles of the kernels (default ``(8, 16)`` query and ``(8, 8)`` key boxes).

    Returns:
        a :class:`~attnpack.ProcessorHandle`; ``remove()`` (or leaving a ``with`` block) restores the processors and
        the original attention weights. ``handle.clear`` is the :class:`ClearState` (pooling weights, pattern cache,
        load report).
    """
    models, _ = resolve_denoisers(pipe_or_transformer)
    flux = [m for m in models if family_of_model(m) == "flux"]
    if len(flux) != 1 or len(models) != 1:
        names = ", ".join(type(m).__name__ for m in models)
        raise ValueError(f"CLEAR supports FLUX.1 transformers (FluxTransformer2DModel) only, got {names}.")
    transformer = flux[0]
    if radius is not None:
        radius = check_number("radius", radius, 1, MAX_RADIUS, integer=True)
    down_factor = check_number("down_factor", down_factor, 1, MAX_DOWN_FACTOR, integer=True)
    if not isinstance(proportional_attention, bool):
        raise TypeError(f"`proportional_attention` must be a bool, got {proportional_attention!r}.")
    if backend is not None:
        from ..kernels.block_sparse import block_sparse_backends

        if backend not in block_sparse_backends():
            known = ", ".join(map(repr, block_sparse_backends()))
            raise ValueError(f"`backend` must be one of {known} or None, got backend={backend!r}.")
    if q_tile is not None or kv_tile is not None:
        q_tile, kv_tile = resolve_clear_tiles((1, 1), q_tile, kv_tile)
    layer_names = [info.name for info in list_layers(transformer)]
    state = ClearState(radius, down_factor, proportional_attention, backend, q_tile, kv_tile)
    if down_factor > 1:
        device = next(transformer.parameters()).device
        state.pooling = ClearPooling(layer_names, down_factor, device=device if device.type != "meta" else None)
    restore_weights = None
    if weights is not None:
        state.report, restore_weights = load_clear_weights(
            transformer, layer_names, weights, down_factor, state.pooling
        )
        meta = state.report.metadata
        if radius is None and str(meta.get("radius", "")).isdigit():
            state.radius = radius = int(meta["radius"])  # the radius the weights were distilled with
        elif radius is not None and meta.get("radius") not in (None, str(radius)):
            logger.warning(
                "CLEAR weights %s were distilled with radius=%s; running them with radius=%d",
                state.report.source,
                meta["radius"],
                radius,
            )
    try:
        handle = apply_processors(
            transformer,
            lambda info: ClearCore(state, info.name),
            processor_cls=ClearAttnProcessor,
            description=f"CLEAR(radius={'auto' if radius is None else radius}, down_factor={down_factor})",
        )
    except BaseException:
        if restore_weights is not None:
            restore_weights()
        raise
    if restore_weights is not None:
        handle.add_callback(restore_weights)
    handle.clear = state
    return handle


def _register() -> None:
    from ..techniques import Option, Technique, register_technique

    register_technique(
        Technique(
            name="clear",
            summary="CLEAR circular local attention for FLUX (radius r, optional pooled global tokens, official or "
            "distilled weights) for faster high-resolution generation",
            apply=apply_clear,
            options=(
                Option(
                    "radius",
                    "int",
                    None,
                    "window radius in tokens (16 px each); released weights: 8, 16, 32; empty: the weights' radius, "
                    "else a quarter of the grid (16 at 1024 px)",
                    minimum=1,
                ),
                Option(
                    "down_factor",
                    "int",
                    1,
                    "pooled global tokens over d x d cells (1 = none; released: 1, 4)",
                    minimum=1,
                ),
                Option("weights", "path", None, "CLEAR checkpoint (.safetensors, official key format)"),
                Option("proportional_attention", "bool", False, "official high-resolution softmax scaling"),
                Option(
                    "backend", "str", None, "kernel: triton, flex, reference (default automatic)", choices=BACKENDS
                ),
            ),
            families=("flux",),
            doc="docs/clear.md",
        )
    )


_register()
