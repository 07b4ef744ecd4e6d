"""PARO calibration: choose per-head token orders and static block-sparse masks from dense generations.

Paper: Zhao et al., "PAROAttention", NeurIPS 2025, https://arxiv.org/abs/2506.16054 (Sec. 3.2-3.3). The calibration
code of the paper is not public; this is a re-derivation:

1. **Orders** (phase 1, skipped with ``reorder=False``): the self-attention layers are hooked while the pipeline
   generates each prompt with dense attention (outputs unchanged). For every call, the post-softmax map of the grid
   tokens is reduced to block statistics under each of the 6 axis orders (2 for images), chunk by chunk over the
   queries, and the block sparsity and incoherence of each order are averaged over calls. Each (layer, head) takes
   the order minimising ``alpha * (1 - sparsity) / max(1 - sparsity) + (1 - alpha) * incoherence / max(incoherence)``
   (the paper's Eq. 3 with its sign slip fixed, see :mod:`attnpack.kernels.paro.stats`).
2. **Masks** (phase 2): the prompts are generated again; the attention mass of every block of the reordered map
   (text blocks included) is accumulated per (timestep bucket, layer, head). Per head the heaviest blocks are kept
   until each requested density is met, always keeping the diagonal, the text rows and columns and the last block
   row and column. The first half of the steps gets ``timestep_buckets`` distinct masks, the later half one shared
   mask.

Progress is shown with tqdm; with ``checkpoint=path`` the state is saved after every prompt and a rerun with the
same arguments resumes where it stopped. Memory: phase 2 keeps ``(timestep_buckets + 1) x layers x heads x T^2``
fp32 sums (``T`` blocks per side) on the denoiser's device; e.g. CogVideoX-5B (T = 278, 42 x 48 heads) needs 0.62 GB
per bucket.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._utils import check_number
from ..attn_processors.families import family_of_model
from ..attn_processors.paro import PARO_FAMILIES, PARO_KINDS, normalize_quant, split_layout
from ..attn_processors.processor import (
    AttnPackProcessor,
    apply_processors,
    list_layers,
    resolve_denoisers,
    select_layers,
)
from ..io import atomic_path
from ..kernels.block_sparse import TokenOrder
from ..kernels.paro import (
    DEFAULT_SIGMA,
    MASK_RULES,
    TILINGS,
    OrderSearch,
    axis_order_names,
    block_statistics,
    fidelity,
    forced_blocks,
    paro_token_order,
    select_block_masks,
)
from .loading import pipeline_defaults
from .paro_plan import (
    SCHEDULES,
    ParoPlan,
    config_hash,
    default_timestep_buckets,
    mask_bits_for,
    pack_codes,
    schedule_bucket,
    uniform_bucket,
)


logger = logging.getLogger(__name__)

__all__ = ["calibrate_paro", "measure_paro_fidelity"]

CHECKPOINT_FORMAT = "attnpack.paro_calibration"


class _CalibrationCore:
    """Dense attention (the stock result) that also feeds the calibration statistics."""

    def __init__(self, state: _Calibration, slot: int):
        self.state = state
        self.slot = slot

    def __call__(self, query, key, value, call):
        out = call.dense(query, key, value)
        self.state.observe(self.slot, query, key, call)
        return out

    def __repr__(self) -> str:
        return f"ParoCalibrationCore(layer={self.state.layers[self.slot]!r})"


@dataclasses.dataclass
class _Calibration:
    layers: list[str]
    heads: int
    block_size: int
    steps: int
    buckets: int
    eps: float
    tiling: str
    schedule: str
    sigma: float
    chunk_elements: int
    phase: str = "orders"
    layout: tuple | None = None  # (grid, text_len, text_first)
    searches: dict[int, OrderSearch] = dataclasses.field(default_factory=dict)
    orders: torch.Tensor | None = None  # [L, H]
    mass: torch.Tensor | None = None  # [NB, L, H, T, T]
    bucket_calls: torch.Tensor | None = None  # [NB, L]
    _token_orders: dict[tuple[int, str], TokenOrder] = dataclasses.field(default_factory=dict)

    def observe(self, slot: int, query: torch.Tensor, key: torch.Tensor, call) -> None:
        text_len, text_first = split_layout(call.layout)
        layout = (tuple(call.layout.grid), text_len, text_first)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(
                f"calibration calls must share one token layout; saw grid {self.layout[0]} with {self.layout[1]} text "
                f"tokens, then grid {layout[0]} with {layout[1]}. Use one resolution, frame count and "
                "max_sequence_length for all prompts."
            )
        grid = layout[0]
        if self.phase == "orders":
            if slot not in self.searches:
                self.searches[slot] = OrderSearch(grid, self.heads, self.block_size, eps=self.eps, sigma=self.sigma)
            self.searches[slot].update(query, key, span=call.layout.image, chunk_elements=self.chunk_elements)
            return
        run = call.run
        if run is None or run.step_index is None:
            raise RuntimeError("PARO calibration needs the denoising step; run it through the pipeline.")
        if self.schedule == "uniform":
            bucket = uniform_bucket(run.step_index, run.num_steps or self.steps, self.buckets)
        else:
            bucket = schedule_bucket(run.step_index, run.num_steps, self.steps, self.buckets)
        order = self._order(slot, query.device)
        mass = block_statistics(query, key, [order], sum_only=True, chunk_elements=self.chunk_elements)[0].sum
        if self.mass is None:
            t = order.num_tiles
            nb = self.buckets if self.schedule == "uniform" else self.buckets + 1
            self.mass = torch.zeros(nb, len(self.layers), self.heads, t, t, device=query.device)
            self.bucket_calls = torch.zeros(nb, len(self.layers), dtype=torch.int64)
        elif self.mass.device != query.device:  # restored from a checkpoint (on the CPU)
            self.mass = self.mass.to(query.device)
        self.mass[bucket, slot] += mass.to(self.mass.device)
        self.bucket_calls[bucket, slot] += 1

    def _order(self, slot: int, device) -> TokenOrder:
        key = (slot, str(device))
        if key not in self._token_orders:
            grid, text_len, text_first = self.layout
            self._token_orders[key] = paro_token_order(
                grid,
                self.orders[slot],
                self.block_size,
                text_len=text_len,
                text_first=text_first,
                tiling=self.tiling,
                device=device,
            )
        return self._token_orders[key]

    def select_orders(self, alpha: float, reorder: bool) -> None:
        self.orders = torch.zeros(len(self.layers), self.heads, dtype=torch.int64)
        if not reorder:
            return
        for slot in range(len(self.layers)):
            if slot not in self.searches or self.searches[slot].count == 0:
                raise RuntimeError(f"layer {self.layers[slot]!r} was never called during calibration.")
            self.orders[slot] = self.searches[slot].select(alpha)

    def order_metrics(self) -> torch.Tensor | None:
        if not self.searches:
            return None
        rows = [torch.stack(self.searches[s].metrics(), dim=-1) for s in range(len(self.layers))]
        return torch.stack(rows)  # [L, H, n_orders, 2]

    # -------------------------------------------------------------------------------------------- checkpoint
    def save(self, path: Path, fingerprint: str, done: dict[str, int]) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        counts = {}
        for slot, search in self.searches.items():
            tensors[f"sparsity_sum.{slot}"] = search.sparsity_sum
            tensors[f"incoherence_sum.{slot}"] = search.incoherence_sum
            counts[slot] = search.count
        if self.orders is not None:
            tensors["orders"] = self.orders
        if self.mass is not None:
            tensors["mass"] = self.mass.cpu()
            tensors["bucket_calls"] = self.bucket_calls
        meta = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "done": json.dumps(done),
            "search_counts": json.dumps(counts),
            "layout": json.dumps(self.layout),
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    def restore(self, path: Path, fingerprint: str) -> dict[str, int]:
        from ..io import read_safetensors

        tensors, meta = read_safetensors(path, "`checkpoint`")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"`checkpoint` {str(path)!r} is not a PARO calibration checkpoint.")
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(
                f"`checkpoint` {str(path)!r} was written by a calibration with other arguments (model, prompts, "
                "steps, block size, buckets, seed or pipeline arguments); delete it or pass another path."
            )
        layout = json.loads(meta["layout"])
        self.layout = None if layout is None else (tuple(layout[0]), int(layout[1]), bool(layout[2]))
        for slot, count in json.loads(meta["search_counts"]).items():
            slot = int(slot)
            search = OrderSearch(self.layout[0], self.heads, self.block_size, eps=self.eps, sigma=self.sigma)
            search.sparsity_sum = tensors[f"sparsity_sum.{slot}"]
            search.incoherence_sum = tensors[f"incoherence_sum.{slot}"]
            search.count = count
            self.searches[slot] = search
        self.orders = tensors.get("orders")
        self.mass = tensors.get("mass")
        self.bucket_calls = tensors.get("bucket_calls")
        return json.loads(meta["done"])


def _call_kwargs(pipe, extra: dict[str, Any]) -> dict[str, Any]:
    # the calibration sets these itself; a built-in model's call defaults (e.g. toy-flux's 20 steps) must not clash
    own = ("prompt", "num_inference_steps", "generator", "output_type", "callback_on_step_end", "return_dict")
    kwargs = {k: v for k, v in pipeline_defaults(pipe).items() if k not in own}
    kwargs.update(extra)
    params = inspect.signature(pipe.__call__).parameters
    unknown = [k for k in extra if k not in params]
    if unknown:
        raise TypeError(f"{type(pipe).__name__} does not take {', '.join(map(repr, unknown))}.")
    return {k: v for k, v in kwargs.items() if k in params}


def _densities(density) -> tuple[tuple[float, ...], float]:
    values = [density] if isinstance(density, (int, float)) and not isinstance(density, bool) else list(density)
    if not values or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1 for d in values):
        raise ValueError(f"`density` must be a number in (0, 1] or a list of them, got {density!r}.")
    return tuple(sorted({float(d) for d in values})), float(values[0])


def calibrate_paro(
    pipe,
    prompts: str | Sequence[str],
    num_inference_steps: int,
    density: float | Sequence[float] = 0.3,
    block_size: int = 64,
    timestep_buckets: int | None = None,
    alpha: float = 0.5,
    quant: str | None = "int8",
    *,
    reorder: bool = True,
    mask_rule: str = "threshold",
    tiling: str = "padded",
    schedule: str = "half",
    layers=None,
    seed: int = 0,
    sparsity_eps: float = 1e-3,
    sparsity_sigma: float = DEFAULT_SIGMA,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    chunk_elements: int = 1 << 25,
    **pipeline_kwargs,
) -> ParoPlan:
    """Calibrate PARO on a CogVideoX, Wan or FLUX pipeline (see the module docstring for the procedure).

    Args:
        pipe: the diffusers pipeline (its denoiser's self-attention layers are calibrated).
        prompts: one or a few prompts (the paper uses 1-2); each is generated twice (orders, then masks).
        num_inference_steps: the schedule the plan is made for.
        density: fraction of blocks kept, or a list of densities to store (nested masks; the first is the default
            at apply time). Density 1 is always available.
        block_size: block (kernel tile) size, 64 in the paper; small values suit tiny test models.
        timestep_buckets: ``schedule="half"``: distinct masks over the first half of the steps (default: one per
            step, as in the paper), the later half shares one more; ``schedule="uniform"``: the number of masks
            (default: one per step).
        alpha: weight of block sparsity vs. block incoherence in the order choice, in ``[0, 1]``.
        quant: default quantization stored in the plan (``"int8"``, ``"fp8"``, ``"int4"`` or ``None``).
        reorder: ``False`` keeps diffusers' token order for every head (the "no reordering" ablation).
        mask_rule: ``"threshold"`` (one mass threshold per head) or ``"row"`` (the same density in every block row).
        tiling: ``"padded"`` (text padded to whole blocks) or ``"joint"`` (blocks over the raw ``[text, grid]``
            sequence, as the official PAROAtten code; needs the text first).
        schedule: ``"half"`` (the paper's) or ``"uniform"`` (the official code's: step ``s`` of ``S`` uses mask
            ``int(s / S * timestep_buckets)``).
        layers: restrict to some self-attention layers (names, indices, regexes); default all.
        seed: generator seed of prompt ``i`` is ``seed + i``.
        sparsity_eps / sparsity_sigma: a block is sparse when at least ``sigma`` of its entries are below ``eps``.
        checkpoint: a ``.safetensors`` path to save progress to after every prompt and resume from.
        progress: show a tqdm progress bar.
        chunk_elements: bound on the entries of one chunk of the attention map while reducing it to blocks.
        **pipeline_kwargs: passed to the pipeline (``height``, ``width``, ``num_frames``, ``guidance_scale``,
            ``max_sequence_length``, ...).

    Returns:
        the :class:`~attnpack.ParoPlan`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"`prompts` must be a non-empty string or list of strings, got {prompts!r}.")
    check_number("num_inference_steps", num_inference_steps, 1, integer=True)
    densities, default_density = _densities(density)
    check_number("block_size", block_size, 1, integer=True, note=" (64 in the paper)")
    buckets = _timestep_buckets(tiling, schedule, timestep_buckets, num_inference_steps)
    check_number("alpha", alpha, 0.0, 1.0)
    if mask_rule not in MASK_RULES:
        raise ValueError(f"`mask_rule` must be one of {', '.join(MASK_RULES)}, got {mask_rule!r}.")
    quant = normalize_quant(quant)
    models, pipeline = resolve_denoisers(pipe)
    if pipeline is None or len(models) != 1:
        raise ValueError("`pipe` must be a diffusers pipeline with one denoiser (CogVideoX, Wan 2.1 or FLUX).")
    model = models[0]
    family = family_of_model(model)
    if family not in PARO_FAMILIES:
        raise ValueError(f"PARO supports {', '.join(PARO_FAMILIES)} models, got a {family} model.")
    infos = select_layers([i for i in list_layers(model) if i.kind in PARO_KINDS], layers)
    call_kwargs = _call_kwargs(pipe, pipeline_kwargs)
    settings = {"prompts": prompts, "steps": num_inference_steps, "block_size": block_size, "buckets": buckets,
                "tiling": tiling, "schedule": schedule, "seed": seed, "reorder": reorder, "alpha": alpha,
                "layers": [i.name for i in infos], "eps": sparsity_eps, "sigma": sparsity_sigma,
                "kwargs": call_kwargs}  # fmt: skip
    fingerprint = json.dumps(
        {"model": [type(model).__name__, config_hash(model)], **settings}, sort_keys=True, default=str
    )
    state = _Calibration(
        layers=[i.name for i in infos],
        heads=infos[0].heads,
        block_size=block_size,
        steps=num_inference_steps,
        buckets=buckets,
        eps=sparsity_eps,
        tiling=tiling,
        schedule=schedule,
        sigma=sparsity_sigma,
        chunk_elements=chunk_elements,
    )
    start = time.perf_counter()
    _observe(pipe, state, prompts, num_inference_steps, call_kwargs, seed=seed, alpha=alpha, reorder=reorder,
             checkpoint=checkpoint, fingerprint=fingerprint, progress=progress)  # fmt: skip
    if state.bucket_calls is None or bool((state.bucket_calls == 0).any()):
        raise RuntimeError("some timestep bucket saw no attention call; check `num_inference_steps`.")
    from .._version import __version__

    info = {
        "prompts": prompts,
        "seed": seed,
        "pipeline_kwargs": dict(call_kwargs),
        "reorder": reorder,
        "sparsity_eps": sparsity_eps,
        "sparsity_sigma": sparsity_sigma,
        "order_names": list(axis_order_names(len(state.layout[0]))),
        "calibration_seconds": round(time.perf_counter() - start, 2),
        "attnpack": __version__,
    }
    grid, text_len, text_first = state.layout
    bits = mask_bits_for(len(densities))
    return ParoPlan(
        model_class=type(model).__name__,
        config_hash=config_hash(model),
        family=family,
        grid=grid,
        text_len=text_len,
        text_first=text_first,
        num_inference_steps=num_inference_steps,
        block_size=block_size,
        densities=densities,
        density=default_density,
        timestep_buckets=buckets,
        layers=tuple(state.layers),
        heads=state.heads,
        orders=state.orders,
        masks=_block_masks(state, densities, mask_rule, bits),
        mask_bits=bits,
        alpha=alpha,
        quant=quant,
        mask_rule=mask_rule,
        order_metrics=state.order_metrics(),
        info=json.loads(json.dumps(info, default=str)),
        tiling=tiling,
        schedule=schedule,
    )


def _timestep_buckets(tiling: str, schedule: str, timestep_buckets: int | None, steps: int) -> int:
    """The number of distinct masks for ``schedule`` (checked with ``tiling``, before any model work)."""
    if tiling not in TILINGS:
        raise ValueError(f"`tiling` must be one of {', '.join(TILINGS)}, got {tiling!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if schedule == "uniform":
        buckets = steps if timestep_buckets is None else timestep_buckets
        return check_number("timestep_buckets", buckets, 1, steps, integer=True,
                            note=" (1..num_inference_steps with schedule='uniform')")  # fmt: skip
    half = default_timestep_buckets(steps)
    buckets = half if timestep_buckets is None else timestep_buckets
    return check_number("timestep_buckets", buckets, 0, half, integer=True, note=" (0..num_inference_steps // 2)")


def _observe(pipe, state: _Calibration, prompts: list[str], steps: int, call_kwargs: dict, *, seed: int,
             alpha: float, reorder: bool, checkpoint, fingerprint: str, progress: bool) -> None:  # fmt: skip
    """Generate every prompt once per phase (orders, then masks) with the calibration cores installed, saving progress
    to ``checkpoint`` after each prompt and resuming from it."""
    from tqdm.auto import tqdm

    phases = (["orders"] if reorder else []) + ["masks"]
    done = {phase: 0 for phase in phases}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        done.update(state.restore(checkpoint, fingerprint))
        logger.info("PARO calibration resumed from %s: %s", checkpoint, done)
    slots = {name: i for i, name in enumerate(state.layers)}
    bar = tqdm(total=len(phases) * len(prompts) * steps, desc="PARO calibration", disable=not progress)
    bar.update(sum(done.values()) * steps)
    previous_bar = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)

    def on_step_end(_pipe, _step, _timestep, _kwargs):
        bar.update(1)
        return {}

    handle = apply_processors(
        pipe,
        lambda info: _CalibrationCore(state, slots[info.name]) if info.name in slots else None,
        processor_cls=AttnPackProcessor,
        description="paro calibration",
    )
    try:
        for phase in phases:
            state.phase = phase
            bar.set_description(f"PARO calibration ({phase})")
            if phase == "masks" and state.orders is None:
                state.select_orders(alpha, reorder)
            for i, prompt in enumerate(prompts):
                if i < done[phase]:
                    continue
                with torch.no_grad():
                    pipe(
                        prompt=prompt,
                        num_inference_steps=steps,
                        generator=torch.Generator("cpu").manual_seed(seed + i),
                        output_type="latent",
                        callback_on_step_end=on_step_end,
                        **call_kwargs,
                    )
                done[phase] = i + 1
                if checkpoint is not None:
                    state.save(checkpoint, fingerprint, done)
    finally:
        handle.remove()
        bar.close()
        if previous_bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = previous_bar


def _block_masks(state: _Calibration, densities: tuple[float, ...], mask_rule: str, bits: int) -> torch.Tensor:
    """The packed nested masks ``[bucket, layer, head, T, T']`` from the observed block mass; text blocks forced on."""
    grid, text_len, text_first = state.layout
    n_text = -(-text_len // state.block_size)
    n_tiles = state.mass.shape[-1]  # T of the plan's tiling
    forced = forced_blocks(n_tiles, range(0, n_text) if text_first else range(n_tiles - n_text, n_tiles))
    return torch.stack(
        [
            torch.stack(
                [
                    pack_codes(select_block_masks(state.mass[b, s], densities, forced, rule=mask_rule).cpu(), bits)
                    for s in range(len(state.layers))
                ]
            )
            for b in range(state.mass.shape[0])
        ]
    )


def measure_paro_fidelity(
    pipe,
    plan: ParoPlan,
    prompt: str,
    settings: Sequence[tuple[float | None, str | None]] = ((None, "plan"),),
    *,
    seed: int = 0,
    num_inference_steps: int | None = None,
    output_type: str = "latent",
    backend: str | None = None,
    **pipeline_kwargs,
) -> list[dict[str, Any]]:
    """Generate ``prompt`` with dense attention and with PARO at each ``(density, quant)`` setting; compare outputs.

    Returns one dict per setting: ``density``, ``quant``, ``achieved_density`` and the :func:`fidelity` metrics
    (cosine similarity, relative L2, PSNR) of the final latents (``output_type="latent"``) or images / frames
    (``"np"``) against the dense generation with the same seed.
    """
    from ..attn_processors.paro import apply_paro

    steps = num_inference_steps or plan.num_inference_steps
    kwargs = dict(plan.info.get("pipeline_kwargs", {}))
    kwargs.update(pipeline_kwargs)
    kwargs = _call_kwargs(pipe, kwargs)

    def run():
        with torch.no_grad():
            out = pipe(
                prompt=prompt,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type=output_type,
                return_dict=False,
                **kwargs,
            )[0]
        return torch.as_tensor(out).float()

    dense = run()
    rows = []
    for density, quant in settings:
        with apply_paro(pipe, plan, quant=quant, density=density, backend=backend) as handle:
            out = run()
            core = next(iter(handle.processors.values())).core
        rows.append(
            {
                "density": core.density,
                "quant": core.quant,
                "achieved_density": plan.achieved_density(core.density),
                **fidelity(dense, out),
            }
        )
    return rows
