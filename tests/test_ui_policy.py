"""The UI's input policy without a server (and without Gradio): which models and weight files may be loaded, seeds,
and the bounds on sizes and steps."""

from __future__ import annotations

import os
import re

import pytest

from attnpack.ui._layout import check_request, make_settings, number, pick_seed
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
    for bad in (-1, 1.5, MAX_SEED + 1, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match=f"`seed` must be an integer in 0..{MAX_SEED}, got seed="):
            pick_seed(bad, False)


def test_settings_bounds():
    cfg = UIConfig(device="cpu", max_resolution=512, max_steps=10, max_frames=9)
    s = make_settings(cfg, "a cat", "", 3, 0, 0, 0, -1, 0)
    assert (s.width, s.height, s.steps, s.guidance, s.num_frames, s.negative_prompt) == (None,) * 6
    s = make_settings(cfg, "a cat", "dog", 3, 512, 64, 10, 0.0, 9)
    assert (s.width, s.height, s.steps, s.guidance, s.num_frames, s.negative_prompt) == (512, 64, 10, 0.0, 9, "dog")
    nan, inf = float("nan"), float("inf")
    for args, message in [
        (dict(width=520), "`width` must be an integer in 16..512 in this UI (0: the default), got width=520."),
        (dict(height=60), "`height` must be a multiple of 8"),
        (dict(steps=11), "`steps` must be an integer in 1..10 in this UI"),
        (dict(steps=2.5), "`steps` must be an integer in 1..10 in this UI (0: the default), got steps=2.5."),
        (dict(num_frames=10), "`num_frames` must be an integer in 1..9"),
        (dict(guidance=101), "`guidance` must be a number in -1..100 (-1: the pipeline's default), got guidance=101"),
        (dict(prompt=""), "`prompt` is empty"),
        (dict(prompt="x" * 4001), "`prompt` is too long (4001 characters; at most 4000)"),
        (dict(negative_prompt="x" * 4001), "`negative_prompt` is too long (4001 characters; at most 4000)"),
        # NaN passes every comparison: before, a NaN guidance made black images and a NaN size a message-less error
        (dict(width=nan), "`width` must be an integer in 16..512 in this UI (0: the default), got width=nan."),
        (dict(steps=inf), "`steps` must be an integer in 1..10 in this UI (0: the default), got steps=inf."),
        (dict(num_frames=-inf), "`num_frames` must be an integer in 1..9"),
        (
            dict(guidance=nan),
            "`guidance` must be a finite number in -1..100 (-1: the pipeline's default), got guidance=nan.",
        ),
        (dict(guidance=True), "`guidance` must be a number"),
        (dict(height="64"), "`height` must be an integer"),
    ]:
        kwargs = dict(prompt="a cat", negative_prompt=None, seed=0) | args
        with pytest.raises(ValueError, match=re.escape(message)):
            make_settings(cfg, **kwargs)


def test_number_is_the_one_check_of_number_fields():
    """The UI's `number` is `_utils.check_number` (one check everywhere) plus Gradio's integral floats."""
    assert number("x", 3, 0, 5, integer=True) == 3 and isinstance(number("x", 3.0, integer=True), int)
    assert number("x", 0.25, 0, 1) == 0.25 and number("x", -1e300) == -1e300
    for value, bounds, message in [
        (float("nan"), {}, "`x` must be a finite number, got x=nan."),
        (float("-inf"), dict(low=0), "`x` must be a finite number >= 0, got x=-inf."),
        (7, dict(high=5), "`x` must be a number <= 5, got x=7."),
        (0.0005, dict(low=1e-3, high=10), "`x` must be a number in 0.001..10, got x=0.0005."),
        (
            2.5,
            dict(integer=True, low=0, high=9, note=" (0: off)"),
            "`x` must be an integer in 0..9 (0: off), got x=2.5.",
        ),
        (None, {}, "`x` must be a number, got x=None."),
        ("1", {}, "`x` must be a number, got x='1'."),
        (False, {}, "`x` must be a number, got x=False."),
    ]:
        with pytest.raises(ValueError) as info:
            number("x", value, **bounds)
        assert str(info.value) == message


def test_every_text_and_number_of_a_request_is_checked():
    import pandas as pd

    table = pd.DataFrame([["a photo of a cat", "cat"], ["x" * 4001, "dog"]], columns=["prompt", "word"])
    cases = [
        ({"model": "m" * 4001}, "`model` is too long (4001 characters; at most 4000); shorten it."),
        ({"subjects": table}, "`subjects` is too long (4001 characters"),
        ({"subjects": {"data": [["a", "b"], ["c", "x" * 4001]]}}, "`subjects` is too long (4001"),
        ({"presets": ["ok", "p" * 4001]}, "`presets` is too long"),
        ({"gna__window_size": "3, " * 2000}, "`gna__window_size` is too long (6000 characters"),
        (
            {"head_guidance__scale": float("nan")},
            "`head_guidance__scale` must be a finite number, got head_guidance__scale=nan.",
        ),
        ({"dropout": float("inf")}, "`dropout` must be a finite number, got dropout=inf."),
        ({"seed": float("nan"), "randomize_seed": True}, "`seed` must be a finite number, got seed=nan."),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError) as info:
            check_request({"prompt": "a cat", "steps": 2, "randomize_seed": False, **fields})
        assert str(info.value).startswith(message), (str(info.value)[:200], message)
        assert "xxxxxxxxxx" not in str(info.value) and "mmmmmmmmmm" not in str(info.value)  # never echoed
    check_request(
        {"prompt": "y" * 4000, "width": 64, "guidance": 3.5, "flag": True, "table": table.iloc[:1], "none": None}
    )


def test_examples_stay_inside_the_toy_vocabulary():
    """Issue 21: the UI's examples are prompts the built-in toy models can draw (the toy parser accepts every one and
    the IR subjects' words appear in their prompts and in the scene)."""
    from attnpack.toy.data import parse_prompt
    from attnpack.ui import astar, generate, ir_diffusion

    for prompt in [*generate.EXAMPLES, *(p for p, _ in astar.EXAMPLES), ir_diffusion.EXAMPLE_SCENE]:
        assert parse_prompt(prompt).objects, prompt
    for prompt, concepts in astar.EXAMPLES:
        assert all(c.strip() in prompt for c in concepts.split(","))
    for prompt, word, *_ in ir_diffusion.EXAMPLE_SUBJECTS:
        assert parse_prompt(prompt).objects and word in prompt and word in ir_diffusion.EXAMPLE_SCENE


def test_user_errors_log_one_line_and_no_traceback(caplog):
    """Issue 21: a user-input error is one warning line on the server console, not a full traceback per request."""
    import gradio as gr

    from attnpack.ui._runtime import user_errors

    with caplog.at_level("WARNING"), pytest.raises(gr.Error) as info:
        with user_errors():
            raise ValueError("`steps` must be an integer in 1..8 in this UI, got steps=99.\nsecond line")
    assert info.value.print_exception is False and "got steps=99" in info.value.message
    (record,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert record.getMessage() == "Generation refused: `steps` must be an integer in 1..8 in this UI, got steps=99."
    assert record.exc_info is None
