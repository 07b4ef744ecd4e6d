"""IR-Diffusion attention: isolation + reposition self-attention and masked mutual cross-attention.

Paper: He, Wang, Zhou, Cai, Chao, Yin, Yang, *Improving Multi-Subject Consistency in Open-Domain Image Generation
with Isolation and Reposition Attention*, arXiv 2411.19261 (https://arxiv.org/abs/2411.19261). Official code:
``hehuiguo/DreamStory`` (``DreamStoryScaledAttnProcessor``).

One batch holds, per CFG half, ``n`` reference images (one per subject) followed by the multi-subject target. The
batch roles come from attnpack's run context (``run_overrides(roles=[...reference..., target, ...])``) and the masks,
switches and dropout from an :class:`IRAttnState` passed as the ``ir_diffusion`` extra of the same ``run_overrides``
block (see :class:`attnpack.pipelines.ir_diffusion.IRDiffusionPipeline`). Outside such a block the processors are
plain dense attention.

With ``M_i^T`` / ``M_i^R`` the target / reference masks of subject ``i`` at the layer's token grid:

- **Isolation** (every self-attention layer, every step; target rows only): a target query of subject ``i`` never
  attends a target key of subject ``j != i``: boolean mask ``allowed[p, q] = not (M_i^T[p] and M_j^T[q])``.
- **Reposition** (the IR layers): reference ``j``'s subject tokens, cropped to ``bbox(M_j^R)`` and resized (nearest)
  into ``bbox(M_j^T)``, are appended as keys / values that only target queries in ``M_j^T * D_j`` may attend
  (``D_j``: Bernoulli(1 - dropout) token dropout, resampled every step, seeded). Only the relocated keys whose
  relocated mask is on are appended: the masked-out ones would get zero weight anyway.
- **Masked mutual cross-attention** (every cross-attention layer): in target region ``M_i^T`` the output becomes
  ``(1 - lambda) O + lambda A_i``, with ``A_i`` the target queries' cross-attention to subject ``i``'s own prompt.

Everything runs through the processor's dense attention (diffusers' dispatcher: SDPA by default) with one boolean (or
additive, with ``reference_bias``) mask ``[1, 1, N, K]`` shared by all heads and CFG halves: no ``N x N x batch``
score tensor is materialised. References keep plain attention, so they match a vanilla run.

Relocating keys instead of hidden states: the official code relocates the processor's input hidden states and
projects them with ``to_k`` / ``to_v``. Projections act token by token, so on every relocated token whose relocated
mask is on (the only keys that get weight) this equals gathering the reference's own keys and values, which is what
we do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from .context import ROLE_REFERENCE, ROLE_TARGET
from .families import LayerInfo, family_of_model, unet_stage
from .processor import AttentionCall, AttnPackProcessor, ProcessorHandle, apply_processors, list_layers, select_layers


__all__ = [
    "STATE_KEY",
    "IRAttnState",
    "IRDiffusionAttnProcessor",
    "IsolationRepositionCore",
    "MaskedMutualCrossCore",
    "apply_ir_diffusion",
    "default_ir_layers",
    "mask_bbox",
    "reposition_index",
    "reposition_tokens",
    "resolve_ir_layers",
]

STATE_KEY = "ir_diffusion"


# ------------------------------------------------------------------------------------------------- geometry
def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (end exclusive) of the ``True`` pixels of a ``[H, W]`` mask, or ``None``."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def reposition_index(reference_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Where Reposition Attention takes each target token from.

    Args:
        reference_mask, target_mask: ``bool [h, w]`` masks of one subject on the same token grid.

    Returns:
        ``long [h * w]``: for each token inside ``bbox(target_mask)``, the (row-major) index of the reference token
        that a nearest resize (``F.interpolate(mode="nearest")``) of the crop ``bbox(reference_mask)`` to the size of
        ``bbox(target_mask)`` puts there; ``-1`` outside the box, or everywhere if either mask is empty.
    """
    h, w = target_mask.shape
    out = torch.full((h * w,), -1, dtype=torch.long)
    rbox, tbox = mask_bbox(reference_mask.cpu()), mask_bbox(target_mask.cpu())
    if rbox is None or tbox is None:
        return out
    rx0, ry0, rx1, ry1 = rbox
    tx0, ty0, tx1, ty1 = tbox
    crop_w = rx1 - rx0
    # resize a map of crop indices with the very interpolation the official code applies to the features
    crop = torch.arange((ry1 - ry0) * crop_w, dtype=torch.float32).view(1, 1, ry1 - ry0, crop_w)
    src = F.interpolate(crop, size=(ty1 - ty0, tx1 - tx0), mode="nearest")[0, 0].long()
    src = (src // crop_w + ry0) * w + (src % crop_w + rx0)
    dst = torch.arange(ty0, ty1)[:, None] * w + torch.arange(tx0, tx1)[None, :]
    out[dst.flatten()] = src.flatten()
    return out


def reposition_tokens(tokens: torch.Tensor, reference_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The relocated reference features ``X~^R`` of Reposition Attention.

    Args:
        tokens: reference features ``[..., h * w, C]`` (row-major tokens).
        reference_mask, target_mask: ``bool [h, w]``.

    Returns:
        ``[..., h * w, C]``: zeros, except inside ``bbox(target_mask)`` where ``tokens * reference_mask`` cropped to
        ``bbox(reference_mask)`` lands after a nearest resize. As in the official code, an empty target mask returns
        ``tokens`` unchanged; an empty reference mask gives zeros.
    """
    if not bool(target_mask.any()):
        return tokens
    index = reposition_index(reference_mask, target_mask).to(tokens.device)
    masked = tokens * reference_mask.flatten().to(tokens.device, tokens.dtype)[:, None]
    out = torch.zeros_like(tokens)
    inside = index >= 0
    out[..., inside, :] = masked[..., index[inside], :]
    return out


# ------------------------------------------------------------------------------------------------- state
class MaskProvider(Protocol):
    """Masks of ``n`` subjects per token grid (e.g. :class:`attnpack.pipelines.ir_masks.SubjectMasks`)."""

    @property
    def num_subjects(self) -> int: ...

    def at(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reference, target)`` masks, each ``bool [n, h * w]``."""
        ...


@dataclasses.dataclass(frozen=True)
class _Group:
    references: tuple[int, ...]  # batch rows of reference 0..n-1
    target: int  # batch row of the target


@dataclasses.dataclass
class _GridMasks:
    reference: torch.Tensor  # bool [n, N]
    target: torch.Tensor  # bool [n, N]
    allowed: torch.Tensor | None  # bool [N, N]: isolation mask of the target block (None: no subjects overlap)
    positions: list[torch.Tensor]  # per subject: target positions of its relocated reference keys
    sources: list[torch.Tensor]  # per subject: the reference tokens they come from


@dataclasses.dataclass
class _TargetLayout:
    blocks: list[tuple[int, torch.Tensor]]  # (subject j, reference-j token indices of its appended keys)
    mask: torch.Tensor | None  # [1, 1, N, K] boolean (or additive with a reference bias); None: plain attention
    key_subject: torch.Tensor  # [K]: j for reference-j keys, -1 for the target's own keys
    key_position: torch.Tensor  # [K]: target token position of each key


@dataclasses.dataclass
class IRAttnState:
    """Per-generation IR-Diffusion state, owned by the pipeline and passed to the processors through
    ``run_overrides(roles=..., ir_diffusion=state)``.

    Args:
        masks: reference / target masks of the ``n`` subjects per token grid (a :class:`MaskProvider`).
        isolation: Isolation Attention in the target's self-attention (all self-attention layers).
        reposition: move reference features into the target boxes at the IR layers. ``False`` keeps the extended
            attention with un-moved reference keys masked by ``M_j^R * D_j`` (the official
            ``is_rescale_self_attn=False``, i.e. DreamStory's masked extended attention).
        mutual_cross_attention: masked mutual cross-attention (official ``is_mutual_cross_attn``).
        dropout: probability of dropping a target query token from the reference attention (official 0.5).
        dropout_seed: seed of the dropout masks (one draw per step and token grid).
        cross_attention_lambda: blend weight of the mutual cross-attention (official 0.9).
        reference_bias: additive bias on the allowed reference logits (official ``ref_sa_lambda``, default 0).
        ir_steps: ``(start, end)`` fractions of the schedule during which the IR layers use the extended attention
            (official: all steps).
        observer: test / debugging hook ``observer(kind, call, q, k, v, out, info)`` called after each target
            computation (``kind`` is ``"self"`` or ``"cross"``); ``info`` holds the keys, values and mask used.
    """

    masks: MaskProvider
    isolation: bool = True
    reposition: bool = True
    mutual_cross_attention: bool = True
    dropout: float = 0.5
    dropout_seed: int = 0
    cross_attention_lambda: float = 0.9
    reference_bias: float = 0.0
    ir_steps: tuple[float, float] = (0.0, 1.0)
    observer: Callable[..., None] | None = None

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= self.cross_attention_lambda <= 1.0:
            raise ValueError(f"`cross_attention_lambda` must be in [0, 1], got {self.cross_attention_lambda!r}.")
        lo, hi = self.ir_steps
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"`ir_steps` must be (start, end) with 0 <= start < end <= 1, got {self.ir_steps!r}.")
        self._grids: dict[tuple, _GridMasks] = {}
        self._groups: dict[tuple[str, ...], list[_Group]] = {}
        self._keep: dict[tuple, torch.Tensor] = {}
        self._layouts: dict[tuple, _TargetLayout] = {}

    @property
    def num_subjects(self) -> int:
        return self.masks.num_subjects

    # ---------------------------------------------------------------- batch layout
    def groups(self, roles: Sequence[str]) -> list[_Group]:
        """Split the batch roles into ``(references, target)`` groups (one per CFG half)."""
        roles = tuple(roles)
        if roles not in self._groups:
            n, groups, refs = self.num_subjects, [], []
            for row, role in enumerate(roles):
                if role == ROLE_REFERENCE:
                    refs.append(row)
                elif role == ROLE_TARGET and len(refs) == n:
                    groups.append(_Group(tuple(refs), row))
                    refs = []
                else:
                    groups = []
                    break
            if not groups or refs:
                raise ValueError(
                    f"IR-Diffusion needs batch roles made of groups of {n} 'reference' rows followed by one 'target' "
                    f"row (set them with run_overrides(roles=...) matching the batch size), got roles={roles}."
                )
            self._groups[roles] = groups
        return self._groups[roles]

    # ---------------------------------------------------------------- masks per grid
    def grid_masks(self, grid: tuple[int, int], device: torch.device) -> _GridMasks:
        key = (tuple(grid), str(device))
        if key not in self._grids:
            reference, target = self.masks.at(tuple(grid))
            h, w = grid
            n = reference.shape[0]
            allowed = None
            if n > 1 and self.isolation:
                blocked = torch.zeros(h * w, h * w, dtype=torch.bool)
                for i in range(n):
                    others = target[[j for j in range(n) if j != i]].any(0)
                    blocked |= target[i][:, None] & others[None, :]
                allowed = ~blocked if bool(blocked.any()) else None
            positions, sources = [], []
            for j in range(n):
                index = reposition_index(reference[j].view(h, w), target[j].view(h, w))
                inside = index >= 0
                keep = inside.clone()
                keep[inside] = reference[j][index[inside]]  # relocated reference mask
                pos = torch.nonzero(keep).flatten()
                positions.append(pos.to(device))
                sources.append(index[pos].to(device))
            self._grids[key] = _GridMasks(
                reference.to(device),
                target.to(device),
                None if allowed is None else allowed.to(device),
                positions,
                sources,
            )
        return self._grids[key]

    def keep_mask(self, grid: tuple[int, int], step: int | None, device: torch.device) -> torch.Tensor:
        """Token dropout ``D``: ``bool [n, h * w]``, ``True`` = kept; one seeded draw per (step, grid)."""
        h, w = grid
        n = self.num_subjects
        if self.dropout == 0:
            return torch.ones(n, h * w, dtype=torch.bool, device=device)
        step = step or 0
        key = (step, h, w, str(device))
        if key not in self._keep:
            if len(self._keep) > 16:  # masks of earlier steps are never needed again
                self._keep.clear()
            seed = (self.dropout_seed * 1_000_003 + step * 10_007 + h * 101 + w) % (2**63 - 1)
            generator = torch.Generator().manual_seed(seed)
            self._keep[key] = (torch.rand(n, h * w, generator=generator) >= self.dropout).to(device)
        return self._keep[key]

    def target_layout(
        self, grid: tuple[int, int], step: int | None, extended: bool, dtype: torch.dtype, device: torch.device
    ) -> _TargetLayout:
        """Which reference keys the target queries get and the mask of the target's SDPA call (shared by every layer
        of a grid within a step, so it is built once per step)."""
        key = (tuple(grid), step if extended else None, extended, dtype, str(device))
        if key in self._layouts:
            return self._layouts[key]
        if len(self._layouts) > 16:  # entries of earlier steps are never needed again
            self._layouts.clear()
        gm = self.grid_masks(grid, device)
        n_tok = grid[0] * grid[1]
        blocks, mask_blocks, subjects, positions = [], [], [], []
        if extended:
            keep = self.keep_mask(grid, step, device)
            for j in range(self.num_subjects):
                query_ok = gm.target[j] & keep[j]
                if not bool(query_ok.any()):  # official: an all-dropped mask falls back to the full mask
                    query_ok = gm.target[j]
                if self.reposition:
                    pos, src = gm.positions[j], gm.sources[j]
                else:
                    key_ok = gm.reference[j] & keep[j]
                    if not bool(key_ok.any()):
                        key_ok = gm.reference[j]
                    pos = src = torch.nonzero(key_ok).flatten()
                if pos.numel() == 0 or not bool(query_ok.any()):
                    continue  # no target region or no reference subject at this grid: the block gets no weight
                blocks.append((j, src))
                mask_blocks.append(query_ok[:, None].expand(n_tok, pos.numel()))
                subjects.append(torch.full_like(pos, j))
                positions.append(pos)
        own = gm.allowed if self.isolation else None
        mask = None
        if blocks or own is not None:
            if own is None:
                own = torch.ones(n_tok, n_tok, dtype=torch.bool, device=device)
            allowed = torch.cat([*mask_blocks, own], dim=1) if blocks else own
            mask = allowed
            if self.reference_bias and blocks:
                bias = torch.zeros(allowed.shape[1], dtype=dtype, device=device)
                bias[: allowed.shape[1] - n_tok] = self.reference_bias
                mask = torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=dtype, device=device))
            mask = mask[None, None]
        own_pos = torch.arange(n_tok, device=device)
        layout = _TargetLayout(
            blocks,
            mask,
            torch.cat([*subjects, torch.full_like(own_pos, -1)]),
            torch.cat([*positions, own_pos]),
        )
        self._layouts[key] = layout
        return layout

    def extended_active(self, run) -> bool:
        progress = None if run is None else run.progress
        return progress is None or self.ir_steps[0] <= progress < self.ir_steps[1]


def _state(call: AttentionCall) -> IRAttnState | None:
    run = call.run
    return None if run is None else run.extras.get(STATE_KEY)


def _grid(call: AttentionCall) -> tuple[int, int]:
    grid = call.layout.grid
    if grid is None or len(grid) != 2:
        raise ValueError(f"IR-Diffusion needs the token grid of layer {call.layer.name!r}; got {grid!r}.")
    return tuple(grid)


def _no_model_mask(call: AttentionCall) -> None:
    if call.mask is not None:
        raise ValueError(
            f"IR-Diffusion does not support attention masks from the model (layer {call.layer.name!r}); "
            "SDXL-architecture UNets pass none."
        )


# ------------------------------------------------------------------------------------------------- cores
class IsolationRepositionCore:
    """Self-attention core of IR-Diffusion (``attn1``).

    Reference rows (and everything outside an IR-Diffusion run): dense attention. Target rows: Isolation Attention;
    at IR layers (``extended=True``) also the relocated reference keys of every subject (Reposition Attention).
    ``q``, ``k``, ``v``: ``[B, H, N, D]``.
    """

    def __init__(self, extended: bool):
        self.extended = extended

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        state = _state(call)
        if state is None:
            return call.dense(q, k, v)
        _no_model_mask(call)
        groups = state.groups(call.run.roles)
        grid = _grid(call)
        extended = self.extended and state.extended_active(call.run)
        targets = [g.target for g in groups]
        others = [r for r in range(q.shape[0]) if r not in targets]

        out = torch.empty_like(q)
        if others:
            out[others] = call.dense(q[others], k[others], v[others], mask=None)
        layout = state.target_layout(grid, call.run.step_index, extended, q.dtype, q.device)
        keys, values = k[targets], v[targets]
        if layout.blocks:
            refs = [[g.references[j] for g in groups] for j, _ in layout.blocks]
            keys = torch.cat([*(k[r][:, :, src] for r, (_, src) in zip(refs, layout.blocks)), keys], dim=2)
            values = torch.cat([*(v[r][:, :, src] for r, (_, src) in zip(refs, layout.blocks)), values], dim=2)
        out[targets] = call.dense(q[targets], keys, values, mask=layout.mask)
        if state.observer is not None:
            info = dict(keys=keys, values=values, mask=layout.mask, targets=targets, extended=extended)
            info.update(key_subject=layout.key_subject, key_position=layout.key_position)
            state.observer("self", call, q, k, v, out, info)
        return out

    def __repr__(self) -> str:
        return f"IsolationRepositionCore(extended={self.extended})"


class MaskedMutualCrossCore:
    """Cross-attention core of IR-Diffusion (``attn2``): in target region ``M_i^T`` the output is blended towards the
    target queries' cross-attention with subject ``i``'s reference prompt, ``O <- (1 - lambda) O + lambda A_i``
    (``A`` averaged where masks overlap). The blend is applied before ``to_out``, which is affine, so it equals the
    official blend after ``to_out``. ``q``: ``[B, H, N, D]``; ``k``, ``v``: ``[B, H, T, D]``.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        out = call.dense(q, k, v)
        state = _state(call)
        if state is None or not state.mutual_cross_attention or state.cross_attention_lambda == 0:
            return out
        _no_model_mask(call)
        groups = state.groups(call.run.roles)
        gm = state.grid_masks(_grid(call), q.device)
        if not bool(gm.target.any()):
            return out
        n = state.num_subjects
        targets = [g.target for g in groups]
        rows = [g.references[j] for g in groups for j in range(n)]
        g_, h, n_tok, d = len(groups), q.shape[1], q.shape[2], q.shape[3]
        queries = q[targets].unsqueeze(1).expand(g_, n, h, n_tok, d).reshape(g_ * n, h, n_tok, d)
        mutual = call.dense(queries, k[rows], v[rows], mask=None).view(g_, n, h, n_tok, d)
        weight = gm.target.to(q.dtype)  # [n, N]
        area = weight.sum(0)
        mean = (mutual * weight[None, :, None, :, None]).sum(1) / (area + 1e-8)[None, None, :, None]
        lam = state.cross_attention_lambda
        inside = (area > 0)[None, None, :, None]
        out = out.clone()
        out[targets] = torch.where(inside, (1 - lam) * out[targets] + lam * mean, out[targets])
        if state.observer is not None:
            state.observer("cross", call, q, k, v, out, {"mutual": mutual, "targets": targets})
        return out

    def __repr__(self) -> str:
        return "MaskedMutualCrossCore()"


class IRDiffusionAttnProcessor(AttnPackProcessor):
    """UNet attention processor running an IR-Diffusion core (see the module docstring)."""

    technique = "ir-diffusion"


# ------------------------------------------------------------------------------------------------- layers
def _self_layers(unet: torch.nn.Module) -> list[LayerInfo]:
    return [info for info in list_layers(unet) if info.kind == "self"]


def default_ir_layers(unet: torch.nn.Module) -> list[str]:
    """Default IR layers (Reposition + extended attention) of a UNet, as module names.

    Official (SDXL / Playground v2.5, 70 self-attention layers): self-attention blocks 36-69 in call order, i.e. the
    decoder from ``up_blocks.0.attentions.0.transformer_blocks.2.attn1`` on (36 decoder layers minus the first 2).
    Rule for any UNet: the decoder (``up_blocks``) self-attention layers, minus the first ``floor(n_decoder / 18)``;
    on SDXL this is exactly the official set, on smaller UNets (e.g. the tiny test UNet, 4 decoder layers) it is the
    whole decoder.
    """
    decoder = [info.name for info in _self_layers(unet) if unet_stage(info.name) == "up"]
    return decoder[len(decoder) // 18 :]


def resolve_ir_layers(unet: torch.nn.Module, ir_layers) -> set[str]:
    """The module names selected by ``ir_layers`` (see :func:`apply_ir_diffusion`); raises for unknown layers."""
    if ir_layers is None:
        return set(default_ir_layers(unet))
    if isinstance(ir_layers, (list, tuple)) and len(ir_layers) == 0:
        return set()
    return {info.name for info in select_layers(_self_layers(unet), ir_layers, argument="ir_layers")}


def apply_ir_diffusion(pipe_or_unet, ir_layers=None) -> ProcessorHandle:
    """Install IR-Diffusion processors on every attention layer of an SDXL-architecture UNet.

    ``attn1`` layers get :class:`IsolationRepositionCore` (extended at ``ir_layers``), ``attn2`` layers
    :class:`MaskedMutualCrossCore`. They act only on denoiser calls made inside
    ``run_overrides(roles=[...], ir_diffusion=IRAttnState(...))`` and are plain dense attention otherwise.

    Args:
        pipe_or_unet: a diffusers pipeline with a ``unet`` or the UNet itself.
        ir_layers: self-attention layers with Reposition Attention: ``None`` (default,
            :func:`default_ir_layers`), ``[]`` (none: isolation only), or names / indices (among the self-attention
            layers) / regexes as in :func:`attnpack.apply_processors`.

    Returns:
        a :class:`~attnpack.ProcessorHandle` restoring the previous processors.
    """
    from .processor import resolve_denoisers

    models, _ = resolve_denoisers(pipe_or_unet)
    unet = models[0]
    if family_of_model(unet) != "unet":
        raise ValueError(
            f"IR-Diffusion needs a UNet (SDXL architecture), got {type(unet).__name__}; "
            "DiT models (SD3, FLUX, ...) are not supported."
        )
    chosen = resolve_ir_layers(unet, ir_layers)

    def factory(info: LayerInfo):
        if info.kind == "self":
            return IsolationRepositionCore(extended=info.name in chosen)
        if info.kind == "cross":
            return MaskedMutualCrossCore()
        return None

    return apply_processors(pipe_or_unet, factory, processor_cls=IRDiffusionAttnProcessor, description="IR-Diffusion")
