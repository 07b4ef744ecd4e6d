"""The shipped toy models: packaging, loading as plain diffusers pipelines, and behaviour judged by the evaluator
(they draw the named objects, random weights do not, and their self-attention is local)."""

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_image_after_reload

from attnpack.pipelines import builtin_models, load_pipeline
from attnpack.toy.adherence import generate_images
from attnpack.toy.data import COLORS, SHAPES
from attnpack.toy.evaluator import evaluate_images
from attnpack.toy.loader import WEIGHTS_DIR, load_evaluator, load_toy_pipeline, toy_model_path
from attnpack.toy.train import TrainConfig, default_config, recipe


ROOT = Path(__file__).resolve().parents[1]
TOYS = ["toy-sd", "toy-flux"]
# every color and every shape twice; ROTATED names the next color instead (a negative control)
_PAIRS = [(i, SHAPES[(2 * i + j) % len(SHAPES)]) for i in range(len(COLORS)) for j in range(2)]
SINGLE = [f"a {list(COLORS)[i]} {shape}" for i, shape in _PAIRS]
ROTATED = [f"a {list(COLORS)[(i + 1) % len(COLORS)]} {shape}" for i, shape in _PAIRS]


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def pipes():
    return {name: load_toy_pipeline(name) for name in TOYS}


def test_weights_are_small_packaged_and_complete():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    line = re.search(r'^"attnpack\.toy" = (\[.*?\])', (ROOT / "pyproject.toml").read_text(), re.M)
    patterns = json.loads(line.group(1))  # [tool.setuptools.package-data] (tomllib needs Python 3.11)
    for p in files:
        rel = p.relative_to(WEIGHTS_DIR.parent).as_posix()
        assert any(fnmatch(rel, pat) for pat in patterns), rel
    assert not [p for p in files if p.suffix in (".pt", ".ckpt", ".tmp") or p.name.startswith(".")]
    for name in ("toy-sd", "toy-flux"):
        assert {p.name for p in toy_model_path(name).iterdir()} >= {"model_index.json", "vae", "text_encoder"}
    assert (toy_model_path("evaluator") / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    "stage, path",
    [
        ("vae", "toy-sd/vae"),
        ("vae", "toy-flux/vae"),
        ("evaluator", "evaluator"),
        ("toy-sd", "toy-sd/unet"),
        ("toy-flux", "toy-flux/transformer"),
    ],
)
def test_shipped_weights_come_with_the_default_training_config(stage, path):
    saved = TrainConfig.load(WEIGHTS_DIR / path / "train_config.json")
    assert saved == TrainConfig.from_dict(default_config(stage).to_dict())  # retraining with defaults = shipped run
    log = json.loads((WEIGHTS_DIR / path / "train_log.json").read_text())
    assert log["steps_done"] == saved.steps and log["seconds"] > 0
    # a continuation records the phases before it: together they are the recipe `attnpack train-toy` runs
    phases = recipe(stage)
    for name, cfg in reversed(phases[:-1]):
        assert log["init"]["folder"] == name
        assert TrainConfig.from_dict(log["init"]["config"]).to_dict() == cfg.to_dict()
        log = log["init"]["log"]
        assert log["steps_done"] == cfg.steps and log["seconds"] > 0
    assert "init" not in log  # the first phase started from random weights


def test_builtin_names_and_defaults():
    from diffusers import FluxPipeline, StableDiffusionPipeline

    assert {"toy-sd", "toy-flux"} <= set(builtin_models())
    pipe = load_pipeline("toy-flux", device="cpu")
    assert isinstance(pipe, FluxPipeline) and pipe._attnpack_model == "toy-flux"
    assert pipe._attnpack_defaults["max_sequence_length"] == 24
    assert isinstance(load_pipeline("toy-sd", device="cpu"), StableDiffusionPipeline)


@pytest.mark.parametrize("name", TOYS)
def test_plain_diffusers_loading_and_save_reload(name, pipes, tmp_path):
    from diffusers import DiffusionPipeline

    plain = DiffusionPipeline.from_pretrained(toy_model_path(name), local_files_only=True)
    kwargs = dict(num_inference_steps=3)
    ours = generate_images(pipes[name], ["a red circle"], [0], **kwargs)[0]
    assert np.array_equal(np.asarray(generate_images(plain, ["a red circle"], [0], **kwargs)[0]), np.asarray(ours))
    pipes[name].save_pretrained(tmp_path / name)
    again = load_toy_pipeline(name, path=tmp_path / name)  # a new file: tensors at other offsets (helpers.RELOAD_ATOL)
    assert_same_image_after_reload(generate_images(again, ["a red circle"], [0], **kwargs)[0], ours)


# Measured with the shipped weights (CPU, these 12 prompts, seeds 0-11 and 100-111): toy-sd 11/12 and 11/12, toy-flux
# 11/12 and 11/12; random weights 0/12 (test below). With 100 prompts toy-sd draws 94% and toy-flux 91% of single
# objects (benchmarks/results/toy_adherence.json; the next test holds both to issue 11's 90% target).
MIN_SINGLE = {"toy-sd": 10 / 12, "toy-flux": 10 / 12}


@pytest.mark.parametrize("name", TOYS)
def test_single_object_prompts_are_drawn(name, pipes, evaluator):
    images = generate_images(pipes[name], SINGLE, list(range(len(SINGLE))))
    assert evaluate_images(evaluator, images, SINGLE)["objects"] >= MIN_SINGLE[name]
    # negative control: the same images judged against the wrong colors must fail
    assert evaluate_images(evaluator, images, ROTATED)["objects"] <= 2 / 12


@pytest.mark.parametrize("name", TOYS)
def test_single_object_adherence_on_100_prompts(name, pipes, evaluator):
    """Issue 11's target on the 100 evaluation prompts of docs/toy-models.md (measured: toy-sd 94%, toy-flux 91%)."""
    from attnpack.toy.adherence import prompt_adherence

    report = prompt_adherence(pipes[name], evaluator, counts=(1,), num_prompts=100)
    assert report["1"]["objects"] >= 0.90, report


def test_random_weights_do_not_pass(evaluator):
    """The same prompts through the random-weight tiny FLUX: the evaluator must not reward noise."""
    pipe = load_pipeline("tiny-flux", device="cpu")
    images = generate_images(pipe, SINGLE, list(range(len(SINGLE))), num_inference_steps=4, max_sequence_length=24)
    assert evaluate_images(evaluator, images, SINGLE)["objects"] <= 1 / 12


@pytest.mark.parametrize(
    "name",
    [
        # measured median 1.46 (layers 1.31-1.47, the 94%-accurate weights; random tiny-flux weights: 0.99): toy-sd's
        # self-attention is only weakly local, so this claim fails for it; strict, so that it is noticed if it changes
        pytest.param("toy-sd", marks=pytest.mark.xfail(strict=True, reason="toy-sd locality measured 1.46x uniform")),
        "toy-flux",  # measured median 3.89 (layers 1.14-6.32)
    ],
)
def test_self_attention_is_local(name, pipes):
    """Share of each image query's attention within its 3x3 neighbourhood, vs what uniform attention would give."""
    from attnpack import apply_processors
    from attnpack.toy.attention import AttentionRecorder, locality

    recorder = AttentionRecorder(steps=[10])
    with apply_processors(pipes[name], recorder, kinds=["self", "joint", "single"]):
        generate_images(pipes[name], ["a red circle left of a blue square"], [0], num_inference_steps=20)
    ratios = [
        locality(probs, recorder.grids[layer])[0] / locality(probs, recorder.grids[layer])[1]
        for (layer, _), probs in recorder.maps.items()
    ]
    assert len(ratios) >= 4
    assert np.median(ratios) >= 2.0, ratios


def test_generate_defaults_to_toy_flux(tmp_path, pipes):
    from PIL import Image

    from attnpack import read_parameters
    from attnpack.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "-p", "a red circle", "--seed", "1", "-o", str(out)]) == 0
    params = read_parameters(out)
    assert params["model"] == "toy-flux" and params["steps"] == 20
    # the same image as the plain diffusers pipeline called with the toy call defaults
    expected = np.asarray(generate_images(pipes["toy-flux"], ["a red circle"], [1])[0])
    with Image.open(out) as im:
        assert im.size == (64, 64)
        assert np.array_equal(np.asarray(im.convert("RGB")), expected)


def test_toy_models_run_in_half_precision_without_nans(pipes):
    pipe = load_toy_pipeline("toy-flux")
    pipe.to(dtype=torch.bfloat16)
    image = np.asarray(generate_images(pipe, ["a red circle"], [0], num_inference_steps=4)[0])
    assert image.std() > 5  # not a flat (NaN -> black) image


def test_paro_calibrates_a_builtin_model_with_call_defaults(tmp_path):
    """load_pipeline("toy-flux") records num_inference_steps=20 among its call defaults; the calibration's own step
    count must win (it used to fail with 'got multiple values for keyword argument num_inference_steps')."""
    import attnpack

    pipe = load_pipeline("toy-flux", device="cpu")
    assert pipe._attnpack_defaults["num_inference_steps"] == 20
    plan = attnpack.calibrate_paro(pipe, ["a red circle"], 2, density=0.5, block_size=8, progress=False)
    assert plan.num_inference_steps == 2 and plan.info["pipeline_kwargs"]["max_sequence_length"] == 24


@pytest.mark.parametrize("name", TOYS)
def test_a_plain_call_draws_what_is_asked(name, evaluator):
    """Issue 21: `attnpack.load_pipeline(name)` then `pipe(prompt)` with nothing else, as with any diffusers
    checkpoint, draws the prompt (it drew a yellow-green texture at diffusers' own defaults)."""
    pipe = load_pipeline(name, device="cpu")
    images = [pipe(p, generator=torch.Generator().manual_seed(i)).images[0] for i, p in enumerate(SINGLE[:6])]
    assert all(im.size == (64, 64) for im in images)
    assert evaluate_images(evaluator, images, SINGLE[:6])["objects"] >= 4 / 6
