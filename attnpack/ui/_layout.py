"""Layout pieces every generating tab uses, in the FLUX-Space conventions: a model picker, a prompt row with a Run
button, an "Advanced settings" accordion (seed with "Randomize seed", size, steps, guidance, frames), and the
helpers that turn those values into checked :class:`~attnpack.pipelines.generation.GenerationSettings`."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from typing import Any

from ._runtime import MAX_SEED, UIConfig


__all__ = [
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
            seed = gr.Number(label="Seed", value=0, precision=0, info=f"0..{MAX_SEED}; the seed used is shown here")
            randomize = gr.Checkbox(label="Randomize seed", value=True)
        # 0 (-1 for guidance) means "the model's default": a browser sends 0 for an empty number field. Ranges are
        # checked by make_settings, whose errors name the setting (Gradio's own range check does not).
        size = f"16..{config.max_resolution} pixels, a multiple of 8; 0: the model's default"
        with gr.Row():
            width = gr.Number(label="Width", value=0, precision=0, info=size)
            height = gr.Number(label="Height", value=0, precision=0, info=size)
        with gr.Row():
            steps = gr.Number(
                label="Steps", value=0, precision=0, info=f"1..{config.max_steps}; 0: the pipeline's default"
            )
            guidance = gr.Number(label="Guidance scale", value=-1, info="-1: the pipeline's default")
            num_frames = gr.Number(
                label="Frames",
                value=0,
                precision=0,
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
    if float(seed) != int(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"`seed` must be an integer in 0..{MAX_SEED}, got seed={seed!r}.")
    return int(seed)


def _optional_int(name: str, value, low: int, high: int, *, multiple: int = 1) -> int | None:
    """``None``, ``""`` and 0 mean "the default" (``None``); anything else must be an integer in ``low..high``."""
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(f"`{name}` must be an integer, got {name}={value!r}.")
    value = int(float(value))
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in {low}..{high} in this UI, got {name}={value}.")
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
    if len(prompt) > 4000:
        raise ValueError(f"`prompt` is too long ({len(prompt)} characters; at most 4000).")
    if guidance is None or guidance == "" or float(guidance) < 0:  # negative: the pipeline's default
        guidance = None
    else:
        guidance = float(guidance)
        if guidance > 100.0:
            raise ValueError(f"`guidance` must be in 0..100 (or -1 for the default), got guidance={guidance}.")
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

    image = gr.Image(label="Result", type="filepath", format="png", interactive=False, height=420)
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
