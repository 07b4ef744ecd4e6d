"""ParoPlan: the result of PARO calibration (per-head axis orders + static block masks), saved as safetensors.

Paper: https://arxiv.org/abs/2506.16054. A plan is tied to one denoiser (class and config), one token grid (latent
frames x height x width after patching, plus the text length), one block size and one step schedule: PARO's masks are
static, so using a plan on another model or resolution raises a ``ValueError`` instead of silently attending to the
wrong blocks. A different number of steps is mapped by progress through the schedule (and logged).

File layout (safetensors):

- ``orders``: ``int8 [L, H]`` order index per layer and head (``0 FHW, 1 FWH, 2 HWF, 3 HFW, 4 WHF, 5 WFH``; images
  ``0 HW, 1 WH``).
- ``masks``: ``uint8 [NB, L, row_bytes]``: per timestep bucket (``NB``) and layer, the ``[H, T, T]`` block codes
  (``T`` blocks per side, text blocks included, tiled as ``tiling`` says) bit-packed into one row. A block's code is
  the index of the smallest stored density whose mask keeps it (``len(densities)``: kept only at density 1);
  ``mask_bits`` per code is 1, 2, 4 or 8 (1 bit for a single density). Plans stay packed in memory too; one
  (bucket, layer) row is unpacked when its pattern is built.
- ``order_metrics`` (optional): ``float32 [L, H, n_orders, 2]`` calibration sparsity and incoherence of every
  candidate order.
- metadata: format and version, model class, config hash, family, grid, text length and position, steps, block size,
  densities, timestep buckets, alpha, quant, mask rule, layer names, heads, shapes, ``tiling`` and ``schedule``
  (format version 2; version 1 files have neither and mean ``"padded"`` / ``"half"``) and free-form ``info`` (JSON).

Two conventions are options of a plan, so that plans of the official PAROAtten code run as they were calibrated
(:mod:`attnpack.pipelines.paro_official` converts them):

- ``tiling``: ``"padded"`` (attnpack's calibration: text padded to whole blocks, the grid starts a new block) or
  ``"joint"`` (the official code: blocks run over the raw ``[text, grid]`` sequence);
- ``schedule``: ``"half"`` (``timestep_buckets`` distinct masks over the first half of the steps, one shared mask
  after) or ``"uniform"`` (the official code: ``timestep_buckets`` masks, step ``s`` of ``S`` uses mask
  ``int(s / S * timestep_buckets)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path


logger = logging.getLogger(__name__)

__all__ = [
    "ParoPlan",
    "mask_bits_for",
    "pack_mask_rows",
    "config_hash",
    "timestep_bucket",
    "uniform_bucket",
    "schedule_bucket",
    "SCHEDULES",
    "default_timestep_buckets",
    "pack_codes",
    "unpack_codes",
]

FORMAT = "attnpack.paro_plan"
VERSION = 2  # 2: `tiling` and `schedule` metadata (version 1 plans are "padded" / "half")
SCHEDULES = ("half", "uniform")


def config_hash(model: torch.nn.Module) -> str:
    """A short hash of a denoiser's config (private ``_``-prefixed entries such as the checkpoint path excluded)."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_timestep_buckets(num_inference_steps: int) -> int:
    """The paper's schedule: one mask per step of the first half (the later half shares one more)."""
    return num_inference_steps // 2


def timestep_bucket(step_index: int, num_steps: int, buckets: int) -> int:
    """Mask bucket of a step: ``buckets`` distinct masks over the first ``num_steps // 2`` steps, then one shared.

    Returns a value in ``[0, buckets]``; ``buckets`` is the shared bucket of the later half.
    """
    half = num_steps // 2
    if step_index >= half or buckets == 0:
        return buckets
    return min(buckets - 1, max(0, step_index) * buckets // half)


def uniform_bucket(step_index: int | None, num_steps: int, buckets: int) -> int:
    """Mask bucket of a step in the official PAROAtten schedule: ``buckets`` masks spread over the whole schedule.

    Step ``s`` of ``num_steps`` uses ``int(s / num_steps * buckets)`` (in floating point, as the official
    ``TimestepCallback`` computes it after each step; this differs from the exact ``floor(s * buckets / num_steps)``
    for a few schedules, e.g. step 29 of 50 with 50 buckets), clamped to ``[0, buckets)``.
    """
    step = 0 if step_index is None else max(0, int(step_index))
    return min(buckets - 1, int(step / num_steps * buckets))


def schedule_bucket(step_index: int | None, num_steps: int | None, calibrated_steps: int, buckets: int) -> int:
    """:func:`timestep_bucket` of a step of a ``num_steps`` schedule, mapped by progress onto the calibrated one."""
    step_index = 0 if step_index is None else step_index
    if num_steps and num_steps != calibrated_steps:
        step_index = step_index * calibrated_steps // num_steps
    return timestep_bucket(step_index, calibrated_steps, buckets)


def mask_bits_for(num_densities: int) -> int:
    """Bits per block code for ``num_densities`` stored levels (codes ``0..num_densities``)."""
    for bits in (1, 2, 4, 8):
        if num_densities < (1 << bits):
            return bits
    raise ValueError(f"at most 255 densities can be stored in a plan, got {num_densities}.")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small non-negative integer codes (``uint8``, any shape) into a 1-D ``uint8`` tensor, ``8 // bits`` per
    byte, least significant first."""
    per = 8 // bits
    flat = codes.flatten().to(torch.int32)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat.view(-1, per) << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    per = 8 // bits
    n = math.prod(shape)
    if packed.numel() * per < n:
        raise ValueError(f"packed masks hold {packed.numel() * per} codes, expected {n}: the file is damaged.")
    shifts = torch.arange(per, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return values.flatten()[:n].to(torch.uint8).view(*shape)


def pack_mask_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8 [..., H, T, T]`` codes -> ``uint8 [..., row_bytes]``: every ``[H, T, T]`` slice packed on its own."""
    lead = codes.shape[:-3]
    rows = codes.reshape(-1, math.prod(codes.shape[-3:]))
    packed = torch.stack([pack_codes(r, bits) for r in rows]) if rows.shape[0] else rows.new_zeros(0, 0)
    return packed.view(*lead, -1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_check(check):
    def parse(text: str):
        value = json.loads(text)
        if not check(value):
            raise ValueError(text)
        return value

    return parse


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


# metadata entry -> (parser of its text, what it must be); `info` may be absent
_META_FIELDS = {
    "model_class": (str, "a class name"),
    "config_hash": (str, "a hash"),
    "family": (str, "a family name"),
    "grid": (_json_check(lambda v: isinstance(v, list) and all(map(_is_int, v))), "a JSON list of ints"),
    "text_len": (int, "an int"),
    "text_first": (_json_check(lambda v: isinstance(v, bool)), "true or false"),
    "num_inference_steps": (int, "an int"),
    "block_size": (int, "an int"),
    "densities": (_json_check(lambda v: isinstance(v, list) and all(map(_is_number, v))), "a list of numbers"),
    "density": (_finite, "a finite number"),
    "timestep_buckets": (int, "an int"),
    "layers": (_json_check(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)), "a list of names"),
    "heads": (int, "an int"),
    "mask_bits": (int, "an int"),
    "alpha": (_finite, "a finite number"),
    "quant": (_json_check(lambda v: v is None or isinstance(v, str)), "a JSON string or null"),
    "mask_rule": (str, "a rule name"),
    "tiling": (str, "a tiling name"),
    "schedule": (str, "a schedule name"),
    "info": (_json_check(lambda v: isinstance(v, dict)), "a JSON object"),
}
# metadata entries a file may lack: their value then (format version 1 plans predate tiling and schedule)
_META_DEFAULTS = {"info": {}, "tiling": "padded", "schedule": "half"}
_META_SINCE = {"tiling": 2, "schedule": 2}  # entries required from this format version on
# tensor -> (dtypes it may have, what a plan stores)
_TENSOR_DTYPES = {
    "orders": ((torch.int8,), "int8"),
    "masks": ((torch.uint8,), "uint8"),
    "order_metrics": ((torch.float32,), "float32"),
}


def _meta_value(meta: dict[str, str], key: str, parse, what: str, name: str, version: int = VERSION):
    if key not in meta:
        if key in _META_DEFAULTS and version < _META_SINCE.get(key, VERSION + 1):
            return _META_DEFAULTS[key]
        raise ValueError(f"{name} lacks the metadata entry {key!r}: the file is damaged or incomplete.")
    try:
        return parse(meta[key])
    except (ValueError, TypeError, RecursionError):  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{name} is damaged: metadata {key}={meta[key][:80]!r} is not {what}.") from None


@dataclasses.dataclass(eq=False)
class ParoPlan:
    """A calibrated PARO plan for one denoiser, token grid and step schedule.

    Attributes:
        model_class / config_hash / family: the denoiser it was calibrated on (:func:`config_hash`).
        grid: token grid of the image / video tokens at the attention layers, ``(F, H, W)`` or ``(H, W)``.
        text_len / text_first: text tokens joined with them in self-attention (CogVideoX: first; FLUX: first; Wan: 0).
        num_inference_steps: the calibration schedule length.
        block_size: tokens per block (the kernel tile).
        densities: stored mask densities (strictly increasing); density 1 (all blocks) is always available.
        density: the default density of :func:`~attnpack.apply_paro`.
        timestep_buckets: with ``schedule="half"``, distinct masks over the first half of the steps (the later half
            shares one more); with ``schedule="uniform"``, the number of masks.
        layers: names of the calibrated attention layers, in the order of :attr:`orders`.
        heads: heads per layer.
        orders: ``int8 [L, H]`` axis-order index per layer and head.
        masks: ``uint8 [num_buckets, L, row_bytes]`` bit-packed nested mask codes (:func:`pack_mask_rows`
            of ``[num_buckets, L, H, T, T]`` codes from :func:`~attnpack.kernels.paro.select_block_masks`).
        mask_bits: bits per code (:func:`mask_bits_for` of the number of densities).
        alpha: weight of sparsity vs. incoherence in the order choice.
        quant: default quantization of :func:`~attnpack.apply_paro` (``"int8"``, ``"fp8"``, ``"int4"`` or ``None``).
        mask_rule: ``"threshold"`` (one mass threshold per head) or ``"row"`` (per query-block row).
        order_metrics: optional ``float32 [L, H, n_orders, 2]`` sparsity / incoherence per candidate order.
        tiling: ``"padded"`` (text blocks padded, the grid starts a new block) or ``"joint"`` (blocks over the raw
            ``[text, grid]`` sequence, as the official PAROAtten code); see
            :func:`~attnpack.kernels.paro.paro_token_order`.
        schedule: ``"half"`` (see ``timestep_buckets``) or ``"uniform"`` (:func:`uniform_bucket`, the official code's).
        info: free-form JSON-serialisable details (prompts, sizes, fidelity, versions).
    """

    model_class: str
    config_hash: str
    family: str
    grid: tuple[int, ...]
    text_len: int
    text_first: bool
    num_inference_steps: int
    block_size: int
    densities: tuple[float, ...]
    density: float
    timestep_buckets: int
    layers: tuple[str, ...]
    heads: int
    orders: torch.Tensor
    masks: torch.Tensor
    mask_bits: int
    alpha: float = 0.5
    quant: str | None = "int8"
    mask_rule: str = "threshold"
    order_metrics: torch.Tensor | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    tiling: str = "padded"
    schedule: str = "half"
    _warned_steps: bool = dataclasses.field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        self.densities = tuple(float(d) for d in self.densities)
        self.layers = tuple(self.layers)
        self.orders = self.orders.to(torch.int8).cpu()
        self.masks = self.masks.to(torch.uint8).cpu()
        self.validate()

    # ------------------------------------------------------------------------------------------------ shape
    @property
    def num_blocks(self) -> int:
        """Blocks per side ``T``: text blocks plus grid blocks (``"joint"`` tiling: blocks of the joint sequence)."""
        if self.tiling == "joint":
            return -(-(self.text_len + math.prod(self.grid)) // self.block_size)
        return -(-self.text_len // self.block_size) + -(-math.prod(self.grid) // self.block_size)

    @property
    def text_blocks(self) -> range:
        """The blocks holding text tokens (``"joint"`` tiling: the last one also holds grid tokens)."""
        nt = -(-self.text_len // self.block_size)
        if self.text_first:
            return range(0, nt)
        return range(self.num_blocks - nt, self.num_blocks)

    @property
    def num_buckets(self) -> int:
        """Stored masks per layer: ``timestep_buckets + 1`` (``"half"`` schedule) or ``timestep_buckets``."""
        return self.timestep_buckets if self.schedule == "uniform" else self.timestep_buckets + 1

    def token_order(self, layer: int, device: torch.device | str | None = None, *, heads: slice | None = None):
        """The block-sparse :class:`~attnpack.kernels.block_sparse.TokenOrder` of ``layer`` (index) in this plan's
        tiling; ``heads``: only those heads' orders (a rank's heads under Ulysses context parallelism)."""
        from ..kernels.paro import paro_token_order

        orders = self.orders[layer]
        if heads is not None and orders.numel() > 1:  # one order per head; a single entry is shared by all heads
            orders = orders[heads]
        return paro_token_order(self.grid, orders, self.block_size, text_len=self.text_len,
                                text_first=self.text_first, tiling=self.tiling, device=device)  # fmt: skip

    def validate(self) -> None:
        """Raise ``ValueError`` if the fields are inconsistent (a damaged or hand-edited plan)."""
        for name, low in (("text_len", 0), ("num_inference_steps", 1), ("block_size", 1), ("timestep_buckets", 0),
                          ("heads", 1), ("mask_bits", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ParoPlan.{name} must be an int >= {low}, got {value!r}.")
        if len(self.grid) not in (2, 3) or any(g < 1 for g in self.grid):
            raise ValueError(f"ParoPlan.grid must be 2 or 3 positive sizes (frames, height, width), got {self.grid}.")
        if not isinstance(self.text_first, bool):
            raise ValueError(f"ParoPlan.text_first must be True or False, got {self.text_first!r}.")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"ParoPlan.layers must be distinct layer names, got {list(self.layers)[:4]}.")
        for name in ("density", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ParoPlan.{name} must be a finite number, got {value!r}.")
        from ..kernels.paro import MASK_RULES, QUANT_MODES

        if self.quant is not None and self.quant not in QUANT_MODES:
            raise ValueError(f"ParoPlan.quant must be one of {', '.join(QUANT_MODES)} or None, got {self.quant!r}.")
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"ParoPlan.mask_rule must be one of {', '.join(MASK_RULES)}, got {self.mask_rule!r}.")
        from ..kernels.paro import TILINGS

        if self.tiling not in TILINGS:
            raise ValueError(f"ParoPlan.tiling must be one of {', '.join(TILINGS)}, got {self.tiling!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ParoPlan.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.tiling == "joint" and self.text_len and not self.text_first:
            raise ValueError("ParoPlan.tiling='joint' needs the text tokens before the grid (text_first=True).")
        n_layers, t = len(self.layers), self.num_blocks
        if tuple(self.orders.shape) != (n_layers, self.heads):
            raise ValueError(f"ParoPlan.orders must be [{n_layers}, {self.heads}], got {tuple(self.orders.shape)}.")
        if self.mask_bits not in (1, 2, 4, 8) or (1 << self.mask_bits) <= len(self.densities):
            raise ValueError(
                f"ParoPlan.mask_bits={self.mask_bits} cannot hold codes of {len(self.densities)} densities."
            )
        expect = (self.num_buckets, n_layers, -(-self.heads * t * t * self.mask_bits // 8))
        if tuple(self.masks.shape) != expect:
            raise ValueError(
                f"ParoPlan.masks must be packed rows {list(expect)} ({self.heads} heads x {t} x {t} blocks at "
                f"{self.mask_bits} bits), got {list(self.masks.shape)}."
            )
        n_orders = 6 if len(self.grid) == 3 else 2
        if len(self.grid) not in (2, 3) or bool(((self.orders < 0) | (self.orders >= n_orders)).any()):
            raise ValueError(f"ParoPlan: orders must lie in [0, {n_orders}) for grid {self.grid}.")
        d = self.densities
        if not d or any(not 0 < x <= 1 for x in d) or any(a >= b for a, b in zip(d, d[1:])):
            raise ValueError(f"ParoPlan.densities must be strictly increasing in (0, 1], got {d}.")
        if self.density != 1.0 and not any(math.isclose(self.density, x) for x in d):
            raise ValueError(f"ParoPlan.density={self.density} must be one of the stored densities {d} or 1.0.")
        if self.schedule == "uniform":
            if self.timestep_buckets < 1:
                raise ValueError(f"ParoPlan.timestep_buckets={self.timestep_buckets} must be >= 1 (masks of the "
                                 "'uniform' schedule).")  # fmt: skip
        elif not 0 <= self.timestep_buckets <= max(self.num_inference_steps // 2, 0):
            raise ValueError(
                f"ParoPlan.timestep_buckets={self.timestep_buckets} must be in [0, num_inference_steps // 2 = "
                f"{self.num_inference_steps // 2}]."
            )
        metrics = None if self.order_metrics is None else tuple(self.order_metrics.shape)
        if metrics is not None and metrics != (n_layers, self.heads, n_orders, 2):
            raise ValueError(
                f"ParoPlan.order_metrics must be [{n_layers}, {self.heads}, {n_orders}, 2], got {list(metrics)}."
            )

    # ------------------------------------------------------------------------------------------------ lookups
    def level(self, density: float | None) -> int | None:
        """Index of ``density`` among :attr:`densities` (``None``: the plan's default; ``None`` result: density 1)."""
        density = self.density if density is None else density
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"`density` must be a number in (0, 1], got {density!r}.")
        if math.isclose(float(density), 1.0):
            return None
        for i, d in enumerate(self.densities):
            if math.isclose(float(density), d, rel_tol=1e-6, abs_tol=1e-9):
                return i
        raise ValueError(
            f"`density`={density} is not stored in this plan (stored: {', '.join(map(str, self.densities))}, and "
            f"1.0). Calibrate with `density=[...]` listing every density you want to use."
        )

    def layer_index(self, name: str) -> int:
        try:
            return self.layers.index(name)
        except ValueError:
            raise ValueError(
                f"layer {name!r} is not in this plan; calibrated layers: {', '.join(self.layers)}."
            ) from None

    def bucket(self, step_index: int | None, num_steps: int | None = None) -> int:
        """Mask bucket of a denoising step; a schedule of another length is mapped by progress (logged once)."""
        if num_steps and num_steps != self.num_inference_steps and not self._warned_steps:
            self._warned_steps = True
            logger.warning(
                "PARO plan calibrated for %d steps used with %d: masks are mapped by progress through the schedule; "
                "calibrate for this schedule for the paper's setting.",
                self.num_inference_steps,
                num_steps,
            )
        if self.schedule == "uniform":
            return uniform_bucket(step_index, num_steps or self.num_inference_steps, self.timestep_buckets)
        return schedule_bucket(step_index, num_steps, self.num_inference_steps, self.timestep_buckets)

    def mask(self, bucket: int, layer: int, density: float | None = None) -> torch.Tensor:
        """bool ``[H, T, T]`` block mask of ``layer`` (index) in ``bucket`` at ``density``."""
        level = self.level(density)
        codes = self.codes(bucket, layer)
        return torch.ones_like(codes, dtype=torch.bool) if level is None else codes <= level

    def codes(self, bucket: int, layer: int) -> torch.Tensor:
        """``uint8 [H, T, T]`` mask codes of one bucket and layer (unpacked)."""
        t = self.num_blocks
        return unpack_codes(self.masks[bucket, layer], self.mask_bits, (self.heads, t, t))

    def mask_codes(self) -> torch.Tensor:
        """All codes, ``uint8 [NB, L, H, T, T]`` (unpacked: mind the memory of large plans)."""
        return torch.stack(
            [torch.stack([self.codes(b, i) for i in range(len(self.layers))]) for b in range(self.num_buckets)]
        )

    def achieved_density(self, density: float | None = None) -> float:
        """Mean fraction of kept blocks over buckets, layers and heads."""
        level = self.level(density)
        if level is None:
            return 1.0
        kept = sum(
            int((self.codes(b, i) <= level).sum()) for b in range(self.num_buckets) for i in range(len(self.layers))
        )
        return kept / (self.num_buckets * len(self.layers) * self.heads * self.num_blocks**2)

    def order_names(self) -> list[list[str]]:
        from ..kernels.paro.orders import axis_order_names

        names = axis_order_names(len(self.grid))
        return [[names[int(o)] for o in row] for row in self.orders]

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable description (no tensors)."""
        from ..kernels.paro.orders import axis_order_names

        names = axis_order_names(len(self.grid))
        counts = torch.bincount(self.orders.flatten().long(), minlength=len(names))
        return {
            "model_class": self.model_class,
            "family": self.family,
            "grid": list(self.grid),
            "text_len": self.text_len,
            "num_inference_steps": self.num_inference_steps,
            "block_size": self.block_size,
            "blocks_per_side": self.num_blocks,
            "layers": len(self.layers),
            "heads": self.heads,
            "timestep_buckets": self.timestep_buckets,
            "tiling": self.tiling,
            "schedule": self.schedule,
            "densities": {str(d): self.achieved_density(d) for d in self.densities},
            "default_density": self.density,
            "quant": self.quant,
            "alpha": self.alpha,
            "mask_rule": self.mask_rule,
            "order_counts": {n: int(c) for n, c in zip(names, counts)},
        }

    # ------------------------------------------------------------------------------------------------ checks
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` is the denoiser this plan was calibrated on."""
        from ..attn_processors.processor import list_layers

        cls = type(model).__name__
        if cls != self.model_class:
            raise ValueError(
                f"this PARO plan was calibrated on a {self.model_class}; the pipeline's denoiser is a {cls}. "
                "Calibrate a plan for this model with `attnpack.calibrate_paro` or `attnpack calibrate-paro`."
            )
        digest = config_hash(model)
        if digest != self.config_hash:
            raise ValueError(
                f"this PARO plan was calibrated on a {cls} with config hash {self.config_hash}; this model's config "
                f"hashes to {digest} (another size or variant). Calibrate a plan for this model."
            )
        heads = {info.name: info.heads for info in list_layers(model)}
        for name in self.layers:
            if heads.get(name) != self.heads:
                raise ValueError(
                    f"layer {name!r} of the plan has {self.heads} heads, the model's has {heads.get(name)}: the plan "
                    "does not fit this model."
                )

    def check_layout(self, grid: tuple[int, ...] | None, text_len: int, text_first: bool) -> None:
        """Raise ``ValueError`` unless an attention call's token layout is the calibrated one."""
        grid = None if grid is None else tuple(grid)
        side = {True: "before", False: "after"}
        wrong = []
        if grid != self.grid:
            wrong.append(f"token grid {grid} (plan: {self.grid})")
        if text_len != self.text_len:
            wrong.append(f"{text_len} text tokens (plan: {self.text_len})")
        elif text_len and text_first != self.text_first:
            wrong.append(
                f"text tokens {side[text_first]} the image tokens (plan: {side[self.text_first]}; the plan's "
                "text_first is wrong for this model)"
            )
        if wrong:
            raise ValueError(
                f"this PARO plan does not fit this attention call, which has {' and '.join(wrong)}. PARO masks are "
                "static: calibrate a plan for this resolution, frame count and prompt length (`attnpack "
                "calibrate-paro --height ... --width ... --frames ...`)."
            )

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to ``path`` (``.safetensors``) atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"orders": self.orders.contiguous(), "masks": self.masks.contiguous()}
        if self.order_metrics is not None:
            tensors["order_metrics"] = self.order_metrics.float().contiguous()
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "model_class": self.model_class,
            "config_hash": self.config_hash,
            "family": self.family,
            "grid": json.dumps(list(self.grid)),
            "text_len": str(self.text_len),
            "text_first": json.dumps(self.text_first),
            "num_inference_steps": str(self.num_inference_steps),
            "block_size": str(self.block_size),
            "densities": json.dumps(list(self.densities)),
            "density": repr(self.density),
            "timestep_buckets": str(self.timestep_buckets),
            "layers": json.dumps(list(self.layers)),
            "heads": str(self.heads),
            "alpha": repr(self.alpha),
            "quant": json.dumps(self.quant),
            "mask_rule": self.mask_rule,
            "mask_bits": str(self.mask_bits),
            "tiling": self.tiling,
            "schedule": self.schedule,
            "info": json.dumps(self.info, default=str),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParoPlan:
        """Read a plan written by :meth:`save`; a damaged or foreign file raises ``ValueError`` naming it."""
        from ..io import read_safetensors

        path = Path(path)
        try:
            tensors, meta = read_safetensors(path, "PARO plan")
        except ValueError as exc:
            if "pickle" not in str(exc):
                raise
            raise ValueError(
                f"{exc} Official PAROAtten plans (permute_plan.pth, sparse_plan.pth) are converted with "
                "`attnpack convert-paro-plan` (attnpack.convert_official_paro_plan)."
            ) from None
        name = f"PARO plan {str(path)!r}"
        if meta.get("format") != FORMAT:
            raise ValueError(f"{name} is not an attnpack PARO plan (no '{FORMAT}' metadata).")
        version = _meta_value(meta, "version", int, "an int", name) if "version" in meta else 0
        if version > VERSION:
            raise ValueError(
                f"{name} is of format version {version}; this attnpack reads up to {VERSION}. Upgrade attnpack."
            )
        fields = {
            key: _meta_value(meta, key, parse, what, name, version) for key, (parse, what) in _META_FIELDS.items()
        }
        extra = sorted(set(tensors) - set(_TENSOR_DTYPES))
        if extra:
            raise ValueError(f"{name} holds tensors a plan does not have: {', '.join(extra[:4])}.")
        for key, (kinds, what) in _TENSOR_DTYPES.items():
            if key not in tensors:
                if key == "order_metrics":
                    continue
                raise ValueError(f"{name} lacks the tensor {key!r}: the file is damaged or incomplete.")
            if tensors[key].dtype not in kinds:
                raise ValueError(f"{name}: tensor {key!r} is {tensors[key].dtype}, a plan stores it as {what}.")
        if "order_metrics" in tensors and not bool(torch.isfinite(tensors["order_metrics"]).all()):
            raise ValueError(f"{name}: tensor 'order_metrics' holds NaN or infinite values; the file is damaged.")
        try:
            for key in ("grid", "densities", "layers"):
                fields[key] = tuple(fields[key])
            return cls(**fields, orders=tensors["orders"], masks=tensors["masks"],
                       order_metrics=tensors.get("order_metrics"))  # fmt: skip
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name} is damaged or was edited: {exc}") from None

    def __repr__(self) -> str:
        dens = ", ".join(f"{d:g}" for d in self.densities)
        return (
            f"ParoPlan({self.model_class}, grid={self.grid}, text={self.text_len}, steps={self.num_inference_steps}, "
            f"block={self.block_size}, layers={len(self.layers)}x{self.heads} heads, densities=({dens}), "
            f"tiling={self.tiling}, schedule={self.schedule})"
        )
