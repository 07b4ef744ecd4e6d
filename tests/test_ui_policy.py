"""The UI's input policy without a server (and without Gradio): which models and weight files may be loaded, seeds,
and the bounds on sizes and steps."""

from __future__ import annotations

import os

import pytest

from attnpack.ui._layout import make_settings, pick_seed
from attnpack.ui._runtime import MAX_SEED, UIConfig, check_weights_file, looks_like_path, resolve_model


def pipeline_folder(path):
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    return path


@pytest.fixture
def tree(tmp_path):
    allowed = tmp_path / "allowed"
    inside = pipeline_folder(allowed / "model")
    outside = pipeline_folder(tmp_path / "private" / "model")
    (allowed / "plain").mkdir()
    os.symlink(outside, allowed / "link")  # a symlink inside the allowed folder, pointing outside
    return allowed, inside, outside


def config(allowed, **kwargs):
    return UIConfig(allowed_dirs=[allowed], device="cpu", **kwargs)


def test_models_inside_allowed_folders_only(tree):
    allowed, inside, outside = tree
    cfg = config(allowed)
    assert resolve_model("tiny-sd15", cfg) == "tiny-sd15"
    assert resolve_model(str(inside), cfg) == str(inside.resolve())
    assert resolve_model(f" {allowed}/../allowed/model ", cfg) == str(inside.resolve())
    for escape in (str(outside), f"{allowed}/../private/model", str(allowed / "link"), "/"):
        with pytest.raises(ValueError, match="nor a folder inside the folders this UI may load from"):
            resolve_model(escape, cfg)
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model(str(allowed / "plain"), cfg)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(allowed / "missing"), cfg)
    with pytest.raises(ValueError, match="no folders are allowed; start the UI with `attnpack ui --allow-dir"):
        resolve_model(str(inside), UIConfig(device="cpu"))


def test_paths_outside_the_allowed_folders_reveal_nothing(tree, tmp_path):
    allowed, _, outside = tree
    (tmp_path / "secret").mkdir()  # exists, no model_index.json
    messages = set()
    for path in (tmp_path / "secret", tmp_path / "missing", outside):
        with pytest.raises(ValueError) as info:
            resolve_model(str(path), config(allowed))
        messages.add(str(info.value).replace(str(path), "PATH"))
    assert len(messages) == 1  # the same answer whether the path exists, is a pipeline, or not


def test_startup_models_are_allowed_wherever_they_are(tree):
    allowed, _, outside = tree
    cfg = UIConfig(default_model=str(outside), device="cpu")
    assert resolve_model(str(outside), cfg) == str(outside.resolve())
    assert cfg.models[0] == str(outside) and "tiny-flux" in cfg.models


def test_hub_ids_follow_allow_hub(tree):
    allowed, _, _ = tree
    assert resolve_model("black-forest-labs/FLUX.1-dev", config(allowed)) == "black-forest-labs/FLUX.1-dev"
    with pytest.raises(ValueError, match="is a Hub id, but this UI does not download models"):
        resolve_model("black-forest-labs/FLUX.1-dev", config(allowed, allow_hub=False))
    for bad in ("", "  ", "tiny-nope", "not a model"):
        with pytest.raises(ValueError, match="`model` .*(empty|is not a built-in model)"):
            resolve_model(bad, config(allowed))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(allowed_dirs=["/nonexistent/folder"]), "`allowed_dirs` entry '/nonexistent/folder' is not an existing"),
        (dict(max_steps=0), "`max_steps` must be a positive integer"),
        (dict(queue_size=True), "`queue_size` must be a positive integer"),
        (dict(max_resolution=32), "`max_resolution` must be >= 64"),
        (dict(default_model="tiny-nope"), "neither a built-in model"),
        (dict(default_model="/"), "not a diffusers pipeline folder"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UIConfig(device="cpu", **kwargs)


def test_weight_files_inside_allowed_folders_and_safetensors_only(tree, tmp_path):
    allowed, _, _ = tree
    cfg = config(allowed)
    good = allowed / "w.safetensors"
    good.write_bytes(b"x")
    assert check_weights_file(str(good), cfg, argument="clear__weights") == str(good.resolve())
    (tmp_path / "private" / "w.safetensors").write_bytes(b"x")
    for path, message in [
        (allowed / "link" / "../w.safetensors", "outside the folders"),  # resolves through the symlink
        (tmp_path / "private" / "w.safetensors", "outside the folders"),
        (allowed / "w.pt", "only from .safetensors files \\(never pickle\\)"),
        (allowed / "w.ckpt", "only from .safetensors files"),
        (allowed / "missing.safetensors", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_weights_file(str(path), cfg, argument="clear__weights")


def test_which_text_values_are_paths(tmp_path, monkeypatch):
    for text in ("int8", "plan", "flex", "none", "0.25", "sd3-medium/dark", "L1H10"):
        assert not looks_like_path(text)
    for text in ("/a/b", "~/w.safetensors", "./w", "../w", "w.safetensors", "w.bin", "x\\y", "plans/p.safetensors"):
        assert looks_like_path(text)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p").write_bytes(b"x")
    assert looks_like_path("plans/p")  # an existing relative path, whatever its name


def test_seeds():
    assert pick_seed(5, False) == 5 and pick_seed(5.0, False) == 5 and pick_seed(None, False) == 0
    seeds = {pick_seed(5, True) for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s <= MAX_SEED for s in seeds)
    for bad in (-1, 1.5, MAX_SEED + 1):
        with pytest.raises(ValueError, match="`seed` must be an integer"):
            pick_seed(bad, False)


def test_settings_bounds():
    cfg = UIConfig(device="cpu", max_resolution=512, max_steps=10, max_frames=9)
    s = make_settings(cfg, "a cat", "", 3, 0, 0, 0, -1, 0)
    assert (s.width, s.height, s.steps, s.guidance, s.num_frames, s.negative_prompt) == (None,) * 6
    s = make_settings(cfg, "a cat", "dog", 3, 512, 64, 10, 0.0, 9)
    assert (s.width, s.height, s.steps, s.guidance, s.num_frames, s.negative_prompt) == (512, 64, 10, 0.0, 9, "dog")
    for args, message in [
        (dict(width=520), "`width` must be in 16..512"),
        (dict(height=60), "`height` must be a multiple of 8"),
        (dict(steps=11), "`steps` must be in 1..10"),
        (dict(steps=2.5), "`steps` must be an integer"),
        (dict(num_frames=10), "`num_frames` must be in 1..9"),
        (dict(guidance=101), "`guidance` must be in 0..100"),
        (dict(prompt=""), "`prompt` is empty"),
        (dict(prompt="x" * 4001), "`prompt` is too long"),
    ]:
        kwargs = dict(prompt="a cat", negative_prompt=None, seed=0) | args
        with pytest.raises(ValueError, match=message):
            make_settings(cfg, **kwargs)
