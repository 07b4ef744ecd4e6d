"""Batch inputs: seed ranges, prompt files (.txt / .jsonl / .csv) with per-row overrides, config files, bad rows."""

import json

import pytest

from attnpack import techniques
from attnpack.pipelines.batch import (
    BatchConfig,
    load_config_file,
    parse_seeds,
    read_rows,
    resolve_config,
)
from attnpack.techniques import Option, Technique


TOY = Technique(
    name="toy",
    summary="test-only technique with one option of each common kind",
    apply=lambda pipe, **kw: None,
    options=(
        Option("scale", "float", 1.0, minimum=0.0, maximum=4.0),
        Option("window_size", "ints", 7, minimum=-1),
        Option("layers", "layers", None),
    ),
)


@pytest.fixture(autouse=True)
def toy_technique(monkeypatch):
    """A technique registered the way GNA, CLEAR, ... register themselves: the batch code knows nothing about it."""
    techniques.available_techniques()  # load the built-in ones first
    monkeypatch.setitem(techniques._REGISTRY, "toy", TOY)


def _config(tmp_path, prompts="p.txt", **kw) -> BatchConfig:
    return BatchConfig(prompts=str(tmp_path / prompts), outdir=str(tmp_path / "out"), model="tiny-sd15", **kw)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "spec, seeds",
    [
        ("0-7", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("5", (5,)),
        (" 0, 3 ,10-12", (0, 3, 10, 11, 12)),
        ("2,0-3", (2, 0, 1, 3)),  # order kept, duplicates dropped
        (9, (9,)),
        ([4, 1, 4], (4, 1)),
        (str(2**64 - 1), (2**64 - 1,)),
    ],
)
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize(
    "spec, message",
    [
        ("7-3", "runs backwards; write 3-7"),
        ("a", "must look like 7, 0-7 or 0,3,5-9"),
        ("-1", "must look like"),
        ("1,,2", "must look like"),
        (-1, "must look like"),
        (True, "must look like"),
        ([], "must look like"),
        ("0-99999999", "more than 1000000 seeds"),
        (str(2**64), "seeds must be < 2\\*\\*64"),
    ],
)
def test_bad_seeds(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(spec)


def test_txt_rows_comments_blank_lines_and_line_numbers(tmp_path):
    _write(tmp_path, "p.txt", "# my prompts\na red cat\n\n  a blue dog  \n#a comment\nthe sea\n")
    rows, errors = read_rows(tmp_path / "p.txt", _config(tmp_path, seeds=(0, 1), steps=3))
    assert errors == []
    assert [(r.index, r.line, r.where, r.settings.prompt) for r in rows] == [
        (0, 2, "p.txt:2", "a red cat"),
        (1, 4, "p.txt:4", "a blue dog"),
        (2, 6, "p.txt:6", "the sea"),
    ]
    assert all(r.seeds == (0, 1) and r.settings.steps == 3 and r.techniques == () for r in rows)


def test_jsonl_overrides(tmp_path):
    lines = [
        {"prompt": "a cat", "seed": 3, "size": "48x32", "steps": 1, "guidance": 2},
        {"prompt": "a dog", "seeds": "1-2", "scale": 3, "negative_prompt": "blur"},
        {"prompt": "a dog", "technique": "none", "height": 40, "pipeline_kwargs": {"eta": 0.5}},
        {"prompt": "a bird", "techniques": [{"name": "dense", "layers": [0, 1]}], "frames": 9},
        {"prompt": "a boat", "toy.window_size": [3, 5], "toy.layers": "0,blocks.1"},
        "just a string",
    ]
    _write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    config = _config(
        tmp_path, "p.jsonl", seeds=(0,), techniques=[("toy", {"scale": 2.0})], pipeline_kwargs={"clip_skip": 1}
    )
    rows, errors = read_rows(tmp_path / "p.jsonl", config)
    assert errors == []
    r = {row.index: row for row in rows}
    assert r[0].seeds == (3,) and (r[0].settings.width, r[0].settings.height) == (48, 32)
    assert r[0].settings.steps == 1 and r[0].settings.guidance == 2.0
    assert r[0].techniques == (("toy", {"scale": 2.0}),)  # run-wide technique and options
    assert r[1].seeds == (1, 2) and r[1].settings.negative_prompt == "blur"
    assert r[1].techniques == (("toy", {"scale": 3.0}),)  # a bare option name goes to the technique that has it
    assert r[2].techniques == () and r[2].settings.height == 40 and r[2].settings.width is None
    assert r[2].settings.pipeline_kwargs == {"clip_skip": 1, "eta": 0.5}
    assert r[3].techniques == (("dense", {"layers": [0, 1]}),) and r[3].settings.num_frames == 9
    assert r[4].techniques == (("toy", {"scale": 2.0, "window_size": (3, 5), "layers": [0, "blocks.1"]}),)
    assert r[5].settings.prompt == "just a string" and r[5].seeds == (0,)


def test_csv_rows_quoted_newlines_empty_cells_and_line_numbers(tmp_path):
    _write(
        tmp_path,
        "p.csv",
        "\ufeffprompt,seed,steps,toy.scale,size\n"  # Excel's byte-order mark
        "a red cat,1,2,0.5,\n"
        '"a blue\ndog, running",,,,32x48\n'  # a quoted prompt across two lines
        "\n"
        "the sea,4-5,,,\n",
    )
    config = _config(tmp_path, "p.csv", seeds=(7,), steps=3, techniques=[("toy", {})])
    rows, errors = read_rows(tmp_path / "p.csv", config)
    assert errors == []
    assert [(r.index, r.line) for r in rows] == [(0, 2), (1, 3), (2, 6)]
    assert rows[0].seeds == (1,) and rows[0].settings.steps == 2 and rows[0].techniques == (("toy", {"scale": 0.5}),)
    assert rows[1].settings.prompt == "a blue\ndog, running" and rows[1].seeds == (7,) and rows[1].settings.steps == 3
    assert (rows[1].settings.width, rows[1].settings.height) == (32, 48) and rows[1].techniques == (("toy", {}),)
    assert rows[2].seeds == (4, 5)


def test_bad_rows_are_reported_with_line_numbers_and_keep_their_index(tmp_path):
    _write(
        tmp_path,
        "p.jsonl",
        "\n".join(
            [
                '{"prompt": "fine"}',
                '{"prompt": "broken", ',  # malformed JSON
                "",
                '{"prompt": "x", "sale": 2}',  # unknown option
                '{"prompt": "x", "scale": 9}',  # out of range
                '{"prompt": "x", "steps": 0}',  # out of range
                '{"prompt": "x", "seed": "3-1"}',
                '{"seed": 1}',
                "[1, 2]",
                '{"prompt": "x", "technique": "nope"}',
                '{"prompt": "x", "size": "big"}',
                '{"prompt": "x", "size": 64, "width": 32}',
                '{"prompt": "last"}',
            ]
        ),
    )
    rows, errors = read_rows(tmp_path / "p.jsonl", _config(tmp_path, "p.jsonl", techniques=[("toy", {})]))
    assert [(r.index, r.line) for r in rows] == [(0, 1), (11, 13)]  # names of later rows do not shift
    messages = [str(e) for e in errors]
    expected = [
        "p.jsonl:2: malformed JSON",
        "p.jsonl:4: unknown key 'sale'; row keys are prompt, negative_prompt, seed",
        "p.jsonl:5: technique 'toy': option `scale`=9 is invalid: must be <= 4.0",
        "p.jsonl:6: `steps` must be an integer in 1..1000, got steps=0",
        "p.jsonl:7: `seed` range '3-1' runs backwards",
        "p.jsonl:8: has no `prompt`",
        'p.jsonl:9: must be a JSON object such as {"prompt": "a cat"}, got [1, 2]',
        "p.jsonl:10: Unknown technique 'nope'",
        "p.jsonl:11: `size` must look like 768x512 (width x height) or 512, got 'big'",
        "p.jsonl:12: give either `size` or `height`/`width`, not both",
    ]
    assert len(messages) == len(expected)
    for message, start in zip(messages, expected):
        assert message.startswith(start), (message, start)
    assert messages[1].endswith("technique options: toy: scale, window_size, layers.")


def test_over_long_texts_are_bad_rows(tmp_path):
    """Every text of a row is bounded (4000 characters) before anything tokenizes it; the error names the field."""
    long = "x" * 4001
    rows = [
        {"prompt": long},
        {"prompt": "a", "negative_prompt": long},
        {"prompt": "a", "layers": long},
        {"prompt": "ok"},
    ]
    _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows))
    rows, errors = read_rows(tmp_path / "p.jsonl", _config(tmp_path, "p.jsonl", techniques=[("toy", {})]))
    assert [r.index for r in rows] == [3]
    assert [str(e) for e in errors] == [
        "p.jsonl:1: `prompt` is too long (4001 characters; at most 4000); shorten it.",
        "p.jsonl:2: `negative_prompt` is too long (4001 characters; at most 4000); shorten it.",
        "p.jsonl:3: `toy.layers` is too long (4001 characters; at most 4000); shorten it.",
    ]
    at_limit = "y" * 4000
    _write(tmp_path, "p.txt", at_limit + "\n")
    rows, errors = read_rows(tmp_path / "p.txt", _config(tmp_path))
    assert errors == [] and rows[0].settings.prompt == at_limit
    with pytest.raises(ValueError, match="`negative_prompt` is too long"):  # run-wide: a bad command line
        _config(tmp_path, negative_prompt=long).validate()


def test_bad_csv_rows(tmp_path):
    _write(tmp_path, "p.csv", 'prompt,steps\na cat,2\nextra,2,3\na dog,many\n"ok",\n')
    rows, errors = read_rows(tmp_path / "p.csv", _config(tmp_path, "p.csv"))
    assert [r.line for r in rows] == [2, 5]
    assert [str(e) for e in errors] == [
        "p.csv:3: has 3 fields but the header has 2.",
        "p.csv:4: `steps` must be an integer, got 'many'.",
    ]


@pytest.mark.parametrize("header", ["text,seed", "prompt,,seed", "prompt,seed,seed", ""])
def test_csv_needs_a_prompt_header(tmp_path, header):
    _write(tmp_path, "p.csv", header + "\na,1\n")
    with pytest.raises(ValueError, match="needs a header row .* including `prompt`"):
        read_rows(tmp_path / "p.csv", _config(tmp_path, "p.csv"))


def test_ambiguous_bare_option(tmp_path):
    _write(tmp_path, "p.jsonl", '{"prompt": "x", "layers": 0}\n{"prompt": "x", "dense.layers": 0}\n')
    config = _config(tmp_path, "p.jsonl", techniques=[("toy", {}), ("dense", {})])
    rows, errors = read_rows(tmp_path / "p.jsonl", config)
    assert str(errors[0]) == "p.jsonl:1: option 'layers' belongs to toy and dense; write e.g. toy.layers."
    assert rows[0].techniques == (("toy", {}), ("dense", {"layers": 0}))


def test_yaml_and_json_config_files(tmp_path):
    (tmp_path / "sweep").mkdir()
    _write(tmp_path / "sweep", "p.txt", "a cat\n")
    _write(
        tmp_path / "sweep",
        "c.yaml",
        "model: tiny-sd15\nprompts: p.txt\noutdir: out\nseeds: 0-3\nsteps: 2\nskip-existing: true\n"
        "techniques:\n  - name: toy\n    scale: 2.5\n    window_size: [3, 5]\n"
        "pipeline_kwargs: {eta: 0.5}\n",
    )
    config = resolve_config({}, tmp_path / "sweep" / "c.yaml")
    assert config.prompts == str(tmp_path / "sweep" / "p.txt")  # relative to the config file
    assert config.outdir == str(tmp_path / "sweep" / "out")
    assert config.seeds == (0, 1, 2, 3) and config.steps == 2 and config.skip_existing is True
    assert config.techniques == [("toy", {"scale": 2.5, "window_size": (3, 5)})]
    assert config.pipeline_kwargs == {"eta": 0.5}
    # the command line wins, and techniques given there replace the file's
    cli = {"seeds": "7", "technique": ["dense"], "opt": ["layers=1"], "model": None, "steps": None}
    config = resolve_config(cli, tmp_path / "sweep" / "c.yaml")
    assert config.seeds == (7,) and config.steps == 2 and config.techniques == [("dense", {"layers": [1]})]
    # the same in JSON, with the technique given as name + options
    data = {"model": "tiny-flux", "prompts": "p.txt", "outdir": "o", "technique": "toy", "opt": {"scale": 1.5}}
    _write(tmp_path / "sweep", "c.json", json.dumps(data))
    config = resolve_config({}, tmp_path / "sweep" / "c.json", defaults={"model": "tiny-sd15"})
    assert config.model == "tiny-flux" and config.techniques == [("toy", {"scale": 1.5})]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: tiny-sd15\ncolour: red\n", "unknown option 'colour'; known options: attention_backend"),
        ("model: [unclosed\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping of options"),
        ("prompts: p.txt\noutdir: o\nsteps: many\n", "`steps` must be an integer, got 'many'"),
        ("prompts: p.txt\noutdir: o\nseeds: 3-1\n", "runs backwards"),
        ("prompts: p.txt\noutdir: o\nskip_existing: maybe\n", "`skip_existing` must be true or false"),
        ("prompts: p.txt\noutdir: o\nformat: jpg\n", "`format` must be png, gif or mp4"),
        ("prompts: p.txt\noutdir: o\nsteps: 0\n", r"`steps` must be an integer in 1\.\.1000"),
        ("prompts: p.txt\noutdir: o\ntechnique: nope\n", "Unknown technique 'nope'"),
        ("prompts: p.txt\noutdir: o\noffload: disk\n", "`offload` must be model or sequential, got 'disk'"),
        ("prompts: missing.txt\noutdir: o\n", "`prompts` file '.*missing.txt' does not exist"),
        ("prompts: p.json\noutdir: o\n", "`prompts` must be a .txt, .jsonl, .csv file"),
        ("outdir: o\n", "`--prompts` is required"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    _write(tmp_path, "p.txt", "a cat\n")
    _write(tmp_path, "c.yaml", text)
    with pytest.raises(ValueError, match=message):
        resolve_config({}, tmp_path / "c.yaml", defaults={"model": "tiny-sd15"})


def test_config_file_kinds(tmp_path):
    with pytest.raises(ValueError, match="must be a .yaml, .yml or .json file"):
        load_config_file(_write(tmp_path, "c.toml", "a = 1"))
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "none.yaml")
    assert load_config_file(_write(tmp_path, "empty.yml", "")) == {}
