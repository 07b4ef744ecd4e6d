"""Plans of the official PAROAtten release converted into attnpack :class:`~attnpack.ParoPlan` files.

Official code: https://github.com/jamescsq47/PAROAtten (commit ``3ac854f``; paper https://arxiv.org/abs/2506.16054).
Its pipelines (``example/pipeline_cogvideox.py``, ``example/pipeline_wan.py``) read two files with
``torch.load(..., weights_only=True)``:

- ``permute_plan.pth``: ``permute`` ``[N_block, N_head]``, the axis order of every (transformer block, head): index
  into ``[[0, 1, 2], [0, 2, 1], [1, 2, 0], [1, 0, 2], [2, 1, 0], [2, 0, 1]]`` (``FHW, FWH, HWF, HFW, WHF, WFH``,
  slowest axis first; ``paroattention/cogvideox.py`` ``permute_qk``), the same numbering as attnpack's; ``empty``
  ``[N_block, N_head]``, an "empty head" flag that the pipelines read but do not apply (the line applying it is
  commented out).
- ``sparse_plan.pth``: ``sparse`` ``[N_bucket, N_block, N_head, T', T']`` block masks (row = query block, column =
  key block, as the kernel reads ``sparse[b, h, q_block, k_block]``) over 64-token blocks of the raw joint
  sequence ``[text, reordered video]``. CogVideoX (226 text tokens): ``T' = 274`` covers the blocks after the 4 that
  hold text; the pipeline pads 4 all-true rows and columns in front (``F.pad(sparse, (4, 0, 4, 0), value=1)``),
  giving 278 blocks, block 3 holding 34 text and 30 video tokens. Wan (no text in self-attention): ``T' = 1182``.
  Both pipelines then force the last block row and column on.
- The mask of denoising step ``s`` of ``S`` is bucket ``int(s / S * N_bucket)`` (``TimestepCallback.on_step_end``
  sets it after each step; step 0 uses bucket 0).

:func:`convert_official_paro_plan` reproduces exactly that: the plan it returns has ``tiling="joint"`` and
``schedule="uniform"``, masks padded and forced as above, and the official token orders. The official kernel's
quantization (INT8 QK^T, FP16 PV with FP16 accumulation) is not attnpack's; converted plans default to
``quant=None`` (sparse only), ``quant="int8"`` at apply time quantizes as attnpack does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

import torch

from ..io import read_torch_tensors
from .paro_plan import ParoPlan, config_hash, pack_codes


logger = logging.getLogger(__name__)

__all__ = ["convert_official_paro_plan", "read_official_paro_plans", "OFFICIAL_LAYOUTS"]

# family -> (self-attention layer of official block i, token grid and text length the official pipelines hard-code)
OFFICIAL_LAYOUTS: dict[str, tuple[str, tuple[int, int, int], int]] = {
    "cogvideox": ("transformer_blocks.{}.attn1", (13, 30, 45), 226),  # 49 frames x 480 x 720
    "wan": ("blocks.{}.attn1", (21, 45, 80), 0),  # 81 frames x 720 x 1280
}
OFFICIAL_BLOCK_SIZE = 64
_FIX = (
    "Give the permute_plan.pth and sparse_plan.pth of the official PAROAtten release "
    "(github.com/jamescsq47/PAROAtten); see docs/paro.md#official-plans."
)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)  # fmt: skip
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_KNOWN_EXTRAS = {"sparse_plan": {"dense_rate"}, "permute_plan": set()}


def _name(kind: str, path) -> str:
    return f"{kind} {str(path)!r}"


def _check_binary(t: torch.Tensor, name: str, key: str) -> None:
    if t.dtype != torch.bool and bool(((t != 0) & (t != 1)).any()):
        raise ValueError(f"{name}: tensor {key!r} must hold only 0 / 1 (a boolean mask), got other values. {_FIX}")


def read_official_paro_plans(
    permute_plan: str | os.PathLike, sparse_plan: str | os.PathLike
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(permute, empty, sparse)`` of official plan files, checked for keys, dtypes and shapes.

    Files are read with ``torch.load(..., weights_only=True)`` only (anything else is refused) and memory-mapped when
    possible. Returns ``permute`` (``int64 [L, H]``), ``empty`` (``bool [L, H]`` or ``None`` when the file has none)
    and ``sparse`` (``[NB, L, H, T', T']``, the file's dtype, values 0 / 1 not yet checked: see
    :func:`convert_official_paro_plan`). Every problem is one ``ValueError`` naming the file and the fix.
    """
    files = {"permute_plan": permute_plan, "sparse_plan": sparse_plan}
    data = {kind: read_torch_tensors(path, f"official PARO {kind}", _FIX) for kind, path in files.items()}
    wanted = {"permute_plan": "permute", "sparse_plan": "sparse"}
    for kind, key in wanted.items():
        name = _name(kind, files[kind])
        if key not in data[kind]:
            other = next((k for k, w in wanted.items() if w in data[kind] and k != kind), None)
            hint = f" It looks like a {other}.pth: are the two files swapped?" if other else ""
            raise ValueError(
                f"{name} has no {key!r} tensor (it holds {', '.join(map(repr, data[kind])) or 'nothing'}).{hint} "
                f"{_FIX}"
            )
        extra = sorted(set(data[kind]) - {key, "empty"} - _KNOWN_EXTRAS[kind])
        if kind == "sparse_plan" and "empty" in data[kind]:
            extra.append("empty")
        if extra:
            logger.warning("%s: ignoring tensors an official plan does not use: %s", name, ", ".join(extra))
    pname, sname = _name("permute_plan", permute_plan), _name("sparse_plan", sparse_plan)
    permute = data["permute_plan"]["permute"]
    if permute.dtype not in _INT_DTYPES or permute.dim() != 2 or 0 in permute.shape:
        raise ValueError(
            f"{pname}: tensor 'permute' must be an integer [N_block, N_head] tensor, got {permute.dtype} of shape "
            f"{list(permute.shape)}. {_FIX}"
        )
    if bool(((permute < 0) | (permute > 5)).any()):
        raise ValueError(
            f"{pname}: tensor 'permute' must hold order indices 0..5 (FHW, FWH, HWF, HFW, WHF, WFH), got values in "
            f"[{int(permute.min())}, {int(permute.max())}]. {_FIX}"
        )
    empty = data["permute_plan"].get("empty")
    if empty is not None:
        if empty.dtype not in _MASK_DTYPES or tuple(empty.shape) != tuple(permute.shape):
            raise ValueError(
                f"{pname}: tensor 'empty' must be a boolean {list(permute.shape)} tensor like 'permute', got "
                f"{empty.dtype} of shape {list(empty.shape)}. {_FIX}"
            )
        _check_binary(empty, pname, "empty")
        empty = empty.bool()
    sparse = data["sparse_plan"]["sparse"]
    shape = list(sparse.shape)
    if sparse.dtype not in _MASK_DTYPES or sparse.dim() != 5 or 0 in shape or shape[3] != shape[4]:
        raise ValueError(
            f"{sname}: tensor 'sparse' must be a boolean [N_bucket, N_block, N_head, T, T] block mask, got "
            f"{sparse.dtype} of shape {shape}. {_FIX}"
        )
    if tuple(shape[1:3]) != tuple(permute.shape):
        raise ValueError(
            f"{sname} has masks for {shape[1]} blocks x {shape[2]} heads, but {pname} has orders for "
            f"{permute.shape[0]} x {permute.shape[1]}: the two files are not from one calibration. {_FIX}"
        )
    return permute.long(), empty, sparse


def _official_layers(model, family: str, n_blocks: int, heads: int, pname: str) -> list[str]:
    from ..attn_processors.processor import list_layers

    pattern, _, _ = OFFICIAL_LAYOUTS[family]
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    found = {}
    for info in list_layers(model):
        match = regex.fullmatch(info.name)
        if match:
            found[int(match.group(1))] = info
    names = [pattern.format(i) for i in range(len(found))]
    if sorted(found) != list(range(len(found))) or not found:
        raise ValueError(f"the {type(model).__name__} has no layers {pattern.format('i')} numbered from 0.")
    if len(found) != n_blocks:
        raise ValueError(
            f"{pname} has orders for {n_blocks} transformer blocks, the {type(model).__name__} has {len(found)}: "
            "the plan was calibrated for another model. Convert it with the model it was made for."
        )
    model_heads = found[0].heads
    if model_heads != heads:
        raise ValueError(
            f"{pname} has orders for {heads} heads per block, the {type(model).__name__} has {model_heads}: the "
            "plan was calibrated for another model. Convert it with the model it was made for."
        )
    return names


def convert_official_paro_plan(
    model,
    permute_plan: str | os.PathLike,
    sparse_plan: str | os.PathLike,
    *,
    grid: tuple[int, int, int] | None = None,
    text_len: int | None = None,
    num_inference_steps: int = 30,
    block_size: int = OFFICIAL_BLOCK_SIZE,
    quant: str | None = None,
    apply_empty: bool = False,
    buckets: int | None = None,
) -> ParoPlan:
    """Convert the official PAROAtten ``permute_plan.pth`` / ``sparse_plan.pth`` into a :class:`~attnpack.ParoPlan`.

    The result runs in attnpack exactly as the official pipelines run the files (see the module docstring):
    ``tiling="joint"`` (64-token blocks over the raw ``[text, video]`` sequence, text blocks dense, last block row
    and column on) and ``schedule="uniform"`` (step ``s`` of ``S`` uses mask ``int(s / S * N_bucket)``, for any
    ``S``).

    Args:
        model: the CogVideoX or Wan 2.1 pipeline or denoiser the plan was calibrated for (only its config and layer
            structure are used: a denoiser built on the ``meta`` device will do).
        permute_plan / sparse_plan: paths of the official files.
        grid: the latent token grid ``(F, H, W)`` after patching; default the shape the official pipeline hard-codes
            (CogVideoX ``(13, 30, 45)``: 49 x 480 x 720; Wan ``(21, 45, 80)``: 81 x 720 x 1280).
        text_len: text tokens before the video tokens in self-attention (default CogVideoX 226, Wan 0).
        num_inference_steps: the schedule the plan was made for (official pipelines: 30); recorded, the mask of a
            step is chosen by progress through whatever schedule runs.
        block_size: tokens per block (the official kernel's 64).
        quant: default quantization stored in the plan (``None``: sparse only; ``"int8"``, ``"fp8"``, ``"int4"``).
        apply_empty: apply the ``empty`` head flags as the official pipelines' commented-out line would (an empty
            head keeps only its forced blocks); default ``False``, as the official pipelines run.
        buckets: the ``num_timestep_for_sparse_mask`` the official ``TimestepCallback`` was given (the official
            pipelines: CogVideoX 30, Wan 4); the first ``buckets`` masks of the file are used. Default: the file's
            ``N_bucket``.

    Returns:
        the plan (single density: the achieved fraction of kept blocks, forced blocks included).
    """
    from ..attn_processors.families import family_of_model
    from ..attn_processors.paro import normalize_quant
    from ..attn_processors.processor import resolve_denoisers

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer (the official kernel's 64), got {block_size!r}.")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    quant = normalize_quant(quant)
    permute, empty, sparse = read_official_paro_plans(permute_plan, sparse_plan)
    pname, sname = _name("permute_plan", permute_plan), _name("sparse_plan", sparse_plan)
    if apply_empty and empty is None:
        raise ValueError(f"`apply_empty=True` needs an 'empty' tensor, which {pname} lacks.")
    models, _ = resolve_denoisers(model)
    if len(models) != 1:
        raise ValueError("`model` must have one denoiser (CogVideoX or Wan 2.1); pass e.g. `pipe.transformer`.")
    denoiser = models[0]
    family = family_of_model(denoiser)
    if family not in OFFICIAL_LAYOUTS:
        raise ValueError(
            f"official PAROAtten plans exist for CogVideoX and Wan 2.1; the model is a {type(denoiser).__name__} "
            f"({family}). Calibrate a plan for it with `attnpack calibrate-paro`."
        )
    _, default_grid, default_text = OFFICIAL_LAYOUTS[family]
    grid = tuple(default_grid if grid is None else grid)
    text_len = default_text if text_len is None else text_len
    if len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"`grid` must be 3 positive ints (frames, height, width of the latent tokens), got {grid}.")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"`text_len` must be a non-negative integer, got {text_len!r}.")
    n_buckets, n_blocks, heads, side, _ = sparse.shape
    if buckets is not None:
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= n_buckets:
            raise ValueError(
                f"`buckets` must be an integer in [1, {n_buckets}] (the masks {sname} holds), got {buckets!r}: the "
                "official pipeline indexes the file's masks with it."
            )
        n_buckets = buckets
    layers = _official_layers(denoiser, family, n_blocks, heads, pname)
    t = -(-(text_len + math.prod(grid)) // block_size)
    n_text = -(-text_len // block_size)
    if side != t - n_text:
        raise ValueError(
            f"{sname} has {side} x {side} block masks, but a grid of {grid} with {text_len} text tokens in "
            f"{block_size}-token blocks needs {t - n_text} ({t} blocks of the joint sequence"
            + (f" minus the {n_text} text blocks the official pipeline pads in" if n_text else "")
            + "). Pass the grid and text length the plan was calibrated for (`grid=` / `text_len=`, "
            "`--grid F,H,W --text-len N`)."
        )
    rows, kept = [], 0
    for b in range(n_buckets):
        row = []
        for layer in range(n_blocks):
            block = sparse[b, layer]
            _check_binary(block, sname, "sparse")
            mask = block.bool()
            if apply_empty:
                mask = mask & ~empty[layer][:, None, None]
            mask = torch.nn.functional.pad(mask, (n_text, 0, n_text, 0), value=True)  # the text blocks: dense
            mask[:, :, -1] = True
            mask[:, -1, :] = True
            kept += int(mask.sum())
            row.append(pack_codes((~mask).to(torch.uint8), 1))  # code 0: kept at the plan's density
        rows.append(torch.stack(row))
    density = kept / (n_buckets * n_blocks * heads * t * t)
    info: dict[str, Any] = {
        "source": "official PAROAtten plan (github.com/jamescsq47/PAROAtten), converted by attnpack",
        "permute_plan": os.fspath(permute_plan),
        "sparse_plan": os.fspath(sparse_plan),
        "empty_heads": None if empty is None else int(empty.sum()),
        "empty_applied": bool(apply_empty),
        "alpha_and_mask_rule": "unknown (the official calibration code is unreleased)",
    }
    return ParoPlan(
        model_class=type(denoiser).__name__,
        config_hash=config_hash(denoiser),
        family=family,
        grid=grid,
        text_len=text_len,
        text_first=True,
        num_inference_steps=num_inference_steps,
        block_size=block_size,
        densities=(density,),
        density=density,
        timestep_buckets=n_buckets,
        layers=tuple(layers),
        heads=heads,
        orders=permute.to(torch.int8),
        masks=torch.stack(rows),
        mask_bits=1,
        quant=quant,
        info=json.loads(json.dumps(info)),
        tiling="joint",
        schedule="uniform",
    )
