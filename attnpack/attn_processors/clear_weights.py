"""CLEAR checkpoints in the official format: reading, checking, loading with restore, saving.

The released files (``Huage001/CLEAR`` on the Hub: ``clear_local_{8,16,32}.safetensors``,
``clear_local_{8,16}_down_4.safetensors``) and the files written by ``attnpack distill-clear`` are plain safetensors
state-dict subsets of ``FluxTransformer2DModel``: full fine-tuned weights and biases of every parameter whose name
contains ``.attn.to_q.``, ``.attn.to_k.``, ``.attn.to_v.`` or ``.attn.to_out.`` (double blocks: q, k, v, out;
single blocks: q, k, v) and, for ``down_factor > 1``, one ``<layer>.processor.spatial_weight`` of shape
``[1, 1, 1, d, 1, d, 1]`` per attention layer (e.g. ``single_transformer_blocks.5.attn.processor.spatial_weight``).

attnpack keeps its processors plain objects, so the pooling weights live in a :class:`ClearPooling` module owned by
the :func:`~attnpack.apply_clear` handle (not inside the transformer) and are mapped to and from those official keys
here. The transformer's own parameters are overwritten in place; their previous values are kept on the CPU and put
back by ``handle.remove()``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

__all__ = [
    "ClearPooling",
    "ClearWeightsReport",
    "CLEAR_PARAM_PATTERNS",
    "clear_parameter_names",
    "pooling_key",
    "read_clear_checkpoint",
    "check_clear_checkpoint",
    "load_clear_weights",
    "save_clear_checkpoint",
]

# substrings of the trainable / released parameter names (official distill.py)
CLEAR_PARAM_PATTERNS = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
POOLING_SUFFIX = ".processor.spatial_weight"


def pooling_key(layer_name: str) -> str:
    """Official key of a layer's pooling weight: ``"<layer>.processor.spatial_weight"``."""
    return f"{layer_name}{POOLING_SUFFIX}"


class ClearPooling(torch.nn.Module):
    """The learnable ``spatial_weight`` of every attention layer (``down_factor > 1``).

    One parameter ``[1, 1, 1, d, 1, d, 1]`` per layer, initialised to ``1 / d**2`` (average pooling), shared by the
    layer's keys and values, heads, channels and positions (as the official ``LocalDownsampleFlexAttnProcessor``).
    Kept in fp32; cast to the keys' dtype and device at every call.

    Args:
        layer_names: attention module names, e.g. ``"transformer_blocks.0.attn"``.
        down_factor: ``d >= 2``.
    """

    def __init__(self, layer_names: Iterable[str], down_factor: int, device: torch.device | str | None = None):
        super().__init__()
        self.down_factor = down_factor
        self.layer_names = list(layer_names)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        d = down_factor
        self.weights = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.full((1, 1, 1, d, 1, d, 1), 1.0 / d**2, device=device))
                for _ in self.layer_names
            ]
        )

    def weight(self, layer_name: str) -> torch.nn.Parameter:
        return self.weights[self._index[layer_name]]

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.processor.spatial_weight": tensor}`` (the official key format)."""
        return {pooling_key(name): self.weights[i] for i, name in enumerate(self.layer_names)}

    def extra_repr(self) -> str:
        return f"layers={len(self.layer_names)}, down_factor={self.down_factor}"


@dataclasses.dataclass
class ClearWeightsReport:
    """What loading a CLEAR checkpoint did.

    Attributes:
        source: the file (or ``"<state dict>"``).
        loaded: keys written (transformer parameters and pooling weights).
        missing: keys a complete checkpoint for this transformer and ``down_factor`` would hold but this one lacks
            (those parameters keep their current values).
        unexpected: always empty after a successful load (unexpected keys are an error).
        metadata: the file's safetensors metadata (attnpack writes ``radius``, ``down_factor``, ``base_model``).
    """

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    metadata: dict[str, str]


def clear_parameter_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the transformer parameters a CLEAR checkpoint holds (the official ``distill.py`` filter)."""
    return [name for name, _ in transformer.named_parameters() if any(p in name for p in CLEAR_PARAM_PATTERNS)]


def read_clear_checkpoint(weights: str | os.PathLike | Mapping[str, torch.Tensor]):
    """``(state_dict, metadata, source)`` from a safetensors path or an in-memory mapping (tensors on the CPU)."""
    if isinstance(weights, Mapping):
        bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"`weights` as a mapping must map str keys to tensors, got {bad[:3]!r}.")
        return dict(weights), {}, "<state dict>"
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"`weights` must be a path to a .safetensors CLEAR checkpoint or a state dict, got {type(weights).__name__}."
        )
    from ..io import read_safetensors

    path = Path(weights).expanduser()
    if not path.exists():
        raise ValueError(
            f"`weights` file {str(path)!r} does not exist. Download an official checkpoint, e.g. "
            "`huggingface_hub.hf_hub_download('Huage001/CLEAR', 'clear_local_16.safetensors')`, or pass a file "
            "written by `attnpack distill-clear`."
        )
    if path.suffix != ".safetensors":
        raise ValueError(f"`weights` must be a .safetensors file (the official CLEAR format), got {str(path)!r}.")
    state, metadata = read_safetensors(path, "`weights` file")
    return state, metadata, str(path)


def _pooling_factor(shape: torch.Size) -> int | None:
    if len(shape) == 7 and shape[:3] == (1, 1, 1) and shape[4] == 1 and shape[6] == 1 and shape[3] == shape[5]:
        return int(shape[3])
    return None


def _preview(keys: list[str], n: int = 4) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_clear_checkpoint(
    transformer: torch.nn.Module,
    layer_names: list[str],
    state: Mapping[str, torch.Tensor],
    down_factor: int,
    source: str = "<state dict>",
) -> tuple[list[str], list[str]]:
    """Validate a checkpoint against a transformer and ``down_factor``: ``(keys to load, missing keys)``.

    Raises ``ValueError`` for keys this transformer does not have (another model), shapes that do not match (another
    model size), pooling weights that do not match ``down_factor``, or a checkpoint without any CLEAR weight.
    """
    params = dict(transformer.named_parameters())
    expected = clear_parameter_names(transformer)
    expected_set = set(expected)
    pool_keys = {pooling_key(n): n for n in layer_names}
    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise ValueError(
            f"`weights` {source!r} holds tensors that are not floating point: {_preview(not_float, 3)}. CLEAR "
            "weights are float tensors (the released files are bf16); the file is damaged or not a CLEAR checkpoint."
        )
    not_finite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if not_finite:
        raise ValueError(
            f"`weights` {source!r} holds NaN or infinite values in {_preview(not_finite, 3)}; the file is damaged "
            "or its distillation diverged."
        )
    # pooling weights say which down factor the checkpoint was trained with
    found = [k for k in state if k.endswith("spatial_weight")]
    shape = "[1, 1, 1, d, 1, d, 1]" if down_factor == 1 else f"[1, 1, 1, {down_factor}, 1, {down_factor}, 1]"
    misshaped = [f"{k} {list(state[k].shape)}" for k in found if _pooling_factor(state[k].shape) is None]
    if misshaped:
        raise ValueError(
            f"`weights` {source!r} holds pooling weights of the wrong shape: {_preview(misshaped, 3)}; every "
            f"spatial_weight must be {shape}. The file is damaged or not a CLEAR checkpoint."
        )
    factors = sorted({_pooling_factor(state[k].shape) for k in found})
    if found and down_factor == 1:
        trained = factors[0] if len(factors) == 1 else factors
        raise ValueError(
            f"`weights` {source!r} holds pooling weights ({len(found)} spatial_weight keys of shape "
            f"{list(state[found[0]].shape)}): it was trained with down_factor={trained}; pass down_factor={trained}."
        )
    if down_factor > 1:
        if not found:
            raise ValueError(
                f"`weights` {source!r} has no pooling weights (spatial_weight): it was trained with down_factor=1, "
                f"but down_factor={down_factor} was requested; pass down_factor=1."
            )
        if factors != [down_factor]:
            raise ValueError(
                f"`weights` {source!r} holds pooling weights for d={factors}, but down_factor={down_factor} was "
                f"requested (pooling weights {shape}); pass the down_factor the checkpoint was trained with."
            )
    unexpected = [k for k in state if k not in pool_keys and k not in expected_set]
    if unexpected:
        in_model = [k for k in unexpected if k in params]
        hint = (
            f" {len(in_model)} of them are other parameters of this transformer (not CLEAR attention weights)."
            if in_model
            else " This looks like a checkpoint for another model (different block count or names)."
        )
        raise ValueError(
            f"`weights` {source!r} has {len(unexpected)} keys this FLUX transformer's CLEAR weights do not have: "
            f"{_preview(unexpected)}.{hint}"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs transformer {tuple(params[k].shape)}"
        for k, v in state.items()
        if k in params and v.shape != params[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"`weights` {source!r} is for a different model size: {_preview(mismatched, 3)}. CLEAR checkpoints must "
            "come from the same base model (the released ones are for FLUX.1-dev)."
        )
    if not any(k in params for k in state):
        raise ValueError(f"`weights` {source!r} holds no CLEAR attention weights (to_q / to_k / to_v / to_out).")
    required = expected + (list(pool_keys) if down_factor > 1 else [])
    missing = [k for k in required if k not in state]
    return [k for k in state], missing


def load_clear_weights(
    transformer: torch.nn.Module,
    layer_names: list[str],
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    down_factor: int,
    pooling: ClearPooling | None,
):
    """Check and load a CLEAR checkpoint; returns ``(report, restore)`` where ``restore()`` puts the transformer's
    previous parameter values back (pooling weights belong to the handle and need no restore)."""
    if any(getattr(m, "fused_projections", False) for m in transformer.modules()):
        raise ValueError(
            "`weights` cannot be loaded while the transformer's q/k/v projections are fused; call "
            "`transformer.unfuse_qkv_projections()` before apply_clear(weights=...)."
        )
    state, metadata, source = read_clear_checkpoint(weights)
    keys, missing = check_clear_checkpoint(transformer, layer_names, state, down_factor, source)
    params = dict(transformer.named_parameters())
    backups: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in keys:
            if key in params:
                p = params[key]
                backups[key] = p.detach().to("cpu", copy=True)
                p.copy_(state[key].to(device=p.device, dtype=p.dtype))
            else:
                target = pooling.weight(key[: -len(POOLING_SUFFIX)])
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
    if missing:
        logger.warning(
            "CLEAR weights %s lack %d keys (those parameters keep their current values): %s",
            source,
            len(missing),
            _preview(missing),
        )
    report = ClearWeightsReport(source, keys, missing, [], metadata)

    def restore() -> None:
        with torch.no_grad():
            for key, value in backups.items():
                params[key].copy_(value.to(params[key].device))

    return report, restore


def save_clear_checkpoint(
    path: str | os.PathLike,
    transformer: torch.nn.Module,
    pooling: ClearPooling | None = None,
    *,
    metadata: Mapping[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the CLEAR weights of ``transformer`` (+ pooling) in the official key format, atomically.

    ``dtype`` casts the tensors (the official files are bf16); ``metadata`` values are stored as strings in the
    safetensors header (attnpack records ``radius``, ``down_factor`` and ``base_model``).
    """
    from safetensors.torch import save_file

    from ..io import atomic_path

    params = dict(transformer.named_parameters())
    state = {k: params[k] for k in clear_parameter_names(transformer)}
    if pooling is not None:
        state.update(pooling.official_state_dict())
    out = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    meta = {"format": "clear", **{k: str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return path
