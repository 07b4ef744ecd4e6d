"""PARO attention processors: per-head token reordering, static block-sparse masks and quantized attention.

Paper: Zhao et al., "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models", NeurIPS 2025, https://arxiv.org/abs/2506.16054.

A :class:`~attnpack.ParoPlan` (from :func:`attnpack.calibrate_paro`) fixes, per self-attention layer and head, the
order in which the video (or image) token grid is flattened, and per timestep bucket which 64 x 64 blocks of the
reordered attention map are computed. :class:`ParoCore` turns that into a
:class:`~attnpack.kernels.block_sparse.BlockSparsePattern` (text blocks first for CogVideoX and FLUX, then the
per-head reordered grid) and runs the shared block-sparse kernel, or the quantized PARO kernel (INT8 QK^T with K
smoothing, INT8 / FP8 / INT4 PV, FP32 accumulation) registered as a block-sparse backend.

Example::

    import attnpack

    plan = attnpack.calibrate_paro(pipe, ["a panda playing guitar"], num_inference_steps=30, density=0.3)
    plan.save("cogvideox_paro.safetensors")
    with attnpack.apply_paro(pipe, "cogvideox_paro.safetensors", quant="int8"):
        video = pipe("a cat", num_inference_steps=30).frames[0]
"""

from __future__ import annotations

import logging
import os

import torch

from ..kernels.block_sparse import BlockSparsePattern, block_sparse_attention, tile_table_from_dense
from ..kernels.paro import QUANT_MODES, triton_unusable
from ..techniques import Option, Technique, register_technique
from .processor import (
    AttentionCall,
    AttnPackProcessor,
    ProcessorHandle,
    apply_processors,
    list_layers,
    resolve_denoisers,
    select_layers,
)


logger = logging.getLogger(__name__)

__all__ = ["ParoAttnProcessor", "ParoCore", "apply_paro", "PARO_FAMILIES", "normalize_quant"]

PARO_FAMILIES = ("cogvideox", "wan", "flux")
PARO_KINDS = ("self", "joint", "single")
QUANT_CHOICES = ("plan", "none", *QUANT_MODES)


class ParoAttnProcessor(AttnPackProcessor):
    """PARO attention (reordered, block-sparse, optionally quantized) on CogVideoX, Wan and FLUX self-attention.

    Paper: https://arxiv.org/abs/2506.16054. Install with :func:`apply_paro`.
    """

    technique = "paro"


def normalize_quant(quant: str | None, plan_quant: str | None = None) -> str | None:
    """``"plan"`` -> the plan's choice; ``None`` / ``"none"`` -> no quantization; else a mode of ``QUANT_MODES``."""
    if quant is None:
        return None
    if not isinstance(quant, str) or quant.lower() not in QUANT_CHOICES:
        raise ValueError(f"`quant` must be one of {', '.join(QUANT_CHOICES)} or None, got {quant!r}.")
    quant = quant.lower()
    if quant == "plan":
        return plan_quant
    return None if quant == "none" else quant


def split_layout(layout) -> tuple[int, bool]:
    """``(text_len, text_first)`` of a self-attention layout whose queries are exactly text + grid tokens."""
    n_text = layout.num_text
    if layout.is_cross or layout.image is None or layout.grid is None:
        raise ValueError("PARO needs self-attention over an image / video token grid (no cross-attention).")
    if layout.num_image + n_text != layout.num_queries or layout.num_keys != layout.num_queries:
        raise ValueError(
            f"PARO needs the attention sequence to be text + grid tokens only; got {layout.num_queries} queries, "
            f"{layout.num_image} grid and {n_text} text tokens (e.g. FLUX Kontext reference tokens are unsupported)."
        )
    return n_text, bool(n_text == 0 or layout.text.start == 0)


class ParoCore:
    """The PARO attention core of one layer.

    Args:
        plan: the :class:`~attnpack.ParoPlan`.
        layer: the layer's index in ``plan.layers``.
        quant: ``None``, ``"int8"``, ``"fp8"`` or ``"int4"``.
        density: one of the plan's densities or 1.0 (``None``: the plan's default).
        backend: block-sparse backend; ``None`` chooses (quantized: the Triton kernel on CUDA, else the reference).
    """

    def __init__(self, plan, layer: int, *, quant: str | None, density: float | None, backend: str | None = None):
        self.plan = plan
        self.layer = layer
        self.quant = quant
        self.density = plan.density if density is None else float(density)
        plan.level(self.density)  # validates
        self.backend = backend
        self._orders: dict[str, object] = {}
        self._current: tuple[int, str, tuple[int, int], BlockSparsePattern] | None = None

    def pattern(
        self, bucket: int, device: torch.device | str = "cpu", heads: slice | None = None
    ) -> BlockSparsePattern:
        """The block-sparse pattern of timestep ``bucket`` for the layer's ``heads`` (all by default; under Ulysses
        context parallelism, the heads this rank holds: per-head orders and masks follow them).

        Only the current bucket's tile table is kept (steps run in order, so it is rebuilt once per bucket change);
        the plan itself stays bit-packed on the CPU, as the paper keeps only the current mask on the GPU.
        """
        device = str(device)
        plan = self.plan
        heads = slice(0, plan.heads) if heads is None else heads
        key = (heads.start, heads.stop)
        if self._current is not None and self._current[:3] == (bucket, device, key):
            return self._current[3]
        if (device, key) not in self._orders:
            self._orders[(device, key)] = plan.token_order(self.layer, device, heads=heads)
        order = self._orders[(device, key)]
        mask = plan.mask(bucket, self.layer, self.density)[heads].to(device)
        name = f"paro {plan.layers[self.layer]} bucket {bucket}"
        pattern = BlockSparsePattern(tile_table_from_dense(mask[None]), order, order, name=name)
        self._current = (bucket, device, key, pattern)
        return pattern

    def _backend(self, query, key, value, pattern) -> str | None:
        if self.backend is not None or self.quant is None:
            return self.backend
        if query.device.type == "cuda" and triton_unusable(query, key, value, pattern, False, self.quant) is None:
            return "paro_quant_triton"
        logger.debug("PARO: quantized attention runs on the PyTorch reference on %s", query.device)
        return "paro_quant_reference"

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall):
        text_len, text_first = split_layout(call.layout)
        self.plan.check_layout(call.layout.grid, text_len, text_first)
        if call.mask is not None:
            raise ValueError(
                f"layer {call.layer.name!r} got an attention mask; PARO supports unmasked self-attention only."
            )
        run = call.run
        bucket = self.plan.bucket(run.step_index if run else None, run.num_steps if run else None)
        pattern = self.pattern(bucket, query.device, call.heads)
        backend = self._backend(query, key, value, pattern)
        options = {"quant": self.quant} if self.quant is not None else None
        return block_sparse_attention(query, key, value, pattern, backend=backend, backend_options=options)

    def __repr__(self) -> str:
        return f"ParoCore(layer={self.plan.layers[self.layer]!r}, density={self.density:g}, quant={self.quant!r})"


def _load_plan(plan):
    from ..pipelines.paro_plan import ParoPlan

    if isinstance(plan, ParoPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return ParoPlan.load(plan)
    raise TypeError(f"`plan` must be a ParoPlan or the path of a saved plan, got {type(plan).__name__}.")


SHIPPED_PLAN = "paro_plan.safetensors"  # a built-in model's calibrated plan, next to its model_index.json


def models_with_plans() -> list[str]:
    """The built-in models that ship a PARO plan."""
    from ..toy.loader import TOY_MODELS, toy_model_path

    return [name for name in TOY_MODELS if (toy_model_path(name) / SHIPPED_PLAN).is_file()]


def shipped_plan(pipe):
    """The path of the plan shipped with ``pipe``'s built-in model (``load_pipeline("toy-flux")``), or ``None``."""
    name = getattr(pipe, "_attnpack_model", None)
    if name not in models_with_plans():
        return None
    from ..toy.loader import toy_model_path

    return toy_model_path(name) / SHIPPED_PLAN


def apply_paro(
    pipe,
    plan=None,
    quant: str | None = "plan",
    density: float | None = None,
    *,
    backend: str | None = None,
    layers=None,
) -> ProcessorHandle:
    """Install PARO attention on a CogVideoX, Wan or FLUX pipeline (or bare denoiser) from a calibrated plan.

    Args:
        pipe: the pipeline (or its ``transformer``) the plan was calibrated on.
        plan: a :class:`~attnpack.ParoPlan` or the path of one saved with :meth:`~attnpack.ParoPlan.save`; ``None``
            (default): the plan shipped with a built-in model (toy-flux: calibrated on 2 prompts, 20 steps, 8-token
            blocks, densities 0.3 / 0.5), else an error.
        quant: ``"int8"`` (QK^T and PV in INT8), ``"fp8"`` (INT8 QK^T, FP8 PV; Ada / Hopper GPUs), ``"int4"``
            (simulated accuracy, no speed-up), ``None`` / ``"none"`` (block-sparse only) or ``"plan"`` (the plan's
            choice, default).
        density: fraction of blocks kept: one of the plan's densities, or 1.0 (reordering and quantization only).
            Default: the plan's.
        backend: block-sparse backend (``"paro_quant_triton"``, ``"paro_quant_reference"`` when quantized;
            ``"triton"``, ``"flex"``, ``"reference"`` otherwise); default: automatic.
        layers: restrict to some of the plan's layers (names, indices, regexes); default all calibrated layers.

    Returns:
        a :class:`~attnpack.ProcessorHandle` restoring the original processors.
    """
    if plan is None:
        plan = shipped_plan(pipe)
    if plan is None:
        raise ValueError(
            "`plan` is required for this model: pass a ParoPlan or the path of one made by `attnpack calibrate-paro` "
            f"(only the built-in models ship one: {', '.join(models_with_plans()) or 'none'})."
        )
    plan = _load_plan(plan)
    quant = normalize_quant(quant, plan.quant)
    plan.level(density)
    models, _ = resolve_denoisers(pipe)
    if len(models) != 1:
        raise ValueError(
            f"PARO plans cover one denoiser; this pipeline has {len(models)}. Pass the denoiser to patch, e.g. "
            "`apply_paro(pipe.transformer, plan)`."
        )
    model = models[0]
    plan.check_model(model)
    infos = [info for info in list_layers(model) if info.name in plan.layers]
    chosen = {info.name for info in select_layers(infos, layers)}
    cores = {
        name: ParoCore(plan, plan.layer_index(name), quant=quant, density=density, backend=backend) for name in chosen
    }
    desc = f"paro density={density if density is not None else plan.density:g} quant={quant}"
    target = pipe if not isinstance(pipe, torch.nn.Module) else model
    return apply_processors(
        target, lambda info: cores.get(info.name), processor_cls=ParoAttnProcessor, description=desc
    )


register_technique(
    Technique(
        name="paro",
        summary="PARO: calibrated per-head token reordering + static block-sparse masks + INT8/FP8 attention "
        "(CogVideoX, Wan, FLUX; needs a plan from `attnpack calibrate-paro`)",
        apply=apply_paro,
        options=(
            Option(
                "plan",
                "path",
                None,
                "path of a PARO plan (.safetensors) from `attnpack calibrate-paro`; empty: the built-in model's own",
            ),
            Option("quant", "str", "plan", "quantization: plan, none, int8, fp8, int4", choices=QUANT_CHOICES),
            Option(
                "density", "float", None, "fraction of blocks kept (a density stored in the plan, or 1)", None, 0, 1
            ),
            Option("backend", "str", None, "block-sparse backend (default: automatic)"),
            Option("layers", "layers", None, "restrict to some of the plan's layers (names, indices, regexes)"),
        ),
        families=PARO_FAMILIES,
        doc="docs/paro.md",
    )
)
