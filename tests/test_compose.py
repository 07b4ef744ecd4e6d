"""Techniques that compose (issue 19): one attention pattern per layer plus modifiers and observers, order-free.

The oracles are independent of the composition code: a brute-force GNA mask in fp64 (``kernels/*/naive.py``) with
the perturbed rows' chosen heads replaced by hand, and each technique applied alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import RecordingCore, forward
from test_paro_plan import make_plan

import attnpack
from attnpack import read_parameters
from attnpack.attn_processors import apply_processors, list_layers
from attnpack.attn_processors.context import run_overrides
from attnpack.attn_processors.gna import GNAAttnProcessor, apply_gna
from attnpack.attn_processors.head_perturbation import (
    install_head_perturbation,
    perturbable_layers,
)
from attnpack.attn_processors.paro import PARO_KINDS
from attnpack.attn_processors.processor import ComposedCore, in_effect
from attnpack.cli import main
from attnpack.kernels.block_sparse.naive import masked_attention
from attnpack.kernels.neighborhood import normalize_neighborhood_args
from attnpack.kernels.neighborhood.naive import neighborhood_mask
from attnpack.techniques import apply_techniques
from attnpack.toy.tiny import TINY_MODELS, build_tiny_denoiser, build_tiny_pipeline, denoiser_inputs


GRID = (4, 6)


class GNAPerturbedOracle:
    """fp64 attention under the brute-force GNA mask (text rows and keys unrestricted); on the layers in ``heads``,
    batch row ``row`` gets identity attention (its own value) on those heads."""

    def __init__(self, window, heads: dict[str, list[int]], row: int, softness: float = 1.0):
        self.spec = normalize_neighborhood_args(GRID, window, 1, 1, False)
        self.heads, self.row, self.softness = heads, row, softness

    def __call__(self, q, k, v, call):
        lay, s = call.layout, self.spec
        mask = torch.zeros(lay.num_queries, lay.num_keys, dtype=torch.bool)
        if lay.text is not None:
            mask[lay.text, :] = True
        if lay.key_text is not None:
            mask[lay.image, lay.key_text] = True
        mask[lay.image, lay.key_image] = neighborhood_mask(s.grid, s.window, s.stride, s.dilation, s.causal)
        out = masked_attention(q, k, v, mask)
        for h in self.heads.get(call.layer.name, []):
            out[self.row, h] = (1 - self.softness) * out[self.row, h] + self.softness * v[self.row, h].double()
        return out.to(q.dtype)


@pytest.mark.parametrize("softness", [1.0, 0.4])
@pytest.mark.parametrize("gna_first", [True, False])
def test_gna_with_head_perturbation_matches_the_oracle(softness, gna_first):
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, batch_size=2, grid=GRID)
    layers = perturbable_layers(model)
    heads = {layers[0].name: [0], layers[2].name: list(range(layers[2].heads))}
    oracle = GNAPerturbedOracle((3, 3), heads, row=1, softness=softness)
    with apply_processors(model, oracle, kinds=("joint", "single")), run_overrides(roles=("cond", "perturbed")):
        expect = forward(model, inputs)
    install = [
        lambda: apply_gna(model, window_size=3),
        lambda: install_head_perturbation(model, ["L0H0", "L2"], softness=softness),
    ]
    handles = [fn() for fn in (install if gna_first else install[::-1])]
    with run_overrides(roles=("cond", "perturbed")):
        ours = forward(model, inputs)
    with run_overrides(roles=("cond", "cond")):
        unperturbed = forward(model, inputs)
    for h in handles:
        h.remove()
    assert (unperturbed[1] - expect[1]).abs().max() > 1e-3  # the perturbation is in effect: the check can fail
    torch.testing.assert_close(ours, expect, atol=2e-5, rtol=0)
    procs = model.attn_processors
    assert all(not isinstance(p, attnpack.AttnPackProcessor) for p in procs.values())  # all restored


def _state(model):
    return {k: (type(p).__name__, repr(getattr(p, "core", None))) for k, p in model.attn_processors.items()}


def test_apply_remove_algebra():
    """A then B equals B then A; removing either leaves what the other gives alone; any removal order restores."""
    model = build_tiny_denoiser("flux")
    inputs = denoiser_inputs(model, batch_size=2, grid=GRID)
    original = dict(model.attn_processors)
    gna = lambda: apply_gna(model, window_size=3)  # noqa: E731
    ptb = lambda: install_head_perturbation(model, "L0,L2H1")  # noqa: E731

    def out():
        with run_overrides(roles=("cond", "perturbed")):
            return forward(model, inputs)

    alone = {}
    for name, fn in (("gna", gna), ("ptb", ptb)):
        with fn():
            alone[name] = (_state(model), out())
    both = []
    for order in ((gna, ptb), (ptb, gna)):
        a, b = (fn() for fn in order)
        both.append((_state(model), out()))
        a.remove()  # the first applied goes first: the second remains alone
        assert _state(model) == alone["ptb" if order[0] is gna else "gna"][0]
        assert torch.equal(out(), alone["ptb" if order[0] is gna else "gna"][1])
        b.remove()
        assert all(model.attn_processors[k] is original[k] for k in original)
    assert both[0][0] == both[1][0] and torch.equal(both[0][1], both[1][1])
    assert not torch.equal(both[0][1], alone["gna"][1]) and not torch.equal(both[0][1], alone["ptb"][1])
    with gna(), ptb():  # the type says the pattern, the core says everything that runs
        composed = dict(model.attn_processors)
        mixed = [p for p in composed.values() if isinstance(p.core, ComposedCore)]
        assert mixed and all(isinstance(p, GNAAttnProcessor) for p in mixed)
        assert "GNACore" in repr(mixed[0].core) and "HeadPerturbationCore" in repr(mixed[0].core)
        assert set(in_effect(model)) == {"gna", "gna + head-guidance"}
    # removal in the other order (last applied first) restores too
    a, b = gna(), ptb()
    b.remove()
    assert _state(model) == alone["gna"][0]
    a.remove()
    assert all(model.attn_processors[k] is original[k] for k in original)


def test_two_patterns_on_one_layer_are_an_error_naming_both():
    model = build_tiny_denoiser("flux")
    original = dict(model.attn_processors)
    with apply_gna(model, window_size=3, layers=[0, 1]):
        with pytest.raises(ValueError, match=r"'clear' cannot be installed: its layers already run gna on 2 of them "):
            attnpack.apply_clear(model, radius=1)
        with pytest.raises(ValueError, match="'dense' cannot be installed: .*gna on 2 of them"):
            attnpack.techniques.get_technique("dense").apply(model)
        with pytest.raises(ValueError, match="'gna' cannot be installed: .*gna on 1"):
            apply_gna(model, window_size=5, layers=[1])
        with apply_gna(model, window_size=5, layers=[2]):  # disjoint layers compose
            pass
    assert all(model.attn_processors[k] is original[k] for k in original)  # the failed calls installed nothing


@pytest.mark.parametrize(
    "apply, message",
    [
        (lambda m: apply_gna(m, window_size=3, layers=[]), "'gna' selects no attention layer"),
        (lambda m: apply_processors(m, RecordingCore(), layers=[]), "selects no attention layer"),
        (lambda m: apply_gna(m, window_size=3, dense_layers=".*"), "'gna' leaves no attention layer"),
        (lambda m: attnpack.techniques.get_technique("dense").apply(m, layers=[]), "'dense' selects no attention"),
        (lambda m: apply_gna(m, window_size=3, layers="nothing-matches"), "`layers` entry 'nothing-matches'"),
    ],
)
def test_empty_selection_is_an_error(apply, message):
    model = build_tiny_denoiser("flux")
    original = dict(model.attn_processors)
    with pytest.raises(ValueError, match=message):
        apply(model)
    assert all(model.attn_processors[k] is original[k] for k in original)


# ------------------------------------------------------------------------------------------------- pipelines
KWARGS = dict(TINY_MODELS["tiny-flux"][2])
HEADS = {"name": "head-guidance", "heads": ["L0", "L2H1"], "scale": 3.0}


def _paro_plan(pipe):
    model = pipe.transformer
    layers = tuple(i.name for i in list_layers(model) if i.kind in PARO_KINDS)
    return make_plan(
        model,
        grid=(4, 4),
        text_len=32,
        layers=layers,
        heads=2,
        family="flux",
        seed=1,
        block_size=4,
        num_inference_steps=2,
        timestep_buckets=1,
    )


PATTERNS = {
    "gna": {"window_size": 3},
    "clear": {"radius": 1},
    "dense": {},
    "paro": {"density": 0.5, "quant": "none"},
}


@pytest.fixture(scope="module")
def flux():
    return build_tiny_pipeline("tiny-flux")


def _image(pipe):
    gen = torch.Generator("cpu").manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, generator=gen, output_type="np", **KWARGS).images[0]


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_and_head_guidance_compose_in_either_order(flux, pattern, tmp_path):
    options = dict(PATTERNS[pattern])
    if pattern == "paro":
        options["plan"] = str(_paro_plan(flux).save(tmp_path / "plan.safetensors"))
    specs = [(pattern, options), ("head-guidance", {k: v for k, v in HEADS.items() if k != "name"})]
    images, effects = [], []
    for order in (specs, specs[::-1]):
        with apply_techniques(flux, order) as handle:
            images.append(_image(flux))
            effects.append(handle.parameters()["in_effect"])
    with apply_techniques(flux, specs[:1]):
        pattern_alone = _image(flux)
    with apply_techniques(flux, specs[1:]):
        guidance_alone = _image(flux)
    np.testing.assert_array_equal(images[0], images[1])  # bit for bit on the CPU
    assert effects[0] == effects[1] and f"{pattern} + head-guidance" in effects[0]
    assert np.abs(images[0] - pattern_alone).max() > 1e-3  # the guidance is in effect
    if pattern != "dense":  # dense is stock attention: with it the guidance alone is the same picture
        assert np.abs(images[0] - guidance_alone).max() > 1e-3  # and so is the pattern
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in flux.transformer.attn_processors.values())


def test_two_patterns_are_refused_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from attnpack.pipelines import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "x.png"
    args = ["generate", "-m", "tiny-flux", "-p", "cat", "-o", str(out), "-t", "gna", "-t", "clear"]
    assert main([*args, "--opt", "gna.window_size=3"]) == 2
    err = capsys.readouterr().err
    assert "'gna' and 'clear' both compute the attention of every layer" in err and not out.exists()


def test_cli_records_both_techniques_in_effect(tmp_path):
    out = tmp_path / "x.png"
    common = ["generate", "-m", "tiny-flux", "-p", "a red cat", "--steps", "2", "--seed", "3"]
    opts = ["--opt", "gna.window_size=3", "--opt", "head-guidance.heads=L0,L2H1", "--opt", "head-guidance.scale=3"]
    assert main([*common, "-o", str(out), "-t", "gna", "-t", "head-guidance", *opts]) == 0
    swapped = tmp_path / "y.png"
    assert main([*common, "-o", str(swapped), "-t", "head-guidance", "-t", "gna", *opts]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(swapped)))
    params = read_parameters(out)
    assert [t["name"] for t in params["techniques"]] == ["gna", "head-guidance"]
    effect = params["in_effect"]
    assert set(effect) == {"gna", "gna + head-guidance"} and effect["gna + head-guidance"]["layers"] == 2
    assert "HeadPerturbationCore" in effect["gna + head-guidance"]["core"]


def test_batch_row_with_two_techniques(tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a red cat", "techniques": [{"name": "gna", "window_size": 3}, HEADS]},
        {"prompt": "a red cat", "techniques": [HEADS, {"name": "gna", "window_size": 3}]},
    ]
    prompts.write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert main(["batch", "-m", "tiny-flux", "--prompts", str(prompts), "--outdir", str(out), "--steps", "2"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[1])))
    assert "gna + head-guidance" in read_parameters(files[0])["in_effect"]


def test_ir_diffusion_refuses_head_guidance_before_any_work(monkeypatch):
    """The one pair that does not compose (both define the batch's rows): a clear error, not a silent no-op."""
    from attnpack.pipelines.ir_diffusion import IRDiffusionPipeline

    pipe = IRDiffusionPipeline.from_pipe(build_tiny_pipeline("tiny-sdxl"))
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1))
    subjects = [{"prompt": "a photo of a red cat", "word": "cat"}, {"prompt": "a photo of a blue dog", "word": "dog"}]
    with attnpack.apply_head_perturbation(pipe, heads="L0", scale=2.0):
        with pytest.raises(ValueError, match="IR-Diffusion does not compose with head guidance"):
            pipe(subjects, "a cat and a dog", height=64, width=64, num_inference_steps=2)
    assert calls == []  # refused before the first denoiser call
