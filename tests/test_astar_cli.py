"""`attnpack astar` on the tiny models: the image and the maps are written atomically with their parameters."""

import os

import pytest
from PIL import Image

from attnpack import read_parameters
from attnpack.cli import main


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_astar_command_writes_image_and_maps(model, tmp_path, capsys):
    out, maps = tmp_path / "img.png", tmp_path / "maps.gif"
    argv = ["astar", "-m", model, "-p", "a cat and a zebra", "--concepts", "cat", "zebra", "--steps", "2"]
    rc = main(argv + ["--seed", "3", "--binarize", "0.5", "-o", str(out), "--maps", str(maps)])
    assert rc == 0, capsys.readouterr().err
    params = read_parameters(out)
    assert params["concepts"] == ["cat", "zebra"] and params["seed"] == 3 and params["steps"] == 2
    assert params["astar"]["binarize"] == 0.5 and params["pipeline"].startswith("AStar")
    assert params["loss_first_step"]["total"] > 0
    with Image.open(out) as im:
        assert im.size == (64, 64)
    with Image.open(maps) as im:
        assert im.n_frames == 2
    assert sorted(os.listdir(tmp_path)) == ["img.png", "maps.gif"]


def test_astar_command_token_indices_and_grid(tmp_path):
    out, maps = tmp_path / "img.png", tmp_path / "maps.png"
    argv = ["astar", "-m", "tiny-sd15", "-p", "a cat and a zebra", "--token-indices", "2,3", "5,6,7,8"]
    assert main(argv + ["--steps", "2", "--attn-res", "8", "-o", str(out), "--maps", str(maps)]) == 0
    assert read_parameters(out)["token_indices"] == [[2, 3], [5, 6, 7, 8]]
    assert read_parameters(maps)["concepts"] == ["tokens [2, 3]", "tokens [5, 6, 7, 8]"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-m", "tiny-sd15", "--concepts", "horse"], "horse"),
        (["-m", "tiny-flux", "--concepts", "cat"], "FluxPipeline"),
        (["-m", "tiny-sd15", "--concepts", "cat", "--attn-res", "16"], "available grids"),
        (["-m", "tiny-sd15", "--concepts", "cat", "-o", "x.jpg"], "--out"),
    ],
)
def test_astar_command_user_errors(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["astar", "-p", "a cat", "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []
