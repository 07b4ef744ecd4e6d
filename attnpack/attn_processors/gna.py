"""Generalized neighborhood attention (GNA) processors for FLUX, SD3/SD3.5, Wan, HunyuanVideo and CogVideoX.

Paper: Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
Light", https://arxiv.org/abs/2504.16922 (NATTEN 0.21 semantics; see :mod:`attnpack.kernels.neighborhood.windows`).

Image / video queries attend their GNA neighborhood on the token grid (after RoPE) plus every text token; text
queries attend everything (dense), as in the paper's FLUX and HunyuanVideo setups and NATTEN issue #264. Windows and
strides can be given relative to a base grid (``base_size``) and rescaled to the actual one as Cosmos-Predict2 does;
chosen layers and the first denoising steps can stay dense.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..kernels._checks import per_axis
from ..kernels.neighborhood import (
    BACKENDS,
    cached_neighborhood_pattern,
    check_backend,
    neighborhood_attention_spec,
    normalize_neighborhood_args,
)
from ..techniques import Option, Technique, register_technique
from .families import family_of_model
from .processor import (
    AttentionCall,
    AttnPackProcessor,
    LayerSpec,
    apply_processors,
    list_layers,
    resolve_denoisers,
    select_layers,
)


logger = logging.getLogger(__name__)

__all__ = ["GNAAttnProcessor", "GNACore", "GNAConfig", "apply_gna", "rescale_window", "SUPPORTED_FAMILIES"]

# family -> number of grid axes
SUPPORTED_FAMILIES: dict[str, int] = {"flux": 2, "sd3": 2, "wan": 3, "hunyuan_video": 3, "cogvideox": 3}
VIDEO_FAMILIES = ("wan", "hunyuan_video", "cogvideox")


class GNAAttnProcessor(AttnPackProcessor):
    """Generalized neighborhood attention (https://arxiv.org/abs/2504.16922) on any supported family: the family
    adapter computes q, k, v exactly as the stock processor, :class:`GNACore` restricts the image queries."""

    technique = "gna"


def rescale_window(
    grid: Sequence[int],
    window_size: Sequence[int],
    stride: Sequence[int],
    base_size: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolve ``-1`` windows to the full axis, ``0`` (``window_size=None``) to :func:`auto_window`, and rescale to
    ``grid`` from ``base_size`` (Cosmos-Predict2 rule).

    Per axis with actual length ``x`` and base length ``b`` (``-1``: no rescaling on that axis):
    ``w' = min(max(2, round(w * x / b)), x)`` and ``s' = min(max(1, round(s * x / b)), w')``.
    """
    windows, strides = [], []
    for a, x in enumerate(grid):
        w, s = window_size[a], stride[a]
        if w == AUTO_WINDOW:
            windows.append(auto_window(x))
            strides.append(min(s, windows[-1]))
            continue
        b = -1 if base_size is None else base_size[a]
        if w == -1:
            windows.append(x)
            strides.append(min(s, x) if b == -1 else min(max(1, round(s * x / b)), x))
            continue
        if b != -1:
            w = min(max(2, round(w * x / b)), x)
            s = min(max(1, round(s * x / b)), w)
        windows.append(w)
        strides.append(s)
    return tuple(windows), tuple(strides)


@dataclasses.dataclass(frozen=True)
class GNAConfig:
    """GNA settings of one layer (per grid axis; ``window_size`` may hold ``-1`` = full axis)."""

    window_size: tuple[int, ...]
    stride: tuple[int, ...] = (1,)
    dilation: tuple[int, ...] = (1,)
    is_causal: tuple[bool, ...] = (False,)
    base_size: tuple[int, ...] | None = None
    backend: str | None = None


class GNACore:
    """Attention core: GNA for image / video queries (plus all text keys), dense attention for text queries.

    Args:
        config: the :class:`GNAConfig`.
        dense_steps: keep denoising steps dense while ``step_index < dense_steps`` (int) or while
            ``step_index / num_steps < dense_steps`` (float in ``[0, 1]``).
    """

    query_subset = True  # honours AttentionCall.queries: runs under ring attention

    def __init__(self, config: GNAConfig, dense_steps: int | float = 0):
        self.config = config
        self.dense_steps = dense_steps
        self._specs: dict[tuple[int, ...], Any] = {}

    def __repr__(self) -> str:
        c = self.config
        window = "auto" if all(w == AUTO_WINDOW for w in c.window_size) else c.window_size
        parts = [f"window_size={window}", f"stride={c.stride}", f"dilation={c.dilation}"]
        if any(c.is_causal):
            parts.append(f"is_causal={c.is_causal}")
        if c.base_size is not None:
            parts.append(f"base_size={c.base_size}")
        if self.dense_steps:
            parts.append(f"dense_steps={self.dense_steps}")
        if c.backend is not None:
            parts.append(f"backend={c.backend!r}")
        return f"GNACore({', '.join(parts)})"

    # ------------------------------------------------------------------------------------------ schedule
    def _dense_now(self, call: AttentionCall) -> bool:
        if not self.dense_steps:
            return False
        run = call.run
        step = None if run is None else run.step_index
        if step is None:
            raise ValueError(
                f"GNA `dense_steps`={self.dense_steps!r} needs the denoising step, which is unknown in this call of "
                f"{call.layer.name}. Apply GNA to a pipeline, or call the denoiser through a pipeline's scheduler."
            )
        if isinstance(self.dense_steps, float):
            if run.num_steps is None:
                raise ValueError(
                    f"GNA `dense_steps`={self.dense_steps} is a fraction of the schedule, but the number of steps is "
                    "unknown (bare denoiser). Apply GNA to the pipeline, or pass an int number of steps."
                )
            return step / run.num_steps < self.dense_steps
        return step < self.dense_steps

    # ------------------------------------------------------------------------------------------ grid
    def _spec(self, grid: tuple[int, ...]):
        """The kernel spec for this grid, or ``None`` when the layer must run dense (a single video frame)."""
        if grid in self._specs:
            return self._specs[grid]
        c = self.config
        if len(grid) == 3 and grid[0] == 1:
            # Cosmos-Predict2 runs image inputs (one latent frame) of a video model with dense attention
            logger.info("GNA: single-frame grid %s: this call runs dense attention (as Cosmos-Predict2 does)", grid)
            spec = None
        else:
            window, stride = rescale_window(grid, c.window_size, c.stride, c.base_size)
            try:
                spec = normalize_neighborhood_args(grid, window, stride, c.dilation, c.is_causal)
            except ValueError as exc:
                raise ValueError(
                    f"GNA settings do not fit this model's token grid {grid}: {exc} Configured: window_size="
                    f"{c.window_size}, stride={c.stride}, dilation={c.dilation}, base_size={c.base_size}."
                ) from None
            if not any(spec.causal) and all(w >= n for w, n in zip(spec.window, grid)):
                logger.warning(
                    "GNA window %s covers the whole token grid %s: attention stays dense here (no effect). Give a "
                    "smaller window_size, or leave it unset for about half of each axis.",
                    spec.window, grid,
                )  # fmt: skip
        self._specs[grid] = spec
        return spec

    # ------------------------------------------------------------------------------------------ ring attention
    def keys_needed(self, positions: torch.Tensor, call: AttentionCall) -> torch.Tensor | None:
        """``bool [N]``: the keys that the queries at ``positions`` (sorted, global) read (``None``: all of them); ring
        attention sends a rank only these. Text queries and dense steps read every key; image queries the key tiles
        their query tiles visit, and the text keys."""
        layout = call.layout
        if self._dense_now(call) or layout.grid is None or layout.image is None:
            return None
        if layout.text is not None and _rows_in(positions, layout.text).numel():
            return None
        spec = self._spec(tuple(layout.grid))
        if spec is None or (self.config.backend is None and spec.is_full()):
            return None
        need = torch.zeros(layout.num_keys, dtype=torch.bool, device=positions.device)
        rows = _rows_in(positions, layout.image)
        if rows.numel():  # the pattern neighborhood_attention_spec runs (the text keys are its extra keys)
            n_text = 0 if layout.key_text is None else layout.key_text.stop - layout.key_text.start
            pattern = cached_neighborhood_pattern(spec, num_extra=n_text, device=positions.device)
            visited = pattern.for_queries(rows).visited_keys().to(need.device)
            need[layout.key_image] = visited[: spec.num_tokens]
            if layout.key_text is not None:
                need[layout.key_text] = True
        return need

    # ------------------------------------------------------------------------------------------ call
    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        owned = call.queries  # ring attention: compute these query rows only
        if self._dense_now(call):
            return call.dense(query if owned is None else query.index_select(2, owned), key, value)
        layout = call.layout
        if layout.grid is None or layout.image is None:
            raise ValueError(
                f"GNA needs the token grid of the image/video stream in layer {call.layer.name}, but it is unknown "
                "here (e.g. FLUX Kontext reference tokens, or a call outside the denoiser's forward)."
            )
        grid = tuple(layout.grid)
        if len(grid) != len(self.config.window_size):
            raise ValueError(
                f"GNA window_size={self.config.window_size} has {len(self.config.window_size)} axes, but layer "
                f"{call.layer.name} has the token grid {grid}."
            )
        spec = self._spec(grid)
        if spec is None:
            return call.dense(query if owned is None else query.index_select(2, owned), key, value)
        image, text = layout.image, layout.text
        img_rows = txt_rows = None
        if owned is not None:  # the owned queries of each stream (sorted: the streams' order is kept)
            img_rows = _rows_in(owned, image)
            txt_rows = None if text is None else _rows_in(owned, text)
        key_image, key_text = layout.key_image, layout.key_text
        q_img, k_img, v_img = query[:, :, image], key[:, :, key_image], value[:, :, key_image]
        k_txt = None if key_text is None else key[:, :, key_text]
        v_txt = None if key_text is None else value[:, :, key_text]
        kwargs = dict(backend=self.config.backend)  # spec and backend checked once, when applied / per grid
        text_keep = _text_keys_kept(call.mask, layout, query.shape[0])
        if owned is not None and img_rows.numel() == 0:
            out_img = q_img.new_zeros(*q_img.shape[:2], 0, v_img.shape[-1])
        elif text_keep is None or k_txt is None:
            out_img = neighborhood_attention_spec(
                q_img, k_img, v_img, spec, additional_keys=k_txt, additional_values=v_txt, query_positions=img_rows,
                **kwargs,
            )  # fmt: skip
        else:  # padded text keys (HunyuanVideo): per batch row, only its real text tokens
            rows = []
            for b in range(query.shape[0]):
                keep = text_keep[b]
                rows.append(
                    neighborhood_attention_spec(
                        q_img[b : b + 1],
                        k_img[b : b + 1],
                        v_img[b : b + 1],
                        spec,
                        additional_keys=k_txt[b : b + 1, :, keep] if keep.any() else None,
                        additional_values=v_txt[b : b + 1, :, keep] if keep.any() else None,
                        **kwargs,
                    )
                )
            out_img = torch.cat(rows, dim=0)
        if text is None:
            return out_img
        q_txt = query[:, :, text] if txt_rows is None else query[:, :, text].index_select(2, txt_rows)
        out_txt = call.dense(q_txt, key, value)  # text queries: everything (with the model's mask)
        parts = [out_txt, out_img] if layout.text_first else [out_img, out_txt]
        return torch.cat(parts, dim=2)


def _rows_in(positions: torch.Tensor, span: slice) -> torch.Tensor:
    """The sorted ``positions`` inside ``span``, relative to its start."""
    inside = positions[(positions >= span.start) & (positions < span.stop)]
    return inside - span.start


def _text_keys_kept(mask: torch.Tensor | None, layout, batch: int) -> torch.Tensor | None:
    """Per batch row, which text keys the model's mask keeps (``None``: no mask / keeps all)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-2] != 1 or mask.shape[1] != 1:
        raise ValueError(
            f"GNA supports key-padding attention masks ([B, 1, 1, N]), got a mask of shape {tuple(mask.shape)}."
        )
    keep = mask[:, 0, 0] if mask.dtype == torch.bool else mask[:, 0, 0] == 0
    keep = keep.expand(batch, -1)
    if layout.key_image is not None and not bool(keep[:, layout.key_image].all()):
        raise ValueError("GNA cannot apply an attention mask that hides image/video tokens.")
    if layout.key_text is None:
        return None
    text_keep = keep[:, layout.key_text]
    return None if bool(text_keep.all()) else text_keep


# ------------------------------------------------------------------------------------------------- apply
AUTO_WINDOW = 0  # window_size=None: about half of each grid axis (auto_window), decided per token grid


def auto_window(length: int) -> int:
    """The default window along an axis of ``length`` tokens: the odd number nearest to half of it, at least 3 and at
    most the axis (``8 -> 5``, ``64 -> 33``, ``4 -> 3``): local enough to change the result, wide enough to keep the
    picture (a ``window_size`` a user gives always wins)."""
    half = length // 2
    return max(1, min(length, max(3, half + 1 if half % 2 == 0 else half)))


def _check_config(window_size, stride, dilation, is_causal, base_size, n_axes: int) -> GNAConfig:
    auto = window_size is None
    where = f" of the model's token grid ({n_axes} here)"
    window = per_axis("window_size", AUTO_WINDOW if auto else window_size, n_axes, where=where)
    stride_t = per_axis("stride", stride, n_axes, where=where)
    dilation_t = per_axis("dilation", dilation, n_axes, where=where)
    causal = per_axis("is_causal", is_causal, n_axes, kind=bool, where=where)
    for name, values, low in (("window_size", window, 2), ("stride", stride_t, 1), ("dilation", dilation_t, 1)):
        for v in values:
            if v < low and not (name == "window_size" and (v == -1 or (auto and v == AUTO_WINDOW))):
                extra = " (or -1 for the full axis)" if name == "window_size" else ""
                raise ValueError(f"`{name}` must be >= {low}{extra} on every axis, got {name}={values}.")
    base = None
    if base_size is not None:
        base = per_axis("base_size", base_size, n_axes, where=where)
        if any(b < 1 and b != -1 for b in base):
            raise ValueError(f"`base_size` must hold positive ints (or -1: no rescaling), got base_size={base}.")
    return GNAConfig(window, stride_t, dilation_t, causal, base)


def _check_dense_steps(dense_steps) -> int | float:
    if isinstance(dense_steps, bool) or not isinstance(dense_steps, (int, float)):
        raise TypeError(f"`dense_steps` must be an int (steps) or a float in [0, 1] (fraction), got {dense_steps!r}.")
    if isinstance(dense_steps, int) and dense_steps < 0:
        raise ValueError(f"`dense_steps` must be >= 0, got dense_steps={dense_steps}.")
    if isinstance(dense_steps, float) and not 0.0 <= dense_steps <= 1.0:
        raise ValueError(
            f"`dense_steps` as a float is a fraction of the schedule in [0, 1], got dense_steps={dense_steps}; "
            "pass an int for a number of steps."
        )
    return dense_steps


def apply_gna(
    pipe_or_model,
    window_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    layers: LayerSpec = None,
    dense_layers: LayerSpec = None,
    dense_steps: int | float = 0,
    base_size: int | Sequence[int] | None = None,
    *,
    backend: str | None = None,
):
    """Replace self-attention of a FLUX, SD3/SD3.5, Wan, HunyuanVideo or CogVideoX denoiser by GNA.

    Paper: https://arxiv.org/abs/2504.16922. Image / video queries attend their neighborhood on the token grid
    (``(H, W)`` for FLUX and SD3, ``(F, H, W)`` for video models; windows per axis, NATTEN semantics) plus all text
    tokens; text queries attend everything. Cross-attention layers (Wan ``attn2``) are left alone.

    Args:
        pipe_or_model: a diffusers pipeline or its denoiser.
        window_size: window per grid axis (int or tuple); ``-1`` = the full axis; ``None`` (default): about half of
            each axis of the actual grid (:func:`auto_window`: 8x8 tokens -> 5x5, 64x64 -> 33x33), so GNA acts on any
            model at any size without settings; give explicit windows for the paper's configurations.
        stride: stride per axis (queries in groups of ``stride`` share a window).
        dilation: dilation per axis.
        is_causal: causal flag per axis (e.g. ``(True, False, False)``: causal in time).
        layers: layers to install on (names, indices, integer-bounded regexes); default all self/joint layers.
        dense_layers: layers among them that keep dense attention (their stock processor).
        dense_steps: keep the first denoising steps dense: an int number of steps, or a float fraction of the
            schedule (steps with ``step_index / num_steps < dense_steps``).
        base_size: grid the window and stride are given for; they are rescaled to the actual grid as in
            Cosmos-Predict2 (``w' = min(max(2, round(w x / b)), x)``, ``s' = min(max(1, round(s x / b)), w')``);
            ``-1`` on an axis: no rescaling there.
        backend: kernel backend (``"reference"``, ``"flex"``, ``"triton"``; default automatic).

    Returns:
        a :class:`~attnpack.ProcessorHandle`; ``handle.remove()`` (or leaving a ``with`` block) restores the
        original processors.

    Example::

        pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
        with attnpack.apply_gna(pipe, window_size=(80, 80), stride=(16, 16), base_size=(256, 256), dense_steps=0.25):
            image = pipe("a lighthouse at dusk", height=4096, width=4096).images[0]
    """
    models, _ = resolve_denoisers(pipe_or_model)
    families = {family_of_model(m) for m in models}
    unsupported = sorted(f for f in families if f not in SUPPORTED_FAMILIES)
    if unsupported:
        raise ValueError(
            f"GNA supports the families {', '.join(SUPPORTED_FAMILIES)}; this pipeline's denoiser is {unsupported[0]}."
        )
    n_axes = {SUPPORTED_FAMILIES[f] for f in families}.pop()
    config = _check_config(window_size, stride, dilation, is_causal, base_size, n_axes)
    config = dataclasses.replace(config, backend=check_backend(backend))
    dense_steps = _check_dense_steps(dense_steps)
    core = GNACore(config, dense_steps)
    kinds = ("self", "joint", "single")
    dense_names: set[str] = set()
    if dense_layers is not None:
        for model in models:
            infos = [i for i in list_layers(model) if i.kind in kinds]
            dense_names |= {i.name for i in select_layers(infos, dense_layers, argument="dense_layers")}

    def factory(info):
        return None if info.name in dense_names else core

    description = f"gna {core!r}"
    handle = apply_processors(
        pipe_or_model, factory, layers, kinds=kinds, processor_cls=GNAAttnProcessor, description=description
    )
    logger.debug("apply_gna: %d layers (%d kept dense) with %r", len(handle.processors), len(dense_names), core)
    return handle


register_technique(
    Technique(
        name="gna",
        summary="generalized neighborhood attention (NATTEN semantics): local windows on the image/video token grid "
        "with stride and dilation, text tokens global; fast block-sparse kernels",
        apply=apply_gna,
        options=(
            Option(
                "window_size",
                "ints",
                None,
                "window per grid axis (int or comma list; -1 = full axis; empty: half of each axis)",
            ),
            Option("stride", "ints", 1, "stride per axis (queries sharing a window)", minimum=1),
            Option("dilation", "ints", 1, "dilation per axis", minimum=1),
            Option("is_causal", "json", False, "causal flag: true/false or a JSON list per axis"),
            Option("layers", "layers", None, "layers to install on (names, indices, regexes); default all"),
            Option("dense_layers", "layers", None, "layers kept dense"),
            Option("dense_steps", "json", 0, "first steps kept dense: an int, or a fraction such as 0.25"),
            Option("base_size", "ints", None, "grid the window/stride are given for (rescaled to the actual grid)"),
            Option("backend", "str", None, "kernel backend", choices=BACKENDS),
        ),
        families=tuple(SUPPORTED_FAMILIES),
        doc="docs/gna.md",
    )
)
