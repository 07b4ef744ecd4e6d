"""The `attnpack` command: generate and info on the tiny models; bad inputs give one error line."""

import json
import os
import stat
import subprocess
import sys

import pytest
from PIL import Image

from attnpack import read_parameters
from attnpack.cli import main
from attnpack.toy.tiny import TINY_MODELS


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_generate_each_tiny_model(model, tmp_path, capsys):
    video = model in ("tiny-wan", "tiny-cogvideox")
    out = tmp_path / ("v.gif" if video else "i.png")
    rc = main(
        ["generate", "--model", model, "--prompt", "a red cat", "--seed", "7", "--steps", "2", "--out", str(out)]
    )
    assert rc == 0
    params = read_parameters(out)
    assert params["model"] == model and params["seed"] == 7 and params["steps"] == 2
    assert params["prompt"] == "a red cat"
    assert params["versions"]["attnpack"] and params["versions"]["diffusers"].startswith("0.42")
    assert sum(params["processors"].values()) > 0
    with Image.open(out) as im:
        assert im.size == ((params["width"], params["height"]) if params["width"] else im.size)
        if video:
            assert im.n_frames == TINY_MODELS[model][2]["num_frames"]
    assert os.listdir(tmp_path) == [out.name]  # no temp files left behind


def test_same_seed_same_image(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        seed = "1" if name != "c.png" else "2"
        assert (
            main(
                [
                    "generate",
                    "-m",
                    "tiny-sd15",
                    "-p",
                    "cat",
                    "--seed",
                    seed,
                    "--steps",
                    "2",
                    "-o",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    a, b, c = (Image.open(tmp_path / n).tobytes() for n in ("a.png", "b.png", "c.png"))
    assert a == b and a != c


def test_attention_backend_is_recorded(tmp_path):
    out = tmp_path / "x.png"
    assert (
        main(
            [
                "generate",
                "-m",
                "tiny-sd15",
                "-p",
                "cat",
                "--steps",
                "2",
                "--attention-backend",
                "_native_math",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    params = read_parameters(out)
    assert params["attention_backend"] == "_native_math"
    assert params["processors"] == {"AttnPackProcessor[DenseCore()]": 8}


def test_mp4_output(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "v.mp4"
    assert main(["generate", "-m", "tiny-wan", "-p", "cat", "--steps", "2", "-o", str(out)]) == 0
    assert read_parameters(out)["model"] == "tiny-wan"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "tiny-nope"], "Unknown built-in model 'tiny-nope'"),
        (["--dtype", "fp8"], "`dtype` must be one of"),
        (["--attention-backend", "warp"], "must be one of"),
        (["--steps", "0"], "`steps` must be an integer"),
        (["--guidance", "nan"], "`guidance` must be a finite number in 0..100, got guidance=nan"),
        (["-o", "out.jpg"], "must end with .png"),
        (["-m", "tiny-wan", "-o", "OUT.png"], "must end with .gif or .mp4"),
    ],
)
def test_bad_inputs_one_line_nonzero(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(
        ["generate", "-p", "cat", "--steps", "2", *argv] if "--steps" not in argv else ["generate", "-p", "cat", *argv]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("attnpack generate: error:") and message in err[0]
    assert os.listdir(tmp_path) == []


LONG = "a red cat " * 401  # 4010 characters: over the limit of 4000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "-p", LONG], "`prompt` is too long (4010 characters; at most 4000)"),
        (["generate", "-p", "cat", "--negative-prompt", LONG], "`negative_prompt` is too long (4010 characters"),
        (["generate", "-p", "cat", "-t", "dense", "--opt", f"layers={LONG}"], "`dense.layers` is too long (4010"),
        (["astar", "-p", LONG, "--concepts", "cat"], "`prompt` is too long (4010 characters"),
        (["astar", "-p", "cat", "--concepts", "cat", "--negative-prompt", LONG], "`negative_prompt` is too long"),
        (["ir", "--subjects", "SUBJECTS", "--scene", LONG], "`scene` is too long (4010 characters"),
        (["ir", "--subjects", "SUBJECTS", "--scene", "a cat", "--negative-prompt", LONG], "`negative_prompt` is too"),
        (["ir", "--subjects", "LONG_SUBJECTS", "--scene", "a cat"], "`subjects[0]['prompt']` is too long (4010"),
    ],
)
def test_over_long_text_is_refused_before_loading_a_model(argv, message, tmp_path, capsys, monkeypatch):
    from attnpack.pipelines import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for a refused input"))
    subjects = {"SUBJECTS": ["a photo of a cat", "cat"], "LONG_SUBJECTS": [LONG, "cat"]}
    for name, (prompt, word) in subjects.items():
        (tmp_path / f"{name}.json").write_text(json.dumps([{"prompt": prompt, "word": word}]))
    argv = [str(tmp_path / f"{a}.json") if a in subjects else a for a in argv]
    rc = main([*argv, "-o", str(tmp_path / "x.png")])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[transformers]")]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"attnpack {argv[0]}: error:") and message in err[0], err
    assert "a red cat a red cat" not in err[0]  # the text is not echoed back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LONG_SUBJECTS.json", "SUBJECTS.json"]


def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IREAD | stat.S_IEXEC)
    if os.geteuid() == 0:  # root bypasses permissions: make the access check see what a user would
        import attnpack.io as io_mod

        real_access = os.access
        monkeypatch.setattr(io_mod.os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m))
    try:
        rc = main(["generate", "-p", "cat", "-o", str(locked / "x.png")])
    finally:
        locked.chmod(stat.S_IRWXU)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not writable" in err[0]
    assert os.listdir(locked) == []


def test_missing_output_folder(tmp_path, capsys):
    rc = main(["generate", "-p", "cat", "-o", str(tmp_path / "nope" / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]


def test_failure_during_write_keeps_no_partial_file(tmp_path, monkeypatch, capsys):
    """A crash while encoding the PNG leaves neither the output nor a temp file."""
    from PIL import Image as PILImage

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PILImage.Image, "save", boom)
    rc = main(["generate", "-p", "cat", "--steps", "2", "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "disk full" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["sdpa"]["ok"] is True
    assert set(report["backends"]) == {"sdpa", "flex", "triton", "xformers", "flash", "sage"}


def test_info_lists_the_versions_results_depend_on(capsys):
    """Issue 18: `attnpack info` (and the test-run header) name the resolved version of every package that changes
    what attnpack computes, so dependency drift on a fresh machine is visible."""
    import importlib.metadata

    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("versions: "))
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "gradio",
                 "numpy", "triton"):  # fmt: skip
        assert f"{name} {importlib.metadata.version(name)}" in line


def test_console_entry_point(tmp_path):
    out = tmp_path / "e.png"
    proc = subprocess.run(
        [sys.executable, "-m", "attnpack", "generate", "-p", "cat", "--steps", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert read_parameters(out)["model"] == "toy-flux"  # the default model
    bad = subprocess.run(
        [sys.executable, "-m", "attnpack", "generate", "-p", "cat", "-m", "tiny-x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_sdpa_is_an_alias_of_native(tmp_path):
    """Issue 21 (naming): `attnpack info` lists the backend `sdpa`; the same name is accepted where a backend is chosen."""
    out = tmp_path / "s.png"
    args = ["generate", "-m", "tiny-sd15", "-p", "cat", "--steps", "1", "-t", "dense", "-o", str(out)]
    assert main([*args, "--attention-backend", "sdpa"]) == 0
    params = read_parameters(out)
    assert params["attention_backend"] == "sdpa" and params["processors"] == {"AttnPackProcessor[DenseCore()]": 8}


def test_ui_help_names_every_tab(capsys):
    """Issue 21: `attnpack ui --help` names every tab of the app."""
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for tab in ("Generate", "Head guidance", "IR-Diffusion", "A-STAR", "Benchmarks / Info"):
        assert tab in text
