"""Layout pieces every generating tab uses, in the FLUX-Space conventions: a model picker, a prompt row with a Run
button, an "Advanced settings" accordion (seed with "Randomize seed", size, steps, guidance, frames), and the
helpers that turn those values into checked :class:`~attnpack.pipelines.generation.GenerationSettings`.

Every value of a request is checked here: :func:`checked_request` (on every event handler) bounds every text and
refuses every non-finite number before the request waits for the device, and :func:`number` is the one conversion
of a number field, with its range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._utils import check_number
from ._runtime import MAX_SEED, UIConfig, user_errors


__all__ = [
    "number",
    "check_request",
    "checked_request",
    "Advanced",
    "model_picker",
    "prompt_row",
    "advanced_settings",
    "result_views",
    "parameters_panel",
    "pick_seed",
    "make_settings",
    "request_settings",
    "labelled_grid",
]


# ------------------------------------------------------------------------------------------------ input checks
def number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    note: str = "",
) -> int | float:
    """A number entering through the UI, checked by :func:`attnpack._utils.check_number` (the one check of every
    number a user gives). Gradio's Number field sends floats, so an integral float passes an integer field; NaN and
    infinities never pass (Gradio's own range check lets NaN through)."""
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return check_number(name, value, low, high, integer=integer, note=note)
    except TypeError as exc:  # the UI reports every bad value the same way
        raise ValueError(str(exc)) from None


def _leaves(value: Any) -> Iterator[Any]:
    """The texts and numbers in a request value: itself, or inside lists, dicts and tables (a Dataframe's cells)."""
    if value is None or isinstance(value, (str, int, float)):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif hasattr(value, "columns") and hasattr(value, "values"):  # a pandas DataFrame (gr.Dataframe)
        yield from _leaves(list(value.columns))
        yield from _leaves(value.values.tolist())
    elif getattr(getattr(value, "dtype", None), "kind", None) == "O":  # a numpy array of objects
        yield from _leaves(value.tolist())
    # anything else (pixel arrays of an image editor, progress trackers, ...) holds no text or number to check


def check_request(fields: Mapping[str, Any]) -> None:
    """The first check of every request, before it waits for the device: every text (also inside tables and lists)
    is at most :data:`~attnpack.pipelines.generation.MAX_TEXT_CHARS` characters and every number is finite. Errors
    name the field by its API parameter name. Ranges are checked where each value is converted (:func:`number`, the
    technique registry)."""
    from ..pipelines.generation import check_text

    for name, value in fields.items():
        for leaf in _leaves(value):
            if isinstance(leaf, str):
                check_text(name, leaf)
            elif isinstance(leaf, float):
                number(name, leaf)


def checked_request(handler: Callable) -> Callable:
    """Decorate an event handler so that :func:`check_request` sees all its arguments (``**kwargs`` included) first;
    a refused request answers with the error (as :func:`~attnpack.ui._runtime.user_errors`) without ever taking
    the device. Gradio sees the handler's own signature."""
    signature = inspect.signature(handler)

    @functools.wraps(handler)
    def checked(*args, **kwargs):
        fields: dict[str, Any] = {}
        for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                fields.update(value)
            else:
                fields[name] = value
        with user_errors():
            check_request(fields)
        return handler(*args, **kwargs)

    return checked


@dataclasses.dataclass
class Advanced:
    """The components of the "Advanced settings" accordion."""

    negative_prompt: Any
    seed: Any
    randomize_seed: Any
    width: Any
    height: Any
    steps: Any
    guidance: Any
    num_frames: Any

    def inputs(self) -> list[Any]:
        """In the order of the handlers' arguments (after ``model`` and ``prompt``)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def named(self) -> dict[str, Any]:
        """``{argument name: component}`` for ``inputs_kwargs``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def model_picker(config: UIConfig, value: str | None = None):
    import gradio as gr

    return gr.Dropdown(
        choices=list(dict.fromkeys([*config.models, *([value] if value else [])])),
        value=value or config.default_model,
        allow_custom_value=True,
        label="Model",
        info="a built-in name, a local diffusers folder (inside the allowed folders) or a Hub id",
    )


def prompt_row(*, placeholder: str = "Enter your prompt", run_label: str = "Run"):
    """``Prompt`` textbox and ``Run`` button on one row."""
    import gradio as gr

    with gr.Row(equal_height=True):
        prompt = gr.Textbox(label="Prompt", placeholder=placeholder, lines=1, max_lines=3, scale=5)
        run = gr.Button(run_label, variant="primary", scale=1, min_width=100)
    return prompt, run


@contextlib.contextmanager
def advanced_settings(config: UIConfig, *, frames: bool = True) -> Iterator[Advanced]:
    """The "Advanced settings" accordion (closed): ``with advanced_settings(config) as adv:`` adds tab-specific
    components inside it after the common ones."""
    import gradio as gr

    with gr.Accordion("Advanced settings", open=False):
        negative = gr.Textbox(label="Negative prompt", value="", placeholder="(none)", lines=1)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, info=f"0..{MAX_SEED}; the seed used is shown here")
            randomize = gr.Checkbox(label="Randomize seed", value=True)
        # 0 (-1 for guidance) means "the model's default": a browser sends 0 for an empty number field. No
        # `precision`: Gradio would round (and fail on NaN, answering with no message) before the handler sees the
        # value; `number` converts it, and its errors name the setting (Gradio's own range check does not).
        size = f"16..{config.max_resolution} pixels, a multiple of 8; 0: the model's default"
        with gr.Row():
            width = gr.Number(label="Width", value=0, info=size)
            height = gr.Number(label="Height", value=0, info=size)
        with gr.Row():
            steps = gr.Number(label="Steps", value=0, info=f"1..{config.max_steps}; 0: the pipeline's default")
            guidance = gr.Number(label="Guidance scale", value=-1, info="-1: the pipeline's default")
            num_frames = gr.Number(
                label="Frames",
                value=0,
                info=f"video models only, 1..{config.max_frames}; 0: the model's default",
                visible=frames,
            )
        yield Advanced(negative, seed, randomize, width, height, steps, guidance, num_frames)


def pick_seed(seed: float | int | None, randomize: bool) -> int:
    """The seed a request uses: a fresh random one when ``randomize``, else ``seed`` (checked)."""
    if randomize:
        return random.SystemRandom().randint(0, MAX_SEED)
    if seed is None:
        return 0
    return number("seed", seed, 0, MAX_SEED, integer=True)


def _optional_int(name: str, value, low: int, high: int, *, multiple: int = 1) -> int | None:
    """``None``, ``""`` and 0 mean "the default" (``None``); anything else must be an integer in ``low..high``."""
    if value is None or value == "" or value == 0:
        return None
    value = number(name, value, low, high, integer=True, note=" in this UI (0: the default)")
    if value % multiple:
        raise ValueError(f"`{name}` must be a multiple of {multiple}, got {name}={value}.")
    return value


def make_settings(
    config: UIConfig,
    prompt: str,
    negative_prompt: str | None,
    seed: int,
    width=None,
    height=None,
    steps=None,
    guidance=None,
    num_frames=None,
):
    """Check the request against the UI's bounds and build the generation settings."""
    from ..pipelines.generation import GenerationSettings

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("`prompt` is empty; please enter a prompt.")
    if guidance == "":
        guidance = None
    if guidance is not None:
        guidance = number("guidance", guidance, -1, 100, note=" (-1: the pipeline's default)")
        if guidance < 0:
            guidance = None
    settings = GenerationSettings(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        seed=seed,
        steps=_optional_int("steps", steps, 1, config.max_steps),
        guidance=guidance,
        height=_optional_int("height", height, 16, config.max_resolution, multiple=8),
        width=_optional_int("width", width, 16, config.max_resolution, multiple=8),
        num_frames=_optional_int("num_frames", num_frames, 1, config.max_frames),
    )
    settings.validate()
    return settings


def result_views():
    """The result image (its download is the PNG with the parameters embedded) and a video player for video models
    (hidden until a video model returns a result)."""
    import gradio as gr

    image = gr.Image(
        label="Result", type="filepath", format="png", interactive=False, height=420, elem_classes=["attnpack-result"]
    )
    video = gr.Video(label="Result video", interactive=False, visible=False, height=420)
    return image, video


def toggle_result_views(event, image, video) -> None:
    """After ``event`` (which returned into ``image`` and ``video``), show the view that holds the result."""
    import gradio as gr

    def show(video_path):
        return gr.update(visible=not video_path), gr.update(visible=bool(video_path))

    event.then(show, video, [image, video], queue=False, api_visibility="private")


def parameters_panel():
    import gradio as gr

    with gr.Accordion("Parameters of the last result", open=False):
        return gr.JSON(label="Parameters")


def request_settings(
    config: UIConfig,
    prompt: str,
    negative_prompt: str | None,
    seed,
    randomize_seed: bool,
    width=None,
    height=None,
    steps=None,
    guidance=None,
    num_frames=None,
):
    """:func:`pick_seed` then :func:`make_settings`, in the order of :meth:`Advanced.inputs` after the prompt; the
    seed actually used is ``settings.seed``."""
    used_seed = pick_seed(seed, randomize_seed)
    return make_settings(config, prompt, negative_prompt, used_seed, width, height, steps, guidance, num_frames)


GAP = 4

# the toy models draw 64x64 images: shown scaled up to the panel, pixels kept sharp (the file keeps its size). Gradio 6
# takes CSS at launch: `attnpack ui` passes it (`demo.launch(css=UI_CSS)` when launching build_demo yourself).
UI_CSS = """
.attnpack-result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""

# the built-in toy models know colored shapes only: examples stay inside that vocabulary, and say so
TOY_EXAMPLES_LABEL = (
    "Examples (the built-in toy models draw red, green, blue, yellow, purple or white circles, squares, triangles, "
    "stars, diamonds and crosses, left of / right of / above / below each other; real models take any prompt)"
)


def labelled_grid(cells: list[list[Any]], row_labels: list[str], col_labels: list[str]):
    """Paste ``cells[r][c]`` (PIL images of one size) into a grid with labels on the left and on top.

    Returns the image and the pixel box ``(x0, y0, x1, y1)`` of every cell, row by row.
    """
    from PIL import Image, ImageDraw

    w, h = cells[0][0].size
    left = 8 + 7 * max(len(label) for label in row_labels)
    top = 20
    grid = Image.new("RGB", (left + len(col_labels) * (w + GAP), top + len(row_labels) * (h + GAP)), "white")
    draw = ImageDraw.Draw(grid)
    boxes = []
    for c, label in enumerate(col_labels):
        draw.text((left + c * (w + GAP) + 2, 4), label, fill="black")
    for r, label in enumerate(row_labels):
        y = top + r * (h + GAP)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for c, cell in enumerate(cells[r]):
            x = left + c * (w + GAP)
            grid.paste(cell.convert("RGB"), (x, y))
            boxes.append((x, y, x + w, y + h))
    return grid, boxes
