"""The web UI through its named API endpoints (gradio_client), on the tiny models.

Results are compared with images made by calling the stock diffusers pipeline directly (no UI involved), so a wrong
seed, a technique that was not applied, or one that leaked into the next request all show up as different pixels.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ui_support import (
    STEPS,
    Watch,
    fetch_file,
    free_port,
    launched,
    need,
    pixels,
    raw_call,
    reference_image,
    ui_techniques,
)

from attnpack import read_parameters


need("gradio", "pip install attnpack[ui]")
gradio_client = need("gradio_client", "pip install attnpack[test]")

from attnpack.ui import build_demo  # noqa: E402
from attnpack.ui._runtime import default_loader  # noqa: E402


MODEL = "tiny-flux"
PROMPT = "a red circle left of a blue square"
OOM_TOKENS = 100  # the test loader "runs out of memory" above this many image tokens (FLUX 256x256 = 256 tokens)


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def app(allowed):
    watch = Watch(default_loader(device="cpu"), oom_tokens=OOM_TOKENS)
    demo = build_demo(
        watch,
        device="cpu",
        allowed_dirs=[allowed],
        allow_hub=False,
        max_resolution=256,
        max_steps=8,
        max_cached_models=2,
        techniques=ui_techniques(),
    )
    with launched(demo) as url:
        yield demo, watch, gradio_client.Client(url, verbose=False)


def generate(client, **kwargs):
    args = dict(model=MODEL, prompt=PROMPT, steps=STEPS, randomize_seed=False, seed=0)
    args.update(kwargs)
    return client.predict(**args, api_name="/generate")


def error_of(client, **kwargs) -> str:
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        generate(client, **kwargs)
    return str(info.value)


def stock_processor_types(pipe) -> list[str]:
    return sorted(type(p).__name__ for p in pipe.transformer.attn_processors.values())


# ------------------------------------------------------------------------------------------------ generate
def test_generate_matches_stock_pipeline_and_honours_the_seed(app):
    _, _, client = app
    image, video, seed, params = generate(client, seed=3)
    assert video is None and seed == 3
    np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, 3))
    assert not np.array_equal(pixels(image), reference_image(MODEL, PROMPT, 4))  # the seed matters
    embedded = read_parameters(image)  # the file the client downloaded: parameters survive the download
    assert embedded == params
    assert embedded["seed"] == 3 and embedded["steps"] == STEPS and embedded["prompt"] == PROMPT
    assert embedded["model"] == MODEL and embedded["techniques"] == []


def test_randomize_seed_returns_the_seed_it_used(app):
    _, _, client = app
    image, _, seed, params = generate(client, seed=3, randomize_seed=True)
    _, _, seed2, _ = generate(client, seed=3, randomize_seed=True)
    assert seed != seed2 and params["seed"] == seed  # random each time, and reported
    np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, seed))


def test_endpoint_parameters_come_from_the_technique_registry(app):
    _, _, client = app
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in info["parameters"]]
    # documented rule: <technique>__<option>, with "-" (head-guidance) and other non-identifier characters as "_"
    expected = [f"{t.replace('-', '_')}__{o.name}" for t, tech in ui_techniques().items() for o in tech.options]
    assert names[-len(expected) :] == expected
    assert names[:3] == ["model", "prompt", "negative_prompt"]


def test_technique_is_applied_for_one_request_only(app):
    demo, _, client = app
    image, _, _, params = generate(client, seed=5, technique="temperature", temperature__factor=3.0)
    np.testing.assert_array_equal(
        pixels(image), reference_image(MODEL, PROMPT, 5, technique="temperature", factor=3.0)
    )
    assert not np.array_equal(pixels(image), reference_image(MODEL, PROMPT, 5))
    assert params["techniques"] == [{"name": "temperature", "factor": 3.0}]
    assert "TemperatureCore(3.0)" in str(params["processors"])
    # the cached pipeline is back to its stock processors, and the next request is plain again
    pipe = demo.attnpack_runtime._pipes[MODEL]
    assert stock_processor_types(pipe) == ["FluxAttnProcessor"] * 3
    image, _, _, params = generate(client, seed=5)
    np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, 5))
    assert params["processors"] == {"FluxAttnProcessor": 3}


def test_head_guidance_combines_with_a_pattern_technique(app):
    """Issue 19: the Generate tab runs GNA and head guidance together, as the Python API does (in either order)."""
    from test_ui_support import STEPS as steps

    import attnpack
    from attnpack.toy.tiny import TINY_MODELS, build_tiny_pipeline

    demo, _, client = app
    image, _, _, params = generate(
        client,
        seed=5,
        technique="gna",
        gna__window_size="3",
        combine_with="head-guidance",
        head_guidance__heads="L0, L2H1",
        head_guidance__scale=3.0,
    )
    pipe = build_tiny_pipeline(MODEL)
    with (
        attnpack.apply_head_perturbation(pipe, heads=["L0", "L2H1"], scale=3.0),
        attnpack.apply_gna(pipe, window_size=3),
    ):
        expected = pipe(
            PROMPT,
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(5),
            output_type="np",
            **TINY_MODELS[MODEL][2],
        ).images[0]
    np.testing.assert_array_equal(pixels(image), (expected * 255).round().astype(np.uint8))
    assert [t["name"] for t in params["techniques"]] == ["gna", "head-guidance"]
    assert "gna + head-guidance" in params["in_effect"]
    assert stock_processor_types(demo.attnpack_runtime._pipes[MODEL]) == ["FluxAttnProcessor"] * 3
    assert "not in the list of choices: ['none', 'head-guidance']" in error_of(
        client, technique="gna", combine_with="gna"
    )
    message = error_of(client, technique="head-guidance", head_guidance__heads="L0", combine_with="head-guidance")
    assert "technique 'head-guidance' is given twice" in message


def test_weights_file_option_only_from_allowed_safetensors(app, allowed, tmp_path):
    from safetensors.torch import save_file

    _, _, client = app
    good = allowed / "factor.safetensors"
    save_file({"factor": torch.tensor(3.0)}, str(good))
    image, _, _, params = generate(client, seed=5, technique="temperature", temperature__factor_file=str(good))
    np.testing.assert_array_equal(
        pixels(image), reference_image(MODEL, PROMPT, 5, technique="temperature", factor=3.0)
    )
    assert params["techniques"] == [{"name": "temperature", "factor": 1.0, "factor_file": str(good.resolve())}]

    outside = tmp_path / "factor.safetensors"
    save_file({"factor": torch.tensor(3.0)}, str(outside))
    message = error_of(client, technique="temperature", temperature__factor_file=str(outside))
    assert "outside the folders this UI may load from" in message and str(allowed) in message
    escape = f"{allowed}/../{tmp_path.name}/factor.safetensors"  # `..` is resolved before the check
    assert "outside the folders" in error_of(client, technique="temperature", temperature__factor_file=escape)
    pickle = allowed / "factor.pt"
    torch.save({"factor": torch.tensor(3.0)}, pickle)
    message = error_of(client, technique="temperature", temperature__factor_file=str(pickle))
    assert "only from .safetensors files (never pickle)" in message


def test_clear_with_a_weights_file_changes_the_weights_for_that_request_only(app, allowed):
    """CLEAR loads its checkpoint into the cached pipeline's transformer for one request and restores it after."""
    from attnpack.attn_processors.clear_weights import clear_parameter_names, save_clear_checkpoint
    from attnpack.toy.tiny import build_tiny_pipeline

    _, _, client = app
    transformer = build_tiny_pipeline(MODEL).transformer
    generator = torch.Generator().manual_seed(0)
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for name in clear_parameter_names(transformer):  # "fine-tuned" weights that visibly change the image
            params[name].add_(0.2 * torch.randn(params[name].shape, generator=generator))
    weights = save_clear_checkpoint(allowed / "clear.safetensors", transformer)
    image, _, _, params = generate(
        client, seed=5, technique="clear", clear__radius=1, clear__weights=str(weights), clear__backend="reference"
    )
    reference = reference_image(
        MODEL, PROMPT, 5, technique="clear", radius=1, weights=str(weights), backend="reference"
    )
    np.testing.assert_array_equal(pixels(image), reference)
    no_weights = reference_image(MODEL, PROMPT, 5, technique="clear", radius=1, backend="reference")
    assert not np.array_equal(reference, no_weights)  # the weights mattered
    assert params["techniques"][0]["weights"] == str(weights.resolve())
    image, _, _, _ = generate(client, seed=5)  # the next request runs on the original weights
    np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, 5))


def test_paro_with_a_plan_file(app, allowed, tmp_path):
    import attnpack
    from attnpack.toy.tiny import build_tiny_pipeline

    _, _, client = app
    size = 128  # 8 x 8 image tokens, blocks of 8
    plan = attnpack.calibrate_paro(
        build_tiny_pipeline(MODEL),
        PROMPT,
        STEPS,
        density=0.5,
        block_size=8,
        quant=None,
        progress=False,
        height=size,
        width=size,
        max_sequence_length=32,
    )
    path = plan.save(allowed / "plan.safetensors")
    request = dict(seed=5, width=size, height=size, technique="paro", paro__plan=str(path), paro__quant="none")
    image, _, _, params = generate(client, **request)
    reference = reference_image(MODEL, PROMPT, 5, technique="paro", size=size, plan=str(path), quant="none")
    np.testing.assert_array_equal(pixels(image), reference)
    assert not np.array_equal(reference, reference_image(MODEL, PROMPT, 5, size=size))
    assert params["techniques"] == [{"name": "paro", "plan": str(path.resolve()), "quant": "none"}]
    outside = plan.save(tmp_path / "plan.safetensors")
    assert "outside the folders" in error_of(client, **{**request, "paro__plan": str(outside)})


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(width=60), "`width` must be a multiple of 8"),
        (dict(height=512), "`height` must be an integer in 16..256 in this UI (0: the default), got height=512."),
        (dict(steps=-1), "`steps` must be an integer in 1..8 in this UI"),
        (dict(steps=9), "`steps` must be an integer in 1..8 in this UI"),
        (dict(prompt="  "), "`prompt` is empty"),
        (dict(seed=-1), "`seed` must be an integer in 0..2147483647"),
        (dict(technique="temperature", temperature__factor=100.0), "option `factor`=100.0 is invalid: must be <= 10"),
        (dict(technique="nope"), f"Value: nope is not in the list of choices: {['none', *ui_techniques()]}"),
        (dict(model="/etc"), "nor a folder inside the folders this UI may load from (allowed folders: "),
        (dict(model="org/some-model"), "is a Hub id, but this UI does not download models"),
        (dict(model="tiny-nope"), "`model` 'tiny-nope' is not a built-in model (tiny-sd15, "),
        (dict(attention_backend="nope"), "nope"),
    ],
)
def test_invalid_requests_give_readable_errors(app, kwargs, expected):
    _, _, client = app
    assert expected in error_of(client, **kwargs)


NAN, INF = float("nan"), float("inf")
TABLE = {
    "headers": ["prompt", "word", "target box", "reference box"],
    "data": [["a photo of a cat", "cat", "", ""]],
    "metadata": None,
}


@pytest.mark.parametrize(
    "api_name, field, kwargs",
    [
        ("/generate", "seed", dict(seed=NAN, randomize_seed=False)),
        ("/generate", "seed", dict(seed=NAN, randomize_seed=True)),  # refused even where it would be unused
        ("/generate", "width", dict(width=INF)),
        ("/generate", "steps", dict(steps=NAN)),
        ("/generate", "guidance", dict(guidance=NAN)),
        ("/generate", "num_frames", dict(num_frames=-INF)),
        ("/generate", "head_guidance__scale", dict(technique="head-guidance", head_guidance__scale=NAN)),
        ("/generate", "temperature__factor", dict(technique="temperature", temperature__factor=NAN)),
        ("/head_guidance", "scale", dict(heads="L0H0", scale=NAN)),
        ("/head_grid", "adaptive_scale", dict(heads="L0H0", adaptive_scale=INF)),
        ("/ir_diffusion", "dropout", dict(model="tiny-sdxl", scene="a cat", subjects=TABLE, dropout=NAN)),
        ("/astar", "sigma", dict(model="tiny-sd15", concepts="cat", sigma=NAN)),
        ("/benchmark", "repeats", dict(technique="dense", repeats=NAN)),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(app, api_name, field, kwargs):
    """NaN and infinities sent through the raw API (gradio_client cannot send them) are refused with the field's name.
    Before, a NaN steps answered `{"error": null}` and a NaN guidance or technique scale made a black image."""
    _, _, client = app
    args = {"model": MODEL, "prompt": "a cat", "steps": STEPS, **kwargs}
    if api_name in ("/ir_diffusion", "/benchmark"):
        args.pop("prompt" if api_name == "/ir_diffusion" else "steps")
    event, message = raw_call(client, api_name, **args)
    assert event == "error" and message == f"`{field}` must be a finite number, got {field}={kwargs[field]}.", message


LONG = "x" * 4_000_000  # 4 MB: before, such a negative prompt was generated with, holding the device (46 s, toy-flux)


@pytest.mark.parametrize(
    "api_name, field, kwargs",
    [
        ("/generate", "negative_prompt", dict(negative_prompt=LONG)),
        ("/generate", "model", dict(model=LONG)),
        ("/generate", "gna__window_size", dict(technique="gna", gna__window_size=LONG)),
        ("/generate", "temperature__factor_file", dict(technique="temperature", temperature__factor_file=LONG)),
        ("/head_guidance", "heads", dict(heads=LONG)),
        ("/head_grid", "softness_grid", dict(heads="L0H0", softness_grid=LONG)),
        ("/ir_diffusion", "subjects", dict(scene="a cat", subjects={**TABLE, "data": [[LONG, "cat", "", ""]]})),
        ("/ir_diffusion", "negative_prompt", dict(scene="a cat", subjects=TABLE, negative_prompt=LONG)),
        ("/astar", "concepts", dict(prompt="a cat", concepts=LONG)),
        ("/astar", "binarize", dict(prompt="a cat", concepts="cat", binarize=LONG)),
        ("/astar_tokens", "prompt", dict(prompt=LONG)),
        ("/benchmark", "prompt", dict(prompt=LONG, technique="dense")),
    ],
)
def test_over_long_texts_are_refused_before_taking_the_device(app, api_name, field, kwargs):
    """Every text field of every tab is bounded (4000 characters) before the request waits for the device: the test
    holds the device lock, so a request that reached it would hang here instead of answering."""
    demo, watch, client = app
    args = {"model": MODEL, "prompt": PROMPT, **kwargs}
    if api_name == "/ir_diffusion":
        args.pop("prompt")
    loads = list(watch.loads)
    with demo.attnpack_runtime.lock:
        job = client.submit(**args, api_name=api_name)
        with pytest.raises(gradio_client.exceptions.AppError) as info:
            job.result(timeout=60)
    assert str(info.value) == f"`{field}` is too long (4000000 characters; at most 4000); shorten it."
    assert watch.loads == loads


def test_pickle_weights_are_never_loaded(app, allowed):
    from attnpack.toy.tiny import build_tiny_pipeline

    _, watch, client = app
    folder = allowed / "pickled"
    build_tiny_pipeline(MODEL).save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("transformer/*.bin"))  # a pickle file is there...
    message = error_of(client, model=str(folder))
    assert "never loads pickle weights" in message and "safetensors" in message  # ... and was refused
    assert str(folder) in watch.loads  # through the real loader
    safe = allowed / "safe"
    build_tiny_pipeline(MODEL).save_pretrained(safe)
    image, _, _, params = generate(client, model=str(safe), width=64, height=64)
    assert pixels(image).shape == (64, 64, 3) and params["model"] == str(safe.resolve())


def test_out_of_memory_is_readable_and_the_app_keeps_serving(app):
    demo, _, client = app
    message = error_of(client, width=256, height=256, technique="temperature", temperature__factor=2.0)
    assert "ran out of GPU memory" in message and "The app is still running" in message
    pipe = demo.attnpack_runtime._pipes[MODEL]
    assert stock_processor_types(pipe) == ["FluxAttnProcessor"] * 3  # removed in `finally`
    image, _, seed, _ = generate(client, seed=3)
    np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, 3))


def test_video_model_returns_a_video_with_parameters(app):
    _, _, client = app
    image, video, seed, params = generate(client, model="tiny-wan", seed=2, num_frames=5)
    assert image is None and video.endswith(".mp4")
    embedded = read_parameters(video)
    assert embedded["model"] == "tiny-wan" and embedded["num_frames"] == 5 and embedded["seed"] == 2


def test_two_clients_at_once_get_their_own_results(app):
    """Requests with different techniques, prompts, seeds and sizes interleave in the queue; each client gets
    exactly its own image and parameters."""
    demo, watch, client = app
    other = gradio_client.Client(demo.local_url, verbose=False)
    mine = dict(seed=5, technique="temperature", temperature__factor=3.0)
    theirs = dict(seed=3, prompt="a cat", width=128, height=128)
    expected = {
        id(mine): reference_image(MODEL, PROMPT, 5, technique="temperature", factor=3.0),
        id(theirs): reference_image(MODEL, "a cat", 3, size=128),
    }
    requests = [(client, mine), (other, theirs)] * 2
    watch.max_active = 0
    base = dict(model=MODEL, prompt=PROMPT, steps=STEPS, randomize_seed=False)
    jobs = [c.submit(**{**base, **kw}, api_name="/generate") for c, kw in requests]
    for job, (_, kw) in zip(jobs, requests):
        image, _, used, params = job.result(timeout=300)
        assert used == kw["seed"] and params["prompt"] == kw.get("prompt", PROMPT)
        np.testing.assert_array_equal(pixels(image), expected[id(kw)])
        assert params["techniques"] == ([{"name": "temperature", "factor": 3.0}] if kw is mine else [])
    assert watch.max_active == 1  # one request on the device at a time


def test_gna_from_the_registry_with_its_list_options(app):
    """GNA's options arrive as text (window "3, 3", backend from a dropdown) and give what apply_gna gives."""
    _, _, client = app
    image, _, _, params = generate(client, seed=5, technique="gna", gna__window_size="3, 3", gna__backend="reference")
    reference = reference_image(MODEL, PROMPT, 5, technique="gna", window_size=(3, 3), backend="reference")
    np.testing.assert_array_equal(pixels(image), reference)
    assert not np.array_equal(reference, reference_image(MODEL, PROMPT, 5))
    (spec,) = params["techniques"]
    assert spec["name"] == "gna" and spec["window_size"] == [3, 3] and spec["backend"] == "reference"
    # issue 21: an empty window is the default, about half of each axis of the grid, and it visibly acts
    image, _, _, params = generate(client, seed=5, technique="gna", gna__window_size="")
    np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, 5, technique="gna"))
    assert not np.array_equal(pixels(image), reference_image(MODEL, PROMPT, 5))
    assert "window_size=auto" in params["in_effect"]["gna"]["core"]


def test_model_cache_loads_each_model_once(app):
    demo, watch, client = app
    before = list(watch.loads)
    generate(client, seed=1)
    generate(client, seed=2)
    assert watch.loads == before  # tiny-flux stayed cached
    assert len(demo.attnpack_runtime.loaded_models()) <= 2  # max_cached_models


# ------------------------------------------------------------------------------------------------ head guidance
def head_guidance(client, api_name="/head_guidance", **kwargs):
    args = dict(model=MODEL, prompt=PROMPT, steps=STEPS, randomize_seed=False, seed=5, **kwargs)
    return client.predict(**args, api_name=api_name)


def test_head_guidance_equals_apply_head_perturbation(app):
    _, _, client = app
    image, _, seed, params = head_guidance(client, heads="L0H0, L1H1", scale=3.0, softness=0.5, token_scope="image")
    options = dict(heads="L0H0,L1H1", scale=3.0, softness=0.5, token_scope="image")
    reference = reference_image(MODEL, PROMPT, 5, technique="head-guidance", **options)
    np.testing.assert_array_equal(pixels(image), reference)
    assert not np.array_equal(reference, reference_image(MODEL, PROMPT, 5))
    (spec,) = params["techniques"]
    assert spec["heads"] == ["L0H0", "L1H1"] and spec["softness"] == 0.5 and spec["token_scope"] == "image"
    assert read_parameters(image)["techniques"] == params["techniques"]
    # the same technique from the Generate tab: preset names (with "/") are heads, not paths
    image, _, _, params = generate(
        client,
        seed=5,
        technique="head-guidance",
        head_guidance__heads="L0H0, L1H1",
        head_guidance__softness=0.5,
        head_guidance__token_scope="image",
    )
    np.testing.assert_array_equal(pixels(image), reference)
    message = error_of(client, technique="head-guidance", head_guidance__heads="flux-dev/bokeh")
    assert "names layer 34" in message
    # a preset found on FLUX.1-dev names a layer the tiny model does not have: the library's message comes through
    with pytest.raises(gradio_client.exceptions.AppError, match="34"):
        head_guidance(client, presets=["flux-dev/bokeh"])
    with pytest.raises(gradio_client.exceptions.AppError, match="`heads` is empty"):
        head_guidance(client)


def test_head_grid_rows_are_heads_and_columns_softness(app):
    _, _, client = app
    grid, seed, params = head_guidance(client, "/head_grid", heads="L0H0; L1", scale=3.0, softness_grid="0, 1")
    assert params["grid"]["rows"] == [["L0H0"], ["L1"]] and params["grid"]["softness"] == [0.0, 1.0]
    assert read_parameters(grid)["grid"] == params["grid"]
    full = pixels(grid)
    stock = reference_image(MODEL, PROMPT, 5)
    for cell in params["grid"]["cells"]:
        x0, y0, x1, y1 = cell["box"]
        heads, u = cell["heads"][0], cell["softness"]
        expected = reference_image(MODEL, PROMPT, 5, technique="head-guidance", heads=heads, scale=3.0, softness=u)
        np.testing.assert_array_equal(full[y0:y1, x0:x1], expected)
        # u = 0 perturbs nothing: the pipeline's own image (up to rounding: the batch carries the extra rows)
        assert (np.abs(expected.astype(int) - stock).max() <= 1) == (u == 0.0)
    for softness_grid, message in [("0, 2", "`softness_values` must be"), (",".join(["1"] * 37), "at most 36")]:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            head_guidance(client, "/head_grid", heads="L0H0", softness_grid=softness_grid)


# ------------------------------------------------------------------------------------------------ IR-Diffusion
SUBJECTS = [{"prompt": "a photo of a cat", "word": "cat"}, {"prompt": "a photo of a dog", "word": "dog"}]
SCENE = "a cat and a dog on the beach"
LEFT, RIGHT = (0, 0, 32, 64), (32, 0, 64, 64)
_IR: dict = {}


def ir_reference(**kwargs):
    """Scene and references from IRDiffusionPipeline called directly on a fresh tiny SDXL (no UI)."""
    from attnpack import IRDiffusionPipeline
    from attnpack.toy.tiny import build_tiny_pipeline

    if "pipe" not in _IR:
        _IR["pipe"] = IRDiffusionPipeline.from_pipe(build_tiny_pipeline("tiny-sdxl"))
    out = _IR["pipe"](SUBJECTS, SCENE, height=64, width=64, num_inference_steps=STEPS, seed=0, **kwargs)
    return [np.asarray(im.convert("RGB")) for im in [out.images[0], *out.reference_images]]


def ir(client, rows=None, **kwargs):
    rows = rows or [[s["prompt"], s["word"], ", ".join(map(str, b)), ""] for s, b in zip(SUBJECTS, (LEFT, RIGHT))]
    table = {"headers": ["prompt", "word", "target box", "reference box"], "data": rows, "metadata": None}
    args = dict(model="tiny-sdxl", scene=SCENE, subjects=table, steps=STEPS, randomize_seed=False, seed=0)
    return client.predict(**{**args, **kwargs}, api_name="/ir_diffusion")


def box_mask(box, layer=False) -> np.ndarray:
    """A 64 x 64 mask painted inside ``box``: ``uint8 [H, W]``, or an RGBA editor layer (painted = opaque)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((64, 64, 4) if layer else (64, 64), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return mask


def upload(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return gradio_client.handle_file(str(path))


def test_ir_diffusion_with_boxes_matches_the_pipeline(app):
    _, _, client = app
    gallery, masks, seed, params = ir(client, target_source="boxes")
    assert [g["caption"] for g in gallery] == ["scene", "reference 1: cat", "reference 2: dog"] and seed == 0
    for got, expected in zip(gallery, ir_reference(target_boxes=[LEFT, RIGHT])):
        np.testing.assert_array_equal(pixels(got["image"]), expected)
    assert read_parameters(gallery[0]["image"])["image"] == "scene" and params["masks"]["target"] == "boxes"
    assert pixels(masks).shape[1] > 3 * 64  # references and scene side by side


def test_ir_diffusion_runs_on_sd1_models(app):
    """Issue 21: the IR tab accepts SD 1.x models (toy-sd, tiny-sd15) through IRDiffusionSDPipeline."""
    from attnpack.pipelines.ir_diffusion import IRDiffusionSDPipeline
    from attnpack.toy.tiny import build_tiny_pipeline

    _, _, client = app
    gallery, _, _, params = ir(client, model="tiny-sd15", target_source="boxes")
    assert params["pipeline"] == "IRDiffusionSDPipeline"
    out = IRDiffusionSDPipeline.from_pipe(build_tiny_pipeline("tiny-sd15"))(
        SUBJECTS, SCENE, height=64, width=64, num_inference_steps=STEPS, seed=0, target_boxes=[LEFT, RIGHT]
    )
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), np.asarray(out.images[0].convert("RGB")))


def test_ir_diffusion_uploaded_and_drawn_masks(app, tmp_path):
    _, _, client = app
    files = [upload(tmp_path / f"m{i}.png", box_mask(b)) for i, b in enumerate((LEFT, RIGHT))]
    expected = ir_reference(target_masks=[box_mask(LEFT), box_mask(RIGHT)])
    gallery, _, _, params = ir(client, target_source="uploaded", target_files=files)
    for got, want in zip(gallery, expected):
        np.testing.assert_array_equal(pixels(got["image"]), want)
    layers = [upload(tmp_path / f"l{i}.png", box_mask(b, layer=True)) for i, b in enumerate((LEFT, RIGHT))]
    drawing = {"background": None, "layers": layers, "composite": layers[0]}
    gallery, _, _, params = ir(client, target_source="drawn", target_drawing=drawing)
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), expected[0])
    assert params["masks"] == {"target": "drawn", "reference": "automatic"}


def test_ir_diffusion_automatic_masks(app):
    _, _, client = app
    gallery, masks, _, params = ir(client)  # default: automatic target and reference masks (layout pass)
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), ir_reference()[0])
    assert isinstance(params["layout_seed"], int) and params["masks"] == {
        "target": "automatic",
        "reference": "automatic",
    }


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(model="tiny-flux"), "IR-Diffusion needs a UNet model (SDXL, Playground v2.5, or SD 1.x/2.x"),
        (
            dict(target_source="uploaded", target_files=[]),
            "`target_files` needs one mask image per subject (2), got 0",
        ),
        (dict(target_source="boxes", rows=[["a photo of a cat", "cat", "1, 2", ""]]), "must be four pixel numbers"),
        (dict(rows=[["", "", "", ""]]), "`subjects` is empty"),
        (dict(rows=[["a photo of a cat", "", "", ""]]), "`subjects` row 1 needs a prompt and a word"),
    ],
)
def test_ir_diffusion_errors(app, kwargs, expected):
    _, _, client = app
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        ir(client, **kwargs)
    assert expected in str(info.value)


# ------------------------------------------------------------------------------------------------ queue
def test_queue_is_bounded_and_serial():
    watch = Watch(default_loader(device="cpu"), block=True)
    demo = build_demo(watch, device="cpu", queue_size=1, techniques=ui_techniques())
    with launched(demo) as url:
        client = gradio_client.Client(url, verbose=False)
        args = dict(model=MODEL, prompt=PROMPT, steps=1, randomize_seed=False, api_name="/generate")
        first = client.submit(seed=1, **args)
        try:
            assert watch.entered.wait(timeout=120)  # the first request holds the device
            second = client.submit(seed=2, **args)  # waits in the queue (size 1)
            for _ in range(100):
                if second.status().code.name == "IN_QUEUE":
                    break
                threading.Event().wait(0.1)
            third = client.submit(seed=3, **args)
            with pytest.raises(Exception, match="(?i)queue is full"):
                third.result(timeout=60)
        finally:
            watch.release.set()
        assert first.result(timeout=120)[2] == 1 and second.result(timeout=120)[2] == 2
        assert watch.max_active == 1


# ------------------------------------------------------------------------------------------------ info, benchmark
def test_info_reports_this_machine(app):
    from attnpack._env import check_backends

    _, _, client = app
    markdown, report = client.predict(api_name="/info")
    direct = check_backends("cpu")
    assert {k: v["ok"] for k, v in report["backends"].items()} == {k: v["ok"] for k, v in direct.items()}
    assert report["backends"]["sdpa"]["ok"] and "| sdpa | yes |" in markdown
    assert report["device"]["type"] == "cpu" and list(report["techniques"]) == list(ui_techniques())
    assert MODEL in report["models"] and MODEL in report["loaded_models"]


def test_benchmark_compares_a_technique_with_stock_attention(app):
    _, _, client = app
    args = dict(model=MODEL, prompt=PROMPT, seed=0, steps=STEPS, repeats=1, api_name="/benchmark")
    table, gallery = client.predict(technique="dense", **args)
    rows = {r[0]: r for r in table["data"]}
    assert rows["dense"][3] == 0 and rows["stock"][2] == 1.0  # dense reproduces stock attention exactly
    assert rows["dense"][2] == pytest.approx(rows["stock"][1] / rows["dense"][1], rel=1e-2)
    table, gallery = client.predict(technique="temperature", temperature__factor=3.0, **args)
    rows = {r[0]: r for r in table["data"]}
    reference = reference_image(MODEL, PROMPT, 0, technique="temperature", factor=3.0).astype(int) - reference_image(
        MODEL, PROMPT, 0
    )
    assert rows["temperature"][3] == np.abs(reference).max() > 0
    assert len(gallery) == 2
    with pytest.raises(gradio_client.exceptions.AppError, match="pick a technique"):
        client.predict(technique="none", **args)
    table, _ = client.predict(**args)  # issue 21: the tab's defaults (GNA with its default window) run as they are
    assert [r[0] for r in table["data"]] == ["stock", "gna"]


# ------------------------------------------------------------------------------------------------ output folder
def outdir_with_secrets(tmp_path) -> tuple[Path, list[Path]]:
    """An output folder that already holds files of its owner, which the UI must never serve."""
    outdir = tmp_path / "outputs"
    (outdir / "private").mkdir(parents=True)
    secrets = [outdir / "private" / "credentials.txt", outdir / "notes.png"]
    for path in secrets:
        path.write_text("token=not-for-the-web")
    return outdir, secrets


def test_outdir_serves_only_what_the_ui_wrote(tmp_path):
    """Before, `--outdir DIR` put DIR in Gradio's allowed paths: anyone could download DIR/private/credentials.txt."""
    outdir, secrets = outdir_with_secrets(tmp_path)
    demo = build_demo(default_loader(device="cpu"), device="cpu", output_dir=outdir, techniques=ui_techniques())
    with launched(demo) as url:
        image, _, _, params = generate(gradio_client.Client(url, verbose=False), seed=3)
        np.testing.assert_array_equal(pixels(image), reference_image(MODEL, PROMPT, 3))  # the client's download
        (kept,) = demo.attnpack_runtime.output_dir.iterdir()  # the result is kept in the folder the UI made
        assert kept.parent.parent == outdir and kept.parent.name.startswith("attnpack-ui-")
        assert read_parameters(kept) == params
        assert fetch_file(url, kept) == (200, kept.read_bytes())  # a result is served
        for path in [*secrets, outdir / "private", kept.parent / ".." / "private" / "credentials.txt"]:
            assert fetch_file(url, path)[0] == 403, path  # nothing else in the folder is
    assert sorted(p.name for p in outdir.iterdir()) == sorted([kept.parent.name, "private", "notes.png"])


# ------------------------------------------------------------------------------------------------ building
def test_building_loads_no_model_and_importing_is_light(tmp_path):
    def refuse(name):
        raise AssertionError(f"build_demo loaded {name}")

    demo = build_demo(refuse, device="cpu", techniques=ui_techniques())
    assert demo.attnpack_runtime.loaded_models() == []
    code = "import sys, attnpack.ui; print(sorted({'gradio', 'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "0"], "`--port` must be in 1..65535"),
        (["--outdir", "/nonexistent/out"], "`--outdir` folder '/nonexistent/out' does not exist"),
        (["--allow-dir", "/nonexistent/models"], "`allowed_dirs` entry '/nonexistent/models' is not an existing"),
        (["--model", "tiny-nope"], "neither a built-in model"),
        (["--max-steps", "0"], "`max_steps` must be a positive integer"),
    ],
)
def test_cli_errors_before_launching(args, message, capsys):
    from attnpack.cli import main

    assert main(["ui", *args]) == 2
    assert message in capsys.readouterr().err


def test_readme_first_command_launches_the_ui_on_the_default_model(tmp_path):
    """Run the README's first command (its `attnpack ui` part, on a free port, with an --outdir that holds private
    files) and generate through it; only the result is served."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()[0]
    assert first.startswith("pip install") and '".[ui]"' in first
    command = first.split("&&")[-1].split()
    assert command[:2] == ["attnpack", "ui"]
    port = free_port()
    outdir, secrets = outdir_with_secrets(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnpack", *command[1:], "--port", str(port), "--outdir", str(outdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"`attnpack ui` exited: {proc.stderr.read()}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "`attnpack ui` did not start serving"
                time.sleep(1)
        client = gradio_client.Client(url, verbose=False)
        image, _, seed, params = generate(client, seed=3)
        assert params["model"] == "tiny-flux" and seed == 3
        np.testing.assert_array_equal(pixels(image), reference_image("tiny-flux", PROMPT, 3))
        (kept,) = outdir.glob("attnpack-ui-*/*.png")
        assert fetch_file(url, kept) == (200, kept.read_bytes()) and read_parameters(kept) == params
        for path in secrets:
            assert fetch_file(url, path)[0] == 403, path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_every_technique_runs_with_its_defaults_on_the_default_model(app):
    """Issue 21: on toy-flux (the default model), every registered technique with all its options left empty gives an
    image, and every one but `dense` (stock attention by design) changes it."""
    from attnpack.techniques import available_techniques

    _, _, client = app
    stock, _, _, _ = generate(client, model="toy-flux", seed=2)
    for name in available_techniques():
        image, _, _, params = generate(client, model="toy-flux", seed=2, technique=name)
        assert [t["name"] for t in params["techniques"]] == [name] and name in " ".join(params["in_effect"])
        changed = not np.array_equal(pixels(image), pixels(stock))
        assert changed == (name != "dense"), name
