"""The Head guidance tab: head-level perturbation guidance (SoftPAG / HeadHunter, https://arxiv.org/abs/2506.10978)
with a heads picker (published presets and ``L1H10``-style heads), scale, softness, perturbation kind and token scope,
and a heads x softness comparison grid. API endpoints ``/head_guidance`` and ``/head_grid``.

Both go through the registered ``head-guidance`` technique (:func:`attnpack.apply_head_perturbation`), installed for
one request and removed after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._layout import (
    TOY_EXAMPLES_LABEL,
    advanced_settings,
    checked_request,
    labelled_grid,
    model_picker,
    parameters_panel,
    prompt_row,
    request_settings,
    result_views,
    toggle_result_views,
)
from ._runtime import Runtime, installed, user_errors


__all__ = ["build_head_guidance_tab", "head_rows", "softness_values", "MAX_GRID_CELLS"]

MAX_GRID_CELLS = 36
# request fields (API parameter names) that go to the settings and to the technique's options
SETTING_INPUTS = (
    "prompt",
    "negative_prompt",
    "seed",
    "randomize_seed",
    "width",
    "height",
    "steps",
    "guidance",
    "num_frames",
)
OPTION_INPUTS = ("scale", "kind", "token_scope", "start", "end", "adaptive_scale", "separate_pass")


def head_rows(presets: Sequence[str] | None, heads: str | None) -> list[list[str]]:
    """Grid rows: one per picked preset, then one per ``;``-separated group of the heads field (each group a
    comma-separated list such as ``L1H10, L13H17``)."""
    rows = [[p] for p in presets or ()]
    for group in (heads or "").split(";"):
        items = [h.strip() for h in group.split(",") if h.strip()]
        if items:
            rows.append(items)
    return rows


def softness_values(text: str) -> list[float]:
    """``"0, 0.5, 1"`` -> ``[0.0, 0.5, 1.0]`` (each in ``[0, 1]``)."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"`softness_values` must be numbers separated by commas, got {text!r}.") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"`softness_values` must be one or more numbers in [0, 1], got {text!r}.")
    return values


def _model_default(model: str) -> list[list[str]]:
    """One row with the built-in model's default heads (toy-flux), or none (then the request names no heads)."""
    from ..presets import default_preset

    preset = default_preset(model)
    return [[preset]] if preset else []


def _preset_choices() -> list[tuple[str, str]]:
    from ..presets import list_presets

    return [(f"{p.name}: {p.meaning}", p.name) for p in list_presets()]


def build_head_guidance_tab(runtime: Runtime, technique) -> None:
    """Add the tab; ``technique`` is the registered ``head-guidance`` technique."""
    import gradio as gr

    from ..attn_processors.head_perturbation import KINDS, TOKEN_SCOPES
    from ..io import save_image
    from ..pipelines.generation import run_generation
    from ..techniques import parse_options

    config = runtime.config
    with gr.Tab("Head guidance", id="head-guidance"):
        gr.Markdown(
            "Perturb chosen attention heads and guide away from the perturbed prediction "
            "([SoftPAG / HeadHunter](https://arxiv.org/abs/2506.10978)). Presets are heads the paper found on "
            "SD3-medium and FLUX.1-dev; layer `L` and head `H` indices follow `docs/head-guidance.md`."
        )
        model = model_picker(config)
        with gr.Row():
            presets = gr.Dropdown(choices=_preset_choices(), value=[], multiselect=True, label="Head presets", scale=2)
            heads = gr.Textbox(
                label="Heads",
                value="",
                placeholder="L1H10, L13H17; L13",
                info="comma-separated heads (L13 = all heads of layer 13); ';' starts another grid row",
                scale=2,
            )
        with gr.Row():
            scale = gr.Slider(0.0, 20.0, value=3.0, step=0.1, label="Scale", info="guidance scale s (0: off)")
            softness = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Softness", info="SoftPAG u (1: PAG)")
            kind = gr.Dropdown(list(KINDS), value="identity", label="Perturbation")
            token_scope = gr.Radio(list(TOKEN_SCOPES), value="full", label="Token scope", info="full: HeadHunter")
        prompt, run = prompt_row()
        image, video = result_views()
        with gr.Accordion("Comparison grid: heads x softness", open=False):
            gr.Markdown(
                "Rows: each picked preset, then each `;`-separated group of the Heads field. Columns: the softness "
                "values (0 is the pipeline without perturbation guidance). Every cell uses the same seed."
            )
            with gr.Row():
                grid_softness = gr.Textbox(value="0, 0.5, 1", label="Softness values", scale=3)
                grid_run = gr.Button("Make grid", variant="secondary", scale=1)
            grid_image = gr.Image(label="Grid", type="filepath", format="png", interactive=False)
        with advanced_settings(config) as advanced:
            with gr.Row():
                start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Start", info="guidance window start")
                end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="End", info="guidance window end")
                adaptive_scale = gr.Number(value=0.0, label="Adaptive scale", info="PAG: s - a (1000 - t)")
                separate_pass = gr.Checkbox(value=False, label="Separate pass", info="less memory, slower")
        parameters = parameters_panel()
        gr.Examples(
            examples=[["a red circle left of a blue square", "", 3.0, 1.0]],  # heads "": the model's default heads
            inputs=[prompt, heads, scale, softness],
            label=TOY_EXAMPLES_LABEL,
        )

    def spec(heads_list: list[str], softness: float, request: dict[str, Any]) -> list[tuple[Any, dict]]:
        if not heads_list:
            raise ValueError(
                "`heads` is empty: pick a preset or type heads such as L1H10 (only built-in models have "
                "default heads)."
            )
        raw = {name: request[name] for name in OPTION_INPUTS}
        return [(technique, parse_options(technique, {**raw, "heads": list(heads_list), "softness": softness}))]

    def settings_of(request: dict[str, Any]):
        return request_settings(config, **{name: request[name] for name in SETTING_INPUTS})

    named = {
        "model": model,
        "prompt": prompt,
        **advanced.named(),
        "presets": presets,
        "heads": heads,
        "scale": scale,
        "softness": softness,
        "kind": kind,
        "token_scope": token_scope,
        "start": start,
        "end": end,
        "adaptive_scale": adaptive_scale,
        "separate_pass": separate_pass,
    }

    @checked_request
    def head_guidance(progress=gr.Progress(track_tqdm=True), **request: Any):  # noqa: B008
        """Generate with head-level perturbation guidance on the picked heads (all rows together). Returns the
        image, the video (video models), the seed used and the parameters."""
        with user_errors():
            settings = settings_of(request)
            rows = head_rows(request["presets"], request["heads"]) or _model_default(request["model"])
            heads_list = [h for row in rows for h in row]
            specs = spec(heads_list, request["softness"], request)
            image_path, video_path, parameters = runtime.generate(request["model"], settings, specs)
        return image_path, video_path, settings.seed, parameters

    event = gr.on(
        triggers=[run.click, prompt.submit],
        fn=head_guidance,
        inputs_kwargs=named,
        outputs=[image, video, advanced.seed, parameters],
        api_name="head_guidance",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
    toggle_result_views(event, image, video)

    @checked_request
    def head_grid(progress=gr.Progress(), **request: Any):  # noqa: B008
        """A grid of generations with the same seed: one row per head group, one column per softness value.
        Returns the grid PNG (parameters embedded, with every cell's box), the seed used and the parameters."""
        with user_errors("The grid"):
            settings = settings_of(request)
            rows = head_rows(request["presets"], request["heads"]) or _model_default(request["model"])
            columns = softness_values(request["softness_grid"])
            if not rows:
                raise ValueError("`heads` is empty: pick presets or type head groups such as L1H10; L13.")
            if len(rows) * len(columns) > MAX_GRID_CELLS:
                raise ValueError(f"the grid has {len(rows) * len(columns)} cells; at most {MAX_GRID_CELLS}.")
            specs = [[spec(row, u, request) for u in columns] for row in rows]  # all checked before any work
            cells, records, base = [], [], None
            with runtime.session(request["model"]) as pipe:
                for r, row in enumerate(rows):
                    cells.append([])
                    for c, u in enumerate(columns):
                        progress((r * len(columns) + c) / (len(rows) * len(columns)), desc=f"{','.join(row)} u={u:g}")
                        with installed(pipe, specs[r][c]):
                            result = run_generation(pipe, settings)
                        cells[-1].append(result.images[0][0] if result.is_video else result.images[0])
                        records.append({"heads": row, "softness": u})
                        base = base or result.parameters
            grid, boxes = labelled_grid(cells, [",".join(row) for row in rows], [f"u={u:g}" for u in columns])
            for record, box in zip(records, boxes):
                record["box"] = list(box)
            options = {k: v for k, v in specs[0][0][0][1].items() if k not in ("heads", "softness")}
            parameters = {
                **{k: v for k, v in base.items() if k not in ("processors", "seconds")},
                "techniques": [{"name": technique.name, **options}],
                "grid": {"rows": rows, "softness": columns, "cells": records},
            }
            path = runtime.output_path(settings.seed, ".png")
            save_image(grid, path, parameters)
        return str(path), settings.seed, parameters

    grid_run.click(
        head_grid,
        inputs_kwargs={**named, "softness_grid": grid_softness},
        outputs=[grid_image, advanced.seed, parameters],
        api_name="head_grid",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
