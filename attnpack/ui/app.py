"""``build_demo``: the attnpack Gradio app, one tab per use. Nothing is loaded until a request needs it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._utils import require
from ._runtime import Runtime, UIConfig, default_loader


__all__ = ["build_demo"]

INTRO = (
    "# attnpack\nAttention techniques for diffusers pipelines. Pick a model and a technique, write a prompt, press "
    "**Run**. Downloads keep the generation parameters inside the file (`attnpack.read_parameters(path)`)."
)


def build_demo(
    loader: Callable[[str], Any] | None = None,
    *,
    default_model: str = "toy-flux",
    models: Sequence[str] | None = None,
    allowed_dirs: Sequence[str | os.PathLike] = (),
    allow_hub: bool = True,
    device: str | None = None,
    dtype: str = "auto",
    offload: str | None = None,
    max_resolution: int = 2048,
    max_steps: int = 100,
    max_frames: int = 257,
    queue_size: int = 16,
    max_cached_models: int = 1,
    output_dir: str | os.PathLike | None = None,
    techniques: Mapping[str, Any] | None = None,
):
    """Build the attnpack web UI (a ``gr.Blocks``, queued, not launched).

    Args:
        loader: ``loader(model) -> pipeline``, called on the first request for a model with a name that passed the
            model policy (a built-in name, an absolute folder path or a Hub id). Default: :func:`attnpack.load_pipeline`
            with ``dtype``, ``device``, ``offload`` and safetensors-only weights. Tests pass the tiny models here.
        default_model: the model selected when the page opens (default ``"toy-flux"``: shipped, no download).
        models: model names offered in the picker (default: ``default_model`` and the built-in models); any of them
            may be loaded. Other names may be typed in, subject to ``allowed_dirs`` and ``allow_hub``.
        allowed_dirs: folders inside which local model folders and weight / plan files (CLEAR weights, PARO plans)
            may be loaded; everything else is refused.
        allow_hub: allow Hub ids (``org/name``), downloaded by ``from_pretrained`` (safetensors only).
        device: where the pipelines run (default: CUDA when available); one request at a time per device.
        dtype, offload: passed to :func:`attnpack.load_pipeline` by the default loader.
        max_resolution, max_steps, max_frames: the largest width/height, step count and frame count accepted.
        queue_size: requests that may wait in the queue; more are refused ("queue is full").
        max_cached_models: pipelines kept loaded (least recently used dropped first).
        output_dir: results are written to a new folder ``attnpack-ui-<time>-<id>`` created inside it (default: a
            temporary folder removed at exit). Launch with ``demo.launch(allowed_paths=demo.attnpack_runtime.
            served_paths)``, as ``attnpack ui`` does: that new folder only, never ``output_dir`` itself, whose other
            files Gradio would then serve to anyone.
        techniques: ``{name: Technique}`` to offer (default: every registered technique,
            :func:`attnpack.techniques.available_techniques`).

    Returns:
        the ``gr.Blocks`` app, queued with concurrency 1 per device and ``max_size=queue_size``, with named API
        endpoints ``/generate``, ``/head_guidance``, ``/head_grid``, ``/ir_diffusion``, ``/astar``, ``/astar_tokens``,
        ``/info`` and ``/benchmark``. ``demo.attnpack_runtime`` is its
        :class:`~attnpack.ui._runtime.Runtime` (pipeline cache, configuration).
    """
    gr = require("gradio", "ui", "The attnpack UI")
    from ..techniques import available_techniques
    from .astar import build_astar_tab
    from .generate import build_generate_tab
    from .head_guidance import build_head_guidance_tab
    from .info import build_info_tab
    from .ir_diffusion import build_ir_diffusion_tab

    config = UIConfig(
        default_model=default_model,
        models=models,
        allowed_dirs=allowed_dirs,
        allow_hub=allow_hub,
        device=device,
        max_resolution=max_resolution,
        max_steps=max_steps,
        max_frames=max_frames,
        queue_size=queue_size,
        max_cached_models=max_cached_models,
        output_dir=output_dir,
    )
    if loader is None:
        loader = default_loader(dtype=dtype, device=config.device, offload=offload)
    runtime = Runtime(loader, config)
    techniques = dict(techniques) if techniques is not None else available_techniques()

    with gr.Blocks(title="attnpack", delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            build_generate_tab(runtime, techniques)
            if "head-guidance" in techniques:
                build_head_guidance_tab(runtime, techniques["head-guidance"])
            build_ir_diffusion_tab(runtime)
            build_astar_tab(runtime)
            build_info_tab(runtime, techniques)
    demo.queue(default_concurrency_limit=1, max_size=config.queue_size, api_open=False)
    demo.attnpack_runtime = runtime
    return demo
