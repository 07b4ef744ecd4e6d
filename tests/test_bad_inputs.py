"""Bad inputs, table by table (issue 20): each gives one clean error naming the cause, no traceback, no output.

Weight, plan and checkpoint files have their own table (``tests/test_bad_files.py``); the UI's raw API is driven with
NaN / infinite numbers and over-long texts on every tab in ``tests/test_ui.py``. ``docs/reliability.md`` adds them up.
"""

from __future__ import annotations

import json
import math

import pytest

import attnpack
from attnpack.cli import main
from attnpack.pipelines import loading
from attnpack.pipelines._batch_input import BatchConfig, read_rows, resolve_config
from attnpack.pipelines.generation import GenerationSettings
from attnpack.toy.tiny import build_tiny_denoiser


LONG = "a red cat " * 401  # 4010 characters: over the 4000-character limit
TRACEBACK_WORDS = ("Traceback", "KeyError", "AttributeError", "ZeroDivisionError", "object has no attribute")


@pytest.fixture(autouse=True)
def _fresh_logging(monkeypatch):
    """`main()` calls logging.basicConfig, which binds the first test's (then closed) captured stderr."""
    import logging

    monkeypatch.setattr(logging.root, "handlers", [])


# transformers warns once per process (torchvision missing) on its first image processor: let that happen here, not
# inside a test whose stderr is captured and checked
build_tiny_denoiser("flux")
__import__("attnpack.toy.tiny", fromlist=["x"]).build_tiny_pipeline("tiny-flux")


def _one_clean_line(err: str, command: str) -> str:
    """The error line; argparse's own errors (an option's JSON, a missing value) come after its usage line, and
    transformers may warn on first import: neither is a traceback."""
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("[transformers]", "usage:", "  "))]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"attnpack {command}: error:"), lines[0]
    assert not any(word in lines[0] for word in TRACEBACK_WORDS), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------- CLI: generate
# (arguments, words of the error): all refused before the model is loaded
GENERATE_BEFORE_LOAD = [
    (["--guidance", "nan"], "`guidance` must be a finite number"),
    (["--guidance", "inf"], "`guidance` must be a finite number"),
    (["--guidance=-inf"], "`guidance` must be a finite number"),
    (["--guidance", "1e308"], "`guidance` must be a number in 0..100"),
    (["--guidance=-1"], "`guidance` must be a number in"),
    (["--seed=-1"], "`seed` must be an integer in 0..18446744073709551615"),
    (["--seed", "18446744073709551616"], "`seed` must be an integer in"),
    (["--seed", "9" * 400], "`seed` must be an integer in"),  # too large for a float: no OverflowError
    (["--steps", "0"], "`steps` must be an integer in 1..1000"),
    (["--steps=-3"], "`steps` must be an integer in 1..1000"),
    (["--steps", "1001"], "`steps` must be an integer in 1..1000"),
    (["--height", "7"], "`height` must be an integer in 8..16384"),
    (["--width", "16385"], "`width` must be an integer in 8..16384"),
    (["--frames", "0"], "`num_frames` must be an integer in"),
    (["--fps", "0"], "`--fps` must be an integer in 1..240"),
    (["--fps=-5"], "`--fps` must be an integer in 1..240"),
    (["-p", ""], "`prompt` must be a non-empty string"),
    (["-p", "   "], "`prompt` must be a non-empty string"),
    (["-p", LONG], "`prompt` is too long (4010 characters; at most 4000)"),
    (["--negative-prompt", LONG], "`negative_prompt` is too long"),
    (["-o", "x.jpg"], "must end with .png"),
    (["-o", "/proc/g.png"], "`--out` folder '/proc' is not writable"),
    (["-o", "no/such/dir/x.png"], "does not exist; create it first"),
    (["--pipeline-kwargs", "[1]"], "must be a JSON object"),
    (["--pipeline-kwargs", "{bad"], "not valid JSON"),
    (["--pipeline-kwargs", '{"generator": 5}'], "must not set `generator`: use `seed` / --seed"),
    (["--pipeline-kwargs", '{"num_images_per_prompt": 0}'], "must not set `num_images_per_prompt`"),
    (["--pipeline-kwargs", '{"num_images_per_prompt": 2}'], "must not set `num_images_per_prompt`"),
    (["--pipeline-kwargs", '{"num_inference_steps": -3}'], "use `steps` / --steps instead"),
    (["--pipeline-kwargs", '{"output_type": "latent"}'], "must not set `output_type`"),
    (["--pipeline-kwargs", '{"eta": NaN}'], "`pipeline_kwargs.eta` must be a finite number"),
    (["--pipeline-kwargs", '{"a": {"b": [1, Infinity]}}'], "`pipeline_kwargs.a.b[1]` must be a finite number"),
    (["-t", "nope"], "Unknown technique 'nope'"),
    (["-t", "gna", "-t", "clear"], "'gna' and 'clear' both compute the attention of every layer"),
    (["-t", "gna", "-t", "gna"], "technique 'gna' is given twice"),
    (["-t", "gna", "--opt", "window_size=abc"], "option `window_size`='abc' is invalid"),
    (["-t", "gna", "--opt", "window_size"], "`--opt` must look like key=value"),
    (["-t", "gna", "--opt", "nope=1"], "technique 'gna' has no option 'nope'"),
    (["-t", "gna", "-t", "head-guidance", "--opt", "scale=1"], "say which technique it is for"),
    (["-t", "head-guidance", "--opt", "scale=nan"], "option `scale`='nan' is invalid: must be a finite number"),
    (["-t", "head-guidance", "--opt", "scale=inf"], "option `scale`='inf' is invalid"),
    (["-t", "head-guidance", "--opt", "scale=1e308"], "option `scale`='1e308' is invalid: must be <= 100.0"),
    (["-t", "head-guidance", "--opt", "scale=-1"], "option `scale`='-1' is invalid: must be >= 0.0"),
    (["-t", "head-guidance", "--opt", "softness=2"], "option `softness`='2' is invalid: must be <= 1.0"),
    (["-t", "head-guidance", "--opt", "kind=blur"], "option `kind`='blur' is invalid: must be one of"),
    (["-t", "clear", "--opt", "radius=nan"], "option `radius`='nan' is invalid"),
    (["-t", "paro", "--opt", "density=nan"], "option `density`='nan' is invalid"),
    (["--techniques", "[bad"], "`--techniques` is not valid JSON"),
    (["--techniques", '[{"name": {"a": 1}}]'], 'must be a JSON list of objects with a "name" string'),
    (["--techniques", "5"], 'must be a JSON list of objects with a "name" string'),
    (["--techniques", '[{"name": "gna", "window_size": "x"}]'], "option `window_size`='x' is invalid"),
    (["--attention-backend", "warp"], "`--attention-backend` must be one of"),
]


@pytest.mark.parametrize("argv, words", GENERATE_BEFORE_LOAD, ids=range(len(GENERATE_BEFORE_LOAD)))
def test_generate_refuses_before_loading(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["generate", "-p", "cat", "--steps", "1"]
    try:
        rc = main([*base, *argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    line = _one_clean_line(capsys.readouterr().err, "generate")
    assert rc == 2 and words in line
    assert list(tmp_path.iterdir()) == []


def _model_folder(tmp_path, index):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    return str(folder)


# refused after the (tiny) model is loaded, before any sampling
GENERATE_AT_LOAD = [
    (["-m", "tiny-nope"], "Unknown built-in model 'tiny-nope'"),
    (["--dtype", "fp8"], "`dtype` must be one of"),
    (["-m", "./no/such/dir"], "is neither a built-in model"),
    (["-m", lambda t: _model_folder(t, "{}")], "does not name a pipeline class (`_class_name`)"),
    (["-m", lambda t: _model_folder(t, "[1, 2]")], "does not name a pipeline class"),
    (["-m", lambda t: _model_folder(t, "{bad json")], "is not a readable JSON file"),
    (["-m", lambda t: _model_folder(t, "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"))], "JSON"),
    (["-m", "tiny-flux", "--pipeline-kwargs", '{"nope": 1}'], "`pipeline_kwargs` 'nope' not taken by FluxPipeline"),
    (["-m", "tiny-flux", "-t", "gna", "--opt", "window_size=3", "--opt", "layers=[]"], "'gna' selects no attention"),
    (
        ["-m", "tiny-flux", "-t", "gna", "--opt", "window_size=3", "--opt", "layers=nothing"],
        "`layers` entry 'nothing'",
    ),
    (["-m", "tiny-flux", "-t", "dense", "--opt", "layers=99"], "`layers` index 99 is out of range"),
    (["-m", "tiny-flux", "-t", "head-guidance", "--opt", "heads=L99"], "`heads` names layer 99"),
    (["-m", "tiny-flux", "-t", "head-guidance", "--opt", "heads=L0H99"], "`heads` names head 99 of layer 0"),
    (["-m", "tiny-flux", "-t", "head-guidance", "--opt", "heads=x"], "`heads` entry 'x' is not a head"),
    (["-m", "tiny-flux", "-t", "clear", "--opt", "radius=100000"], "`radius` must be an integer in 1..4096"),
    (["-m", "tiny-sd15", "-t", "clear"], "CLEAR supports FLUX.1 transformers"),
    (["-m", "tiny-flux", "-t", "paro"], "`plan`"),
    (["-m", "tiny-flux", "-t", "paro", "--opt", "plan=missing.safetensors"], "missing.safetensors"),
    (["-m", "tiny-flux", "-t", "clear", "--opt", "weights=missing.safetensors"], "missing.safetensors"),
    (["-m", "tiny-flux", "-t", "gna", "--opt", "window_size=0"], "window_size"),
    (["-m", "tiny-flux", "-t", "dense", "-t", "gna", "--opt", "gna.window_size=3"], "both compute the attention"),
]


@pytest.mark.parametrize("argv, words", GENERATE_AT_LOAD, ids=range(len(GENERATE_AT_LOAD)))
def test_generate_refuses_before_sampling(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    before = {p.name for p in tmp_path.iterdir()}
    rc = main(["generate", "-p", "cat", "--steps", "1", "-o", "x.png", *argv])
    line = _one_clean_line(capsys.readouterr().err, "generate")
    assert rc == 2 and words in line
    assert {p.name for p in tmp_path.iterdir()} == before  # no output written


# ------------------------------------------------------------------------------------------------- batch rows
ROWS = [
    ('{"prompt": ""}', "`prompt` must be a non-empty string"),
    ('{"prompt": 5}', "prompt"),
    ('{"prompt": "a cat", "guidance": 1e999}', "`guidance` must be a finite number"),
    ('{"prompt": "a cat", "guidance": NaN}', "`guidance` must be a finite number"),
    ('{"prompt": "a cat", "guidance": -Infinity}', "`guidance` must be a finite number"),
    ('{"prompt": "a cat", "steps": -3}', "`steps` must be an integer in 1..1000"),
    ('{"prompt": "a cat", "steps": 2.5}', "steps"),
    ('{"prompt": "a cat", "seed": -1}', "seed"),
    ('{"prompt": "a cat", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "a cat", "height": 7}', "`height` must be an integer in 8..16384"),
    ('{"prompt": "a cat", "techniques": "[bad"}', "not valid JSON"),
    ('{"prompt": "a cat", "techniques": [{"name": "nope"}]}', "Unknown technique 'nope'"),
    ('{"prompt": "a cat", "techniques": [{"name": {"a": 1}}]}', '"name" string'),
    ('{"prompt": "a cat", "technique": "gna", "opt": [1, 2]}', "unknown key 'opt'"),
    ('{"prompt": "a cat", "technique": 5}', "`technique` must be a name"),
    ('{"prompt": "a cat", "technique": "head-guidance", "heads": "L0", "scale": "nan"}', "must be a finite number"),
    ('{"prompt": "a cat", "technique": "gna,clear"}', "both compute the attention of every layer"),
    ('{"prompt": "a cat", "pipeline_kwargs": {"generator": 5}}', "must not set `generator`"),
    ('{"prompt": "a cat", "pipeline_kwargs": {"num_images_per_prompt": 2}}', "num_images_per_prompt"),
    ('{"prompt": "a cat", "pipeline_kwargs": [1]}', "pipeline_kwargs"),
    (json.dumps({"prompt": LONG}), "`prompt` is too long"),
    (json.dumps({"prompt": "a cat", "negative_prompt": LONG}), "`negative_prompt` is too long"),
    ("{bad json", "malformed JSON"),
    ("[1, 2]", "must be a JSON object"),
    (b'{"prompt": "a \xff cat"}', "not valid UTF-8 text (byte 0xff)"),
]


@pytest.mark.parametrize("row, words", ROWS, ids=range(len(ROWS)))
def test_bad_batch_rows_are_reported_not_run(row, words, tmp_path):
    path = tmp_path / "p.jsonl"
    good = b'{"prompt": "a good row"}\n'
    path.write_bytes(good + (row if isinstance(row, bytes) else row.encode()) + b"\n" + good)
    rows, errors = read_rows(path, BatchConfig(model="tiny-sd15", prompts=str(path), outdir=str(tmp_path / "out")))
    assert [r.index for r in rows] == [0, 2]  # the bad row keeps its index; the others still run
    assert len(errors) == 1 and errors[0].where == "p.jsonl:2" and words in errors[0].message
    assert not any(word in errors[0].message for word in TRACEBACK_WORDS)


def test_a_batch_of_bad_rows_writes_only_the_good_outputs(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    lines = [r if isinstance(r, bytes) else r.encode() for r, _ in ROWS]
    path.write_bytes(b"\n".join([b'{"prompt": "a good row"}', *lines]) + b"\n")
    out = tmp_path / "out"
    rc = main(["batch", "-m", "tiny-sd15", "--prompts", str(path), "--outdir", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{len(ROWS)} bad row" in err and "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_0.png"]
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 1 and all(math.isfinite(r["guidance"] or 0) for r in records)  # valid JSON, no NaN


# ------------------------------------------------------------------------------------------------- config files
CONFIGS = [
    ("steps: 0\n", "`steps` must be an integer in 1..1000"),
    ("fps: 0\n", "`fps` must be an integer in 1..240"),
    ("guidance: .nan\n", "`guidance` must be a finite number"),
    ("guidance: .inf\n", "`guidance` must be a finite number"),
    ("techniques: '[bad'\n", "not valid JSON"),
    ("techniques: [{name: {a: 1}}]\n", '"name" string'),
    ("technique: 5\n", "`technique` must be a name or a list of names"),
    ("technique: gna\nopt: 3\n", "`opt` must be key=value strings or a mapping"),
    ("technique: gna\nopt: [1, 2]\n", "`--opt` must be a list of key=value strings"),
    ("technique: [gna, clear]\n", "both compute the attention of every layer"),
    ("nope: 1\n", "unknown option 'nope'"),
    ("pipeline_kwargs: {generator: 5}\n", "must not set `generator`"),
    ("negative_prompt: " + LONG + "\n", "`negative_prompt` is too long"),
    ("- 1\n- 2\n", "config"),
    ("steps: [\n", "config"),
]


@pytest.mark.parametrize("text, words", CONFIGS, ids=range(len(CONFIGS)))
def test_bad_config_files(text, words, tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: tiny-sd15\nprompts: p.txt\noutdir: o\n" + text if not text.startswith(("-", "steps: [")) else text
    )
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ValueError) as info:
        resolve_config({}, config).validate()
    assert words in str(info.value) and not any(w in str(info.value) for w in TRACEBACK_WORDS)


# ------------------------------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def flux():
    return build_tiny_denoiser("flux")


API = [
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", scale=float("nan")), "`scale` must be a finite"),
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", scale=float("inf")), "`scale` must be a finite"),
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", scale=1e308), "`scale` must be a number in"),
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", softness=float("nan")), "`softness`"),
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", start=float("nan")), "`start` must be a finite"),
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", adaptive_scale=-1.0), "`adaptive_scale`"),
    (lambda m: attnpack.apply_head_perturbation(m, heads=[]), "`heads` is empty"),
    (lambda m: attnpack.apply_head_perturbation(m, heads="L0", kind="blur"), "`kind` must be one of"),
    (lambda m: attnpack.apply_clear(m, radius=0), "`radius` must be an integer in 1..4096"),
    (lambda m: attnpack.apply_clear(m, radius=100000), "`radius` must be an integer in 1..4096"),
    (lambda m: attnpack.apply_clear(m, radius=float("nan")), "`radius` must be an integer"),
    (lambda m: attnpack.apply_clear(m, down_factor=10**6), "`down_factor` must be an integer in 1..64"),
    (lambda m: attnpack.apply_gna(m, window_size=3, layers=[]), "'gna' selects no attention layer"),
    (lambda m: attnpack.apply_gna(m, window_size=3, dense_layers=".*"), "'gna' leaves no attention layer"),
    (lambda m: attnpack.apply_gna(m, window_size=3, layers="zzz"), "`layers` entry 'zzz' matches no"),
    (lambda m: attnpack.apply_gna(m, window_size=3, layers=[True]), "`layers` items must be names"),
    (lambda m: attnpack.apply_processors(m, "not a core"), "`core_or_factory` must be an attention core"),
    (lambda m: attnpack.apply_techniques(m, [("nope", {})]), "Unknown technique 'nope'"),
    (lambda m: attnpack.apply_techniques(m, [("gna", {}), ("clear", {})]), "both compute the attention"),
    (lambda m: attnpack.apply_techniques(m, [("gna", {"window_size": 3})], "warp"), "`attention_backend` must be"),
    (lambda m: attnpack.set_attention_backend(m, "warp"), "`backend` must be one of"),
    (lambda m: attnpack.ParoPlan.load("missing.safetensors"), "missing.safetensors"),
    (lambda m: GenerationSettings("a cat", guidance=float("nan")).validate(), "`guidance` must be a finite"),
    (lambda m: GenerationSettings("a cat", seed=2**64).validate(), "`seed` must be an integer in"),
    (lambda m: GenerationSettings("a cat", seed=1.5).validate(), "`seed` must be an integer"),
    (lambda m: GenerationSettings("a cat", steps=True).validate(), "`steps` must be an integer"),
    (lambda m: GenerationSettings("a cat", pipeline_kwargs={"generator": 5}).validate(), "must not set"),
    (lambda m: GenerationSettings("a cat", pipeline_kwargs={1: 2}).validate(), "named arguments"),
    (lambda m: attnpack.load_pipeline("tiny-flux", dtype="fp8"), "`dtype` must be one of"),
    (lambda m: attnpack.load_pipeline("tiny-flux", device="tpu"), "`device` must be"),
    (lambda m: attnpack.save_video([], "x.gif", fps=0), "`fps` must be an integer in 1..240"),
]


@pytest.mark.parametrize("call, words", API, ids=range(len(API)))
def test_api_errors_name_the_argument(call, words, flux, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = dict(flux.attn_processors)
    with pytest.raises((ValueError, TypeError)) as info:
        call(flux)
    assert words in str(info.value), str(info.value)
    assert all(flux.attn_processors[k] is original[k] for k in original)  # nothing left installed
    assert list(tmp_path.iterdir()) == []


def test_the_tables_cover_at_least_150_bad_inputs():
    from test_bad_files import CASES as FILE_CASES

    total = len(GENERATE_BEFORE_LOAD) + len(GENERATE_AT_LOAD) + len(ROWS) + len(CONFIGS) + len(API) + len(FILE_CASES)
    assert total >= 150, total
