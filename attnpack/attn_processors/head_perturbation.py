"""Head-level attention perturbation (SoftPAG / HeadHunter): the attention core and the head specification.

For the *perturbed* batch rows and the *selected heads* of a layer, the attention map ``A`` is replaced by
``(1 - u) A + u A'`` (SoftPAG, Eq. 7 of HeadHunter), where ``A'`` is the perturbation target and ``u`` the softness.
Attention is linear in ``A``, so the head output becomes ``(1 - u) * SDPA(q, k, v) + u * A' v``; ``A' v`` is computed
without materialising an ``N x N`` map:

==============  ==========================================  ===============================================
``kind``        ``token_scope="full"`` (HeadHunter)          ``token_scope="image"`` (diffusers PAG)
==============  ==========================================  ===============================================
``identity``    ``A' = I``: every token attends itself,      image queries attend only themselves among the
                ``A' v = v`` (PAG)                           image keys, plus every text key with its logit
``uniform``     ``A' = 1/N``: ``A' v = mean_keys(v)``        the image-key logits of an image query are
                                                             replaced by their mean (``q . mean(k_img)``)
``query_mean``  every query replaced by the mean query       image queries replaced by the mean image query
                (SEG's infinite-blur limit)                  (HeadHunter ``smoothed_energy@img``)
==============  ==========================================  ===============================================

With ``token_scope="image"`` text queries keep their attention, and the image-scope targets are logit
perturbations followed by the softmax, exactly like diffusers' ``PAGJointAttnProcessor2_0`` for ``identity``. The
text keys are reached through diffusers' attention dispatcher with one extra key that carries the image part, so no
``N_img x N_text`` map is stored either. On layers without text tokens (UNet and Wan self-attention) both scopes are
the same.

Layer index of a head ``(layer, head)``, per family (:func:`perturbable_layers`):

- SD3 / SD3.5: the joint ``attn`` of transformer block ``layer`` (SD3.5's extra ``attn2`` is never perturbed);
- FLUX.1: the global index over double-stream blocks (``0..18``) then single-stream blocks (``19..56``);
- UNet (SD 1.x / SDXL): the order of the self-attention ``attn1`` modules in ``unet.attn_processors``;
- Wan: the self-attention ``attn1`` of block ``layer``.

Papers: HeadHunter / SoftPAG, https://arxiv.org/abs/2506.10978 ; PAG, https://arxiv.org/abs/2403.17377 ;
SEG, https://arxiv.org/abs/2408.00760 .
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

import torch

from .context import ROLE_PERTURBED
from .families import LayerInfo, TokenLayout, dense_attention, family_of_model
from .processor import (
    AttentionCall,
    AttnPackProcessor,
    ModifierCore,
    ProcessorHandle,
    apply_processors,
    list_layers,
    resolve_denoisers,
)


__all__ = [
    "KINDS",
    "TOKEN_SCOPES",
    "PERTURBABLE_KINDS",
    "HeadPerturbationCore",
    "HeadPerturbationAttnProcessor",
    "HeadSpec",
    "perturbation_target",
    "blend_heads",
    "perturbable_layers",
    "parse_heads",
    "resolve_heads",
    "format_heads",
    "install_head_perturbation",
]

KINDS = ("identity", "uniform", "query_mean")
TOKEN_SCOPES = ("full", "image")

# the attention layers that carry HeadHunter's layer index, per family (LayerInfo.kind values)
PERTURBABLE_KINDS: dict[str, tuple[str, ...]] = {
    "unet": ("self",),
    "sd3": ("joint",),
    "flux": ("joint", "single"),
    "wan": ("self",),
}
_LAYER_DESCRIPTION = {
    "unet": "self-attention `attn1` modules, in `unet.attn_processors` order",
    "sd3": "joint attention `transformer_blocks.N.attn` (SD3.5 `attn2` excluded)",
    "flux": "double-stream blocks first, then single-stream blocks",
    "wan": "self-attention `blocks.N.attn1`",
}

HeadSpec = Union[str, int, tuple, Iterable[Union[str, int, tuple]]]
Dense = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------------------------------- math
def _check_kind_scope(kind: str, token_scope: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, got {kind!r}.")
    if token_scope not in TOKEN_SCOPES:
        raise ValueError(f"`token_scope` must be one of {', '.join(TOKEN_SCOPES)}, got {token_scope!r}.")


def _key_columns(mask: torch.Tensor | None, cols: slice, rows: slice | None) -> torch.Tensor | None:
    """``mask[..., rows, cols]`` keeping broadcast dimensions of size 1."""
    if mask is None:
        return None
    if rows is not None and mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask[..., cols]


def _append_key_column(mask: torch.Tensor | None, n_rows: int) -> torch.Tensor | None:
    """Append an always-visible key column to a bool (True = keep) or additive float mask."""
    if mask is None:
        return None
    shape = (*mask.shape[:-2], mask.shape[-2], 1)
    extra = torch.ones(shape, dtype=torch.bool, device=mask.device)
    if mask.dtype != torch.bool:
        extra = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, extra], dim=-1)


def _attend_with_extra_key(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    extra_logit: torch.Tensor,
    extra_value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    dense: Dense,
) -> torch.Tensor:
    """Attention of ``query`` over ``key`` plus one extra key per query whose logit and value are given.

    ``query [b, h, n, d]``, ``key/value [b, h, m, d]``, ``extra_logit [b, h, n]`` (already scaled),
    ``extra_value [b, h, n or 1, d]``. Computed with one dense attention call on head dimension ``d + 2`` (padded to
    a multiple of 8 for fused kernels): the extra key is 1 on the two added channels, where the query carries
    ``extra_logit / scale`` split into a rounded part and its remainder (so half precision keeps the logit to about
    16 bits); the extra value is 1 on the first added channel, whose output is the extra key's weight ``w``. The
    result is ``out[..., :d] + w * extra_value``.
    """
    b, h, n, d = query.shape
    m = key.shape[-2]
    d_aug = -(-(d + 2) // 8) * 8
    dtype = query.dtype
    logit = extra_logit.float() / scale
    high = logit.to(dtype)
    low = (logit - high.float()).to(dtype)
    q_aug = torch.cat([query, high.unsqueeze(-1), low.unsqueeze(-1), query.new_zeros(b, h, n, d_aug - d - 2)], dim=-1)
    unit_k = query.new_zeros(b, h, 1, d_aug)
    unit_k[..., d : d + 2] = 1
    unit_v = query.new_zeros(b, h, 1, d_aug)
    unit_v[..., d] = 1
    k_aug = torch.cat([torch.cat([key, key.new_zeros(b, h, m, d_aug - d)], dim=-1), unit_k], dim=-2)
    v_aug = torch.cat([torch.cat([value, value.new_zeros(b, h, m, d_aug - d)], dim=-1), unit_v], dim=-2)
    out = dense(q_aug, k_aug, v_aug, mask=_append_key_column(mask, n), scale=scale)
    return out[..., :d] + out[..., d : d + 1] * extra_value


# image queries per chunk of the image-scope targets: bounds the extra memory to about one chunk of queries
QUERY_CHUNK = 1024


def _check_layout(query: torch.Tensor, key: torch.Tensor, layout: TokenLayout, token_scope: str) -> bool:
    """Whether the image-scope path applies (joint image + text layout); raises for unsupported layouts."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    if n_q != n_k:
        raise ValueError(
            f"head perturbation needs self- or joint attention (as many keys as queries), got {n_q=}, {n_k=}."
        )
    if token_scope == "full" or layout.text is None or layout.num_text == 0:
        return False
    if layout.image is None or layout.key_image != layout.image or layout.key_text != layout.text:
        raise ValueError(f"`token_scope='image'` needs a joint image + text layout, got {layout}.")
    return True


def _target_chunks(query, key, value, layout, kind, token_scope, mask, scale, dense):
    """Yield ``(rows, target)``: ``A' v`` for the query rows ``rows`` (``target [b, h, n_rows or 1, d]``)."""
    n, d = query.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    everything = slice(0, n)
    if not _check_layout(query, key, layout, token_scope):
        if kind == "identity":
            yield everything, value
        elif kind == "uniform":
            if mask is None:
                yield everything, value.mean(dim=-2, keepdim=True)
            else:  # uniform over the keys each query may see: the softmax of the mask alone
                yield everything, dense(torch.zeros_like(query), key, value, mask=mask, scale=scale)
        else:
            q_mean = query.mean(dim=-2, keepdim=True)
            if mask is not None and mask.shape[-2] != 1:
                q_mean = q_mean.expand_as(query)
            yield everything, dense(q_mean, key, value, mask=mask, scale=scale)
        return

    img, txt = layout.image, layout.text
    if kind == "query_mean":
        q_mean = query[:, :, img].mean(dim=-2, keepdim=True)
        rows_mask = _key_columns(mask, everything, img)
        if rows_mask is not None and rows_mask.shape[-2] != 1:
            q_mean = q_mean.expand(-1, -1, img.stop - img.start, -1)
        yield img, dense(q_mean, key, value, mask=rows_mask, scale=scale)
        return
    k_txt, v_txt = key[:, :, txt], value[:, :, txt]
    if kind == "uniform":  # n_img keys sharing the mean image logit q . mean(k_img)
        k_mean = key[:, :, img].float().mean(dim=-2, keepdim=True)
        v_mean = value[:, :, img].mean(dim=-2, keepdim=True)
    for start in range(img.start, img.stop, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, img.stop))
        q = query[:, :, rows]
        if kind == "identity":  # the own key, with its own logit
            extra_logit = (q.float() * key[:, :, rows].float()).sum(dim=-1) * scale
            extra_value = value[:, :, rows]
        else:
            extra_logit = (q.float() @ k_mean.transpose(-1, -2)).squeeze(-1) * scale + math.log(img.stop - img.start)
            extra_value = v_mean
        chunk_mask = _key_columns(mask, txt, rows)
        yield rows, _attend_with_extra_key(q, k_txt, v_txt, extra_logit, extra_value, scale, chunk_mask, dense)


def _default_dense(q, k, v, mask=None, scale=None):
    return dense_attention(q, k, v, mask, scale=scale)


def perturbation_target(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    kind: str = "identity",
    token_scope: str = "full",
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dense: Dense | None = None,
) -> tuple[torch.Tensor, slice]:
    """``A' v`` for the perturbed attention map ``A'`` (see the module docstring), without an ``N x N`` map.

    Args:
        query, key, value: ``[b, h, N, d]`` (self- or joint attention: queries and keys are the same tokens).
        layout: where image and text tokens sit (``layout.text is None`` for pure self-attention).
        kind, token_scope: the perturbation (module docstring).
        mask: the model's attention mask for these rows (bool, True = attend, or additive), broadcastable to
            ``[b, h, N, N]``; ``None`` for no mask. With ``token_scope="image"`` only its text-key columns are used
            (padding masks); image keys are always visible to the image-scope targets.
        scale: softmax scale (default ``1 / sqrt(d)``).
        dense: ``dense(q, k, v, mask=..., scale=...)`` on ``[B, H, N, D]`` (default: diffusers' dispatcher).

    Returns:
        ``(target, rows)``: ``target [b, h, n_rows or 1, d]`` for the query rows ``rows`` (all rows for
        ``token_scope="full"``, the image span for ``"image"``; other rows keep their attention).
    """
    _check_kind_scope(kind, token_scope)
    chunks = list(_target_chunks(query, key, value, layout, kind, token_scope, mask, scale, dense or _default_dense))
    rows = slice(chunks[0][0].start, chunks[-1][0].stop)
    return (chunks[0][1] if len(chunks) == 1 else torch.cat([t for _, t in chunks], dim=-2)), rows


def _blend_(out, query, key, value, layout, softness, kind, token_scope, mask, scale, dense) -> None:
    """``out[..., rows, :] = (1 - u) out + u A' v`` in place, one chunk of query rows at a time."""
    for rows, target in _target_chunks(query, key, value, layout, kind, token_scope, mask, scale, dense):
        part = out[:, :, rows]
        if softness == 1.0:
            part.copy_(target.expand_as(part))
        else:
            part.mul_(1.0 - softness).add_(target.to(part.dtype), alpha=softness)


def blend_heads(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    softness: float = 1.0,
    kind: str = "identity",
    token_scope: str = "full",
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dense: Dense | None = None,
) -> torch.Tensor:
    """SoftPAG output ``(1 - u) * out + u * A' v`` on the rows that ``A'`` changes; ``out`` is the attention output.

    All tensors are ``[b, h, N, d]`` for the perturbed rows and heads only; returns a new tensor of that shape.
    """
    _check_kind_scope(kind, token_scope)
    result = out.clone()
    _blend_(
        result, query, key, value, layout, float(softness), kind, token_scope, mask, scale, dense or _default_dense
    )
    return result


def _runs(indices: Sequence[int]) -> list[slice]:
    """Sorted indices as maximal contiguous slices: ``[0, 1, 2, 5]`` -> ``[slice(0, 3), slice(5, 6)]``."""
    runs: list[slice] = []
    for i in sorted(indices):
        if runs and runs[-1].stop == i:
            runs[-1] = slice(runs[-1].start, i + 1)
        else:
            runs.append(slice(i, i + 1))
    return runs


def _mask_part(mask: torch.Tensor | None, rows: slice, heads: slice) -> torch.Tensor | None:
    if mask is None or mask.ndim < 4:
        return mask
    if mask.shape[0] > 1:
        mask = mask[rows]
    if mask.shape[1] > 1:
        mask = mask[:, heads]
    return mask


# ------------------------------------------------------------------------------------------------- core
class HeadPerturbationCore(ModifierCore):
    """Modifier core: the layer's attention (dense alone), then SoftPAG on the selected heads of the perturbed rows.

    The blend is written in place into views of the attention output (contiguous runs of rows and heads), so the
    extra memory is the target of one chunk of queries (for ``identity`` with ``token_scope="full"``: none).

    Args:
        heads: head indices of this layer to perturb.
        softness: ``u`` in ``[0, 1]``: 0 keeps attention, 1 replaces it by the target (PAG).
        kind: ``"identity"``, ``"uniform"`` or ``"query_mean"``.
        token_scope: ``"full"`` (HeadHunter) or ``"image"`` (diffusers PAG on joint attention).
        rows: ``"perturbed"`` (batch rows whose run-context role is ``"perturbed"``, set by the guidance hook) or
            ``"all"`` (every row; used by the modular-pipeline guider for its perturbed pass).
    """

    def __init__(
        self,
        heads: Sequence[int],
        softness: float = 1.0,
        kind: str = "identity",
        token_scope: str = "full",
        rows: str = "perturbed",
    ):
        _check_kind_scope(kind, token_scope)
        if rows not in ("perturbed", "all"):
            raise ValueError(f"`rows` must be 'perturbed' or 'all', got {rows!r}.")
        self.heads = sorted({int(h) for h in heads})
        self.softness = _check_softness(softness)
        self.kind = kind
        self.token_scope = token_scope
        self.rows = rows

    def _rows(self, call: AttentionCall, batch: int) -> list[int]:
        if self.rows == "all":
            return list(range(batch))
        return [] if call.run is None else [r for r in call.run.rows(ROLE_PERTURBED) if r < batch]

    def modify(self, query, key, value, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Blend the perturbed rows' selected heads of ``out`` (the layer's attention, whatever pattern computed it:
        dense alone, or GNA / CLEAR / PARO composed with this core) towards the perturbation target."""
        rows = self._rows(call, query.shape[0])
        if not rows or not self.heads or self.softness == 0.0:
            return out
        # checked whatever heads this rank holds: under context parallelism every rank must fail alike (a rank that
        # skipped the check would wait forever for the others in the next collective)
        _check_layout(query, key, call.layout, self.token_scope)
        heads = call.local_heads(self.heads)  # under context parallelism: the selected heads this rank holds
        if not heads:
            return out
        if torch.is_grad_enabled() and out.requires_grad:
            out = out.clone()  # autograd: blend into a copy, never into the attention kernel's saved output

        def dense(q, k, v, mask=None, scale=None):
            return call.dense(q, k, v, mask=mask, scale=scale)

        for r in _runs(rows):
            for h in _runs(heads):
                _blend_(
                    out[r, h],
                    query[r, h],
                    key[r, h],
                    value[r, h],
                    call.layout,
                    self.softness,
                    self.kind,
                    self.token_scope,
                    _mask_part(call.mask, r, h),
                    None,
                    dense,
                )
        return out

    def __repr__(self) -> str:
        return (
            f"HeadPerturbationCore(heads={self.heads}, softness={self.softness}, kind={self.kind!r}, "
            f"token_scope={self.token_scope!r}, rows={self.rows!r})"
        )


class HeadPerturbationAttnProcessor(AttnPackProcessor):
    """attnpack processor running a :class:`HeadPerturbationCore` (any supported family)."""

    technique = "head-guidance"


def _check_softness(softness: float) -> float:
    if isinstance(softness, bool) or not isinstance(softness, (int, float)) or not 0.0 <= float(softness) <= 1.0:
        raise ValueError(f"`softness` must be a number in [0, 1] (0: no perturbation, 1: PAG), got {softness!r}.")
    return float(softness)


# ------------------------------------------------------------------------------------------------- head spec
def perturbable_layers(model: torch.nn.Module) -> list[LayerInfo]:
    """The layers that carry HeadHunter's layer index in ``model``, position in the list = layer index."""
    family = family_of_model(model)
    if family not in PERTURBABLE_KINDS:
        raise ValueError(
            f"head perturbation supports {', '.join(PERTURBABLE_KINDS)} denoisers; {type(model).__name__} is "
            f"family {family!r}."
        )
    kinds = PERTURBABLE_KINDS[family]
    return [info for info in list_layers(model) if info.kind in kinds]


_HEAD_RE = re.compile(r"^\s*[lL]\s*(-?\d+)\s*(?:[hH]\s*(-?\d+))?\s*$")


def _split_items(spec: HeadSpec) -> list:
    if isinstance(spec, str):
        return [part for part in re.split(r"[,;\s]+", spec.strip()) if part]
    if isinstance(spec, (int, tuple)) and not isinstance(spec, bool):
        return [spec]
    if isinstance(spec, Iterable):
        items: list = []
        for item in spec:
            items.extend(_split_items(item) if isinstance(item, str) else [item])
        return items
    raise TypeError(f"`heads` must be a string like 'L1H10', a (layer, head) pair or a list of them, got {spec!r}.")


def parse_heads(spec: HeadSpec) -> list[tuple[int, int | None]]:
    """Parse a head specification into ``(layer, head)`` pairs (``head=None``: every head of the layer).

    Accepted items: ``(layer, head)`` tuples, ``"L1H10"`` (layer 1, head 10), ``"L13"`` or an integer (all heads of
    layer 13), comma-separated strings (``"L1H10,L13"``), and preset names from :mod:`attnpack.presets`
    (``"sd3-medium/dark"``).
    """
    from .. import presets

    items = _split_items(spec)
    if not items:
        raise ValueError("`heads` is empty: give at least one head, e.g. heads=['L1H10'] or heads=[(1, 10)].")
    out: list[tuple[int, int | None]] = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"`heads` entry {item!r} is not a head; use 'L1H10', 'L13' or (1, 10).")
        if isinstance(item, int):
            out.append((item, None))
        elif isinstance(item, tuple):
            if len(item) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in item[:1]):
                raise TypeError(f"`heads` entry {item!r} must be a (layer, head) pair of integers.")
            layer, head = item
            if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
                raise TypeError(f"`heads` entry {item!r} must be a (layer, head) pair of integers.")
            out.append((layer, head))
        elif isinstance(item, str):
            if item in presets.PRESETS:
                out.extend(presets.PRESETS[item].heads)
                continue
            match = _HEAD_RE.match(item)
            if match is None:
                raise ValueError(
                    f"`heads` entry {item!r} is not a head: use 'L<layer>H<head>' (e.g. 'L1H10'), 'L<layer>' for all "
                    f"heads of a layer, or a preset name ({', '.join(sorted(presets.PRESETS))})."
                )
            out.append((int(match.group(1)), None if match.group(2) is None else int(match.group(2))))
        else:
            raise TypeError(f"`heads` entry {item!r} must be a string like 'L1H10' or a (layer, head) pair.")
    return out


def resolve_heads(
    model: torch.nn.Module, spec: HeadSpec, layers: Sequence[LayerInfo] | None = None
) -> dict[str, list[int]]:
    """Check ``spec`` against ``model``'s layer and head counts: ``{layer name: sorted head indices}``.
    ``layers``: ``perturbable_layers(model)`` when the caller has it already."""
    layers = perturbable_layers(model) if layers is None else layers
    family = family_of_model(model)
    chosen: dict[str, set[int]] = {}
    for layer, head in parse_heads(spec):
        if not 0 <= layer < len(layers):
            raise ValueError(
                f"`heads` names layer {layer}, but this {type(model).__name__} has {len(layers)} perturbable layers "
                f"(0..{len(layers) - 1}: {_LAYER_DESCRIPTION[family]})."
            )
        info = layers[layer]
        if head is None:
            heads = set(range(info.heads))
        elif not 0 <= head < info.heads:
            raise ValueError(
                f"`heads` names head {head} of layer {layer} ({info.name}), which has {info.heads} heads "
                f"(0..{info.heads - 1})."
            )
        else:
            heads = {head}
        chosen.setdefault(info.name, set()).update(heads)
    order = {info.name: i for i, info in enumerate(layers)}
    return {name: sorted(chosen[name]) for name in sorted(chosen, key=order.__getitem__)}


def format_heads(
    model: torch.nn.Module, resolved: dict[str, list[int]], layers: Sequence[LayerInfo] | None = None
) -> list[str]:
    """``["L1H10", ...]`` for a :func:`resolve_heads` result."""
    index = {info.name: i for i, info in enumerate(perturbable_layers(model) if layers is None else layers)}
    return [f"L{index[name]}H{h}" for name, heads in resolved.items() for h in heads]


def install_head_perturbation(
    pipe_or_model,
    heads: HeadSpec,
    softness: float = 1.0,
    kind: str = "identity",
    token_scope: str = "full",
    *,
    rows: str = "perturbed",
) -> ProcessorHandle:
    """Install :class:`HeadPerturbationCore` processors on the layers named by ``heads`` (no guidance).

    Every denoiser of the pipeline (``transformer`` and ``transformer_2`` for Wan 2.2) gets the same heads. The
    processors perturb only the batch rows marked ``"perturbed"`` in the run context (``rows="perturbed"``), so
    without :func:`attnpack.apply_head_perturbation`'s guidance hook they reproduce the stock output.
    """
    _check_kind_scope(kind, token_scope)
    softness = _check_softness(softness)
    models, _ = resolve_denoisers(pipe_or_model)
    layers = perturbable_layers(models[0])
    resolved = resolve_heads(models[0], heads, layers)
    for other in models[1:]:
        if resolve_heads(other, heads) != resolved:
            raise ValueError("the pipeline's denoisers differ in layout; apply head perturbation to each model.")

    def factory(info: LayerInfo):
        selected = resolved.get(info.name)
        return None if selected is None else HeadPerturbationCore(selected, softness, kind, token_scope, rows)

    names = format_heads(models[0], resolved, layers)
    handle = apply_processors(
        pipe_or_model,
        factory,
        layers=list(resolved),
        processor_cls=HeadPerturbationAttnProcessor,
        description=f"head perturbation {', '.join(names)}",
    )
    handle.heads = names
    return handle
