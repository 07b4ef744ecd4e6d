"""The technique registry: option parsing and validation, CLI selection, combined handles."""

import pytest
import torch
from helpers import forward

from attnpack import read_parameters
from attnpack.cli import main
from attnpack.techniques import (
    Option,
    Technique,
    apply_techniques,
    get_technique,
    parse_options,
    parse_technique_specs,
)
from attnpack.toy.tiny import build_tiny_denoiser, denoiser_inputs


TOY = Technique(
    name="toy",
    summary="test-only",
    apply=lambda pipe, **kw: None,
    options=(
        Option("window_size", "ints", 7, minimum=-1),
        Option("scale", "float", 1.0, minimum=0.0, maximum=10.0),
        Option("causal", "bool", False),
        Option("kind", "str", "identity", choices=("identity", "uniform")),
        Option("heads", "strs", None),
        Option("layers", "layers", None),
        Option("weights", "path", None),
    ),
)


def test_parse_options_from_strings_and_values():
    parsed = parse_options(
        TOY,
        {
            "window_size": "13,13",
            "scale": "2.5",
            "causal": "yes",
            "kind": "uniform",
            "heads": "L1H2,L3",
            "layers": "0,blocks.1",
        },
    )
    assert parsed == {
        "window_size": (13, 13),
        "scale": 2.5,
        "causal": True,
        "kind": "uniform",
        "heads": ["L1H2", "L3"],
        "layers": [0, "blocks.1"],
    }
    assert parse_options(TOY, {"window_size": 5, "heads": ["L0H1"]}) == {"window_size": 5, "heads": ["L0H1"]}
    assert parse_options(TOY, {"window_size": "[-1, 8]"})["window_size"] == (-1, 8)
    assert parse_options(TOY, {"weights": "~/w.safetensors"})["weights"].endswith("/w.safetensors")
    assert not parse_options(TOY, {"weights": "~/w.safetensors"})["weights"].startswith("~")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"scale": "11"}, "option `scale`='11' is invalid: must be <= 10.0"),
        ({"kind": "soft"}, "must be one of identity, uniform"),
        ({"causal": "maybe"}, "expected true or false"),
        ({"window": 3}, "has no option 'window'; its options: window_size"),
        ({"window_size": "a,b"}, "option `window_size`"),
        ({"weights": 3}, "expected a file path"),
    ],
)
def test_bad_options_name_technique_option_and_value(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_options(TOY, raw)


def test_unknown_technique():
    with pytest.raises(ValueError, match="Unknown technique 'nope'. Available: .*dense"):
        get_technique("nope")


def test_specs_from_cli_pieces():
    assert parse_technique_specs(["dense"], ["layers=0"]) == [("dense", {"layers": [0]})]
    assert parse_technique_specs(None, None, '[{"name": "dense", "layers": [1]}]') == [("dense", {"layers": [1]})]
    with pytest.raises(ValueError, match="say which technique"):
        parse_technique_specs(["dense", "dense"], ["layers=0"])
    with pytest.raises(ValueError, match="key=value"):
        parse_technique_specs(["dense"], ["layers"])


def test_apply_techniques_dense_and_restore():
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model)
    ref = forward(model, inputs)
    original = model.attn_processors
    with apply_techniques(model, [("dense", {"layers": "single"})]):
        assert sum(type(p).__name__ == "AttnPackProcessor" for p in model.attn_processors.values()) == 2
        torch.testing.assert_close(forward(model, inputs), ref, atol=1e-6, rtol=0)
    assert all(model.attn_processors[k] is original[k] for k in original)


def test_generate_with_technique_records_it(tmp_path):
    out = tmp_path / "t.png"
    assert main(["generate", "-p", "cat", "--steps", "2", "-t", "dense", "--opt", "layers=0", "-o", str(out)]) == 0
    params = read_parameters(out)
    assert params["techniques"] == [{"name": "dense", "layers": [0]}]
    assert params["processors"]["AttnPackProcessor[DenseCore()]"] == 1


def test_generate_bad_technique_option_fails_before_loading(tmp_path, capsys):
    rc = main(["generate", "-p", "cat", "-t", "dense", "--opt", "window=3", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no option 'window'" in err[0]
