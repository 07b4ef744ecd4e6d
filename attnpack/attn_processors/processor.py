"""Installing attention cores on a denoiser: the generic processor, layer selection and restore handles."""

from __future__ import annotations

import abc
import dataclasses
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, Union

import torch

from .context import ParallelLayout, RunState, current_run, install_run_context, release_run_context
from .families import LayerInfo, Prepared, TokenLayout, dense_attention, family_of_model, get_adapter
from .parallel import check_parallel_support, needs_exchange, parallel_call


logger = logging.getLogger(__name__)

__all__ = [
    "AttentionCall",
    "AttentionCore",
    "DenseCore",
    "ModifierCore",
    "ObserverCore",
    "ComposedCore",
    "AttnPackProcessor",
    "ProcessorHandle",
    "apply_processors",
    "list_layers",
    "select_layers",
    "resolve_denoisers",
    "set_attention_backend",
    "in_effect",
    "ROLE_PATTERN",
    "ROLE_MODIFIER",
    "ROLE_OBSERVER",
]

_DEFAULT = object()


@dataclasses.dataclass
class AttentionCall:
    """Everything an attention core may use besides ``q``, ``k``, ``v``.

    Attributes:
        attn: the diffusers attention module being run.
        layer: :class:`LayerInfo` of this layer (name, index, kind, heads).
        layout: :class:`TokenLayout` of the query / key sequences.
        mask: the model's own attention mask, ready for SDPA (``None`` for most models).
        run: the :class:`RunState` of the denoiser call (grid, step, batch roles), ``None`` outside a hooked call.
        processor: the processor running this call (holds ``_attention_backend`` / ``_parallel_config``).
        parallel: whether dense attention goes through the processor's context-parallel config (``False`` for
            layers diffusers runs unparallelised, and inside the Ulysses exchange of ``parallel.ulysses_call``).
        heads: the layer's heads (global indices) that ``q``, ``k``, ``v`` hold: all of them on one process, this
            rank's share under Ulysses context parallelism (cores selecting heads by index map through it).
        queries: ``None`` (every query), or under ring attention the sorted positions of the queries this rank owns:
            ``q`` then has every position (the others are zeros) and ``k``/``v`` every key, and the core returns
            ``[B, H, len(queries), D]``, the rows of ``queries`` only. Only cores with ``query_subset = True`` are
            given one (GNA, CLEAR); the others refuse ring attention.
    """

    attn: torch.nn.Module
    layer: LayerInfo
    layout: TokenLayout
    mask: torch.Tensor | None
    run: RunState | None
    processor: AttnPackProcessor
    parallel: bool = True
    heads: slice | None = None
    queries: torch.Tensor | None = None

    def local_heads(self, heads) -> list[int]:
        """The positions in this call's ``q``/``k``/``v`` of the layer heads ``heads`` (global indices) held here."""
        if self.heads is None:  # one process: every head is here, at its own index
            return list(heads)
        s = self.heads
        return [h - s.start for h in heads if s.start <= h < s.stop]

    @property
    def backend(self):
        return self.processor._attention_backend

    @property
    def parallel_config(self):
        return self.processor._parallel_config if self.parallel else None

    def dense(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any = _DEFAULT,
        *,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Dense attention through diffusers' dispatcher with this processor's backend (``[B, H, N, D]`` in/out).

        ``mask`` defaults to the model's own mask (:attr:`mask`); pass ``None`` to drop it.
        """
        return dense_attention(
            query,
            key,
            value,
            self.mask if mask is _DEFAULT else mask,
            scale=scale,
            backend=self.backend,
            parallel_config=self.parallel_config,
        )


class AttentionCore(Protocol):
    """A technique: ``core(query, key, value, call) -> output``, all ``[B, H, N, D]``."""

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor: ...


# What a core does to a layer's attention, which decides how it combines with others on the same layer (docs/
# architecture.md, "Composition"): a *pattern* computes the attention (dense, GNA, CLEAR, PARO, IR-Diffusion's masked
# attention: alternatives to each other, at most one per layer); a *modifier* changes the output on some batch rows or
# heads after the pattern ran (head perturbation); an *observer* only records (A-STAR's store, attention recorders).
ROLE_PATTERN, ROLE_MODIFIER, ROLE_OBSERVER = "pattern", "modifier", "observer"
ROLES = (ROLE_PATTERN, ROLE_MODIFIER, ROLE_OBSERVER)


def core_role(core) -> str:
    """The composition role of ``core``: its ``role`` attribute, ``"pattern"`` for any plain attention core."""
    role = getattr(core, "role", ROLE_PATTERN)
    if role not in ROLES:
        raise TypeError(f"{core!r} has role {role!r}; a core's `role` must be one of {', '.join(ROLES)}.")
    return role


class DenseCore:
    """The identity technique: plain dense attention (reproduces the stock processor).

    ``fallback=True`` marks the dense processors :func:`set_attention_backend` puts on layers whose stock processors
    bypass diffusers' dispatcher: they are no technique, so any other pattern installed on the layer takes their place
    (instead of conflicting with them).
    """

    role = ROLE_PATTERN

    def __init__(self, fallback: bool = False):
        self.fallback = fallback

    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        return call.dense(query, key, value)

    def __repr__(self) -> str:
        return "DenseCore()"


class ModifierCore(abc.ABC):
    """Base class of modifier cores: ``modify(q, k, v, call, out)`` returns the layer's output given the output
    ``out`` of the layer's pattern (dense attention when the modifier is alone on the layer)."""

    role = ROLE_MODIFIER

    @abc.abstractmethod
    def modify(self, query, key, value, call: AttentionCall, out: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        return self.modify(query, key, value, call, call.dense(query, key, value))


class ObserverCore(abc.ABC):
    """Base class of observer cores: ``observe(q, k, v, call, out)`` records what it needs and changes nothing."""

    role = ROLE_OBSERVER

    @abc.abstractmethod
    def observe(self, query, key, value, call: AttentionCall, out: torch.Tensor) -> None: ...

    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        out = call.dense(query, key, value)
        self.observe(query, key, value, call, out)
        return out


class ComposedCore:
    """Several techniques on one layer: the pattern computes the attention, then each modifier changes its output,
    then each observer sees the result. Modifiers and observers run in the order of their technique names, so the
    order in which techniques were applied never matters."""

    def __init__(self, pattern: AttentionCore, modifiers: Sequence[Any] = (), observers: Sequence[Any] = ()):
        self.pattern = pattern
        self.modifiers = tuple(modifiers)
        self.observers = tuple(observers)

    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        out = self.pattern(query, key, value, call)
        for modifier in self.modifiers:
            out = modifier.modify(query, key, value, call, out)
        for observer in self.observers:
            observer.observe(query, key, value, call, out)
        return out

    @property
    def parts(self) -> tuple:
        return (self.pattern, *self.modifiers, *self.observers)

    def __repr__(self) -> str:
        return " + ".join(repr(part) for part in self.parts)


class AttnPackProcessor:
    """A diffusers attention processor made of a family adapter and an attention core.

    The ``__call__`` signature covers every supported family: legacy ``Attention`` modules pass keywords (filtered by
    this signature), ``FluxAttention`` and ``WanAttention`` pass ``(attn, hidden_states, encoder_hidden_states,
    attention_mask, rotary)`` positionally (Wan's ``rotary_emb`` lands in ``image_rotary_emb``).
    """

    _attention_backend = None
    _parallel_config = None
    technique: str | None = None  # the registry name of the technique this class runs (subclasses set it)

    def __init__(self, core: AttentionCore, layer: LayerInfo):
        self.core = core
        self.layer = layer
        self._adapter = get_adapter(layer.family)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        temb: torch.Tensor | None = None,
    ):
        run = current_run()
        prep: Prepared = self._adapter.prepare(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, temb, run, self
        )
        call = AttentionCall(attn, self.layer, prep.layout, prep.mask, run, self, prep.parallel)
        parallel = None if run is None else run.parallel
        if parallel is not None and needs_exchange(self.core):
            out = parallel_call(self.core, prep.query, prep.key, prep.value, call, parallel)
        else:
            out = self.core(prep.query, prep.key, prep.value, call)
        return self._adapter.finish(attn, out, prep)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer.name!r}, core={self.core!r})"


# ------------------------------------------------------------------------------------------------- layers
def resolve_denoisers(pipe_or_model) -> tuple[list[torch.nn.Module], Any]:
    """The denoiser(s) of a pipeline (``unet``, ``transformer``, ``transformer_2``) or the model itself.

    Returns ``(models, pipeline_or_None)``.
    """
    if isinstance(pipe_or_model, torch.nn.Module):
        family_of_model(pipe_or_model)  # raises for unsupported classes
        return [pipe_or_model], None
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"Expected a diffusers pipeline or denoiser model, got {type(pipe_or_model).__name__}. "
            "Pass e.g. `pipe` or `pipe.transformer`."
        )
    models = [components[k] for k in ("unet", "transformer", "transformer_2") if components.get(k) is not None]
    if not models:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no `unet` or `transformer` component to install processors on."
        )
    for m in models:
        family_of_model(m)
    return models, pipe_or_model


def list_layers(model: torch.nn.Module) -> list[LayerInfo]:
    """The attention layers attnpack can handle in ``model``, in ``attn_processors`` order."""
    family = family_of_model(model)
    adapter = get_adapter(family)
    modules = dict(model.named_modules())
    layers: list[LayerInfo] = []
    kind_counts: dict[str, int] = {}
    for key in model.attn_processors:
        name = key[: -len(".processor")]
        module = modules[name]
        kind = adapter.layer_kind(name, module)
        if kind is None:
            continue
        heads = module.heads
        layers.append(
            LayerInfo(
                name=name,
                index=len(layers),
                family=family,
                kind=kind,
                kind_index=kind_counts.get(kind, 0),
                heads=heads,
                head_dim=module.inner_dim // heads,
            )
        )
        kind_counts[kind] = kind_counts.get(kind, 0) + 1
    return layers


LayerSpec = Union[str, int, "re.Pattern[str]", Iterable[Union[str, int, "re.Pattern[str]"]], None]


def _guarded(pattern: str) -> re.Pattern[str]:
    """Compile ``pattern`` so that a match never starts or ends inside a number (``blocks.1`` != ``blocks.10``)."""
    return re.compile(rf"(?:(?![0-9])|(?<![0-9]))(?:{pattern})(?:(?<![0-9])|(?![0-9]))")


def _describe(layers: Sequence[LayerInfo], limit: int = 40) -> str:
    names = [f"{i.index}: {i.name}" for i in layers]
    if len(names) > limit:
        names = names[:limit] + [f"... and {len(names) - limit} more"]
    return "; ".join(names)


def select_layers(layers: Sequence[LayerInfo], spec: LayerSpec, *, argument: str = "layers") -> list[LayerInfo]:
    """Resolve a layer selection against ``layers``.

    ``spec`` is ``None`` (all), or one or a list of: an exact module name (``"transformer_blocks.0.attn"``, the
    ``.processor`` suffix is accepted), an integer index (negative counts from the end), or a regular expression
    searched in the names with integer boundaries: ``"blocks.1"`` matches ``transformer_blocks.1.attn`` but not
    ``transformer_blocks.10.attn``. Each item must match at least one layer.
    """
    if spec is None:
        return list(layers)
    if isinstance(spec, (str, int, re.Pattern)):
        items = [spec]
    elif isinstance(spec, Iterable):
        items = list(spec)
    else:
        raise TypeError(f"`{argument}` must be a name, an integer index, a regex or a list of them, got {spec!r}.")
    chosen: dict[str, LayerInfo] = {}
    by_name = {info.name: info for info in layers}
    for item in items:
        matched: list[LayerInfo]
        if isinstance(item, bool) or not isinstance(item, (str, int, re.Pattern)):
            raise TypeError(f"`{argument}` items must be names, integer indices or regexes, got {item!r}.")
        if isinstance(item, int):
            if not -len(layers) <= item < len(layers):
                raise ValueError(
                    f"`{argument}` index {item} is out of range: this model has {len(layers)} attention layers "
                    f"(0..{len(layers) - 1}). Valid layers: {_describe(layers)}"
                )
            matched = [layers[item]]
        else:
            text = item.pattern if isinstance(item, re.Pattern) else item
            if text.endswith(".processor"):
                text = text[: -len(".processor")]
            if text in by_name:
                matched = [by_name[text]]
            else:
                try:
                    regex = _guarded(text)
                except re.error as exc:
                    raise ValueError(f"`{argument}` entry {text!r} is not a valid regular expression: {exc}") from None
                matched = [info for info in layers if regex.search(info.name)]
        if not matched:
            raise ValueError(
                f"`{argument}` entry {item!r} matches no attention layer. Valid layers: {_describe(layers)}"
            )
        for info in matched:
            chosen[info.name] = info
    return [info for info in layers if info.name in chosen]


# ------------------------------------------------------------------------------------------------- composition
# attributes a processor carries for diffusers (set by set_attention_backend / enable_parallelism): a processor that
# replaces another on the same layer keeps them
_CARRIED_ATTRIBUTES = ("_attention_backend", "_parallel_config")
_TABLE = "_attnpack_compositions"
_TOKENS = itertools.count(1)  # one per handle: the key of its contributions in the layer tables


@dataclasses.dataclass
class _Contribution:
    technique: str
    role: str
    core: Any
    processor_cls: type


@dataclasses.dataclass
class _LayerComposition:
    """What attnpack installed on one layer: every handle's contribution, the processor that runs them all, and the
    processor that was there before (restored when the last contribution goes)."""

    info: LayerInfo
    original: Any
    installed: Any = None
    contributions: dict[int, _Contribution] = dataclasses.field(default_factory=dict)

    def pattern(self) -> _Contribution | None:
        patterns = [c for c in self.contributions.values() if c.role == ROLE_PATTERN]
        chosen = [c for c in patterns if not getattr(c.core, "fallback", False)]
        return (chosen or patterns or [None])[0]

    def build(self, previous: Any) -> AttnPackProcessor:
        """The processor running every contribution (the contribution's own processor when it is alone)."""
        pattern = self.pattern()
        ordered = sorted((c for c in self.contributions.values() if c.role != ROLE_PATTERN), key=_order)
        modifiers = [c for c in ordered if c.role == ROLE_MODIFIER]
        observers = [c for c in ordered if c.role == ROLE_OBSERVER]
        if pattern is not None and getattr(pattern.core, "fallback", False) and ordered:
            pattern = None  # plain dense attention: the modifiers / observers run it themselves when alone
        if pattern is not None and not ordered:
            proc = pattern.processor_cls(pattern.core, self.info)
        elif pattern is None and len(ordered) == 1:
            proc = ordered[0].processor_cls(ordered[0].core, self.info)
        else:
            core = ComposedCore(
                pattern.core if pattern is not None else DenseCore(),
                [c.core for c in modifiers],
                [c.core for c in observers],
            )
            proc = (pattern or ordered[0]).processor_cls(core, self.info)
        for name in _CARRIED_ATTRIBUTES:
            if name in getattr(previous, "__dict__", {}):
                setattr(proc, name, previous.__dict__[name])
        return proc

    def techniques(self) -> list[str]:
        pattern = self.pattern()
        rest = sorted({c.technique for c in self.contributions.values() if c.role != ROLE_PATTERN})
        return ([pattern.technique] if pattern is not None else []) + rest


def _order(contribution: _Contribution) -> tuple:
    return (contribution.technique, type(contribution.core).__name__)


def _table(model: torch.nn.Module) -> dict[str, _LayerComposition]:
    table = model.__dict__.get(_TABLE)
    if table is None:
        table = model.__dict__[_TABLE] = {}
    return table


def in_effect(pipe_or_model) -> dict[str, Any]:
    """What attnpack runs on the denoiser(s) now, per layer, summarised for the parameters embedded in outputs:
    ``{"<techniques joined by +>": {"layers": count, "names": [...], "core": repr of one layer's core}}``."""
    try:
        models, _ = resolve_denoisers(pipe_or_model)
    except (TypeError, ValueError):
        return {}
    groups: dict[str, dict[str, Any]] = {}
    for model in models:
        current = model.attn_processors
        for name, comp in model.__dict__.get(_TABLE, {}).items():
            proc = current.get(f"{name}.processor")
            if proc is not comp.installed:
                continue
            group = groups.setdefault(
                " + ".join(comp.techniques()), {"layers": 0, "names": [], "core": repr(proc.core)}
            )
            group["layers"] += 1
            group["names"].append(name)
    for group in groups.values():
        if len(group["names"]) > 8:
            group["names"] = group["names"][:4] + [f"... {len(group['names']) - 6} more"] + group["names"][-2:]
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------------------------- handle
class ProcessorHandle:
    """Restores what an ``apply_*`` call changed. Use ``handle.remove()`` or ``with apply_...(...):``.

    Removing takes this handle's cores off the layers it installed them on: a layer with other techniques left runs
    those (exactly as if they had been applied alone), a layer with none gets back its original processor object.
    Layers changed since by someone else are left alone. Then the run-context hook reference is released and any
    extra restore callbacks run (e.g. weights).
    """

    def __init__(self, description: str = ""):
        self.description = description
        self._token = next(_TOKENS)
        self._layers: list[tuple[torch.nn.Module, list[str], str]] = []  # (model, layer names, key prefix)
        self._callbacks: list[Callable[[], None]] = []
        self._children: list[ProcessorHandle] = []
        self._models_with_context: list[torch.nn.Module] = []
        self._last: dict[str, AttnPackProcessor] = {}
        self.removed = False

    @property
    def processors(self) -> dict[str, AttnPackProcessor]:
        """The processors now running this handle's cores, by ``attn_processors`` key (after :meth:`remove`: the
        ones that ran them last)."""
        if self.removed:
            return dict(self._last)
        out: dict[str, AttnPackProcessor] = {}
        for model, names, prefix in self._layers:
            table, current = model.__dict__.get(_TABLE, {}), model.attn_processors
            for name in names:
                comp = table.get(name)
                key = f"{name}.processor"
                if comp is not None and self._token in comp.contributions and current.get(key) is comp.installed:
                    out[prefix + key] = comp.installed
        for child in self._children:
            out.update(child.processors)
        return out

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on :meth:`remove` (callbacks run in reverse order, after processors are restored)."""
        self._callbacks.append(fn)

    def remove(self) -> None:
        if self.removed:
            return
        self._last = self.processors
        self.removed = True
        for model, names, _ in reversed(self._layers):
            table, current = _table(model), model.attn_processors
            restore = dict(current)
            for name in names:
                comp, key = table.get(name), f"{name}.processor"
                if comp is None or comp.contributions.pop(self._token, None) is None:
                    continue
                if current.get(key) is not comp.installed:  # replaced by someone else since: leave it
                    if not comp.contributions:
                        del table[name]
                    continue
                if comp.contributions:
                    comp.installed = restore[key] = comp.build(current[key])
                else:
                    restore[key] = comp.original
                    del table[name]
            model.set_attn_processor(restore)
        for model in reversed(self._models_with_context):
            release_run_context(model)
        for fn in reversed(self._callbacks):
            fn()

    def __enter__(self) -> ProcessorHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.processors)} processors"
        return f"ProcessorHandle({self.description!r}, {state})"


CoreOrFactory = Union[AttentionCore, Callable[[LayerInfo], "AttentionCore | None"]]


def _layer_list(names: Sequence[str], limit: int = 6) -> str:
    shown = list(names[:limit]) + ([f"... {len(names) - limit} more"] if len(names) > limit else [])
    return ", ".join(shown)


def apply_processors(
    pipe_or_model,
    core_or_factory: CoreOrFactory,
    layers: LayerSpec = None,
    *,
    kinds: Iterable[str] | None = None,
    processor_cls: type[AttnPackProcessor] = AttnPackProcessor,
    description: str = "",
    technique: str | None = None,
) -> ProcessorHandle:
    """Install an attention core on the selected attention layers of a pipeline's denoiser(s).

    Cores compose per layer (docs/architecture.md, "Composition"): a layer runs at most one *pattern* core (dense,
    GNA, CLEAR, PARO, ...; a second one on the same layer is an error naming both techniques), plus any *modifiers*
    (head perturbation) and *observers* (recorders). Applying A then B gives the same processors as B then A.

    Args:
        pipe_or_model: a diffusers pipeline (its ``unet`` / ``transformer`` / ``transformer_2``) or a denoiser.
        core_or_factory: an :class:`AttentionCore` shared by all selected layers, or a factory
            ``fn(layer: LayerInfo) -> core | None`` (``None`` keeps that layer's processor).
        layers: layer selection (see :func:`select_layers`); ``None`` selects all supported layers. A selection that
            installs nothing (``layers=[]``, a factory returning ``None`` everywhere) is an error.
        kinds: restrict to layer kinds (``"self"``, ``"cross"``, ``"joint"``, ``"single"``).
        processor_cls: processor class to instantiate (subclasses of :class:`AttnPackProcessor`).
        description: shown in the handle's repr.
        technique: the name used in conflict errors and in :func:`in_effect` (default: ``processor_cls.technique``,
            else ``description``, else the core's class name).

    Returns:
        a :class:`ProcessorHandle` restoring the original processors.
    """
    models, pipeline = resolve_denoisers(pipe_or_model)
    if not callable(core_or_factory):
        raise TypeError(f"`core_or_factory` must be an attention core or a factory function, got {core_or_factory!r}.")
    is_factory = _is_factory(core_or_factory)
    name = technique or processor_cls.technique or description or type(core_or_factory).__name__
    handle = ProcessorHandle(description)
    kinds = set(kinds) if kinds is not None else None
    plans: list[tuple[torch.nn.Module, dict[str, tuple[LayerInfo, _Contribution]]]] = []
    conflicts: dict[str, list[str]] = {}
    selected_any = False
    for model in models:
        infos = list_layers(model)
        if kinds is not None:
            infos = [i for i in infos if i.kind in kinds]
            if not infos:
                raise ValueError(f"{type(model).__name__} has no attention layers of kind {sorted(kinds)}.")
        selected = select_layers(infos, layers)
        selected_any = selected_any or bool(selected)
        table, current = _table(model), model.attn_processors
        plan: dict[str, tuple[LayerInfo, _Contribution]] = {}
        for info in selected:
            core = core_or_factory(info) if is_factory else core_or_factory
            if core is None:
                continue
            new = _Contribution(name, core_role(core), core, processor_cls)
            comp = table.get(info.name)
            if comp is not None and current.get(f"{info.name}.processor") is comp.installed:
                for other in comp.contributions.values():
                    same_pattern = new.role == other.role == ROLE_PATTERN and not (
                        getattr(core, "fallback", False) or getattr(other.core, "fallback", False)
                    )
                    if same_pattern or other.technique == name:
                        conflicts.setdefault(other.technique, []).append(info.name)
            plan[info.name] = (info, new)
        plans.append((model, plan))
    if conflicts:
        lines = [f"{other} on {len(names)} of them ({_layer_list(names)})" for other, names in conflicts.items()]
        raise ValueError(
            f"{name!r} cannot be installed: its layers already run {'; '.join(lines)}. A layer runs one attention "
            "pattern (dense, GNA, CLEAR, PARO, ... are alternatives) and each technique once; remove the other "
            "technique's handle first, or give the two techniques disjoint `layers`."
        )
    if not any(plan for _, plan in plans):
        why = "leaves no attention layer to install on" if selected_any else "selects no attention layer"
        raise ValueError(
            f"{name!r} {why} (`layers`={layers!r}; options such as `dense_layers` or a plan may exclude layers): "
            "nothing would change. Select at least one layer (leave `layers` unset for all). "
            f"Valid layers: {_describe(list_layers(models[0]))}"
        )
    for model, plan in plans:
        table, current = _table(model), model.attn_processors
        new_procs = dict(current)
        for layer_name, (info, contribution) in plan.items():
            key = f"{layer_name}.processor"
            comp = table.get(layer_name)
            if comp is None or current.get(key) is not comp.installed:  # new, or replaced by someone else since
                comp = table[layer_name] = _LayerComposition(info, original=current[key])
            comp.contributions[handle._token] = contribution
            comp.installed = new_procs[key] = comp.build(current[key])
        model.set_attn_processor(new_procs)  # a full dict: set_attn_processor consumes it, so pass our own copy
        handle._layers.append((model, list(plan), "" if len(models) == 1 else f"{type(model).__name__}:"))
        install_run_context(model, pipeline)
        handle._models_with_context.append(model)
    for model, _ in plans:
        parallel = ParallelLayout.of_model(model)
        if parallel is not None:  # the model runs under context parallelism already: refuse now, not at the first step
            try:
                check_parallel_support(model, parallel)
            except ValueError:
                handle.remove()
                raise
    logger.debug("installed %s on %d layers", name, sum(len(plan) for _, plan in plans))
    return handle


def _is_factory(obj) -> bool:
    """A plain function or lambda taking one argument is a factory; objects with a 4-argument __call__ are cores."""
    import inspect

    if inspect.isfunction(obj) or inspect.ismethod(obj):
        params = [p for p in inspect.signature(obj).parameters.values() if p.default is inspect.Parameter.empty]
        return len(params) == 1
    return False


# families whose stock processors call F.scaled_dot_product_attention directly, bypassing diffusers' dispatcher
BYPASSING_FAMILIES = ("unet", "sd3", "cogvideox")


def check_attention_backend(backend: str, argument: str = "backend"):
    """The diffusers ``AttentionBackendName`` of ``backend`` (``"sdpa"`` is an alias of diffusers' ``"native"``), or a
    ``ValueError`` naming ``argument`` and the valid names. Needs no model: entry points call it before loading one."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    valid = [b.value for b in AttentionBackendName]
    if isinstance(backend, str) and backend.lower() == "sdpa":
        backend = "native"
    if not isinstance(backend, str) or backend.lower() not in valid:
        raise ValueError(f"`{argument}` must be one of {', '.join(valid)} (or sdpa), got {backend!r}.")
    return AttentionBackendName(backend.lower())


def set_attention_backend(pipe_or_model, backend: str) -> ProcessorHandle:
    """Run every attention layer of the denoiser(s) on a diffusers attention backend (``"flash"``, ``"sage"``, ...).

    Unlike ``model.set_attention_backend``, this reaches UNet, SD3 and CogVideoX layers too (attnpack's dense
    processors are installed there first; they reproduce the stock output exactly) and does not change diffusers'
    process-wide default backend. ``handle.remove()`` restores the previous processors and backends.
    """
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    name = check_attention_backend(backend)
    try:
        _check_attention_backend_requirements(name)
    except (RuntimeError, ImportError) as exc:
        raise ValueError(f"attention backend {backend!r} is not usable here: {str(exc).splitlines()[0]}") from None
    models, _ = resolve_denoisers(pipe_or_model)
    handle = ProcessorHandle(f"attention backend {name.value}")
    for model in models:
        if family_of_model(model) in BYPASSING_FAMILIES:
            # dense processors only where stock ones bypass the dispatcher; a technique's processors stay
            procs = model.attn_processors
            stock = [
                i.index for i in list_layers(model) if not hasattr(procs[f"{i.name}.processor"], "_attention_backend")
            ]
            if stock:
                inner = apply_processors(
                    model, DenseCore(fallback=True), layers=stock, description="dense (dispatcher-aware)"
                )
                handle.add_callback(inner.remove)
                handle._children.append(inner)
    previous: list[tuple[torch.nn.Module, str, Any, Any]] = []
    for model in models:
        for key, proc in model.attn_processors.items():
            if hasattr(proc, "_attention_backend"):
                previous.append((model, key, proc, proc.__dict__.get("_attention_backend", _DEFAULT)))
                proc._attention_backend = name

    def restore():
        for model, key, proc, value in previous:
            now = model.attn_processors.get(key)
            # a processor rebuilt since on this layer (another technique composed with it) carried the backend over
            for target in {id(proc): proc, id(now): now}.values() if isinstance(now, AttnPackProcessor) else (proc,):
                if value is _DEFAULT:
                    target.__dict__.pop("_attention_backend", None)
                else:
                    target._attention_backend = value

    handle.add_callback(restore)
    return handle
