"""`attnpack batch` on the tiny models: outputs equal stock diffusers calls, overrides, names, metadata, resuming."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import assert_same_image_after_reload
from PIL import Image

from attnpack import apply_processors, read_parameters, set_attention_backend, techniques
from attnpack.cli import main
from attnpack.pipelines.batch import METADATA_FILE, merge_metadata
from attnpack.techniques import Option, Technique
from attnpack.toy.tiny import build_tiny_pipeline


class TemperatureCore:
    """Sharper attention (softmax scale times ``scale``): a toy technique whose effect is easy to reproduce."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, q, k, v, call):
        return call.dense(q, k, v, scale=self.scale / q.shape[-1] ** 0.5)

    def __repr__(self) -> str:
        return f"TemperatureCore({self.scale})"


def apply_temperature(pipe, scale=1.0, layers=None):
    return apply_processors(pipe, TemperatureCore(scale), layers=layers, description="temperature")


TEMPERATURE = Technique(
    name="temperature",
    summary="test-only",
    apply=apply_temperature,
    options=(Option("scale", "float", 1.0, minimum=0.25, maximum=4.0), Option("layers", "layers", None)),
)


@pytest.fixture(autouse=True)
def temperature_technique(monkeypatch):
    """Registered like GNA or CLEAR register themselves; `attnpack batch` knows nothing about it."""
    techniques.available_techniques()
    monkeypatch.setitem(techniques._REGISTRY, "temperature", TEMPERATURE)


@pytest.fixture(scope="module")
def sd15():
    """An independent copy of the built-in tiny SD 1.5 (same weights as `-m tiny-sd15`)."""
    pipe = build_tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock(pipe, prompt, seed, steps=2, **kwargs):
    """The image stock diffusers makes, as uint8 pixels."""
    kwargs = {"height": 64, "width": 64, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pil", **kwargs).images[0]
    return np.asarray(image)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def records(outdir):
    return [json.loads(line) for line in (outdir / METADATA_FILE).read_text().splitlines()]


def run(tmp_path, *argv, prompts=None):
    args = ["batch", "--outdir", str(tmp_path / "out"), *argv]
    if prompts is not None:
        args += ["--prompts", str(prompts)]
    return main(args)


def test_txt_batch_equals_stock_diffusers(tmp_path, sd15, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# two prompts\na red cat\n\na blue dog\n")
    assert run(tmp_path, "-m", "tiny-sd15", "--seeds", "0-1", "--steps", "2", prompts=prompts) == 0
    out = tmp_path / "out"
    names = ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]
    assert sorted(os.listdir(out)) == sorted([*names, METADATA_FILE])  # no temporary or journal files left
    for name, prompt, seed in zip(names, ["a red cat"] * 2 + ["a blue dog"] * 2, [0, 1, 0, 1]):
        np.testing.assert_array_equal(pixels(out / name), stock(sd15, prompt, seed))
    meta = records(out)
    assert [r["file"] for r in meta] == names
    for record, line in zip(meta, [2, 2, 4, 4]):
        embedded = read_parameters(out / record["file"])
        assert "seconds" not in embedded  # timing is in metadata.jsonl only: same settings give the same file
        assert record == {**embedded, "seconds": record["seconds"], "total_seconds": record["total_seconds"],
                          "process": 0}  # fmt: skip
        assert record["seconds"] > 0 and record["total_seconds"] >= record["seconds"]
        assert record["line"] == line and record["source"] == "p.txt" and record["row"] == int(record["file"][:5])
        assert record["model"] == "tiny-sd15" and record["dtype"] == "float32" and record["steps"] == 2
        assert record["revision"] is None and record["techniques"] == [] and record["guidance"] == 7.5
        assert record["versions"]["diffusers"].startswith("0.42") and record["versions"]["attnpack"]
    err = capsys.readouterr().err
    assert "attnpack batch: 4 written, 0 skipped (already done), 0 failed (0 bad rows) of 4 outputs" in err
    assert "s per image" in err


def test_jsonl_overrides_and_bad_rows(tmp_path, sd15, capsys):
    rows = [
        '{"prompt": "a cat", "seed": 3, "size": "48x32", "steps": 1}',
        '{"prompt": "a dog", "seeds": "1-2", "scale": 3}',
        '{"prompt": "a dog", "seed": 1, "technique": "none"}',
        '{"prompt": "broken"',
        '{"prompt": "a cat", "scale": 99}',
        '{"prompt": "a cat", "sclae": 2}',
        '{"prompt": "a cat", "seed": 5, "frames": 3}',  # fails when generating: an image model has no frames
        '{"prompt": "the sea", "temperature.layers": "0,1", "seed": 4}',
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(rows) + "\n")
    rc = run(tmp_path, "-m", "tiny-sd15", "--steps", "2", "-t", "temperature", "--opt", "scale=2", prompts=prompts)
    assert rc == 1  # some rows failed: the batch went on and reports them
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "00000_3.png",
        "00001_1.png",
        "00001_2.png",
        "00002_1.png",
        "00007_4.png",
    ]
    err = capsys.readouterr().err
    for message in (
        "bad row skipped: p.jsonl:4: malformed JSON",
        "bad row skipped: p.jsonl:5: technique 'temperature': option `scale`=99 is invalid: must be <= 4.0",
        "bad row skipped: p.jsonl:6: unknown key 'sclae'",
        "failed: p.jsonl:7 (00006_5.png): ValueError: StableDiffusionPipeline does not take `num_frames`",
        "5 written, 0 skipped (already done), 4 failed (3 bad rows) of 9 outputs",
    ):
        assert message in err
    # size and steps overrides
    first = read_parameters(out / "00000_3.png")
    assert pixels(out / "00000_3.png").shape == (32, 48, 3)
    assert (first["width"], first["height"], first["steps"], first["seed"]) == (48, 32, 1, 3)
    assert first["techniques"] == [{"name": "temperature", "scale": 2.0}]
    # a technique option from the row: the same as applying the technique through the Python API
    for seed in (1, 2):
        with apply_temperature(sd15, scale=3.0):
            expected = stock(sd15, "a dog", seed)
        np.testing.assert_array_equal(pixels(out / f"00001_{seed}.png"), expected)
        assert not np.array_equal(expected, stock(sd15, "a dog", seed))
    assert read_parameters(out / "00001_1.png")["techniques"] == [{"name": "temperature", "scale": 3.0}]
    # technique "none": stock output
    np.testing.assert_array_equal(pixels(out / "00002_1.png"), stock(sd15, "a dog", 1))
    assert read_parameters(out / "00002_1.png")["processors"] == {"AttnProcessor2_0": 8}
    # options merge: run-wide scale=2 plus the row's layers
    params = read_parameters(out / "00007_4.png")
    assert params["techniques"] == [{"name": "temperature", "scale": 2.0, "layers": [0, 1]}]
    assert params["processors"] == {"AttnPackProcessor[TemperatureCore(2.0)]": 2, "AttnProcessor2_0": 6}
    assert [r["file"] for r in records(out)] == sorted(p.name for p in out.glob("*.png"))


def test_over_long_prompt_line_is_a_bad_row(tmp_path, sd15, capsys):
    """A 12 MB prompt line (83 s and 2.8 GB in the tokenizer before it was bounded) is refused as a bad row."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("x" * 12_000_000 + "\na red cat\n")
    assert run(tmp_path, "-m", "tiny-sd15", "--steps", "2", prompts=prompts) == 1  # a bad row: reported, not fatal
    err = capsys.readouterr().err
    assert "bad row skipped: p.txt:1: `prompt` is too long (12000000 characters; at most 4000); shorten it." in err
    assert "1 written, 0 skipped (already done), 1 failed (1 bad row) of 2 outputs" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00001_0.png"]  # the row keeps its index
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "00001_0.png"), stock(sd15, "a red cat", 0))


def test_csv_config_file_and_command_line(tmp_path, sd15):
    (tmp_path / "p.csv").write_text('prompt,seed,temperature.scale\na red cat,0,\n"a blue\ndog",2,1.5\n')
    (tmp_path / "c.yaml").write_text(
        "model: tiny-sd15\nprompts: p.csv\noutdir: out\nsteps: 3\nseeds: 0-1\n"
        "techniques:\n  - name: temperature\n    scale: 2\nattention-backend: _native_math\n"
    )
    assert main(["batch", "--config", str(tmp_path / "c.yaml"), "--steps", "2"]) == 0  # the command line wins
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_0.png", "00001_2.png"]
    # the same as the Python API: technique, then attention backend
    for name, scale, prompt, seed in (("00000_0.png", 2.0, "a red cat", 0), ("00001_2.png", 1.5, "a blue\ndog", 2)):
        with apply_temperature(sd15, scale=scale), set_attention_backend(sd15, "_native_math"):
            np.testing.assert_array_equal(pixels(out / name), stock(sd15, prompt, seed))
        assert read_parameters(out / name)["processors"] == {f"AttnPackProcessor[TemperatureCore({scale})]": 8}
    params = read_parameters(out / "00001_2.png")
    assert params["line"] == 3 and params["steps"] == 2 and params["prompt"] == "a blue\ndog"
    assert params["attention_backend"] == "_native_math"


def test_video_model_writes_gif_named_by_row_and_seed(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert run(tmp_path, "-m", "tiny-wan", "--steps", "2", "--seeds", "3", "--fps", "4", prompts=prompts) == 0
    params = read_parameters(tmp_path / "out" / "00000_3.gif")
    assert params["num_frames"] == 9 and params["fps"] == 4 and params["seed"] == 3
    with Image.open(tmp_path / "out" / "00000_3.gif") as im:
        assert im.n_frames == 9
    assert run(tmp_path, "-m", "tiny-wan", "--format", "png", prompts=prompts) == 2
    assert "`format`='png' does not suit a video model; use gif or mp4" in capsys.readouterr().err


def test_skip_existing_does_only_what_is_missing(tmp_path, sd15, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\nthe sea\n")
    args = ["-m", "tiny-sd15", "--steps", "2", "--seeds", "0-1"]
    assert run(tmp_path, *args, prompts=prompts) == 0
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "00002_1.png").unlink()  # missing: made again
    prompts.write_text("a red cat\na green dog\nthe sea\n")  # row 1 changed: its two files are made again
    capsys.readouterr()
    assert run(tmp_path, *args, "--skip-existing", prompts=prompts) == 0
    err = capsys.readouterr().err
    assert "00001_0.png was made with other settings (prompt); generating it again" in err
    assert "3 written, 3 skipped (already done), 0 failed (0 bad rows) of 6 outputs" in err
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(after) == sorted(before)
    assert [n for n in sorted(after) if after[n] == before.get(n)] == ["00000_0.png", "00000_1.png", "00002_0.png"]
    np.testing.assert_array_equal(pixels(out / "00001_1.png"), stock(sd15, "a green dog", 1))
    meta = records(out)
    assert [r["file"] for r in meta] == sorted(after)  # one record per file, in order
    assert [r["prompt"] for r in meta if r["row"] == 1] == ["a green dog"] * 2
    # a run without --skip-existing makes everything again, still one record per file
    assert run(tmp_path, *args, prompts=prompts) == 0
    assert [r["file"] for r in records(out)] == sorted(after)


def test_skip_existing_remakes_damaged_outputs(tmp_path, sd15, capsys):
    """A finished output cut short afterwards (its parameters, at the start of the PNG, still read) is made again, to
    the same bytes, and reported; an intact one is kept."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\nthe sea\n")
    args = ["-m", "tiny-sd15", "--steps", "2", "--height", "64", "--width", "64"]
    assert run(tmp_path, *args, prompts=prompts) == 0
    out = tmp_path / "out"
    original = {p.name: p.read_bytes() for p in out.glob("*.png")}
    kept = (out / "00002_0.png").stat().st_mtime_ns
    (out / "00000_0.png").write_bytes(original["00000_0.png"][: len(original["00000_0.png"]) // 2])  # cut in half
    (out / "00001_0.png").write_bytes(original["00001_0.png"][:-1])  # one byte short
    assert read_parameters(out / "00000_0.png") == read_parameters(out / "00002_0.png") | {
        "prompt": "a red cat", "file": "00000_0.png", "row": 0, "line": 1
    }  # fmt: skip
    capsys.readouterr()
    assert run(tmp_path, *args, "--skip-existing", prompts=prompts) == 0
    err = capsys.readouterr().err
    assert "00000_0.png is incomplete or damaged: " in err and "00001_0.png is incomplete or damaged: " in err
    assert "2 written, 1 skipped (already done), 2 damaged (made again), 0 failed (0 bad rows) of 3 outputs" in err
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == original  # made again, byte for byte
    assert (out / "00002_0.png").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(pixels(out / "00000_0.png"), stock(sd15, "a red cat", 0))
    assert [r["file"] for r in records(out)] == sorted(original)  # one record per file
    assert sorted(os.listdir(out)) == sorted([*original, METADATA_FILE])


def test_model_is_loaded_only_when_there_is_work(tmp_path, sd15, monkeypatch, capsys):
    """A finished batch of a local (or Hub) model re-runs with --skip-existing without loading its weights."""
    from attnpack.pipelines import batch

    sd15.save_pretrained(tmp_path / "model")
    loads = []
    real_load = batch._load
    monkeypatch.setattr(batch, "_load", lambda *a: loads.append(1) or real_load(*a))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    args = ["-m", str(tmp_path / "model"), "--steps", "2", "--height", "64", "--width", "64", "--skip-existing"]
    assert run(tmp_path, *args, prompts=prompts) == 0 and len(loads) == 1
    # saved and loaded again: equal up to float summation order (helpers.RELOAD_ATOL says why)
    assert_same_image_after_reload(pixels(tmp_path / "out" / "00001_0.png"), stock(sd15, "a blue dog", 0))
    assert run(tmp_path, *args, prompts=prompts) == 0 and len(loads) == 1
    assert "0 written, 2 skipped (already done)" in capsys.readouterr().err
    (tmp_path / "out" / "00000_0.png").unlink()
    assert run(tmp_path, *args, prompts=prompts) == 0 and len(loads) == 2
    assert "1 written, 1 skipped (already done)" in capsys.readouterr().err


def test_merge_metadata_recovers_dedupes_and_orders(tmp_path):
    """The main process's merge: journals of killed runs, torn lines, lost records, deleted files."""
    from attnpack import save_image

    for name in ("00000_2.png", "00000_10.png", "00001_0.png", "00003_0.png"):
        save_image(np.zeros((4, 4, 3)), tmp_path / name, {"file": name, "seed": int(name[6:-4])})
    (tmp_path / METADATA_FILE).write_text(
        json.dumps({"file": "00000_10.png", "seed": 10, "old": True})
        + "\n"
        + json.dumps({"file": "00009_0.png", "seed": 0})  # its file was deleted
        + "\n"
    )
    (tmp_path / ".metadata.0.jsonl.part").write_text(
        json.dumps({"file": "00000_10.png", "seed": 10, "seconds": 1.0})  # newer record of the same file
        + "\n"
        + json.dumps({"file": "00001_0.png", "seed": 0, "seconds": 2.0})
        + '\n{"file": "00003_0.png", "se'  # cut short by a kill
    )
    (tmp_path / ".metadata.1.jsonl.part").write_text(json.dumps({"file": "00000_2.png", "seed": 2}) + "\n")
    expected = ["00000_2.png", "00000_10.png", "00001_0.png", "00003_0.png"]
    assert merge_metadata(tmp_path, expected=expected, drop=["00001_0.png"]) == 3
    assert records(tmp_path) == [
        {"file": "00000_2.png", "seed": 2},
        {"file": "00000_10.png", "seed": 10, "seconds": 1.0},
        {"file": "00003_0.png", "seed": 0, "seconds": None},  # recovered from the embedded parameters
    ]
    assert sorted(os.listdir(tmp_path)) == sorted([*expected, METADATA_FILE])


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "`--prompts` is required"),
        (["--prompts", "p.txt", "-t", "nope"], "Unknown technique 'nope'"),
        (["--prompts", "p.txt", "--seeds", "x"], "`seeds` must look like"),
        (["--prompts", "p.txt", "-t", "dense", "--opt", "layer=1"], "technique 'dense' has no option 'layer'"),
        (["--prompts", "nope.txt"], "`prompts` file 'nope.txt' does not exist"),
        (["--prompts", "p.txt", "--config", "c.yaml"], "does not exist"),
        (["--prompts", "p.txt", "--dtype", "fp8"], "`dtype` must be one of"),
        (["--prompts", "p.txt", "--attention-backend", "warp"], "`attention_backend` must be one of"),
    ],
)
def test_bad_command_lines_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    rc = main(["batch", "-m", "tiny-sd15", "--outdir", "out", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("attnpack batch: error:") and message in err[0]
    assert not (tmp_path / "out").exists()
