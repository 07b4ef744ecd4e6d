"""The IR-Diffusion tab: several subjects, each consistent with its own reference, in one scene
(https://arxiv.org/abs/2411.19261), through :class:`attnpack.IRDiffusionPipeline` (SDXL) or `IRDiffusionSDPipeline` (SD 1.x) on the cached
pipeline. API endpoint ``/ir_diffusion``.

Subjects come from a table (prompt, word, optional target / reference boxes). Target masks are automatic (the
pipeline's attention maps on a layout pass), boxes, uploaded mask images, or drawn (one editor layer per subject);
reference masks are automatic, boxes or uploaded.
"""

from __future__ import annotations

from typing import Any

from ._layout import (
    TOY_EXAMPLES_LABEL,
    advanced_settings,
    checked_request,
    labelled_grid,
    model_picker,
    number,
    parameters_panel,
    prompt_row,
    request_settings,
)
from ._runtime import Runtime, user_errors


__all__ = ["build_ir_diffusion_tab", "parse_subjects", "TARGET_SOURCES", "REFERENCE_SOURCES"]

TARGET_SOURCES = ("automatic", "boxes", "uploaded", "drawn")
REFERENCE_SOURCES = ("automatic", "boxes", "uploaded")
COLUMNS = ["prompt", "word", "target box", "reference box"]
EXAMPLE_SUBJECTS = [  # what the built-in toy-sd draws (colored shapes); real SDXL / SD models take any subject
    ["a red circle", "circle", "0, 0, 32, 64", ""],
    ["a blue square", "square", "32, 0, 64, 64", ""],
]
EXAMPLE_SCENE = "a red circle left of a blue square"
SETTING_INPUTS = ("negative_prompt", "seed", "randomize_seed", "width", "height", "steps", "guidance")


def _box(text: str, argument: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(float(v)) for v in str(text).replace(";", ",").split(",") if v.strip())
    except (ValueError, OverflowError):  # not a number, or "inf"
        box = ()
    if len(box) != 4:
        raise ValueError(f"`{argument}` must be four pixel numbers x0, y0, x1, y1, got {text!r}.")
    return box


def _rows(table: Any) -> list[list[str]]:
    """Rows of the subjects table (a Gradio Dataframe value: ``{"data": [...]}``, a list of rows, or a DataFrame)."""
    if isinstance(table, dict):
        table = table.get("data", [])
    if hasattr(table, "values") and hasattr(table, "columns"):  # pandas
        table = table.values.tolist()
    rows = []
    for row in table or []:
        cells = ["" if v is None else str(v).strip() for v in list(row) + [""] * (len(COLUMNS) - len(row))]
        if any(cells):
            rows.append(cells[: len(COLUMNS)])
    return rows


def parse_subjects(table: Any) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """``(subjects, target box texts, reference box texts)`` from the subjects table (empty rows skipped)."""
    rows = _rows(table)
    if not rows:
        raise ValueError("`subjects` is empty: add one row per subject with its prompt and its word.")
    subjects = []
    for i, (prompt, word, _, _) in enumerate(rows):
        if not prompt or not word:
            raise ValueError(
                f"`subjects` row {i + 1} needs a prompt and a word, got prompt={prompt!r}, word={word!r}."
            )
        subjects.append({"prompt": prompt, "word": word})
    return subjects, [r[2] for r in rows], [r[3] for r in rows]


def _uploaded(files, n: int, argument: str) -> list:
    from PIL import Image

    files = list(files or [])
    if len(files) != n:
        raise ValueError(f"`{argument}` needs one mask image per subject ({n}), got {len(files)}.")
    masks = []
    for f in files:
        path = f if isinstance(f, str) else getattr(f, "name", None) or f["path"]
        with Image.open(path) as im:
            masks.append(im.convert("L").copy())
    return masks


def _drawn(editor: Any, n: int) -> list:
    """Masks from the editor's layers (layer ``i`` = subject ``i``): where the layer is painted (alpha > 0)."""
    import numpy as np
    from PIL import Image

    layers = list((editor or {}).get("layers") or [])
    if len(layers) < n:
        raise ValueError(f"`target_drawing` needs one painted layer per subject ({n}), got {len(layers)} layers.")
    masks = []
    for layer in layers[:n]:
        if isinstance(layer, str):
            with Image.open(layer) as im:
                layer = np.asarray(im.convert("RGBA"))
        layer = np.asarray(layer)
        masks.append(layer[..., 3] if layer.ndim == 3 and layer.shape[-1] == 4 else layer)
    return masks


def mask_inputs(subjects, target_boxes, reference_boxes, request: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's ``target_masks`` / ``target_boxes`` / ``reference_masks`` / ``reference_boxes`` arguments."""
    n = len(subjects)
    out: dict[str, Any] = {}
    for side, texts in (("target", target_boxes), ("reference", reference_boxes)):
        source = request[f"{side}_source"]
        sources = TARGET_SOURCES if side == "target" else REFERENCE_SOURCES
        if source not in sources:
            raise ValueError(f"`{side}_source` must be one of {', '.join(sources)}, got {source!r}.")
        if source == "boxes":
            out[f"{side}_boxes"] = [_box(t, f"subjects row {i + 1} {side} box") for i, t in enumerate(texts)]
        elif source == "uploaded":
            out[f"{side}_masks"] = _uploaded(request[f"{side}_files"], n, f"{side}_files")
        elif source == "drawn":
            out[f"{side}_masks"] = _drawn(request["target_drawing"], n)
    return out


def build_ir_diffusion_tab(runtime: Runtime) -> None:
    import gradio as gr

    from .._utils import package_versions
    from ..io import save_image
    from ..pipelines.ir_diffusion import ir_pipeline_for
    from ..pipelines.ir_masks import overlay_masks
    from ..pipelines.loading import pipeline_defaults

    config = runtime.config
    # toy-sd is trained (tiny-sdxl has random weights: noise); either runs IR-Diffusion on the CPU
    default = next((m for m in ("toy-sd", "tiny-sdxl") if m in config.models), config.default_model)
    with gr.Tab("IR-Diffusion", id="ir-diffusion"):
        gr.Markdown(
            "Several subjects, each consistent with its own reference image, in one scene "
            "([IR-Diffusion](https://arxiv.org/abs/2411.19261), SDXL and SD 1.x models such as toy-sd). Each subject's word must "
            "appear in its prompt and in the scene prompt. Box: `x0, y0, x1, y1` in pixels."
        )
        model = model_picker(config, value=default)
        subjects = gr.Dataframe(
            value=EXAMPLE_SUBJECTS,
            headers=COLUMNS,
            datatype=["str"] * len(COLUMNS),
            row_count=(2, "dynamic"),
            column_count=(len(COLUMNS), "fixed"),
            interactive=True,
            label="Subjects",
        )
        prompt, run = prompt_row(placeholder=f"the scene, e.g. {EXAMPLE_SCENE}")
        with gr.Row():
            target_source = gr.Radio(list(TARGET_SOURCES), value="automatic", label="Target masks")
            reference_source = gr.Radio(list(REFERENCE_SOURCES), value="automatic", label="Reference masks")
        with gr.Accordion("Mask images and drawing", open=False):
            with gr.Row():
                target_files = gr.File(
                    file_count="multiple", file_types=["image"], label="Target mask images (one per subject, in order)"
                )
                reference_files = gr.File(
                    file_count="multiple", file_types=["image"], label="Reference mask images (one per subject)"
                )
            target_drawing = gr.ImageEditor(
                label="Drawn target masks: paint subject 1 on layer 1, subject 2 on layer 2, ...",
                type="numpy",
                layers=True,
                canvas_size=(512, 512),
            )
        gallery = gr.Gallery(label="Result and references", columns=4, height="auto")
        masks_view = gr.Image(label="Masks used (references, then the scene)", type="filepath", interactive=False)
        with advanced_settings(config, frames=False) as advanced:
            with gr.Row():
                isolation = gr.Checkbox(value=True, label="Isolation attention")
                reposition = gr.Checkbox(value=True, label="Reposition attention")
                mutual = gr.Checkbox(value=True, label="Masked mutual cross-attention")
            with gr.Row():
                dropout = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Dropout", info="official 0.5")
                lam = gr.Slider(0.0, 1.0, value=0.9, step=0.05, label="Cross-attention lambda", info="official 0.9")
        parameters = parameters_panel()
        gr.Examples(examples=[[EXAMPLE_SCENE]], inputs=[prompt], label=TOY_EXAMPLES_LABEL)

    @checked_request
    def ir_diffusion(
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
        target_files: list | None = None,
        reference_files: list | None = None,
        target_drawing: dict | None = None,
        **request: Any,
    ):
        """Generate the scene and one reference per subject. Returns the gallery (scene first, then the
        references; PNGs with parameters embedded), the masks figure, the seed used and the parameters. The mask
        images and the drawing are optional (used with the "uploaded" / "drawn" mask sources)."""
        request.update(target_files=target_files, reference_files=reference_files, target_drawing=target_drawing)
        with user_errors("IR-Diffusion"):
            settings = request_settings(
                config, request["scene"], **{name: request[name] for name in SETTING_INPUTS}, num_frames=None
            )
            subjects, target_boxes, reference_boxes = parse_subjects(request["subjects"])
            masks = mask_inputs(subjects, target_boxes, reference_boxes, request)
            weights = dict(
                dropout=number("dropout", request["dropout"], 0, 1),
                cross_attention_lambda=number("cross_attention_lambda", request["cross_attention_lambda"], 0, 1),
            )
            with runtime.session(request["model"]) as pipe:
                ir = ir_pipeline_for(pipe, request["model"])
                defaults = pipeline_defaults(pipe)
                options = dict(
                    negative_prompt=settings.negative_prompt,
                    height=settings.height or defaults.get("height"),
                    width=settings.width or defaults.get("width"),
                    seed=settings.seed,
                    isolation=bool(request["isolation"]),
                    reposition=bool(request["reposition"]),
                    mutual_cross_attention=bool(request["mutual_cross_attention"]),
                    **weights,
                )
                if settings.steps is not None:
                    options["num_inference_steps"] = settings.steps
                if settings.guidance is not None:
                    options["guidance_scale"] = settings.guidance
                result = ir(subjects, settings.prompt, output_type="pil", **masks, **options)
            parameters = {
                "model": request["model"],
                "pipeline": type(ir).__name__,
                "subjects": subjects,
                "scene": settings.prompt,
                **options,
                "masks": {"target": request["target_source"], "reference": request["reference_source"]},
                "layout_seed": result.layout_seed,
                "versions": package_versions(),
            }
            gallery_items = []
            for i, image in enumerate([result.images[0], *result.reference_images]):
                label = "scene" if i == 0 else f"reference {i}: {subjects[i - 1]['word']}"
                path = runtime.output_path(settings.seed, ".png")
                save_image(image, path, {**parameters, "image": label})
                gallery_items.append((str(path), label))
            panels = [overlay_masks(im, m[None]) for im, m in zip(result.reference_images, result.reference_masks)]
            panels.append(overlay_masks(result.images[0], result.target_masks))
            figure, _ = labelled_grid([panels], ["masks"], [s["word"] for s in subjects] + ["scene"])
            masks_path = runtime.output_path(settings.seed, ".png")
            save_image(figure, masks_path, {**parameters, "image": "masks"})
        return gallery_items, str(masks_path), settings.seed, parameters

    gr.on(
        triggers=[run.click, prompt.submit],
        fn=ir_diffusion,
        inputs_kwargs={
            "model": model,
            "scene": prompt,
            "subjects": subjects,
            **{k: v for k, v in advanced.named().items() if k != "num_frames"},
            "target_source": target_source,
            "reference_source": reference_source,
            "target_files": target_files,
            "reference_files": reference_files,
            "target_drawing": target_drawing,
            "isolation": isolation,
            "reposition": reposition,
            "mutual_cross_attention": mutual,
            "dropout": dropout,
            "cross_attention_lambda": lam,
        },
        outputs=[gallery, masks_view, advanced.seed, parameters],
        api_name="ir_diffusion",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
