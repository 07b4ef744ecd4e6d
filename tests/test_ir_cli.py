"""`attnpack ir`: outputs with parameters, parity with the Python API, one-line user errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from attnpack import read_parameters
from attnpack.cli import main
from attnpack.pipelines.ir_diffusion import IRDiffusionPipeline
from attnpack.toy.tiny import build_tiny_pipeline


SUBJECTS = [
    {"prompt": "a photo of a red cat", "word": "cat", "target_box": [0, 0, 32, 64], "reference_box": [8, 8, 56, 56]},
    {"prompt": "a photo of a blue dog", "word": "dog", "target_box": [32, 0, 64, 64], "reference_box": [0, 0, 64, 48]},
]
SCENE = "a cat and a dog on a beach"


def write(tmp_path, data, name="subjects.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def assert_same_scene_as_the_api(out, pipe, **options):
    """The scene the command wrote equals the same generation through the Python API (64 px, 1 step, seed 4)."""
    api = pipe(
        [{"prompt": s["prompt"], "word": s["word"]} for s in SUBJECTS],
        SCENE,
        height=64,
        width=64,
        num_inference_steps=1,
        seed=4,
        target_boxes=[s["target_box"] for s in SUBJECTS],
        reference_boxes=[s["reference_box"] for s in SUBJECTS],
        **options,
    )
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(api.images[0]))


def test_ir_writes_scene_references_and_masks(tmp_path):
    subjects = write(tmp_path, {"subjects": SUBJECTS, "scene": SCENE})
    out = tmp_path / "scene.png"
    rc = main(["ir", "--subjects", str(subjects), "--steps", "1", "--seed", "4", "--dropout", "0.25", "-o", str(out)])
    assert rc == 0
    expected = {"scene.png", "scene_reference_0.png", "scene_reference_1.png", "scene_masks.png", "subjects.json"}
    assert set(os.listdir(tmp_path)) == expected  # boxes given: no layout pass; no temporary files left
    params = read_parameters(out)
    assert params["pipeline"] == "IRDiffusionPipeline" and params["model"] == "tiny-sdxl"
    assert params["scene"] == SCENE and params["seed"] == 4 and params["dropout"] == 0.25
    assert params["subjects"][1] == {"prompt": SUBJECTS[1]["prompt"], "word": "dog"}
    assert params["masks"]["target_box"] == "given" and params["layout_seed"] == 4
    assert read_parameters(tmp_path / "scene_reference_1.png")["image"] == "reference 1"
    # the same generation through the Python API gives the same pixels
    assert_same_scene_as_the_api(out, IRDiffusionPipeline.from_pipe(build_tiny_pipeline("tiny-sdxl")), dropout=0.25)
    with Image.open(tmp_path / "scene_masks.png") as im:
        assert im.size == (3 * 64 + 2 * 4, 64)


def test_ir_runs_sd1_models_like_the_python_api(tmp_path):
    """Issue 21: `attnpack ir` takes SD 1.x models (toy-sd, tiny-sd15) through IRDiffusionSDPipeline."""
    from attnpack.pipelines.ir_diffusion import IRDiffusionSDPipeline

    subjects = write(tmp_path, {"subjects": SUBJECTS, "scene": SCENE})
    out = tmp_path / "scene.png"
    assert (
        main(["ir", "-m", "tiny-sd15", "--subjects", str(subjects), "--steps", "1", "--seed", "4", "-o", str(out)])
        == 0
    )
    assert read_parameters(out)["pipeline"] == "IRDiffusionSDPipeline"
    assert_same_scene_as_the_api(out, IRDiffusionSDPipeline.from_pipe(build_tiny_pipeline("tiny-sd15")))


@pytest.mark.parametrize(
    ("data", "extra", "match"),
    [
        (None, [], "does not exist"),
        ("not json", [], "not valid JSON"),
        ([], [], "non-empty list"),
        ([{"prompt": "a cat", "word": "cat", "box": [0, 0, 1, 1]}], ["--scene", "a cat"], "unknown keys"),
        ([{"prompt": "a cat", "word": "cat"}], [], "scene prompt"),
        (
            [{"prompt": "a cat", "word": "cat", "target_box": [0, 0, 8, 8]}, {"prompt": "a dog", "word": "dog"}],
            ["--scene", "a cat and a dog"],
            "every subject or for none",
        ),
        ([{"prompt": "a cat", "word": "cat"}], ["--scene", "a cat", "--attention-backend", "flash"], "not supported"),
        ([{"prompt": "a cat", "word": "cat"}], ["--scene", "a cat", "--mask-threshold", "high"], "mask-threshold"),
        ([{"prompt": "a cat", "word": "cat"}], ["--scene", "a cat", "-m", "tiny-flux"], "needs a UNet model"),
        ([{"prompt": "a cat"}], ["--scene", "a cat"], "exactly the keys"),
    ],
)
def test_ir_user_errors(tmp_path, capsys, data, extra, match):
    path = tmp_path / "s.json"
    if data is not None:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    rc = main(["ir", "--subjects", str(path), "--steps", "1", "-o", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("attnpack ir: error:") and match in err[0]
    assert not (tmp_path / "o.png").exists()


def test_ir_masks_from_files(tmp_path):
    """Per-subject mask images (paths relative to the JSON file)."""
    for i, cols in enumerate(((0, 32), (32, 64))):
        m = np.zeros((64, 64), dtype=np.uint8)
        m[:, cols[0] : cols[1]] = 255
        Image.fromarray(m).save(tmp_path / f"t{i}.png")
    subjects = [{"prompt": s["prompt"], "word": s["word"], "target_mask": f"t{i}.png"} for i, s in enumerate(SUBJECTS)]
    path = write(tmp_path, subjects)
    rc = main(
        ["ir", "--subjects", str(path), "--scene", SCENE, "--steps", "1", "--no-extras", "-o", str(tmp_path / "o.png")]
    )
    assert rc == 0
    params = read_parameters(tmp_path / "o.png")
    assert params["masks"]["target_mask"] == "given" and params["masks"]["reference_box"] == "automatic"
    assert not (tmp_path / "o_masks.png").exists()
