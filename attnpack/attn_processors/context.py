"""Per-call run context: what attention processors need to know about the current denoiser call.

A diffusers :class:`~diffusers.hooks.ModelHook` on the denoiser records, for every forward, the token grid of the
image or video stream (from FLUX ``img_ids``, from the latent shape for UNets, SD3 and video models), the number of
text tokens, the denoising step index and timestep, and which batch rows are unconditional, conditional, perturbed,
reference or target. Processors read it with :func:`current_run` instead of counting calls.

The state lives in a :class:`contextvars.ContextVar` that is set for the duration of one denoiser forward, so two
pipelines in one process, or two threads serving two requests, never see each other's state.

Step index: when the hook is bound to a pipeline's scheduler, the step is the number of ``scheduler.step`` calls since
the last ``set_timesteps`` (plus the scheduler's ``begin_index`` for img2img), and ``num_steps`` is
``len(scheduler.timesteps)``. Without a scheduler, the step advances whenever the timestep changes and restarts when it
goes up (a new generation); ``num_steps`` is then unknown.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager


logger = logging.getLogger(__name__)

__all__ = [
    "RunState",
    "ParallelLayout",
    "RunContextHook",
    "current_run",
    "run_overrides",
    "install_run_context",
    "checkpoint_with_run_context",
    "ROLE_UNCOND",
    "ROLE_COND",
    "ROLE_PERTURBED",
    "ROLE_REFERENCE",
    "ROLE_TARGET",
]

ROLE_UNCOND = "uncond"
ROLE_COND = "cond"
ROLE_PERTURBED = "perturbed"
ROLE_REFERENCE = "reference"
ROLE_TARGET = "target"

HOOK_NAME = "attnpack_run_context"

_CURRENT: contextvars.ContextVar[RunState | None] = contextvars.ContextVar("attnpack_run_state", default=None)
_OVERRIDES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "attnpack_run_overrides", default=None
)


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """How one denoiser call is split across processes by diffusers' context parallelism (``enable_parallelism``).

    The sequence is cut into ``world`` equal contiguous shards along the token axis, one per context-parallel rank,
    stream by stream (FLUX shards text and image tokens separately, each rank holding
    ``[its text shard, its image shard]``; Wan shards the video tokens). Under Ulysses, the all-to-all before attention
    gives each rank the whole sequence for ``heads / ulysses_degree`` heads: the rank with Ulysses index ``r`` holds
    heads ``r * H / P ... (r + 1) * H / P - 1`` (:meth:`heads`).

    Attributes:
        ulysses_degree / ring_degree: the degrees of diffusers' ``ContextParallelConfig``.
        rank: this process's index in the flattened context-parallel mesh (its sequence shard).
        ulysses_rank / ring_rank: its index in the Ulysses and ring groups.
        world: number of sequence shards (``ulysses_degree * ring_degree``).
        anything: ``ulysses_anything`` / ``ring_anything`` (uneven shards) is on.
        config: diffusers' ``ParallelConfig`` (meshes and process groups), not compared.
    """

    ulysses_degree: int
    ring_degree: int
    rank: int
    ulysses_rank: int
    ring_rank: int
    anything: bool = False
    config: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def world(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def heads(self, num_heads: int) -> slice:
        """The heads (global indices) this rank attends over after the Ulysses all-to-all."""
        per = num_heads // self.ulysses_degree
        return slice(self.ulysses_rank * per, (self.ulysses_rank + 1) * per)

    def local_len(self, num_tokens: int) -> int:
        """Tokens of a stream of ``num_tokens`` held by each rank (diffusers shards evenly)."""
        return num_tokens // self.world

    def shard(self, num_tokens: int) -> slice:
        """The tokens (global indices) of a stream of ``num_tokens`` that this rank holds between attention layers."""
        n = self.local_len(num_tokens)
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def ulysses_group(self):
        return self.config.context_parallel_config._ulysses_mesh.get_group()

    @property
    def ring_group(self):
        return self.config.context_parallel_config._ring_mesh.get_group()

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> ParallelLayout | None:
        """The layout set by ``model.enable_parallelism(config=ContextParallelConfig(...))``, ``None`` without one."""
        config = getattr(model, "_parallel_config", None)
        cp = getattr(config, "context_parallel_config", None)
        if cp is None or cp._world_size is None or cp.ulysses_degree * cp.ring_degree <= 1:
            return None
        return cls(
            ulysses_degree=cp.ulysses_degree,
            ring_degree=cp.ring_degree,
            rank=cp._flattened_mesh.get_local_rank(),
            ulysses_rank=cp._ulysses_local_rank,
            ring_rank=cp._ring_local_rank,
            anything=bool(cp.ulysses_anything or cp.ring_anything),
            config=config,
        )


@dataclasses.dataclass
class RunState:
    """What is known about the denoiser call in flight.

    Attributes:
        family: model family of the denoiser (``"unet"``, ``"sd3"``, ``"flux"``, ``"wan"``, ``"cogvideox"``,
            ``"hunyuan_video"``).
        grid: token grid of the image / video stream at the attention layers of full resolution, ``(H, W)`` for images
            and ``(F, H, W)`` for videos, row-major. UNet layers at lower resolutions use :meth:`grid_for`.
        text_len: number of text (context) tokens joined with the image tokens (FLUX, SD3, CogVideoX, HunyuanVideo),
            or ``None`` where text is only reached through cross-attention.
        image_len: number of image tokens forming ``grid`` (FLUX Kontext appends reference-image tokens after them).
        step_index: denoising step (0-based), ``None`` if unknown.
        num_steps: number of scheduler timesteps, ``None`` if unknown.
        timestep: the timestep value passed to the denoiser (first batch element).
        batch_size: batch size of the denoiser input.
        roles: one role per batch row (``"uncond"``, ``"cond"``, ``"perturbed"``, ``"reference"``, ``"target"``).
        cache_name: the name of diffusers' ``cache_context`` around the call (``"cond"``, ``"uncond"``, ...), if any.
        extras: free-form per-call state set through :func:`run_overrides` (e.g. by attnpack pipelines).
        parallel: the :class:`ParallelLayout` of a context-parallel call (``None`` on one process). ``grid``,
            ``text_len`` and ``image_len`` always describe the *whole* sequence, never a rank's shard.
    """

    family: str
    grid: tuple[int, ...] | None = None
    text_len: int | None = None
    image_len: int | None = None
    step_index: int | None = None
    num_steps: int | None = None
    timestep: float | None = None
    batch_size: int = 1
    roles: tuple[str, ...] = ()
    cache_name: str | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    parallel: ParallelLayout | None = None

    @property
    def local_text_len(self) -> int | None:
        """Text tokens held by this process: :attr:`text_len`, or its shard under context parallelism."""
        if self.text_len is None or self.parallel is None:
            return self.text_len
        return self.parallel.local_len(self.text_len)

    @property
    def progress(self) -> float | None:
        """Fraction of the schedule done before this step (``step_index / num_steps``), ``None`` if unknown."""
        if self.step_index is None or not self.num_steps:
            return None
        return self.step_index / self.num_steps

    def grid_for(self, num_tokens: int) -> tuple[int, ...] | None:
        """Grid of a layer holding ``num_tokens`` image tokens.

        Equals :attr:`grid` at full resolution; for UNet levels downsampled by stride-2 convolutions (each side
        ``ceil(n / 2)``) it walks down the levels until the token count matches. ``None`` if nothing matches.
        """
        if self.grid is None:
            return None
        grid = tuple(self.grid)
        for _ in range(8):
            if math.prod(grid) == num_tokens:
                return grid
            if math.prod(grid) < num_tokens:
                break
            # video models never downsample inside the denoiser: only the spatial axes shrink in UNets
            grid = grid[:-2] + tuple((n + 1) // 2 for n in grid[-2:])
        return None

    def rows(self, *roles: str) -> list[int]:
        """Batch rows whose role is one of ``roles``."""
        return [i for i, r in enumerate(self.roles) if r in roles]


def current_run() -> RunState | None:
    """The :class:`RunState` of the denoiser call in flight in this thread / task, or ``None`` outside one."""
    return _CURRENT.get()


@contextlib.contextmanager
def run_overrides(*, roles: Sequence[str] | None = None, **extras: Any) -> Iterator[None]:
    """Override batch roles and add per-call extras for denoiser calls made inside the ``with`` block.

    Used by code that builds the batch itself (guidance hooks, the IR-Diffusion and A-STAR pipelines). ``roles``
    applies only when its length equals the batch size of the call. Nested blocks merge, inner values winning.
    """
    parent = _OVERRIDES.get() or {}
    merged = dict(parent)
    merged_extras = dict(parent.get("extras", {}))
    merged_extras.update(extras)
    merged["extras"] = merged_extras
    if roles is not None:
        merged["roles"] = tuple(roles)
    token = _OVERRIDES.set(merged)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


# a state already built for the denoiser call in flight by a hook wrapping the run-context hook (head guidance), with
# the batch size of the call it makes: the run-context hook derives roles and extras from it instead of rebuilding
_PREBUILT: contextvars.ContextVar[tuple[torch.nn.Module, RunState] | None] = contextvars.ContextVar(
    "attnpack_prebuilt_state", default=None
)


@contextlib.contextmanager
def reuse_state(module: torch.nn.Module, state: RunState, batch_size: int) -> Iterator[None]:
    """Denoiser calls of ``module`` inside the block reuse ``state`` (grid, step, timestep, ...) with ``batch_size``
    rows: for hooks that wrap the run-context hook and have built the call's state already."""
    token = _PREBUILT.set((module, dataclasses.replace(state, batch_size=batch_size)))
    try:
        yield
    finally:
        _PREBUILT.reset(token)


@contextlib.contextmanager
def _bound_run(run: RunState | None) -> Iterator[None]:
    token = _CURRENT.set(run)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def checkpoint_with_run_context(module: torch.nn.Module, *args):
    """A ``gradient_checkpointing_func`` that recomputes blocks with the run context of their forward pass.

    Gradient checkpointing re-runs a block's forward during the backward pass, outside the denoiser call whose hook
    set :func:`current_run` (and, on CUDA, in autograd's own thread), so processors would see no run context there.
    Use ``model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_run_context)`` when training
    with attnpack processors installed.
    """
    from torch.utils.checkpoint import checkpoint

    run = current_run()
    return checkpoint(
        module.__call__,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _bound_run(run)),
    )


# ------------------------------------------------------------------------------------------------- step tracking
class _SchedulerStepTracker:
    """Counts ``scheduler.step`` calls since the last ``set_timesteps`` by wrapping the two methods on the instance."""

    ATTR = "_attnpack_step_tracker"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.count = 0
        self.refs = 0
        self.offset: int | None = None  # first step's index when the scheduler has no begin_index (see position)
        self._orig_step = scheduler.__dict__.get("step")
        self._orig_set = scheduler.__dict__.get("set_timesteps")
        step_fn, set_fn = scheduler.step, scheduler.set_timesteps

        # functools.wraps keeps the signatures: pipelines inspect `set_timesteps` for `sigmas` / `timesteps` support
        @functools.wraps(step_fn)
        def step(*args, **kwargs):
            out = step_fn(*args, **kwargs)
            self.count += 1
            return out

        @functools.wraps(set_fn)
        def set_timesteps(*args, **kwargs):
            self.count = 0
            self.offset = None
            return set_fn(*args, **kwargs)

        scheduler.step = step
        scheduler.set_timesteps = set_timesteps

    @classmethod
    def acquire(cls, scheduler) -> _SchedulerStepTracker:
        tracker = getattr(scheduler, cls.ATTR, None)
        if tracker is None:
            tracker = cls(scheduler)
            setattr(scheduler, cls.ATTR, tracker)
        tracker.refs += 1
        return tracker

    def release(self) -> None:
        self.refs -= 1
        if self.refs > 0:
            return
        for name, orig in (("step", self._orig_step), ("set_timesteps", self._orig_set)):
            if orig is None:
                self.scheduler.__dict__.pop(name, None)
            else:
                setattr(self.scheduler, name, orig)
        self.scheduler.__dict__.pop(self.ATTR, None)

    def position(self, timestep: float | None = None) -> tuple[int | None, int | None]:
        """``(step index, number of timesteps)``. img2img pipelines skip the first timesteps: the offset is the
        scheduler's ``begin_index`` or, for schedulers without one (DDIM, ...), the index of the first denoiser
        call's timestep in ``scheduler.timesteps``."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        num = len(timesteps) if timesteps is not None else None
        begin = getattr(self.scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin + self.count, num
        if self.offset is None and self.count == 0 and timestep is not None and timesteps is not None:
            matches = (torch.as_tensor(timesteps, dtype=torch.float64) - timestep).abs() < 1e-3
            self.offset = int(matches.nonzero()[0, 0]) if bool(matches.any()) else 0
        return (self.offset or 0) + self.count, num


class _CacheContextReceiver(StateManager):
    """Receives diffusers' ``cache_context(name, ...)`` (pipelines name their cond / uncond denoiser calls)."""

    def __init__(self):
        super().__init__(state_cls=None)

    def set_context(self, context) -> None:
        self._context = context

    @property
    def name(self) -> str | None:
        return None if self._context is None else self._context.name

    def reset(self, *args, **kwargs) -> None:
        self._context = None


# ------------------------------------------------------------------------------------------------- grid extraction
def _family_of(model: torch.nn.Module) -> str:
    from .families import family_of_model

    return family_of_model(model)


def extract_call_info(family: str, model: torch.nn.Module, arguments: dict[str, Any]) -> dict[str, Any]:
    """Grid, text length, image length and batch size of one denoiser call (the family adapter reads them from the
    call's bound arguments: :meth:`FamilyAdapter.call_info`), plus its timestep."""
    from .families import get_adapter

    info = get_adapter(family).call_info(model.config, arguments)
    timestep = arguments.get("timestep")
    if timestep is not None:
        t = timestep.flatten()[0] if torch.is_tensor(timestep) else timestep
        info["timestep"] = float(t)
    return info


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    wait = getattr(tensor, "wait", None)  # functional collectives return AsyncCollectiveTensor
    return wait() if callable(wait) else tensor


def _unshard_arguments(model: torch.nn.Module, arguments: dict[str, Any], parallel: ParallelLayout) -> dict:
    """The denoiser arguments that diffusers' context-parallel plan split at the model's input, gathered back (so the
    run context sees the whole grid, not this rank's shard). Hidden states are only read for their shape: they are
    replaced by ``meta`` tensors of the whole shape instead of being gathered."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    plan = (getattr(model, "_cp_plan", None) or {}).get("", {})
    mesh = parallel.config.context_parallel_config._flattened_mesh
    out = dict(arguments)
    for name, spec in plan.items():
        value = out.get(name)
        if torch.is_tensor(value) and not getattr(spec, "split_output", False) and value.dim() == spec.expected_dims:
            if name.endswith("hidden_states"):
                shape = list(value.shape)
                shape[spec.split_dim] *= parallel.world
                out[name] = torch.empty(shape, dtype=value.dtype, device="meta")
            else:
                out[name] = _wait(EquipartitionSharder.unshard(value, spec.split_dim, mesh))
    return out


# ------------------------------------------------------------------------------------------------- the hook
class RunContextHook(ModelHook):
    """Sets :func:`current_run` for the duration of each forward of the denoiser it is registered on."""

    _is_stateful = True

    def __init__(self, family: str):
        super().__init__()
        self.family = family
        self.refs = 0
        self.active = True
        self.pipeline = None
        self._tracker: _SchedulerStepTracker | None = None
        self._cache = _CacheContextReceiver()
        self._signature: inspect.Signature | None = None
        self._last_timestep: float | None = None
        self._fallback_step = 0
        self._registered_forward = None

    # ---------------------------------------------------------------- binding
    def bind_pipeline(self, pipeline) -> None:
        """Use ``pipeline``'s scheduler for step indices and its CFG flag for default batch roles."""
        if pipeline is None or self.pipeline is pipeline:
            return
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None:
            return
        if self._tracker is not None:
            self._tracker.release()
        self.pipeline = pipeline
        self._tracker = _SchedulerStepTracker.acquire(scheduler)

    def unbind(self) -> None:
        if self._tracker is not None:
            self._tracker.release()
        self._tracker = None
        self.pipeline = None

    def reset_state(self, module):
        self._last_timestep = None
        self._fallback_step = 0
        self._cache.reset()
        return module

    # ---------------------------------------------------------------- forward
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        prebuilt = _PREBUILT.get()
        if prebuilt is not None and prebuilt[0] is module:
            state = dataclasses.replace(prebuilt[1])
            self._apply_overrides(state)
        else:
            state = self.build_state(module, args, kwargs)
        if state.parallel is not None:
            from .parallel import check_parallel_support

            check_parallel_support(module, state.parallel, at_run=True)  # refuse before the denoiser does any work
        token = _CURRENT.set(state)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _CURRENT.reset(token)

    def build_state(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> RunState:
        if self._signature is None:
            self._signature = inspect.signature(self.fn_ref.original_forward)
        try:
            arguments = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            arguments = dict(kwargs)
        parallel = ParallelLayout.of_model(module)
        if parallel is not None and self._inside_context_parallel_split(module):
            arguments = _unshard_arguments(module, arguments, parallel)
        info = extract_call_info(self.family, module, arguments)
        step_index, num_steps = self._step_position(info.get("timestep"))
        state = RunState(
            family=self.family,
            grid=info.get("grid"),
            text_len=info.get("text_len"),
            image_len=info.get("image_len"),
            step_index=step_index,
            num_steps=num_steps,
            timestep=info.get("timestep"),
            batch_size=info.get("batch_size", 1),
            cache_name=self._cache.name,
            parallel=parallel,
        )
        if state.image_len is None and state.grid is not None:
            state.image_len = math.prod(state.grid)
        self._apply_overrides(state)
        return state

    @staticmethod
    def _inside_context_parallel_split(module: torch.nn.Module) -> bool:
        """Whether diffusers' context-parallel split hook on the model itself runs before this hook (it was registered
        later, by ``enable_parallelism`` after attnpack was applied): the call's arguments are then rank shards."""
        order = list(getattr(getattr(module, "_diffusers_hook", None), "_hook_order", ()))
        split = [i for i, name in enumerate(order) if name.startswith("cp_input---")]
        return HOOK_NAME in order and any(i > order.index(HOOK_NAME) for i in split)

    def _apply_overrides(self, state: RunState) -> None:
        overrides = _OVERRIDES.get() or {}
        state.extras = dict(overrides.get("extras", {}))
        state.roles = self._roles(state.batch_size, overrides.get("roles"))

    def _step_position(self, timestep: float | None) -> tuple[int | None, int | None]:
        if self._tracker is not None:
            return self._tracker.position(timestep)
        if timestep is None:
            return None, None
        if self._last_timestep is not None:
            if timestep > self._last_timestep:
                self._fallback_step = 0
            elif timestep < self._last_timestep:
                self._fallback_step += 1
        self._last_timestep = timestep
        return self._fallback_step, None

    def _roles(self, batch_size: int, override: tuple[str, ...] | None) -> tuple[str, ...]:
        if override is not None and len(override) == batch_size:
            return tuple(override)
        name = self._cache.name
        if name == "uncond":
            return (ROLE_UNCOND,) * batch_size
        if name == "cond":
            return (ROLE_COND,) * batch_size
        cfg = False
        if self.pipeline is not None:
            try:
                cfg = bool(getattr(self.pipeline, "do_classifier_free_guidance", False))
            except (AttributeError, TypeError):  # property read before the first __call__
                cfg = False
        if (cfg or name == "cond_uncond") and batch_size % 2 == 0:
            half = batch_size // 2
            return (ROLE_UNCOND,) * half + (ROLE_COND,) * half
        return (ROLE_COND,) * batch_size


def install_run_context(model: torch.nn.Module, pipeline=None) -> RunContextHook:
    """Register (or reuse) the run-context hook on ``model``; each call adds one reference.

    Release with :func:`release_run_context`. When ``pipeline`` is given, its scheduler provides step indices.
    """
    registry = HookRegistry.check_if_exists_or_initialize(model)
    hook = registry.get_hook(HOOK_NAME)
    if hook is None:
        hook = RunContextHook(_family_of(model))
        registry.register_hook(hook, HOOK_NAME)
        hook._registered_forward = model.forward
    elif not hook.active:  # a pass-through leftover (see release_run_context): switch it back on
        hook.active = True
        hook.refs = 0
    hook.refs += 1
    if pipeline is not None:
        hook.bind_pipeline(pipeline)
    return hook


def _remove_hook(model: torch.nn.Module, hook: RunContextHook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if model.forward is hook._registered_forward:
        registry.remove_hook(HOOK_NAME, recurse=False)
    else:
        # Something (e.g. accelerate's offload hook) wrapped the forward after us; removing our wrapper would drop
        # theirs. Leave a pass-through in place instead.
        hook.active = False


def release_run_context(model: torch.nn.Module) -> None:
    """Drop one reference taken by :func:`install_run_context`; the hook goes away with the last one."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None:
        return
    hook.refs -= 1
    if hook.refs > 0:
        return
    hook.unbind()
    _remove_hook(model, hook)
    if not hook.active:
        logger.debug("run-context hook left as a pass-through: the forward was wrapped after it")
