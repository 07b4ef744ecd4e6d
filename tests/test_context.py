"""The run context: token grids, steps, timesteps and batch roles, per call and per thread."""

import threading

import pytest
import torch
from helpers import RecordingCore, forward

from attnpack.attn_processors import apply_processors, current_run, run_overrides
from attnpack.toy.tiny import build_tiny_denoiser, build_tiny_pipeline, denoiser_inputs


def _run(pipe, **kwargs):
    return pipe(prompt="a red cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)


@pytest.mark.parametrize("grid", [(64, 96), (96, 64)])
def test_flux_grid_from_img_ids_full_size(grid):
    model = build_tiny_denoiser("flux")
    core = RecordingCore()
    with apply_processors(model, core):
        forward(model, denoiser_inputs(model, grid=grid, text_len=5))
    for call in core.calls:
        assert call.run.grid == grid and call.run.text_len == 5 and call.run.image_len == grid[0] * grid[1]
        assert call.layout.grid == grid


@pytest.mark.parametrize("hw", [(64, 96), (96, 64)])
def test_flux_pipeline_non_square(hw):
    pipe = build_tiny_pipeline("tiny-flux")
    core = RecordingCore()
    with apply_processors(pipe, core):
        _run(pipe, height=hw[0], width=hw[1], num_inference_steps=2, max_sequence_length=16)
    assert {c.run.grid for c in core.calls} == {(hw[0] // 16, hw[1] // 16)}
    assert {c.layout.grid for c in core.calls} == {(hw[0] // 16, hw[1] // 16)}
    assert {c.run.text_len for c in core.calls} == {16}


def test_flux_kontext_style_ids_grid_covers_first_image_only():
    from attnpack.attn_processors.families import flux_grid as _flux_grid

    ids = torch.zeros(4 * 6 + 9, 3)
    ids[:24, 1] = torch.arange(24) // 6
    ids[:24, 2] = torch.arange(24) % 6
    ids[24:, 0] = 1  # a reference image appended (FLUX Kontext)
    ids[24:, 1] = torch.arange(9) // 3
    ids[24:, 2] = torch.arange(9) % 3
    assert _flux_grid(ids) == ((4, 6), 24)
    shuffled = ids[:24][torch.randperm(24)]
    assert _flux_grid(shuffled)[0] is None  # not row-major: no grid rather than a wrong one


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_unet_non_square_latents(model):
    pipe = build_tiny_pipeline(model)
    core = RecordingCore()
    with apply_processors(pipe, core):
        _run(pipe, height=64, width=96, num_inference_steps=2)
    # latent 8x12; UNet levels halve it
    expected = {(8, 12), (4, 6)} if model == "tiny-sd15" else {(4, 6)}
    assert {c.layout.grid for c in core.calls} == expected
    assert {c.run.grid for c in core.calls} == {(8, 12)}
    for c in core.calls:
        assert c.layout.num_queries == c.layout.grid[0] * c.layout.grid[1]


def test_sd3_grid():
    pipe = build_tiny_pipeline("tiny-sd3")
    core = RecordingCore()
    with apply_processors(pipe, core):
        _run(pipe, height=64, width=96, num_inference_steps=2, max_sequence_length=16)
    assert {c.layout.grid for c in core.calls} == {(4, 6)}


def test_wan_video_grid():
    pipe = build_tiny_pipeline("tiny-wan")
    core = RecordingCore()
    with apply_processors(pipe, core):
        pipe(
            prompt="a cat",
            num_frames=9,
            height=32,
            width=48,
            num_inference_steps=2,
            output_type="np",
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
        )
    # (9 - 1) / 4 + 1 = 3 latent frames; 32x48 px -> 4x6 latent -> patch (1, 2, 2) -> 2x3
    assert {c.layout.grid for c in core.calls} == {(3, 2, 3)}


def test_cogvideox_video_grid():
    pipe = build_tiny_pipeline("tiny-cogvideox")
    core = RecordingCore()
    with apply_processors(pipe, core):
        pipe(
            prompt="a cat",
            num_frames=9,
            height=32,
            width=48,
            num_inference_steps=2,
            output_type="np",
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
        )
    assert {c.layout.grid for c in core.calls} == {(3, 2, 3)}
    assert {c.run.text_len for c in core.calls} == {16}


def test_steps_timesteps_and_cfg_roles_sd15():
    pipe = build_tiny_pipeline("tiny-sd15")
    core = RecordingCore()
    with apply_processors(pipe, core, layers=0):
        _run(pipe, num_inference_steps=3, guidance_scale=5.0)
        _run(pipe, num_inference_steps=2, guidance_scale=1.0)  # second generation: step restarts; no CFG
    runs = [c.run for c in core.calls]
    assert [r.step_index for r in runs] == [0, 1, 2, 0, 1]
    assert [r.num_steps for r in runs] == [3, 3, 3, 2, 2]
    assert [r.progress for r in runs[:3]] == [0.0, 1 / 3, 2 / 3]
    expected_t = [float(t) for t in pipe.scheduler.timesteps]  # last set_timesteps: the 2-step run
    assert [r.timestep for r in runs[3:]] == expected_t
    assert runs[0].roles == ("uncond", "cond") and runs[0].rows("cond") == [1]
    assert runs[3].roles == ("cond",)


def test_img2img_step_index_without_scheduler_begin_index():
    """SD img2img with DDIM (no `begin_index`) skips the first timesteps: the step index counts from where it starts."""
    import numpy as np
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline.from_pipe(build_tiny_pipeline("tiny-sd15"))
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    core = RecordingCore()
    with apply_processors(pipe, core, layers=0):
        _run(pipe, image=image, strength=0.6, num_inference_steps=5, guidance_scale=1.0)
    runs = [c.run for c in core.calls]
    timesteps = [float(t) for t in pipe.scheduler.timesteps]  # the full schedule; the last 3 are run
    assert [r.step_index for r in runs] == [2, 3, 4] and all(r.num_steps == 5 for r in runs)
    assert [timesteps[r.step_index] for r in runs] == [r.timestep for r in runs]


def test_roles_from_cache_context_wan():
    pipe = build_tiny_pipeline("tiny-wan")
    core = RecordingCore()
    with apply_processors(pipe, core, layers=0):
        pipe(
            prompt="a cat",
            negative_prompt="",
            num_frames=5,
            height=16,
            width=16,
            num_inference_steps=2,
            guidance_scale=5.0,
            output_type="np",
            max_sequence_length=16,
        )
    assert [c.run.roles for c in core.calls] == [("cond",), ("uncond",)] * 2
    assert [c.run.cache_name for c in core.calls] == ["cond", "uncond"] * 2
    assert [c.run.step_index for c in core.calls] == [0, 0, 1, 1]


def test_run_overrides_roles_and_extras():
    model = build_tiny_denoiser("flux")
    core = RecordingCore()
    inputs = denoiser_inputs(model, batch_size=3)
    with apply_processors(model, core, layers=0):
        with run_overrides(roles=["cond", "cond", "perturbed"], request="r1"):
            forward(model, inputs)
        with run_overrides(roles=["cond"]):  # wrong length: ignored, defaults apply
            forward(model, inputs)
    assert core.calls[0].run.roles == ("cond", "cond", "perturbed")
    assert core.calls[0].run.extras == {"request": "r1"}
    assert core.calls[1].run.roles == ("cond",) * 3
    assert current_run() is None  # nothing leaks outside the forward


def test_bare_denoiser_fallback_step_counting():
    model = build_tiny_denoiser("flux")
    core = RecordingCore()
    with apply_processors(model, core, layers=0):
        for t in (0.9, 0.9, 0.5, 0.1, 0.9, 0.4):
            inputs = denoiser_inputs(model)
            inputs["timestep"] = torch.tensor([t])
            forward(model, inputs)
    assert [c.run.step_index for c in core.calls] == [0, 0, 1, 2, 0, 1]
    assert all(c.run.num_steps is None for c in core.calls)


def test_two_pipelines_in_two_threads_do_not_interfere():
    pipes = {(64, 64): build_tiny_pipeline("tiny-flux"), (64, 128): build_tiny_pipeline("tiny-flux", seed=1)}
    seen: dict[tuple, set] = {}
    errors = []

    def work(hw, pipe):
        core = RecordingCore()
        try:
            with apply_processors(pipe, core):
                for _ in range(3):
                    _run(pipe, height=hw[0], width=hw[1], num_inference_steps=3, max_sequence_length=8)
            seen[hw] = {c.run.grid for c in core.calls}
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=item) for item in pipes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {(64, 64): {(4, 4)}, (64, 128): {(4, 8)}}


def test_gradient_checkpoint_recompute_sees_the_run_context():
    """Recomputed blocks (backward pass) get the run context of their forward, so text length and grid are known."""
    from attnpack.attn_processors.context import checkpoint_with_run_context

    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, grid=(3, 5))
    core = RecordingCore()
    with apply_processors(model, core):
        model.train()
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_run_context)
        model(**inputs, return_dict=False)[0].square().mean().backward()
        model.disable_gradient_checkpointing()
    # 3 layers in the forward pass, the 3 recomputed in the backward pass
    assert len(core.calls) == 6
    assert all(c.run is not None and c.run.grid == (3, 5) for c in core.calls)
    assert all(c.layout.num_text == 8 for c in core.calls)
