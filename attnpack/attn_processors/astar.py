"""Cross-attention store for A-STAR (Agarwal et al., ICCV 2023, https://arxiv.org/abs/2306.14544).

A-STAR optimises the latent with losses on the cross-attention maps of the concept tokens. Those maps come from the
UNet's cross-attention (``attn2``) layers at one resolution (SD 1.x/2.x at 512 px: the five 16x16 layers; SDXL at
1024 px: the 32x32 layers). This module installs :class:`AStarAttnProcessor` on exactly those layers; every other layer
keeps its own processor (stock SDPA).

The processor's core computes attention with diffusers' dispatcher (bit-identical to the stock processor) and, when
the denoiser call carries a :class:`CrossAttentionStore` in its run context (``run_overrides(astar_store=store)``),
additionally computes the attention probabilities of the conditional rows explicitly: ``softmax(q k^T / sqrt(d))``,
``[B, H, N_q, 77]``, averaged over heads and kept with their autograd graph. These are small (``N_q x 77`` per head),
unlike the ``N_q x N_q`` self-attention maps that diffusers' Attend-and-Excite materialises on every layer.

Which layers sit at which grid is derived from the UNet's structure (:func:`unet_cross_attention_grids`) and checked at
run time against the grid the run context reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from .context import ROLE_COND
from .families import unet_layer_grids
from .processor import (
    AttentionCall,
    AttnPackProcessor,
    ObserverCore,
    ProcessorHandle,
    apply_processors,
    list_layers,
    resolve_denoisers,
)


logger = logging.getLogger(__name__)

__all__ = [
    "AStarAttnProcessor",
    "CrossAttentionStore",
    "CrossAttentionStoreCore",
    "StoreComplete",
    "STORE_KEY",
    "unet_cross_attention_grids",
    "default_attn_res",
    "select_store_layers",
    "apply_cross_attention_store",
    "cross_attention_probs",
]

# key of the store in ``RunState.extras`` (set with ``run_overrides(**{STORE_KEY: store})``)
STORE_KEY = "astar_store"


class StoreComplete(Exception):
    """Raised by a store with ``stop_when_complete=True`` once every expected layer was recorded.

    The A-STAR gradient pass needs the UNet only up to its last target layer; stopping there saves the rest of the
    forward (at SD 1.x 512 px: the 32x32 and 64x64 up blocks) without changing the loss or its gradient.
    """


class AStarAttnProcessor(AttnPackProcessor):
    """UNet cross-attention processor that also records attention probabilities for A-STAR."""

    technique = "a-star"


def cross_attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``softmax(q k^T / sqrt(d) + mask)`` in float32.

    Args:
        query: ``[B, H, N_q, D]``.
        key: ``[B, H, N_k, D]``.
        mask: ``None``, a boolean mask (``True`` = attend) or an additive mask broadcastable to ``[B, H, N_q, N_k]``.

    Returns:
        ``[B, H, N_q, N_k]`` float32 probabilities (differentiable).
    """
    scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


class CrossAttentionStore:
    """Head-averaged cross-attention probabilities of one denoiser call, for the layers in ``layers``.

    Args:
        layers: ``{layer name: (h, w)}``, the layers expected to report and the grid each must have.
        stop_when_complete: raise :class:`StoreComplete` once all layers reported (ends the forward early).

    After the call, :meth:`average` returns the maps averaged over heads and layers as ``[B_cond, h, w, N_k]`` (only
    the batch rows whose role is ``"cond"`` are recorded).
    """

    def __init__(self, layers: Mapping[str, tuple[int, int]], *, stop_when_complete: bool = False):
        if not layers:
            raise ValueError("`layers` must name at least one cross-attention layer.")
        grids = set(layers.values())
        if len(grids) != 1:
            raise ValueError(f"all store layers must share one grid, got {sorted(grids)}.")
        self.layers = dict(layers)
        self.grid: tuple[int, int] = next(iter(grids))
        self.stop_when_complete = stop_when_complete
        self.maps: dict[str, torch.Tensor] = {}

    @property
    def complete(self) -> bool:
        return len(self.maps) == len(self.layers)

    def record(self, query: torch.Tensor, key: torch.Tensor, call: AttentionCall) -> None:
        """Store the head-averaged probabilities ``[B_cond, N_q, N_k]`` of the conditional rows of this call."""
        name = call.layer.name
        if name not in self.layers:
            return
        expected = self.layers[name]
        if tuple(call.layout.grid or ()) != expected:
            raise RuntimeError(
                f"A-STAR store: layer {name!r} ran at grid {call.layout.grid}, expected {expected}; "
                "the UNet's level structure is not the one unet_cross_attention_grids assumes."
            )
        if name in self.maps:
            raise RuntimeError(f"A-STAR store: layer {name!r} ran twice in one denoiser call.")
        rows = call.run.rows(ROLE_COND) if call.run is not None and call.run.roles else list(range(query.shape[0]))
        if len(rows) != query.shape[0]:
            query, key = query[rows], key[rows]
            mask = call.mask[rows] if call.mask is not None and call.mask.shape[0] > 1 else call.mask
        else:
            mask = call.mask
        self.maps[name] = cross_attention_probs(query, key, mask).mean(dim=1)
        if self.stop_when_complete and self.complete:
            raise StoreComplete

    def average(self) -> torch.Tensor:
        """Maps averaged over heads and layers: ``[B_cond, h, w, N_k]`` float32."""
        missing = sorted(set(self.layers) - set(self.maps))
        if missing:
            raise RuntimeError(f"A-STAR store: layers {missing} did not run in this denoiser call.")
        stacked = torch.stack([self.maps[name] for name in self.layers])  # [L, B, N_q, N_k]
        mean = stacked.mean(dim=0)
        return mean.reshape(mean.shape[0], *self.grid, mean.shape[-1])


class CrossAttentionStoreCore(ObserverCore):
    """Observer feeding the :class:`CrossAttentionStore` of the run context; alone on a layer it runs dense attention
    (through diffusers' dispatcher). Outside a call carrying a store (``run_overrides(astar_store=...)``) it records
    nothing.
    """

    def observe(self, query, key, value, call: AttentionCall, out: torch.Tensor) -> None:
        store = call.run.extras.get(STORE_KEY) if call.run is not None else None
        if store is not None:
            store.record(query, key, call)

    def __repr__(self) -> str:
        return "CrossAttentionStoreCore()"


# ------------------------------------------------------------------------------------------------- layer grids
def unet_cross_attention_grids(unet: torch.nn.Module, latent_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Grid ``(h, w)`` of every cross-attention layer of a ``UNet2DConditionModel`` for a latent of ``latent_size``
    (:func:`~attnpack.attn_processors.families.unet_layer_grids`, the UNet adapter's knowledge of its levels)."""
    try:
        grids = unet_layer_grids(unet, latent_size)
    except TypeError as exc:
        raise TypeError(f"A-STAR {exc}") from None
    return {info.name: grids[info.name] for info in list_layers(unet) if info.kind == "cross" and info.name in grids}


def default_attn_res(grids: Mapping[str, tuple[int, int]], image_size: tuple[int, int]) -> tuple[int, int]:
    """The map resolution A-STAR uses when ``attn_res`` is not given.

    As diffusers' Attend-and-Excite with ``attn_res=None``: ``(ceil(height / 32), ceil(width / 32))``, i.e. 16x16 for
    SD 1.x at 512 px and 32x32 for SDXL at 1024 px. If the UNet has no cross-attention layer at that grid (small models
    or unusual sizes), the available grid with the closest token count (on a log scale; ties go to the finer grid).
    """
    target = (math.ceil(image_size[0] / 32), math.ceil(image_size[1] / 32))
    available = sorted(set(grids.values()), key=lambda g: -math.prod(g))
    if not available:
        raise ValueError("this UNet has no cross-attention layers; A-STAR needs text cross-attention.")
    if target in available:
        return target
    best = min(available, key=lambda g: abs(math.log(math.prod(g) / math.prod(target))))
    logger.info("A-STAR: no cross-attention layer at %s; using the closest grid %s", target, best)
    return best


def select_store_layers(
    unet: torch.nn.Module,
    latent_size: tuple[int, int],
    image_size: tuple[int, int],
    attn_res: int | Sequence[int] | None = None,
) -> dict[str, tuple[int, int]]:
    """The cross-attention layers at ``attn_res`` (default: :func:`default_attn_res`), as ``{name: (h, w)}``."""
    grids = unet_cross_attention_grids(unet, latent_size)
    if attn_res is None:
        res = default_attn_res(grids, image_size)
    else:
        if isinstance(attn_res, bool) or not (
            isinstance(attn_res, int)
            or (
                isinstance(attn_res, Sequence)
                and len(attn_res) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in attn_res)
            )
        ):
            raise TypeError(f"`attn_res` must be an int or a pair of ints (h, w), got {attn_res!r}.")
        res = (attn_res, attn_res) if isinstance(attn_res, int) else (int(attn_res[0]), int(attn_res[1]))
    chosen = {name: grid for name, grid in grids.items() if grid == res}
    if not chosen:
        available = sorted({g for g in grids.values()}, key=lambda g: -math.prod(g))
        raise ValueError(
            f"`attn_res` {res} matches no cross-attention layer of this UNet for a {latent_size[0]}x{latent_size[1]} "
            f"latent; available grids: {', '.join(f'{h}x{w}' for h, w in available)}."
        )
    return chosen


def apply_cross_attention_store(pipe_or_unet, layers: Iterable[str]) -> ProcessorHandle:
    """Install :class:`AStarAttnProcessor` (with :class:`CrossAttentionStoreCore`) on exactly the named layers.

    Returns the restore handle; every other layer keeps its processor. A diffusers attention backend set on a replaced
    layer's processor (e.g. by :func:`attnpack.set_attention_backend`) carries over.
    """
    models, _ = resolve_denoisers(pipe_or_unet)
    names = list(layers)
    if not names:
        raise ValueError("`layers` must name at least one cross-attention layer.")
    handle = apply_processors(
        pipe_or_unet if len(models) == 1 else models[0],
        CrossAttentionStoreCore(),
        layers=names,
        kinds=("cross",),
        processor_cls=AStarAttnProcessor,
        description="A-STAR cross-attention store",
    )
    return handle  # a backend chosen with set_attention_backend on these layers carries over (apply_processors)
