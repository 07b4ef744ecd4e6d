"""Installing attention cores on a denoiser: the generic processor, layer selection and restore handles."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, Union

import torch

from ._context import RunState, current_run, install_run_context, release_run_context
from ._families import LayerInfo, Prepared, TokenLayout, dense_attention, family_of_model, get_adapter


logger = logging.getLogger(__name__)

__all__ = [
    "AttentionCall",
    "AttentionCore",
    "DenseCore",
    "AttnPackProcessor",
    "ProcessorHandle",
    "apply_processors",
    "list_layers",
    "select_layers",
    "resolve_denoisers",
    "set_attention_backend",
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
    """

    attn: torch.nn.Module
    layer: LayerInfo
    layout: TokenLayout
    mask: torch.Tensor | None
    run: RunState | None
    processor: AttnPackProcessor
    parallel: bool = True

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


class DenseCore:
    """The identity technique: plain dense attention (reproduces the stock processor)."""

    def __call__(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        return call.dense(query, key, value)

    def __repr__(self) -> str:
        return "DenseCore()"


class AttnPackProcessor:
    """A diffusers attention processor made of a family adapter and an attention core.

    The ``__call__`` signature covers every supported family: legacy ``Attention`` modules pass keywords (filtered by
    this signature), ``FluxAttention`` and ``WanAttention`` pass ``(attn, hidden_states, encoder_hidden_states,
    attention_mask, rotary)`` positionally (Wan's ``rotary_emb`` lands in ``image_rotary_emb``).
    """

    _attention_backend = None
    _parallel_config = None

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


# ------------------------------------------------------------------------------------------------- handle
class ProcessorHandle:
    """Restores what an ``apply_*`` call changed. Use ``handle.remove()`` or ``with apply_...(...):``.

    Removing restores the original processor objects of the replaced layers (layers changed since by someone else
    are left alone), detaches the run-context hook reference and runs any extra restore callbacks (e.g. weights).
    """

    def __init__(self, description: str = ""):
        self.description = description
        self._entries: list[tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]] = []
        self._callbacks: list[Callable[[], None]] = []
        self._models_with_context: list[torch.nn.Module] = []
        self.removed = False
        self.processors: dict[str, AttnPackProcessor] = {}

    def _record(self, model, originals: dict[str, Any], installed: dict[str, Any]) -> None:
        self._entries.append((model, originals, installed))

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on :meth:`remove` (callbacks run in reverse order, after processors are restored)."""
        self._callbacks.append(fn)

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        for model, originals, installed in reversed(self._entries):
            current = model.attn_processors
            restore = dict(current)
            for key, proc in installed.items():
                if current.get(key) is proc:
                    restore[key] = originals[key]
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


def apply_processors(
    pipe_or_model,
    core_or_factory: CoreOrFactory,
    layers: LayerSpec = None,
    *,
    kinds: Iterable[str] | None = None,
    processor_cls: type[AttnPackProcessor] = AttnPackProcessor,
    description: str = "",
) -> ProcessorHandle:
    """Install an attention core on the selected attention layers of a pipeline's denoiser(s).

    Args:
        pipe_or_model: a diffusers pipeline (its ``unet`` / ``transformer`` / ``transformer_2``) or a denoiser.
        core_or_factory: an :class:`AttentionCore` shared by all selected layers, or a factory
            ``fn(layer: LayerInfo) -> core | None`` (``None`` keeps that layer's processor).
        layers: layer selection (see :func:`select_layers`); ``None`` selects all supported layers.
        kinds: restrict to layer kinds (``"self"``, ``"cross"``, ``"joint"``, ``"single"``).
        processor_cls: processor class to instantiate (subclasses of :class:`AttnPackProcessor`).
        description: shown in the handle's repr.

    Returns:
        a :class:`ProcessorHandle` restoring the original processors.
    """
    models, pipeline = resolve_denoisers(pipe_or_model)
    if not callable(core_or_factory):
        raise TypeError(f"`core_or_factory` must be an attention core or a factory function, got {core_or_factory!r}.")
    is_factory = _is_factory(core_or_factory)
    handle = ProcessorHandle(description)
    kinds = set(kinds) if kinds is not None else None
    for model in models:
        infos = list_layers(model)
        if kinds is not None:
            infos = [i for i in infos if i.kind in kinds]
            if not infos:
                raise ValueError(f"{type(model).__name__} has no attention layers of kind {sorted(kinds)}.")
        selected = select_layers(infos, layers)
        current = model.attn_processors
        new = dict(current)
        installed: dict[str, Any] = {}
        for info in selected:
            core = core_or_factory(info) if is_factory else core_or_factory
            if core is None:
                continue
            key = f"{info.name}.processor"
            proc = processor_cls(core, info)
            new[key] = proc
            installed[key] = proc
        model.set_attn_processor(new)  # a full dict: set_attn_processor consumes it, so pass our own copy
        handle._record(model, {k: current[k] for k in installed}, installed)
        for key, proc in installed.items():
            handle.processors[key if len(models) == 1 else f"{type(model).__name__}:{key}"] = proc
        install_run_context(model, pipeline)
        handle._models_with_context.append(model)
    logger.debug("installed %d %s processors", len(handle.processors), processor_cls.__name__)
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


def set_attention_backend(pipe_or_model, backend: str) -> ProcessorHandle:
    """Run every attention layer of the denoiser(s) on a diffusers attention backend (``"flash"``, ``"sage"``, ...).

    Unlike ``model.set_attention_backend``, this reaches UNet, SD3 and CogVideoX layers too (attnpack's dense
    processors are installed there first; they reproduce the stock output exactly) and does not change diffusers'
    process-wide default backend. ``handle.remove()`` restores the previous processors and backends.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    valid = [b.value for b in AttentionBackendName]
    if not isinstance(backend, str) or backend.lower() not in valid:
        raise ValueError(f"`backend` must be one of {', '.join(valid)}, got {backend!r}.")
    name = AttentionBackendName(backend.lower())
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
                inner = apply_processors(model, DenseCore(), layers=stock, description="dense (dispatcher-aware)")
                handle.add_callback(inner.remove)
                handle.processors.update(inner.processors)
    previous: list[tuple[Any, Any]] = []
    for model in models:
        for proc in model.attn_processors.values():
            if hasattr(proc, "_attention_backend"):
                previous.append((proc, proc.__dict__.get("_attention_backend", _DEFAULT)))
                proc._attention_backend = name

    def restore():
        for proc, value in previous:
            if value is _DEFAULT:
                proc.__dict__.pop("_attention_backend", None)
            else:
                proc._attention_backend = value

    handle.add_callback(restore)
    return handle
