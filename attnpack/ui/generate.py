"""The Generate tab: the plain pipeline, or any registered attention technique (GNA, CLEAR with a weights file, PARO
with a plan file, ...), on any model. API endpoint ``/generate``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._layout import (
    TOY_EXAMPLES_LABEL,
    advanced_settings,
    checked_request,
    model_picker,
    parameters_panel,
    prompt_row,
    request_settings,
    result_views,
    toggle_result_views,
)
from ._runtime import Runtime, user_errors
from ._techniques import NO_TECHNIQUE, technique_controls


__all__ = ["build_generate_tab", "EXAMPLES"]

EXAMPLES = [  # inside the toy models' vocabulary (TOY_EXAMPLES_LABEL); real models draw them too
    "a red circle left of a blue square",
    "a green star above a yellow diamond",
    "a small white cross in the top left",
]


def _backend_choices() -> list[tuple[str, str]]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [("default", "")] + [(b.value, b.value) for b in AttentionBackendName]


def build_generate_tab(runtime: Runtime, techniques: Mapping[str, Any]) -> None:
    """Add the tab (inside the current ``gr.Tabs``)."""
    import gradio as gr

    config = runtime.config
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            model = model_picker(config)
            controls = technique_controls(techniques, combine=True)
        controls.add_options()
        prompt, run = prompt_row()
        image, video = result_views()
        with advanced_settings(config) as advanced:
            backend = gr.Dropdown(
                choices=_backend_choices(),
                value="",
                label="Attention backend",
                info="diffusers backend for dense attention (the Info tab lists the ones that work here)",
            )
        parameters = parameters_panel()
        gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label=TOY_EXAMPLES_LABEL)

    @checked_request
    def generate(
        model: str,
        prompt: str,
        negative_prompt: str | None = None,
        seed: float = 0,
        randomize_seed: bool = True,
        width: float = 0,
        height: float = 0,
        steps: float = 0,
        guidance: float = -1,
        num_frames: float = 0,
        technique: str = NO_TECHNIQUE,
        attention_backend: str | None = None,
        combine_with: str = NO_TECHNIQUE,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio recognises the default)
        **technique_options: Any,
    ):
        """Generate one image or video (0 for a size, steps or frames and -1 for guidance mean the model's default),
        with ``technique`` and, on top of it, ``combine_with`` (head guidance) when given. Returns the image file (PNG, parameters embedded), the video file (MP4 or GIF, video models only), the seed
        actually used, and the parameters."""
        with user_errors():
            settings = request_settings(
                config, prompt, negative_prompt, seed, randomize_seed, width, height, steps, guidance, num_frames
            )
            specs = controls.specs(technique, technique_options, config, combine_with)
            progress(0.0, desc=f"loading {model}")
            image_path, video_path, parameters = runtime.generate(model, settings, specs, attention_backend or None)
        return image_path, video_path, settings.seed, parameters

    event = gr.on(
        triggers=[run.click, prompt.submit],
        fn=generate,
        inputs=[
            model,
            prompt,
            *advanced.inputs(),
            controls.selector,
            backend,
            *[c for c in [controls.combine] if c is not None],
        ],
        inputs_kwargs=controls.widgets,
        outputs=[image, video, advanced.seed, parameters],
        api_name="generate",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
    toggle_result_views(event, image, video)
