"""Technique controls built from the registry (:mod:`attnpack.techniques`), so that a technique registered later
appears in the UI, with its options, without any change here.

Each option becomes one component whose API parameter is ``<technique>__<option>`` (non-identifier characters
replaced by ``_``), e.g. ``gna__window_size``. Empty text means "the API default". Text options that name a file
(a weights path, a PARO plan, ...) are checked by :func:`~attnpack.ui._runtime.check_weights_file`: inside the allowed
folders and ``.safetensors`` only.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Mapping
from typing import Any

from ._runtime import UIConfig, check_weights_file, looks_like_path


__all__ = ["NO_TECHNIQUE", "TechniqueControls", "technique_controls", "combinable", "api_name_of"]

NO_TECHNIQUE = "none"


def api_name_of(technique: str, option: str) -> str:
    return re.sub(r"\W", "_", f"{technique}__{option}")


def _text_default(kind: str, default: Any) -> str:
    if default is None:
        return ""
    if kind == "json":
        return json.dumps(default)
    if isinstance(default, (list, tuple)):
        return ", ".join(str(v) for v in default)
    return str(default)


def _info(opt, required: bool) -> str:
    parts = [opt.help] if opt.help else []
    if opt.minimum is not None or opt.maximum is not None:
        low = "" if opt.minimum is None else f"{opt.minimum:g} ≤ "
        high = "" if opt.maximum is None else f" ≤ {opt.maximum:g}"
        parts.append(f"{low}value{high}")
    if required and "required" not in opt.help.lower():
        parts.append("required")
    elif opt.default is None and opt.kind != "bool" and not required:
        parts.append("empty: default")
    return "; ".join(parts)


def _widget(opt, required: bool):
    import gradio as gr

    label, info = opt.name, _info(opt, required)
    if opt.kind == "bool":
        return gr.Checkbox(label=label, value=bool(opt.default), info=info, min_width=240)
    if opt.choices is not None:
        choices = [str(c) for c in opt.choices]
        if opt.default is None:
            choices = [("(default)", ""), *[(c, c) for c in choices]]
        return gr.Dropdown(
            choices=choices, value=_text_default(opt.kind, opt.default), label=label, info=info, min_width=240
        )
    if opt.kind in ("int", "float") and opt.default is not None:
        # the range is in `info` and checked by parse_options, whose errors name the option; no `precision`, so
        # that Gradio passes the value as sent (its rounding fails on NaN with no message)
        return gr.Number(label=label, value=opt.default, info=info, min_width=240)
    return gr.Textbox(
        label=label, value=_text_default(opt.kind, opt.default), placeholder="default", info=info, min_width=240
    )


@dataclasses.dataclass
class TechniqueControls:
    """A technique picker and one group of option components per technique (only the picked one visible)."""

    selector: Any
    groups: dict[str, Any]
    widgets: dict[str, Any]  # API parameter name -> component
    keys: dict[str, tuple[str, str]]  # API parameter name -> (technique, option)
    techniques: dict[str, Any]
    combine: Any = None  # a second picker for a modifier technique (head guidance) on top of the first, or None

    def add_options(self) -> None:
        """One group per technique (its summary, then one component per option, wrapping in rows), visible only
        while that technique is picked."""
        import gradio as gr

        for name, tech in self.techniques.items():
            with gr.Group(visible=name == self.selector.value) as group:
                families = f" Models: {', '.join(tech.families)}." if tech.families else ""
                doc = f" Docs: `{tech.doc}`." if tech.doc else ""
                gr.Markdown(f"**{name}**: {tech.summary}.{families}{doc}", padding=True)
                required = _required(tech)
                with gr.Row():
                    for opt in tech.options:
                        api_name = api_name_of(name, opt.name)
                        self.widgets[api_name] = _widget(opt, opt.name in required)
                        self.keys[api_name] = (name, opt.name)
            self.groups[name] = group

        pickers = [self.selector] + ([self.combine] if self.combine is not None else [])

        def show(*picked: str):
            return [gr.update(visible=name in picked) for name in self.groups]

        if self.groups:
            for picker in pickers:
                picker.change(show, pickers, list(self.groups.values()), queue=False, api_visibility="private")

    def specs(
        self, technique: str | None, values: Mapping[str, Any], config: UIConfig, combine_with: str | None = None
    ) -> list[tuple[Any, dict]]:
        """``[(Technique, options)]`` for :meth:`~attnpack.ui._runtime.Runtime.generate` from the request's values
        (``{api name: value}``): the picked technique (none for :data:`NO_TECHNIQUE`), then ``combine_with`` (a
        modifier technique such as head guidance, or none). Options are converted and checked here."""
        from ..techniques import check_composable

        unknown = sorted(set(values) - set(self.keys))
        if unknown:
            raise ValueError(
                f"unknown technique options {', '.join(unknown)}; the options are {', '.join(self.keys)}."
            )
        specs = self._spec(technique, values, config, "technique")
        if combine_with and combine_with != NO_TECHNIQUE:
            tech = self.techniques.get(combine_with)
            if tech is None or tech.role != "modifier":
                known = ", ".join([NO_TECHNIQUE, *combinable(self.techniques)])
                raise ValueError(f"`combine_with` must be one of {known}, got combine_with={combine_with!r}.")
            specs += self._spec(combine_with, values, config, "combine_with")
        check_composable(specs)
        return specs

    def _spec(self, technique: str | None, values: Mapping[str, Any], config: UIConfig, argument: str) -> list:
        from ..techniques import parse_options

        if not technique or technique == NO_TECHNIQUE:
            return []
        if technique not in self.techniques:
            known = ", ".join([NO_TECHNIQUE, *self.techniques])
            raise ValueError(f"`{argument}` must be one of {known}, got {argument}={technique!r}.")
        raw: dict[str, Any] = {}
        for api_name, value in values.items():
            tech, option = self.keys[api_name]
            if tech != technique or value is None or (isinstance(value, str) and not value.strip()):
                continue
            kind = self.techniques[tech].option(option).kind
            if kind == "path" or (kind == "str" and isinstance(value, str) and looks_like_path(value)):
                value = check_weights_file(value, config, argument=api_name)
            elif kind == "strs" and isinstance(value, str):
                items = [v.strip() for v in value.split(",") if v.strip()]
                value = [check_weights_file(v, config, argument=api_name) if looks_like_path(v) else v for v in items]
            raw[option] = value
        tech = self.techniques[technique]
        for name in _required(tech):
            if name not in raw:
                opt = tech.option(name)
                raise ValueError(
                    f"technique {technique!r} needs `{name}` (API parameter {api_name_of(technique, name)}): {opt.help}."
                )
        return [(tech, parse_options(tech, raw))]


def _required(tech) -> list[str]:
    """Options the technique's ``apply`` function has no default for."""
    params = list(inspect.signature(tech.apply).parameters.values())[1:]  # after the pipeline
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def combinable(techniques: Mapping[str, Any]) -> list[str]:
    """The techniques that can be added on top of another one (modifiers: head guidance)."""
    return [name for name, tech in techniques.items() if tech.role == "modifier"]


def technique_controls(
    techniques: Mapping[str, Any],
    *,
    label: str = "Attention technique",
    combine: bool = False,
    default: str = NO_TECHNIQUE,
) -> TechniqueControls:
    """Build the picker (inside the current Gradio context); :meth:`TechniqueControls.add_options` adds the option
    groups where they should go. ``combine=True`` adds a second picker for a modifier technique (head guidance) to
    run on top of the first (docs/architecture.md, "Composition")."""
    import gradio as gr

    techniques = dict(techniques)
    choices = [(f"{NO_TECHNIQUE} (stock attention)", NO_TECHNIQUE)] + [(name, name) for name in techniques]
    value = default if default in techniques else NO_TECHNIQUE
    selector = gr.Dropdown(choices=choices, value=value, label=label, info="its options appear below")
    second = None
    modifiers = combinable(techniques)
    if combine and modifiers:
        patterns = ", ".join(n for n, t in techniques.items() if t.role == "pattern")
        second = gr.Dropdown(
            choices=[(NO_TECHNIQUE, NO_TECHNIQUE)] + [(n, n) for n in modifiers],
            value=NO_TECHNIQUE,
            label="Combine with",
            info=f"runs on top of the technique on the left; composes with any of {patterns} (those are "
            "alternatives to each other)",
        )
    return TechniqueControls(selector, {}, {}, {}, techniques, second)
