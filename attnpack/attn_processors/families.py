"""Model-family adapters: the only place in attnpack that knows diffusers model internals.

An adapter turns an attention module's inputs into ``query``, ``key``, ``value`` shaped ``[B, H, N, D]`` (after
qk-norm and RoPE, exactly as the stock diffusers processor computes them) plus a :class:`TokenLayout` saying where text
and image/video tokens sit; after the attention *core* ran, it projects the core's ``[B, H, N, D]`` output back exactly
as the stock processor does. With the dense core (:class:`DenseCore`) every adapter reproduces the stock processor.

Families (diffusers 0.42):

==================  ==============================================  ===========================================
family              denoiser / attention modules                    token order seen by the core
==================  ==============================================  ===========================================
``unet``            UNet2DConditionModel ``attn1`` / ``attn2``       image (self) or image queries -> text keys
``sd3``             SD3Transformer2DModel ``attn`` (+ SD3.5 attn2)   image first, then text
``flux``            FluxTransformer2DModel double / single blocks    text first, then image
``wan``             WanTransformer3DModel ``attn1`` / ``attn2``      video (self) or video queries -> text keys
``cogvideox``       CogVideoXTransformer3DModel ``attn1``            text first, then video
``hunyuan_video``   HunyuanVideoTransformer3DModel (not refiner)     video first, then text
==================  ==============================================  ===========================================

Dense attention always goes through :func:`diffusers.models.attention_dispatch.dispatch_attention_fn` with the
processor's ``_attention_backend`` and ``_parallel_config``, so ``model.set_attention_backend(...)`` reaches UNet, SD3
and CogVideoX layers too (their stock processors call ``F.scaled_dot_product_attention`` directly).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb


if TYPE_CHECKING:
    from .context import RunState

__all__ = [
    "TokenLayout",
    "LayerInfo",
    "Prepared",
    "FamilyAdapter",
    "ADAPTERS",
    "FAMILY_MODEL_CLASSES",
    "family_of_model",
    "get_adapter",
    "dense_attention",
]


# ------------------------------------------------------------------------------------------------- data types
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where tokens sit in the query and key sequences that an attention core receives.

    Attributes:
        num_queries / num_keys: sequence lengths ``N_q`` and ``N_k``.
        image / text: spans of image (or video) and text tokens among the queries (``None`` if absent).
        key_image / key_text: the same among the keys.
        grid: the image/video token grid, ``(H, W)`` or ``(F, H, W)``, row-major over the ``image`` span
            (``None`` if unknown).
        text_first: ``True`` when text precedes the image tokens (FLUX, CogVideoX).
        is_cross: keys come from another sequence (text cross-attention), not from the queries.
    """

    num_queries: int
    num_keys: int
    image: slice | None = None
    text: slice | None = None
    key_image: slice | None = None
    key_text: slice | None = None
    grid: tuple[int, ...] | None = None
    text_first: bool = False
    is_cross: bool = False

    @property
    def num_text(self) -> int:
        return 0 if self.text is None else self.text.stop - self.text.start

    @property
    def num_image(self) -> int:
        return 0 if self.image is None else self.image.stop - self.image.start

    @classmethod
    def self_attention(cls, n: int, grid: tuple[int, ...] | None) -> TokenLayout:
        return cls(n, n, image=slice(0, n), key_image=slice(0, n), grid=grid)

    @classmethod
    def cross_attention(cls, n_q: int, n_k: int, grid: tuple[int, ...] | None) -> TokenLayout:
        return cls(n_q, n_k, image=slice(0, n_q), key_text=slice(0, n_k), grid=grid, is_cross=True)

    @classmethod
    def joint(cls, n_image: int, n_text: int, grid: tuple[int, ...] | None, text_first: bool) -> TokenLayout:
        n = n_image + n_text
        if text_first:
            image, text = slice(n_text, n), slice(0, n_text)
        else:
            image, text = slice(0, n_image), slice(n_image, n)
        return cls(n, n, image=image, text=text, key_image=image, key_text=text, grid=grid, text_first=text_first)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser, as seen by an installed processor.

    Attributes:
        name: module path, e.g. ``"single_transformer_blocks.5.attn"`` (the processor key minus ``.processor``).
        index: position among the denoiser's supported attention layers, in ``attn_processors`` order. For FLUX this
            is the global index used by HeadHunter (double blocks 0..18, then single blocks 19..56).
        family: the model family (see module docstring).
        kind: ``"self"``, ``"cross"``, ``"joint"`` (image + text in one attention) or ``"single"`` (FLUX /
            HunyuanVideo single-stream blocks, also joint).
        kind_index: position among the layers of the same ``kind`` (e.g. the order of UNet ``attn1`` modules).
        heads / head_dim: number of heads and their width.
    """

    name: str
    index: int
    family: str
    kind: str
    kind_index: int
    heads: int
    head_dim: int


@dataclasses.dataclass
class Prepared:
    """What an adapter hands to the core, plus what it needs to finish the call."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: TokenLayout
    mask: torch.Tensor | None = None
    parallel: bool = True  # whether the processor's context-parallel config applies (Wan: self-attention only)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend=None,
    parallel_config=None,
) -> torch.Tensor:
    """Dense attention on ``[B, H, N, D]`` tensors through diffusers' dispatcher (which takes ``[B, S, H, D]``)."""
    out = dispatch_attention_fn(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=mask,
        dropout_p=0.0,
        is_causal=False,
        scale=scale,
        backend=backend,
        parallel_config=parallel_config,
    )
    return out.transpose(1, 2)


def _to_bhnd(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` -> ``[B, H, N, D]`` (a view, as the stock processors do)."""
    b = x.shape[0]
    return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _flatten_heads(out: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H*D]``."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _grid(run: RunState | None, n: int) -> tuple[int, ...] | None:
    return None if run is None else run.grid_for(n)


# ------------------------------------------------------------------------------------------------- base adapter
def flux_grid(img_ids: torch.Tensor) -> tuple[tuple[int, int] | None, int]:
    """Grid of the first image in FLUX ``img_ids`` (``[N, 3]``: stream id, row, column), and its token count; the grid
    is ``None`` when the first image's tokens are not first or not row-major (no grid rather than a wrong one)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    ids = ids.detach().to("cpu", torch.float64)
    first = ids[:, 0] == ids[0, 0]
    count = int(first.sum())
    if not bool(first[:count].all()):  # the first image's tokens must come first
        return None, ids.shape[0]
    rows, cols = ids[:count, 1], ids[:count, 2]
    r0, c0 = rows.min(), cols.min()
    h = int(rows.max() - r0) + 1
    w = int(cols.max() - c0) + 1
    if h * w != count:
        return None, count
    idx = torch.arange(count, dtype=torch.float64)
    if not (torch.equal(rows - r0, torch.div(idx, w, rounding_mode="floor")) and torch.equal(cols - c0, idx % w)):
        return None, count  # not row-major
    return (h, w), count


def _as_int_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class FamilyAdapter:
    """Base class of the family adapters; subclasses implement :meth:`layer_kind`, :meth:`prepare`, :meth:`finish`."""

    family: ClassVar[str]

    def layer_kind(self, name: str, module: torch.nn.Module) -> str | None:
        """Kind of the attention layer ``name`` (``None``: not handled by attnpack, keep the stock processor)."""
        raise NotImplementedError

    def prepare(
        self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor
    ) -> Prepared:
        raise NotImplementedError

    def finish(self, attn, out: torch.Tensor, prep: Prepared):
        raise NotImplementedError

    def call_info(self, cfg, arguments: dict[str, Any]) -> dict[str, Any]:
        """``batch_size``, ``grid`` (token grid of the image / video stream), ``text_len`` and ``image_len`` of one
        denoiser call, from its bound arguments and the model config (what the run context records)."""
        info: dict[str, Any] = {}
        hs = arguments.get("hidden_states")
        if hs is not None:
            info["batch_size"] = hs.shape[0]
        ehs = arguments.get("encoder_hidden_states")
        if ehs is not None:
            info["text_len"] = ehs.shape[1]
        return info

    @staticmethod
    def head_dim(attn) -> int:
        return attn.inner_dim // attn.heads


# ------------------------------------------------------------------------------------------------- UNet
class UNetAdapter(FamilyAdapter):
    """``Attention`` + ``AttnProcessor2_0`` / ``FusedAttnProcessor2_0`` (SD 1.x/2.x, SDXL; self ``attn1``, cross
    ``attn2``)."""

    family = "unet"

    def call_info(self, cfg, arguments):
        sample = arguments.get("sample")
        return {} if sample is None else {"batch_size": sample.shape[0], "grid": tuple(sample.shape[-2:])}

    def layer_kind(self, name, module):
        return "cross" if getattr(module, "is_cross_attention", False) else "self"

    def prepare(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        channel = height = width = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        if getattr(attn, "fused_projections", False):
            if not is_cross:
                query, key, value = torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)
            else:
                if attn.norm_cross:
                    encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
                query = attn.to_q(hidden_states)
                key, value = torch.split(attn.to_kv(encoder_hidden_states), attn.to_kv.out_features // 2, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)

        query, key, value = (_to_bhnd(x, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_q, n_k = query.shape[2], key.shape[2]
        grid = (height, width) if input_ndim == 4 else _grid(run, n_q)
        layout = TokenLayout.cross_attention(n_q, n_k, grid) if is_cross else TokenLayout.self_attention(n_q, grid)
        state = dict(residual=residual, input_ndim=input_ndim, shape=(batch_size, channel, height, width))
        return Prepared(query, key, value, layout, attention_mask, state=state)

    def finish(self, attn, out, prep):
        dtype = prep.query.dtype
        hidden_states = _flatten_heads(out).to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if prep.state["input_ndim"] == 4:
            batch_size, channel, height, width = prep.state["shape"]
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + prep.state["residual"]
        return hidden_states / attn.rescale_output_factor


# ------------------------------------------------------------------------------------------------- SD3 / SD3.5
_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def unet_stage(name: str) -> str | None:
    """``"down"``, ``"mid"`` or ``"up"``: the part of a ``UNet2DConditionModel`` an attention layer (module name as in
    :func:`attnpack.list_layers`) sits in; ``None`` for other names."""
    match = _UNET_BLOCK.match(name)
    if match is None:
        return None
    return "mid" if match.group(3) else ("down" if match.group(1) == "down_blocks" else "up")


def _halve(grid: tuple[int, int]) -> tuple[int, int]:
    # diffusers' Downsample2D: conv 3x3, stride 2, padding 1 -> ceil(n / 2)
    return tuple((n + 1) // 2 for n in grid)  # type: ignore[return-value]


def unet_layer_grids(unet: torch.nn.Module, latent_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Token grid ``(h, w)`` of every attention layer of a ``UNet2DConditionModel`` for a latent of ``latent_size``.

    Down block ``i`` runs at the latent size halved (ceil) once per downsampler before it, the mid block at the lowest
    level, and up block ``j`` at the level of down block ``n - 1 - j`` (diffusers upsamples to the skip connection's
    size). Keys are the layer names (module paths without ``.processor``).
    """
    down_blocks = getattr(unet, "down_blocks", None)
    up_blocks = getattr(unet, "up_blocks", None)
    if down_blocks is None or up_blocks is None or len(down_blocks) != len(up_blocks):
        raise TypeError(
            f"needs a UNet2DConditionModel (SD 1.x/2.x, SDXL) with matching down/up blocks, got {type(unet).__name__}."
        )
    levels: list[tuple[int, int]] = []
    grid = (int(latent_size[0]), int(latent_size[1]))
    for block in down_blocks:
        levels.append(grid)
        if getattr(block, "downsamplers", None):
            grid = _halve(grid)
    out: dict[str, tuple[int, int]] = {}
    for key in unet.attn_processors:
        name = key[: -len(".processor")]
        match = _UNET_BLOCK.match(name)
        if match is None:
            continue
        if match.group(3):
            out[name] = grid
        elif match.group(1) == "down_blocks":
            out[name] = levels[int(match.group(2))]
        else:
            out[name] = levels[len(levels) - 1 - int(match.group(2))]
    return out


class SD3Adapter(FamilyAdapter):
    """``JointAttnProcessor2_0`` / ``FusedJointAttnProcessor2_0``: image first, then text; qk-norm (SD3.5) applied in
    both paths (the stock fused processor skips it); SD3.5 ``attn2`` is image self-attention; the last block has
    ``context_pre_only`` (text output not projected)."""

    family = "sd3"

    def call_info(self, cfg, arguments):
        info = super().call_info(cfg, arguments)
        hs = arguments.get("hidden_states")
        if hs is not None:
            info["grid"] = (hs.shape[-2] // cfg.patch_size, hs.shape[-1] // cfg.patch_size)
        return info

    def layer_kind(self, name, module):
        return "self" if name.endswith("attn2") else "joint"

    def prepare(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor):
        n_image = hidden_states.shape[1]
        has_text = encoder_hidden_states is not None
        if getattr(attn, "fused_projections", False):
            query, key, value = torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (_to_bhnd(x, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_text = 0
        if has_text:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = torch.split(
                    attn.to_added_qkv(encoder_hidden_states), attn.to_added_qkv.out_features // 3, dim=-1
                )
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (_to_bhnd(x, attn.heads) for x in (eq, ek, ev))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            n_text = eq.shape[2]
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        grid = _grid(run, n_image)
        layout = (
            TokenLayout.joint(n_image, n_text, grid, text_first=False)
            if has_text
            else TokenLayout.self_attention(n_image, grid)
        )
        return Prepared(query, key, value, layout, None, state=dict(n_image=n_image, has_text=has_text))

    def finish(self, attn, out, prep):
        hidden_states = _flatten_heads(out).to(prep.query.dtype)
        n_image = prep.state["n_image"]
        encoder_hidden_states = None
        if prep.state["has_text"]:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


# ------------------------------------------------------------------------------------------------- FLUX
class FluxAdapter(FamilyAdapter):
    """``FluxAttention`` + ``FluxAttnProcessor``: text first, then image; RoPE on the joint sequence. Double-stream
    blocks receive text separately and return ``(image, text)``; single-stream blocks receive the joined sequence
    (text length from the run context) and return it without an output projection."""

    family = "flux"

    def call_info(self, cfg, arguments):
        info = super().call_info(cfg, arguments)
        img_ids = arguments.get("img_ids")
        if img_ids is not None:
            info["grid"], info["image_len"] = flux_grid(img_ids)
        return info

    def layer_kind(self, name, module):
        return "single" if name.startswith("single_transformer_blocks") else "joint"

    def prepare(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor):
        fused = getattr(attn, "fused_projections", False)
        if fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            if fused and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
            n_text = encoder_hidden_states.shape[1]
        else:
            n_text = None if run is None else run.local_text_len  # this rank's text shard under context parallelism
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)

        n = query.shape[1]
        if n_text is None:
            layout = TokenLayout(n, n)
        else:
            n_image = n - n_text
            grid = None
            if run is not None and run.grid is not None and run.image_len == n_image:
                grid = run.grid
            layout = TokenLayout.joint(n_image, n_text, grid, text_first=True)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        state = dict(double=double, n_text=encoder_hidden_states.shape[1] if double else None)
        return Prepared(q, k, v, layout, attention_mask, state=state)

    def finish(self, attn, out, prep):
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(prep.query.dtype)
        if prep.state["double"]:
            n_text = prep.state["n_text"]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_text, hidden_states.shape[1] - n_text], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


# ------------------------------------------------------------------------------------------------- Wan
def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE on ``[B, S, H, D]`` (same arithmetic as ``WanAttnProcessor``)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanAdapter(FamilyAdapter):
    """``WanAttention`` + ``WanAttnProcessor``: ``attn1`` video self-attention with RoPE (qk RMSNorm across heads,
    before the head split); ``attn2`` cross-attention to text, plus the I2V image-context keys (the first
    ``L - 512`` context tokens, through ``add_k_proj``/``add_v_proj``, attended separately and summed)."""

    family = "wan"

    def call_info(self, cfg, arguments):
        hs = arguments.get("hidden_states")  # Wan's encoder_hidden_states only enter cross-attention
        if hs is None:
            return {}
        pt, ph, pw = _as_int_tuple(cfg.patch_size)
        f, h, w = hs.shape[-3:]
        return {"batch_size": hs.shape[0], "grid": (f // pt, h // ph, w // pw)}

    def layer_kind(self, name, module):
        return "cross" if getattr(module, "is_cross_attention", False) or name.endswith("attn2") else "self"

    def prepare(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor):
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if getattr(attn, "fused_projections", False):
            if not attn.is_cross_attention:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary is not None:
            query = _wan_rotary(query, *rotary)
            key = _wan_rotary(key, *rotary)

        image_out = None
        if encoder_hidden_states_img is not None:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
            else:
                key_img = attn.add_k_proj(encoder_hidden_states_img)
                value_img = attn.add_v_proj(encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image_out = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=processor._attention_backend,
                parallel_config=None,
            )
            image_out = image_out.flatten(2, 3).type_as(query)

        n_q, n_k = query.shape[1], key.shape[1]
        grid = _grid(run, n_q)
        layout = TokenLayout.cross_attention(n_q, n_k, grid) if is_cross else TokenLayout.self_attention(n_q, grid)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return Prepared(q, k, v, layout, attention_mask, parallel=not is_cross, state=dict(image_out=image_out))

    def finish(self, attn, out, prep):
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(prep.query)
        if prep.state["image_out"] is not None:
            hidden_states = hidden_states + prep.state["image_out"]
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


# ------------------------------------------------------------------------------------------------- CogVideoX
class CogVideoXAdapter(FamilyAdapter):
    """``CogVideoXAttnProcessor2_0`` / fused: text first, then video; RoPE on the video part only."""

    family = "cogvideox"

    def call_info(self, cfg, arguments):
        info = super().call_info(cfg, arguments)
        hs = arguments.get("hidden_states")  # [B, F, C, H, W]
        if hs is not None:
            p = cfg.patch_size
            pt = getattr(cfg, "patch_size_t", None) or 1
            frames = -(-hs.shape[1] // pt)  # CogVideoX 1.5 pads the frames to a multiple of patch_size_t
            info["grid"] = (frames, hs.shape[-2] // p, hs.shape[-1] // p)
        return info

    def layer_kind(self, name, module):
        return "joint"

    def prepare(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor):
        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "fused_projections", False):
            query, key, value = torch.split(attn.to_qkv(hidden_states), attn.to_qkv.out_features // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (_to_bhnd(x, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary is not None:
            query[:, :, n_text:] = apply_rotary_emb(query[:, :, n_text:], rotary)
            if not attn.is_cross_attention:
                key[:, :, n_text:] = apply_rotary_emb(key[:, :, n_text:], rotary)
        n_video = sequence_length - n_text
        layout = TokenLayout.joint(n_video, n_text, _grid(run, n_video), text_first=True)
        return Prepared(query, key, value, layout, attention_mask, state=dict(n_text=n_text))

    def finish(self, attn, out, prep):
        hidden_states = _flatten_heads(out)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        n_text = prep.state["n_text"]
        encoder_hidden_states, hidden_states = hidden_states.split([n_text, hidden_states.size(1) - n_text], dim=1)
        return hidden_states, encoder_hidden_states


# ------------------------------------------------------------------------------------------------- HunyuanVideo
class HunyuanVideoAdapter(FamilyAdapter):
    """``HunyuanVideoAttnProcessor2_0`` on the main double / single blocks: video first, text last; RoPE on video
    tokens; the attention mask marks text padding. The token refiner keeps its stock processor."""

    family = "hunyuan_video"

    def call_info(self, cfg, arguments):
        info = super().call_info(cfg, arguments)
        hs = arguments.get("hidden_states")
        if hs is not None:
            pt, p = cfg.patch_size_t or 1, cfg.patch_size
            f, h, w = hs.shape[-3:]
            info["grid"] = (f // pt, h // p, w // p)
        return info

    def layer_kind(self, name, module):
        if "token_refiner" in name or name.startswith("context_embedder"):
            return None
        return "single" if name.startswith("single_transformer_blocks") else "joint"

    def prepare(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, run, processor):
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary is not None:
            if single:
                query = torch.cat(
                    [apply_rotary_emb(query[:, :-n_text], rotary, sequence_dim=1), query[:, -n_text:]], dim=1
                )
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], rotary, sequence_dim=1), key[:, -n_text:]], dim=1)
            else:
                query = apply_rotary_emb(query, rotary, sequence_dim=1)
                key = apply_rotary_emb(key, rotary, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)
        n = query.shape[1]
        n_video = n - n_text
        layout = TokenLayout.joint(n_video, n_text, _grid(run, n_video), text_first=False)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return Prepared(q, k, v, layout, attention_mask, state=dict(n_text=n_text))

    def finish(self, attn, out, prep):
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(prep.query.dtype)
        n_text = prep.state["n_text"]
        if n_text == 0:
            return hidden_states, None
        hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# ------------------------------------------------------------------------------------------------- registry
ADAPTERS: dict[str, FamilyAdapter] = {
    a.family: a
    for a in (UNetAdapter(), SD3Adapter(), FluxAdapter(), WanAdapter(), CogVideoXAdapter(), HunyuanVideoAdapter())
}

# diffusers denoiser class name -> family (subclasses are matched through the MRO)
FAMILY_MODEL_CLASSES: dict[str, str] = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
    "WanVACETransformer3DModel": "wan",
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
}


def family_of_model(model: torch.nn.Module) -> str:
    """The family of a diffusers denoiser, or a ``ValueError`` naming the supported classes."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILY_MODEL_CLASSES:
            return FAMILY_MODEL_CLASSES[cls.__name__]
    raise ValueError(
        f"attnpack does not support denoisers of class {type(model).__name__}. "
        f"Supported: {', '.join(FAMILY_MODEL_CLASSES)}."
    )


def get_adapter(family: str) -> FamilyAdapter:
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ValueError(f"Unknown model family {family!r}; known: {', '.join(ADAPTERS)}.") from None
