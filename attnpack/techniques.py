"""Registry of the techniques that can be selected by name (CLI ``--technique``, batch files, the UI).

Each technique module registers a :class:`Technique` whose option names equal the keyword arguments of its Python
``apply_*`` function, so ``--technique gna --opt window_size=13`` means ``apply_gna(pipe, window_size=13)``. Options
given as strings (command line, CSV) are converted and validated here, with errors that name the technique, the option,
the value and the fix.

Modules listed in :data:`TECHNIQUE_MODULES` are imported on first use of the registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


__all__ = [
    "Option",
    "Technique",
    "register_technique",
    "get_technique",
    "available_techniques",
    "parse_options",
    "apply_techniques",
    "check_composable",
    "technique_parameters",
    "TechniquesHandle",
    "parse_technique_specs",
    "TECHNIQUE_MODULES",
]

# modules that register techniques when imported (one line per technique module)
TECHNIQUE_MODULES: list[str] = [
    "attnpack.attn_processors.clear",
    "attnpack.attn_processors.gna",
    "attnpack.attn_processors.paro",
    "attnpack.pipelines.guidance",
]

_REGISTRY: dict[str, Technique] = {}
_LOADED = False


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a technique.

    ``kind`` is ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"path"`` (a file the technique reads, e.g. weights or
    a plan: the UI only accepts ``.safetensors`` files inside its allowed folders), ``"ints"`` (an int or a tuple of ints, e.g. a window
    per axis; ``-1`` allowed), ``"strs"`` (a list of strings), ``"floats"``, ``"layers"`` (a layer selection:
    names, indices, regexes) or ``"json"`` (any JSON value).
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None


@dataclasses.dataclass(frozen=True)
class Technique:
    """A technique selectable by name: ``apply(pipe, **options)`` returns a restore handle."""

    name: str
    summary: str
    apply: Callable[..., Any]
    options: tuple[Option, ...] = ()
    families: tuple[str, ...] = ()  # model families it supports (empty: all)
    doc: str = ""  # path of its docs page, e.g. "docs/gna.md"
    # how it combines with others on a layer (docs/architecture.md, "Composition"): "pattern" computes the attention
    # (alternatives to each other), "modifier" changes some rows / heads of it (head guidance)
    role: str = "pattern"

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        known = ", ".join(o.name for o in self.options) or "none"
        raise ValueError(f"technique {self.name!r} has no option {name!r}; its options: {known}.")


def register_technique(technique: Technique) -> Technique:
    if technique.name in _REGISTRY and _REGISTRY[technique.name] is not technique:
        raise ValueError(f"a technique named {technique.name!r} is already registered")
    _REGISTRY[technique.name] = technique
    return technique


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in TECHNIQUE_MODULES:
        importlib.import_module(module)


def available_techniques() -> dict[str, Technique]:
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_technique(name: str) -> Technique:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown technique {name!r}. Available: {', '.join(sorted(_REGISTRY)) or 'none'}.")
    return _REGISTRY[name]


# ------------------------------------------------------------------------------------------------- value parsing
def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _split(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    return [p.strip() for p in text.strip("()").split(",") if p.strip()]


def _convert(opt: Option, value: Any) -> Any:
    kind = opt.kind
    is_text = isinstance(value, str)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():  # 3.0 from a JSON file or a UI number field
            return int(value)
        if isinstance(value, bool) or not (isinstance(value, int) or is_text):
            raise ValueError("expected an integer")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not (isinstance(value, (int, float)) or is_text):
            raise ValueError("expected a number")
        return float(value)
    if kind == "bool":
        return _parse_bool(value) if is_text else bool(value)
    if kind == "str":
        if not is_text:
            raise ValueError("expected a string")
        return value
    if kind == "path":
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError("expected a file path")
        return os.path.expanduser(os.fspath(value))
    if kind in ("ints", "floats"):
        cast = int if kind == "ints" else float
        items = _split(value) if is_text else (list(value) if isinstance(value, (list, tuple)) else [value])
        if not items or any(isinstance(v, bool) for v in items):
            raise ValueError("expected a number or a comma-separated list of numbers")
        out = tuple(cast(v) for v in items)
        return out[0] if len(out) == 1 else out
    if kind == "strs":
        if is_text:
            return _split(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError("expected a list of strings")
    if kind == "layers":
        if value is None:
            return None
        if is_text:
            return [int(p) if p.lstrip("-").isdigit() else p for p in _split(value)]
        return value
    if kind == "json":
        return json.loads(value) if is_text else value
    raise AssertionError(f"unknown option kind {kind!r}")


def _check_range(opt: Option, value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if opt.minimum is not None and v < opt.minimum:
                raise ValueError(f"must be >= {opt.minimum}")
            if opt.maximum is not None and v > opt.maximum:
                raise ValueError(f"must be <= {opt.maximum}")
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"must be one of {', '.join(map(str, opt.choices))}")


def _texts(value: Any) -> Iterable[str]:
    """Every string in ``value`` (nested lists, tuples and dicts included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts(item)


def parse_options(technique: Technique | str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Convert and validate ``raw`` options (strings or Python values); unset options keep the API defaults."""
    from .pipelines.generation import check_text

    tech = get_technique(technique) if isinstance(technique, str) else technique
    out: dict[str, Any] = {}
    for name, value in raw.items():
        opt = tech.option(name)
        for text in _texts(value):  # before anything parses it, and without echoing it in the error
            check_text(f"{tech.name}.{name}", text)
        try:
            converted = _convert(opt, value)
            if converted is not None:
                _check_range(opt, converted)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"technique {tech.name!r}: option `{name}`={value!r} is invalid: {exc}.") from None
        out[name] = converted
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_technique_specs(names: Sequence[str] | None, opts: Sequence[str] | None, config: str | None = None):
    """Build ``[(technique, options), ...]`` from CLI pieces.

    ``names``: ``--technique`` values; ``opts``: ``--opt key=value`` (``key`` or ``technique.key`` when several
    techniques are given); ``config``: a JSON list of ``{"name": ..., <options>}`` objects.
    """
    specs: list[tuple[str, dict[str, Any]]] = []
    if config:
        try:
            items = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"`--techniques` is not valid JSON: {exc}") from None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) for i in items
        ):
            raise ValueError(
                '`--techniques` must be a JSON list of objects with a "name" string, e.g. [{"name": "dense"}], got '
                f"{_short(items)}."
            )
        specs.extend((i["name"], {k: v for k, v in i.items() if k != "name"}) for i in items)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names or ()):
        raise ValueError(f"`--technique` must be technique names, got {_short(names)}.")
    specs.extend((name, {}) for name in names or ())
    if isinstance(opts, str) or not all(isinstance(o, str) for o in opts or ()):
        raise ValueError(f"`--opt` must be a list of key=value strings, got {_short(opts)}.")
    for item in opts or ():
        if "=" not in item:
            raise ValueError(f"`--opt` must look like key=value, got {item!r}.")
        key, value = item.split("=", 1)
        key = key.strip()
        target = None
        if "." in key and key.split(".", 1)[0] in {n for n, _ in specs}:
            target, key = key.split(".", 1)
        if target is None:
            if len(specs) != 1:
                raise ValueError(
                    f"`--opt {item}`: say which technique it is for (technique.{key}=...) or give one --technique."
                )
            target = specs[0][0]
        for n, options in specs:
            if n == target:
                options[key] = value
    parsed = [(name, parse_options(name, options)) for name, options in specs]
    check_composable(parsed)
    return parsed


def check_composable(specs: Iterable[tuple[Any, Mapping[str, Any]]]) -> None:
    """Refuse, before any model is loaded, combinations that cannot work whatever the model: two attention-pattern
    techniques (``role="pattern"``: dense, GNA, CLEAR, PARO are alternatives) both on every layer (no ``layers``
    given), or one technique twice. Overlaps that depend on the model's layers are caught when installing."""
    seen: dict[str, int] = {}
    everywhere: list[str] = []
    for spec, options in specs:
        tech = get_technique(spec) if isinstance(spec, str) else spec
        seen[tech.name] = seen.get(tech.name, 0) + 1
        if seen[tech.name] == 2:
            raise ValueError(
                f"technique {tech.name!r} is given twice; give it once (one call takes all its layers / heads)."
            )
        if tech.role == "pattern" and options.get("layers") is None:
            everywhere.append(tech.name)
    if len(everywhere) > 1:
        raise ValueError(
            f"techniques {' and '.join(repr(n) for n in everywhere)} both compute the attention of every layer: "
            "a layer runs one attention pattern (dense, GNA, CLEAR and PARO are alternatives). Keep one, or give "
            "them disjoint `layers`. Head guidance composes with any of them."
        )


class TechniquesHandle:
    """Techniques (and an attention backend) installed by :func:`apply_techniques`: ``remove()`` takes them all off
    (any order is fine, see docs/architecture.md "Composition"); ``parameters()`` is what outputs embed."""

    def __init__(self, pipe, specs: list[tuple[str, dict[str, Any]]], handles: list[Any], attention_backend):
        self.pipe = pipe
        self.specs = specs
        self.handles = handles
        self.attention_backend = attention_backend
        self.description = ", ".join(name for name, _ in specs) or "no techniques"

    def parameters(self) -> dict[str, Any]:
        """``{"techniques": what was asked, "attention_backend": ..., "in_effect": what runs per layer}``."""
        from .attn_processors.processor import in_effect

        params = technique_parameters(self.specs, self.attention_backend)
        params["in_effect"] = in_effect(self.pipe) if self.handles else {}
        return params

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        backend = f", attention backend {self.attention_backend}" if self.attention_backend else ""
        return f"TechniquesHandle({self.description}{backend})"


def technique_parameters(specs: Iterable[tuple[Any, Mapping[str, Any]]], attention_backend: str | None) -> dict:
    """The requested techniques and backend as embedded in outputs (:meth:`TechniquesHandle.parameters` adds what
    was in effect)."""
    return {
        "techniques": [{"name": spec if isinstance(spec, str) else spec.name, **opts} for spec, opts in specs],
        "attention_backend": attention_backend or "default",
    }


def apply_techniques(
    pipe, specs: Iterable[tuple[Any, Mapping[str, Any]]] = (), attention_backend: str | None = None
) -> TechniquesHandle:
    """Install techniques by name, then an attention backend, on ``pipe``: the one installation path of the command
    line, ``attnpack batch`` and the UI.

    Args:
        pipe: a diffusers pipeline (or denoiser).
        specs: ``[(technique name or Technique, options), ...]``; options as Python values or strings (converted
            and checked by :func:`parse_options`). The order does not matter: techniques compose per layer.
        attention_backend: a diffusers attention backend name for every layer (see
            :func:`attnpack.set_attention_backend`), or ``None`` to keep the current one.

    Returns:
        a :class:`TechniquesHandle`; if anything fails, whatever was installed is removed before the error is raised.
    """
    specs = list(specs)
    check_composable(specs)
    if attention_backend:
        from .attn_processors.processor import check_attention_backend

        check_attention_backend(attention_backend, "attention_backend")
    handles: list[Any] = []
    names: list[tuple[str, dict[str, Any]]] = []
    try:
        for spec, options in specs:
            tech = get_technique(spec) if isinstance(spec, str) else spec
            parsed = parse_options(tech, options)
            handles.append(tech.apply(pipe, **parsed))
            names.append((tech.name, parsed))
        if attention_backend:
            from .attn_processors.processor import set_attention_backend

            handles.append(set_attention_backend(pipe, attention_backend))
    except BaseException:
        for h in reversed(handles):
            h.remove()
        raise
    return TechniquesHandle(pipe, names, handles, attention_backend)


# ------------------------------------------------------------------------------------------------- built-in "dense"
def _apply_dense(pipe, layers=None):
    from .attn_processors.processor import DenseCore, apply_processors

    return apply_processors(pipe, DenseCore(), layers=layers, description="dense", technique="dense")


register_technique(
    Technique(
        name="dense",
        summary="attnpack's dense processors (identical output to stock; routes every family through diffusers' "
        "attention dispatcher, so --attention-backend reaches all layers)",
        apply=_apply_dense,
        options=(Option("layers", "layers", None, "layers to install on (names, indices, regexes); default all"),),
    )
)
