"""Head-level perturbation guidance as a diffusers guider, for modular pipelines.

:class:`HeadPerturbationGuidance` is a :class:`diffusers.guiders.BaseGuidance`. Install it with
``modular_pipe.update_components(guider=HeadPerturbationGuidance(heads=["L1H10"], ...))``. Each step it asks for up
to three predictions, run by the pipeline as separate batches: ``pred_cond``, ``pred_uncond`` (when CFG is on) and
``pred_cond_ptb`` (the conditional inputs with the chosen heads perturbed; attnpack's head-perturbation processors are
installed for that batch only and removed right after it), and combines them as

    pred = pred_uncond + g * (pred_cond - pred_uncond) + s * (pred_cond - pred_cond_ptb)      (CFG on)
    pred = pred_cond + s * (pred_cond - pred_cond_ptb)                                        (CFG off)

Unlike diffusers' ``PerturbedAttentionGuidance`` it perturbs single heads, works on SD3 / FLUX / Wan attention
(diffusers' guider raises there), picks layers by attnpack's documented indices instead of ``fqn="auto"`` and, without
CFG, uses the PAG paper's ``pred_cond + s * (pred_cond - pred_ptb)`` (diffusers' guider then returns
``pred_skip + s * (pred_cond - pred_skip)``).

Paper: https://arxiv.org/abs/2506.10978 (HeadHunter / SoftPAG).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

from ..attn_processors.head_perturbation import (
    _check_kind_scope,
    _check_softness,
    install_head_perturbation,
    parse_heads,
)
from .guidance import scheduled_scale


if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["HeadPerturbationGuidance"]

COND, UNCOND, PTB = "pred_cond", "pred_uncond", "pred_cond_ptb"


class HeadPerturbationGuidance(BaseGuidance):
    """Head-level perturbation guidance (SoftPAG / HeadHunter) for diffusers modular pipelines.

    Args:
        heads (`list[str]` or `str`): heads to perturb, as in :func:`attnpack.apply_head_perturbation`
            (``"L1H10"``, ``"L13"``, presets); stored in the config as strings.
        guidance_scale (`float`, defaults to `7.5`): classifier-free guidance scale ``g`` (1 disables CFG).
        perturbed_guidance_scale (`float`, defaults to `3.0`): perturbation guidance scale ``s``.
        softness (`float`, defaults to `1.0`): SoftPAG ``u`` in ``[0, 1]``.
        kind (`str`, defaults to `"identity"`): ``"identity"``, ``"uniform"`` or ``"query_mean"``.
        token_scope (`str`, defaults to `"full"`): ``"full"`` or ``"image"``.
        perturbed_guidance_start / perturbed_guidance_stop (`float`, defaults to `0.0` / `1.0`): window of the
            perturbation guidance, as fractions of the steps.
        perturbed_guidance_adaptive_scale (`float`, defaults to `0.0`): ``s_t = max(0, s - a * (1000 - t))``.
        guidance_rescale (`float`, defaults to `0.0`): rescale of the combined prediction (arXiv 2305.08891).
        use_original_formulation (`bool`, defaults to `False`): CFG as ``pred_cond + g * (pred_cond - pred_uncond)``.
        start / stop (`float`): window of classifier-free guidance.
        enabled (`bool`): switch the guider off.
    """

    _input_predictions = [COND, UNCOND, PTB]

    @register_to_config
    def __init__(
        self,
        heads: list[str] | str | None = None,
        guidance_scale: float = 7.5,
        perturbed_guidance_scale: float = 3.0,
        softness: float = 1.0,
        kind: str = "identity",
        token_scope: str = "full",
        perturbed_guidance_start: float = 0.0,
        perturbed_guidance_stop: float = 1.0,
        perturbed_guidance_adaptive_scale: float = 0.0,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        if heads is None:
            raise ValueError("`heads` must be given, e.g. HeadPerturbationGuidance(heads=['L1H10']).")
        # syntax check now (layer / head counts are checked against the denoiser); stored as JSON-friendly strings
        heads = [f"L{layer}" if head is None else f"L{layer}H{head}" for layer, head in parse_heads(heads)]
        self.register_to_config(heads=heads)
        _check_kind_scope(kind, token_scope)
        if not 0.0 <= perturbed_guidance_start < perturbed_guidance_stop <= 1.0:
            raise ValueError(
                "`perturbed_guidance_start` and `perturbed_guidance_stop` must satisfy 0 <= start < stop <= 1, got "
                f"{perturbed_guidance_start} and {perturbed_guidance_stop}."
            )
        self.heads = heads
        self.guidance_scale = guidance_scale
        self.perturbed_guidance_scale = perturbed_guidance_scale
        self.softness = _check_softness(softness)
        self.kind = kind
        self.token_scope = token_scope
        self.perturbed_guidance_start = perturbed_guidance_start
        self.perturbed_guidance_stop = perturbed_guidance_stop
        self.perturbed_guidance_adaptive_scale = perturbed_guidance_adaptive_scale
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self._order: list[str] = [COND]
        self._handle = None

    # ---------------------------------------------------------------- which predictions
    def _identifiers(self) -> tuple[list[int], list[str]]:
        cfg, ptb = self._is_cfg_enabled(), self._is_ptb_enabled()
        order = [COND] + ([UNCOND] if cfg else []) + ([PTB] if ptb else [])
        # tuple index 0 = conditional inputs, 1 = unconditional ones; the perturbed pass uses the conditional prompt
        return [1 if name == UNCOND else 0 for name in order], order

    def prepare_inputs(self, data: dict[str, Any]) -> list[BlockState]:
        indices, self._order = self._identifiers()
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._order)]

    def prepare_inputs_from_block_state(self, data: BlockState, input_fields: dict[str, Any]) -> list[BlockState]:
        indices, self._order = self._identifiers()
        return [
            self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in zip(indices, self._order)
        ]

    def _current(self) -> str:
        index = self._count_prepared - 1
        return self._order[index] if 0 <= index < len(self._order) else COND

    # ---------------------------------------------------------------- models
    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._current() == PTB:
            self._handle = install_head_perturbation(
                denoiser, self.heads, self.softness, self.kind, self.token_scope, rows="all"
            )

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ---------------------------------------------------------------- combination
    def _ptb_scale(self) -> float:
        if not self._enabled:
            return 0.0
        return scheduled_scale(
            float(self.perturbed_guidance_scale),
            self.perturbed_guidance_start,
            self.perturbed_guidance_stop,
            float(self.perturbed_guidance_adaptive_scale) if self._timestep is not None else 0.0,
            self._num_inference_steps,
            self._step,
            self._timestep,
        )

    def _is_ptb_enabled(self) -> bool:
        return self._ptb_scale() > 0.0

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            first, stop = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            if not first <= self._step < stop:
                return False
        neutral = 0.0 if self.use_original_formulation else 1.0
        return not math.isclose(self.guidance_scale, neutral)

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_cond_ptb: torch.Tensor | None = None,
    ) -> GuiderOutput:
        pred = pred_cond
        if pred_uncond is not None and self._is_cfg_enabled():
            base = pred_cond if self.use_original_formulation else pred_uncond
            pred = base + self.guidance_scale * (pred_cond - pred_uncond)
        if pred_cond_ptb is not None:
            pred = pred + self._ptb_scale() * (pred_cond - pred_cond_ptb)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._current() != UNCOND

    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled()) + int(self._is_ptb_enabled())
