"""Head-level perturbation guidance on unmodified diffusers pipelines (SoftPAG / HeadHunter).

:func:`apply_head_perturbation` installs head-perturbation processors on the chosen heads and a denoiser hook. For
every denoiser call inside the guidance window the hook runs a *perturbed* copy of the conditional rows, either
appended to the batch (one forward, the default) or as an extra forward (``separate_pass=True``, lower peak memory),
marking them ``"perturbed"`` in the run context so that only they are perturbed. It then adds
``s * (eps_c - eps_ptb)`` to the unconditional *and* the conditional predictions it returns. Any classifier-free
guidance of the form ``eps_u + g * (eps_c - eps_u)`` (whatever ``g``, also Wan 2.2's per-stage scale) then yields

    eps = eps_u + g * (eps_c - eps_u) + s * (eps_c - eps_ptb)

and a pipeline without CFG (FLUX.1-dev's distilled guidance, ``guidance_scale <= 1``) yields
``eps = eps_c + s * (eps_c - eps_ptb)``, the perturbed pass using the conditional prompt and the same guidance
embedding. Batched CFG (SD 1.x, SDXL, SD3: batch ``[uncond, cond]``) is handled within one call; separate passes
(FLUX true CFG, Wan: diffusers' ``cache_context("cond" / "uncond")``) are handled by computing the shift in the
conditional pass and adding it again in the following unconditional pass of the same step.

The guidance scale follows diffusers' PAG: ``s_t = max(0, s - adaptive_scale * (1000 - t))`` with ``t`` the
scheduler's timestep, active on steps ``int(start * N) <= i < int(end * N)``.

Paper: https://arxiv.org/abs/2506.10978 (HeadHunter / SoftPAG); PAG: https://arxiv.org/abs/2403.17377 .
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .._utils import check_number
from ..attn_processors.context import (
    HOOK_NAME as RUN_CONTEXT_HOOK,
)
from ..attn_processors.context import (
    ROLE_COND,
    ROLE_PERTURBED,
    ROLE_UNCOND,
    RunContextHook,
    RunState,
    reuse_state,
    run_overrides,
)
from ..attn_processors.head_perturbation import (
    KINDS,
    TOKEN_SCOPES,
    HeadSpec,
    install_head_perturbation,
)
from ..attn_processors.processor import ProcessorHandle, resolve_denoisers
from ..techniques import Option, Technique, register_technique


logger = logging.getLogger(__name__)

__all__ = [
    "apply_head_perturbation",
    "HeadGuidanceHook",
    "HeadGuidanceHandle",
    "guidance_window",
    "scheduled_scale",
]

HOOK_NAME = "attnpack_head_guidance"
MAX_SCALE = 100.0  # published scales are 1-10; far larger ones only overflow into black images

# denoiser arguments that have no batch dimension even when their first size equals the batch size
NON_BATCHED_ARGUMENTS = frozenset({"img_ids", "txt_ids"})


def guidance_window(start: float, end: float, num_steps: int | None, step: int | None) -> bool:
    """Whether step ``step`` of ``num_steps`` lies in ``[int(start * N), int(end * N))`` (diffusers' guiders)."""
    if (start, end) == (0.0, 1.0):
        return True
    if num_steps is None or step is None:
        return False
    return int(start * num_steps) <= step < int(end * num_steps)


def scheduled_scale(
    scale: float, start: float, end: float, adaptive_scale: float, num_steps: int | None, step: int | None, timestep
) -> float:
    """The perturbation guidance scale at one step (diffusers' PAG schedule): 0 outside the window
    (:func:`guidance_window`), else ``max(0, s - adaptive_scale * (1000 - t))``; ``timestep`` may be a callable
    returning ``t`` (only called when ``adaptive_scale > 0``)."""
    if scale == 0.0 or not guidance_window(start, end, num_steps, step):
        return 0.0
    if adaptive_scale > 0.0:
        t = timestep() if callable(timestep) else timestep
        if t is None:
            raise RuntimeError("`adaptive_scale` needs the timestep, but the denoiser call has none.")
        return max(0.0, scale - adaptive_scale * (1000.0 - float(torch.as_tensor(t).flatten()[0])))
    return scale


def _map_batched(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], batch: int, name: str | None = None) -> Any:
    """Apply ``fn`` to every tensor in ``value`` (nested dicts / lists / tuples) whose first size is ``batch``."""
    if name in NON_BATCHED_ARGUMENTS:
        return value
    if torch.is_tensor(value):
        return fn(value) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _map_batched(v, fn, batch, k) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_map_batched(v, fn, batch, name) for v in value)
    return value


def _sample_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` with its prediction replaced (tuple for ``return_dict=False``, output class otherwise)."""
    batch = sample.shape[0]

    def trim(x):
        return x[:batch] if torch.is_tensor(x) and x.ndim > 0 and x.shape[0] > batch else x

    if torch.is_tensor(output):
        return sample
    if isinstance(output, tuple):
        return (sample, *(trim(x) for x in output[1:]))
    output.sample = sample
    return output


@dataclasses.dataclass(frozen=True)
class _Settings:
    scale: float
    start: float
    end: float
    adaptive_scale: float
    separate_pass: bool


class HeadGuidanceHook(ModelHook):
    """Denoiser hook adding ``s * (eps_c - eps_ptb)`` to the predictions (see the module docstring).

    It must wrap the run-context hook (registered after it), so that the roles it sets reach the processors.
    """

    def __init__(self, settings: _Settings, context: RunContextHook):
        super().__init__()
        self.settings = settings
        self.context = context
        self.active = True
        self._signature: inspect.Signature | None = None
        self._local = threading.local()
        self._registered_forward = None

    # ---------------------------------------------------------------- schedule
    def scale_at(self, state: RunState) -> float:
        """Guidance scale for the call described by ``state`` (0 outside the window)."""
        s = self.settings
        return scheduled_scale(
            s.scale, s.start, s.end, s.adaptive_scale, state.num_steps, state.step_index, lambda: self._timestep(state)
        )

    def _timestep(self, state: RunState):
        pipeline = self.context.pipeline
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        if timesteps is not None and state.step_index is not None and state.step_index < len(timesteps):
            return float(timesteps[state.step_index])
        return state.timestep

    # ---------------------------------------------------------------- forward
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if not self.active or kwargs.get("skip_layers") is not None:  # SD3's own skip-layer pass: leave it alone
            return forward(*args, **kwargs)
        state = self.context.build_state(module, args, kwargs)
        scale = self.scale_at(state)
        roles = state.roles
        if scale == 0.0 or not set(roles) <= {ROLE_UNCOND, ROLE_COND}:
            return forward(*args, **kwargs)
        cond_rows, uncond_rows = state.rows(ROLE_COND), state.rows(ROLE_UNCOND)
        if not cond_rows:
            if state.cache_name != ROLE_UNCOND:
                return forward(*args, **kwargs)
            # a separate unconditional pass: shift it like the conditional one before it
            output = forward(*args, **kwargs)
            shift = self._take_pending(state)
            return _with_sample(output, _sample_of(output) + shift.to(_sample_of(output).dtype))
        if uncond_rows and len(uncond_rows) != len(cond_rows):
            logger.debug("head guidance skipped: %d uncond rows vs %d cond rows", len(uncond_rows), len(cond_rows))
            return forward(*args, **kwargs)

        if self._signature is None:
            self._signature = inspect.signature(forward)
        bound = self._signature.bind(*args, **kwargs)
        batch = state.batch_size
        idx = torch.tensor(cond_rows)

        def rows_of(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, idx.to(x.device))

        n_ptb = len(cond_rows)
        if self.settings.separate_pass:
            with reuse_state(module, state, batch):
                output = forward(*args, **kwargs)
            perturbed = self._rebind(bound, rows_of, batch)
            with run_overrides(roles=(ROLE_PERTURBED,) * n_ptb), reuse_state(module, state, n_ptb):
                eps_ptb = _sample_of(forward(*perturbed.args, **perturbed.kwargs))
            eps = _sample_of(output)
        else:
            extended = self._rebind(bound, lambda x: torch.cat([x, rows_of(x)]), batch)
            roles_ext = tuple(roles) + (ROLE_PERTURBED,) * n_ptb
            with run_overrides(roles=roles_ext), reuse_state(module, state, batch + n_ptb):
                output = forward(*extended.args, **extended.kwargs)
            both = _sample_of(output)
            eps, eps_ptb = both[:batch], both[batch:]

        shift = scale * (rows_of(eps) - eps_ptb)
        new = eps.clone()
        new[idx.to(eps.device)] += shift
        if uncond_rows:
            new[torch.tensor(uncond_rows, device=eps.device)] += shift
        if state.cache_name == ROLE_COND:  # a separate unconditional pass may follow in this step
            self._local.pending = (self._key(state), shift)
        return _with_sample(output, new)

    def _rebind(self, bound: inspect.BoundArguments, fn, batch: int) -> inspect.BoundArguments:
        new = self._signature.bind_partial()
        for name, value in bound.arguments.items():
            new.arguments[name] = _map_batched(value, fn, batch, name)
        return new

    @staticmethod
    def _key(state: RunState) -> tuple:
        return (state.step_index, state.timestep, state.batch_size)

    def _take_pending(self, state: RunState) -> torch.Tensor:
        pending = getattr(self._local, "pending", None)
        if pending is None or pending[0] != self._key(state):
            raise RuntimeError(
                "head guidance: this pipeline ran an unconditional denoiser pass (cache_context 'uncond') at step "
                f"{state.step_index} without the conditional pass before it. attnpack expects the conditional pass "
                "first (as FLUX and Wan do); use the pipeline without true CFG or report the pipeline."
            )
        self._local.pending = None
        return pending[1]


class HeadGuidanceHandle:
    """Restores what :func:`apply_head_perturbation` changed: removes the guidance hooks, then the processors."""

    def __init__(self, processors: ProcessorHandle, hooks: list[tuple[torch.nn.Module, HeadGuidanceHook]]):
        self._processors = processors
        self._hooks = hooks
        self.heads: list[str] = getattr(processors, "heads", [])
        self.processors = processors.processors
        self.description = processors.description
        self.removed = False

    def add_callback(self, fn: Callable[[], None]) -> None:
        self._processors.add_callback(fn)

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for model, hook in reversed(self._hooks):
            registry = HookRegistry.check_if_exists_or_initialize(model)
            if model.forward is hook._registered_forward:
                registry.remove_hook(HOOK_NAME, recurse=False)
            else:  # something wrapped the forward after us (e.g. offloading): leave a pass-through
                hook.active = False
        self._processors.remove()

    def __enter__(self) -> HeadGuidanceHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"heads {', '.join(self.heads)}"
        return f"HeadGuidanceHandle({state})"


def apply_head_perturbation(
    pipe,
    heads: HeadSpec | None = None,
    scale: float = 3.0,
    softness: float = 1.0,
    kind: str = "identity",
    token_scope: str = "full",
    start: float = 0.0,
    end: float = 1.0,
    adaptive_scale: float = 0.0,
    separate_pass: bool = False,
) -> HeadGuidanceHandle:
    """Head-level perturbation guidance (SoftPAG / HeadHunter) on an unmodified diffusers pipeline.

    Works on ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
    ``FluxPipeline`` and ``WanPipeline`` (their img2img / inpaint variants call the denoiser the same way), or on a
    bare denoiser (then every call is treated as conditional, without a schedule).

    Args:
        pipe: the pipeline (or denoiser).
        heads: heads to perturb: ``[(layer, head), ...]``, ``"L1H10"``, ``"L13"`` (all heads of layer 13), a list or
            comma-separated string of those, or preset names (:mod:`attnpack.presets`). Layer indices: SD3 joint
            blocks, FLUX global index (double blocks 0..18, then single 19..56), UNet ``attn1`` order, Wan blocks.
            ``None`` (default): the heads shipped for a built-in model (toy-flux: ``toy-flux/searched``, found with
            :func:`attnpack.search_heads`); other models need heads.
        scale: perturbation guidance scale ``s`` (0 reproduces the pipeline exactly).
        softness: SoftPAG interpolation ``u`` in ``[0, 1]`` (1 = PAG identity).
        kind: ``"identity"`` (PAG), ``"uniform"`` or ``"query_mean"`` (SEG's infinite-blur limit).
        token_scope: ``"full"`` (HeadHunter: identity over every token) or ``"image"`` (diffusers PAG: image queries
            attend only themselves and the text tokens; text rows unchanged).
        start, end: guidance window as fractions of the schedule (steps ``int(start*N) <= i < int(end*N)``).
        adaptive_scale: diffusers PAG's ``pag_adaptive_scale``: ``s_t = max(0, s - adaptive_scale * (1000 - t))``.
        separate_pass: run the perturbed rows as an extra forward instead of appending them to the batch (lower
            peak memory, slower).

    Returns:
        a handle; ``handle.remove()`` (or leaving a ``with`` block) removes the hook and restores the processors.

    Example::

        pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers", ...)
        with attnpack.apply_head_perturbation(pipe, heads="sd3-medium/dark", scale=3.0, softness=0.5):
            image = pipe("a lighthouse", guidance_scale=5.0).images[0]
    """
    scale = check_number("scale", scale, 0.0, MAX_SCALE)
    start = check_number("start", start, 0.0, 1.0)
    end = check_number("end", end, 0.0, 1.0)
    adaptive_scale = check_number("adaptive_scale", adaptive_scale, 0.0, MAX_SCALE)
    if not start < end:
        raise ValueError(f"`start` must be smaller than `end`, got start={start}, end={end}.")
    if not isinstance(separate_pass, bool):
        raise TypeError(f"`separate_pass` must be True or False, got {separate_pass!r}.")
    if heads is None:
        from ..presets import PRESETS, default_preset

        heads = default_preset(getattr(pipe, "_attnpack_model", None))
        if heads is None:
            raise ValueError(
                "`heads` is required for this model: give heads such as 'L1H10' or 'L13', a preset "
                f"({', '.join(sorted(PRESETS))}), or find some with `attnpack search-heads`. Only the built-in "
                "models have default heads."
            )
    models, pipeline = resolve_denoisers(pipe)
    if pipeline is None and ((start, end) != (0.0, 1.0) or adaptive_scale > 0.0):
        raise ValueError(
            "`start`, `end` and `adaptive_scale` need the pipeline's schedule: pass the pipeline, not its denoiser."
        )
    for model in models:
        registry = getattr(model, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            raise ValueError(
                f"head guidance is already applied to this {type(model).__name__}; remove the previous handle first "
                "(one call can perturb any number of heads)."
            )
    settings = _Settings(scale, start, end, adaptive_scale, separate_pass)
    processors = install_head_perturbation(pipe, heads, softness, kind, token_scope)
    hooks: list[tuple[torch.nn.Module, HeadGuidanceHook]] = []
    for model in models:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        hook = HeadGuidanceHook(settings, registry.get_hook(RUN_CONTEXT_HOOK))
        registry.register_hook(hook, HOOK_NAME)
        hook._registered_forward = model.forward
        hooks.append((model, hook))
    handle = HeadGuidanceHandle(processors, hooks)
    logger.debug("head guidance on %s (scale %s, softness %s)", handle.heads, scale, softness)
    return handle


register_technique(
    Technique(
        name="head-guidance",
        summary="head-level perturbation guidance (SoftPAG / HeadHunter): perturb chosen attention heads and guide "
        "away from the perturbed prediction",
        apply=apply_head_perturbation,
        options=(
            Option(
                "heads",
                "strs",
                None,
                "heads: L1H10, L13 (all heads of layer 13), presets like sd3-medium/dark; empty: the built-in model's",
            ),
            Option("scale", "float", 3.0, "perturbation guidance scale s (0: off)", minimum=0.0, maximum=MAX_SCALE),
            Option("softness", "float", 1.0, "SoftPAG u: 0 no perturbation, 1 PAG", minimum=0.0, maximum=1.0),
            Option("kind", "str", "identity", "perturbation target", choices=KINDS),
            Option("token_scope", "str", "full", "full (HeadHunter) or image (diffusers PAG)", choices=TOKEN_SCOPES),
            Option(
                "start", "float", 0.0, "start of the guidance window (fraction of steps)", minimum=0.0, maximum=1.0
            ),
            Option("end", "float", 1.0, "end of the guidance window (fraction of steps)", minimum=0.0, maximum=1.0),
            Option(
                "adaptive_scale", "float", 0.0, "PAG adaptive scale: s - a*(1000 - t)", minimum=0.0, maximum=MAX_SCALE
            ),
            Option("separate_pass", "bool", False, "run the perturbed rows as an extra forward (less memory)"),
        ),
        families=("unet", "sd3", "flux", "wan"),
        doc="docs/head-guidance.md",
        role="modifier",
    )
)
