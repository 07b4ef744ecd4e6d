"""Bad CLEAR weights, PARO plans and training checkpoints: every one is a single ``ValueError`` naming the file.

Each case writes one damaged file where its reader looks for it and checks that the user gets one plain
``ValueError`` (no chained exception, no ``SafetensorError`` / ``KeyError`` / ``ZeroDivisionError`` / JSON or
Unicode error) whose message names the file, that a planted pickle never ran, and that nothing was installed or
written: the pipeline keeps its processors and weights, a training run writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import plant_pickle
from safetensors import safe_open
from safetensors.torch import save_file
from test_clear import official_checkpoint
from test_paro_plan import make_plan

import attnpack
from attnpack.attn_processors import list_layers
from attnpack.attn_processors.paro import PARO_KINDS
from attnpack.io import save_state
from attnpack.pipelines.clear_distill import CHECKPOINT_KIND as DISTILL_KIND
from attnpack.pipelines.clear_distill import ClearDistillConfig, distill_clear
from attnpack.pipelines.clear_distill.checkpoints import _read_resume_checkpoint
from attnpack.toy.tiny import build_tiny_pipeline
from attnpack.toy.train import CHECKPOINT_KIND as TOY_KIND
from attnpack.toy.train import _read_checkpoint, default_config, train


# ------------------------------------------------------------------------------------------------- targets
@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-flux")


@dataclasses.dataclass
class Target:
    """Where a reader looks for its file, a good file's tensors and metadata, and the call that reads it."""

    name: str
    where: Callable[[Path], Path]  # tmp_path -> the file's path
    good: Callable[[object], tuple[dict, dict]]  # pipe -> (tensors, metadata)
    run: Callable[[object, Path, Path, dict], object]  # (pipe, tmp_path, file, options)
    wrote: Callable[[Path], list[Path]] = lambda tmp: []  # outputs a failed run must not have written


def _clear_good(pipe):
    return official_checkpoint(pipe.transformer, down_factor=2), {"format": "clear", "radius": "2"}


def _paro_good(pipe):
    layers = tuple(i.name for i in list_layers(pipe.transformer) if i.kind in PARO_KINDS)
    plan = make_plan(pipe.transformer, grid=(6, 8), text_len=8, layers=layers, heads=2, family="flux")
    return _state_of(lambda path: plan.save(path))


def _state_of(write) -> tuple[dict, dict]:
    """Tensors and metadata of the file ``write(path)`` writes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        write(path)
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def _distill_cfg(tmp: Path) -> ClearDistillConfig:
    return ClearDistillConfig(model="tiny-flux", output_dir=str(tmp / "out"), data=str(tmp / "data"), radius=2,
                              down_factor=2, resolution=64, steps=6, optimizer="adamw")  # fmt: skip


def _distill_good(pipe):
    cfg = dataclasses.asdict(_distill_cfg(Path("/nonexistent")))
    state = {"step": 5, "trainable": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"step": torch.tensor(5.0)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}, "config": cfg}  # fmt: skip
    return _state_of(lambda path: save_state(path, state, DISTILL_KIND))


def _distill(tmp: Path):
    (tmp / "data").mkdir(exist_ok=True)
    return distill_clear(_distill_cfg(tmp), show_progress=False)


TOY_CFG = dataclasses.replace(default_config("evaluator"), steps=2, batch_size=2, warmup_steps=1)


def _toy_good(pipe):
    state = {"step": 1, "config": TOY_CFG.to_dict(), "network": {"w": torch.zeros(2)}, "ema": None,
             "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 1}, "seconds": 0.5,
             "losses": [0.25]}  # fmt: skip
    return _state_of(lambda path: save_state(path, state, TOY_KIND))


TARGETS = {
    "clear": Target(
        "clear",
        lambda tmp: tmp / "clear.safetensors",
        _clear_good,
        lambda pipe, tmp, path, opt: attnpack.apply_clear(pipe, radius=2, down_factor=opt.get("d", 2), weights=path),
    ),
    "paro": Target(
        "paro",
        lambda tmp: tmp / "plan.safetensors",
        _paro_good,
        lambda pipe, tmp, path, opt: attnpack.apply_paro(pipe, path),
    ),
    "distill": Target(
        "distill",
        lambda tmp: tmp / "out" / "checkpoints" / "step-0000005.safetensors",
        _distill_good,
        lambda pipe, tmp, path, opt: _distill(tmp),
        lambda tmp: [tmp / "out" / "config.json", tmp / "out" / "cache"],
    ),
    "toy": Target(
        "toy",
        lambda tmp: tmp / "evaluator.ckpt" / "checkpoint.safetensors",
        _toy_good,
        lambda pipe, tmp, path, opt: train("evaluator", tmp, config=TOY_CFG, progress=False),
        lambda tmp: [tmp / "evaluator"],
    ),
}


# ------------------------------------------------------------------------------------------------- file makers
def _header_file(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _save(path: Path, tensors: dict, metadata: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _good_bytes(path: Path, good) -> bytes:
    _save(path, *good)
    return path.read_bytes()


def truncated(path, good, tmp):
    path.write_bytes(_good_bytes(path, good)[:-7])


def truncated_header(path, good, tmp):
    path.write_bytes(_good_bytes(path, good)[:40])


def empty(path, good, tmp):
    path.write_bytes(b"")


def pickle_renamed(path, good, tmp):
    plant_pickle(path, tmp / "code-ran")


def raw_pickle(path, good, tmp):
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=2))


def text_file(path, good, tmp):
    path.write_text("these are not the weights you are looking for\n")


def lying_offsets(path, good, tmp):  # a header whose tensor runs 6400 bytes past a 64-byte body
    _header_file(path, json.dumps({"w": {"dtype": "F32", "shape": [40, 40], "data_offsets": [0, 6400]}}).encode(),
                 b"\0" * 64)  # fmt: skip


def huge_header_length(path, good, tmp):
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")


def header_not_json(path, good, tmp):
    _header_file(path, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', b"\0" * 4)


def unknown_dtype(path, good, tmp):
    _header_file(path, json.dumps({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4)


def non_utf8_metadata(path, good, tmp):
    header = b'{"__metadata__": {"format": "\xff\xfe"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    _header_file(path, header, b"\0" * 4)


def directory(path, good, tmp):
    path.mkdir()


def link_to_passwd(path, good, tmp):
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd here")
    os.symlink("/etc/passwd", path)


def dangling_link(path, good, tmp):
    os.symlink(tmp / "gone.safetensors", path)


GENERIC = [truncated, truncated_header, empty, pickle_renamed, raw_pickle, text_file, lying_offsets,
           huge_header_length, header_not_json, unknown_dtype, non_utf8_metadata, directory, link_to_passwd,
           dangling_link]  # fmt: skip


def edit(tensors: Callable | None = None, **metadata):
    """A maker that saves the good file with ``tensors(dict)`` applied and metadata entries replaced (``None``:
    removed)."""

    def make(path, good, tmp):
        t, m = {k: v.clone() for k, v in good[0].items()}, dict(good[1])
        if tensors is not None:
            t = tensors(t)
        for key, value in metadata.items():
            if value is None:
                m.pop(key, None)
            else:
                m[key] = value
        _save(path, t, m)

    return make


def _first(t, pattern):
    return next(k for k in sorted(t) if pattern in k)


def set_item(pattern, value):
    """Replace the first tensor whose key contains ``pattern`` by ``value(old)`` (``None``: drop it)."""

    def change(t):
        key = _first(t, pattern)
        new = value(t[key])
        if new is None:
            del t[key]
        else:
            t[key] = new
        return t

    return change


def with_nan(x):
    x = x.float().clone()
    x.view(-1)[0] = math.nan
    return x


def with_inf(x):
    x = x.float().clone()
    x.view(-1)[-1] = math.inf
    return x


def add_tensor(name, value):
    return lambda t: {**t, name: value}


def edit_state(change):
    """A maker editing the JSON state of a training checkpoint."""

    def make(path, good, tmp):
        state = json.loads(good[1]["state"])
        change(state)
        _save(path, good[0], {**good[1], "state": json.dumps(state)})

    return make


def legacy_pickle(name):
    def make(path, good, tmp):
        plant_pickle(path.with_name(name), tmp / "code-ran")
        return path.with_name(name)

    return make


# (target, maker, words the message must hold, options)
SPECIFIC = [
    # CLEAR weights: the file is readable but its tensors are not CLEAR weights for this model
    ("clear", edit(set_item(".attn.to_q.weight", lambda x: x.to(torch.int32))), "not floating point", {}),
    ("clear", edit(set_item(".attn.to_k.weight", with_nan)), "NaN or infinite", {}),
    ("clear", edit(set_item(".attn.to_out.0.bias", with_inf)), "NaN or infinite", {}),
    (
        "clear",
        edit(set_item("spatial_weight", lambda x: torch.rand(1, 1, 1, 2, 1, 3, 1))),
        re.compile(r"wrong shape: .*spatial_weight \[1, 1, 1, 2, 1, 3, 1\].* must be \[1, 1, 1, 2, 1, 2, 1\]"),
        {},
    ),
    ("clear", edit(set_item("spatial_weight", lambda x: torch.rand(4))), "spatial_weight [4]", {}),
    (
        "clear",
        edit(lambda t: {k: torch.rand(1, 1, 1, 3, 1, 3, 1) if "spatial" in k else v for k, v in t.items()}),
        "pooling weights for d=[3], but down_factor=2",
        {},
    ),
    ("clear", edit(), "trained with down_factor=2; pass down_factor=2", {"d": 1}),
    ("clear", edit(set_item(".attn.to_v.weight", lambda x: x[:, :-1])), "different model size", {}),
    ("clear", edit(add_tensor("transformer_blocks.0.attn.to_evil.weight", torch.ones(2))), "keys this FLUX", {}),
    ("clear", edit(lambda t: {}), "holds no CLEAR attention weights", {"d": 1}),
    ("clear", legacy_pickle("clear.pt"), "must be a .safetensors file", {}),
    # PARO plans: metadata that does not parse or does not make a plan
    ("paro", edit(block_size="0"), "block_size must be an int >= 1, got 0", {}),
    ("paro", edit(block_size="-4"), "block_size must be an int >= 1, got -4", {}),
    ("paro", edit(block_size="4.5"), "metadata block_size='4.5' is not an int", {}),
    ("paro", edit(density="abc"), "metadata density='abc' is not a finite number", {}),
    ("paro", edit(density="nan"), "metadata density='nan' is not a finite number", {}),
    ("paro", edit(alpha="inf"), "metadata alpha='inf' is not a finite number", {}),
    ("paro", edit(densities="[0.3, NaN]"), "densities must be strictly increasing", {}),
    ("paro", edit(grid="[6, 0]"), "grid must be 2 or 3 positive sizes", {}),
    ("paro", edit(grid="six by eight"), "metadata grid='six by eight' is not a JSON list of ints", {}),
    ("paro", edit(text_first='"yes"'), "text_first='\"yes\"' is not true or false", {}),
    ("paro", edit(text_len="-1"), "text_len must be an int >= 0", {}),
    ("paro", edit(heads="0"), "heads must be an int >= 1", {}),
    ("paro", edit(mask_bits="3"), "mask_bits=3 cannot hold", {}),
    ("paro", edit(quant='"int7"'), "quant must be one of", {}),
    ("paro", edit(layers="[1, 2]"), "layers='[1, 2]' is not a list of names", {}),
    ("paro", edit(info="{oops"), "metadata info='{oops' is not a JSON object", {}),
    ("paro", edit(layers=None), "lacks the metadata entry 'layers'", {}),
    ("paro", edit(version="x"), "metadata version='x' is not an int", {}),
    ("paro", edit(version="99"), "format version 99", {}),
    ("paro", edit(format=None), "is not an attnpack PARO plan", {}),
    ("paro", edit(set_item("orders", lambda x: None)), "lacks the tensor 'orders'", {}),
    (
        "paro",
        edit(set_item("masks", lambda x: x.float())),
        "tensor 'masks' is torch.float32, a plan stores it as uint8",
        {},
    ),
    ("paro", edit(set_item("orders", lambda x: x.float())), "tensor 'orders' is torch.float32", {}),
    ("paro", edit(set_item("masks", lambda x: x[:, :, :-1])), "masks must be packed rows", {}),
    ("paro", edit(add_tensor("order_metrics", torch.full((4, 2, 2, 2), math.inf))), "order_metrics' holds NaN", {}),
    ("paro", edit(add_tensor("evil", torch.ones(1))), "holds tensors a plan does not have: evil", {}),
    # training checkpoints: safetensors + JSON that is not a checkpoint of this kind
    (
        "distill",
        edit(format="attnpack.toy_train_checkpoint"),
        "is not of kind 'attnpack.clear_distill_checkpoint'",
        {},
    ),
    ("distill", edit(state="{not json"), "'state' metadata is not JSON", {}),
    ("distill", edit(state=None), "'state' metadata is not JSON", {}),
    ("distill", edit(version="99"), "format version '99'", {}),
    ("distill", edit_state(lambda s: s.update(step="5")), "'step' should be int, found str", {}),
    ("distill", edit_state(lambda s: s.pop("config")), "'config' should be dict, found nothing", {}),
    ("distill", edit_state(lambda s: s["trainable"].update(w={"__tensor__": "nope"})), "bad entry", {}),
    ("distill", edit_state(lambda s: s.update(config={"__tuple__": 5})), "bad entry", {}),
    ("distill", edit(add_tensor("stray", torch.ones(1))), "holds tensors its state does not use (stray)", {}),
    ("distill", legacy_pickle("step-0000005.pt"), "is a checkpoint in the pickle format", {}),
    ("toy", edit(set_item("network", lambda x: None)), "bad entry", {}),
    ("toy", edit_state(lambda s: s.update(losses={"a": 1})), "'losses' should be list, found dict", {}),
    ("toy", edit_state(lambda s: s.update(ema=3)), "'ema' should be dict or None, found int", {}),
    ("toy", edit_state(lambda s: s.update(step=True)), "'step' should be int, found bool", {}),
    ("toy", legacy_pickle("checkpoint.pt"), "is a checkpoint in the pickle format", {}),
]

GENERIC_WORDS = {
    truncated: "its size does not match the tensor data its header lists",
    truncated_header: "it ends inside its header",
    empty: "the file is empty",
    pickle_renamed: "looks like a pickle",
    raw_pickle: "looks like a pickle",
    text_file: "it is another kind of file",
    lying_offsets: "offsets past the end of the file",
    huge_header_length: "not a valid safetensors file",
    header_not_json: "invalid JSON",
    unknown_dtype: "not a valid safetensors file",
    non_utf8_metadata: "invalid UTF-8",
    directory: "is not a regular file",
    link_to_passwd: "(a link to '/etc/passwd') is not a valid safetensors file",
    dangling_link: "does not exist",
}

CASES = [
    pytest.param(target, maker, GENERIC_WORDS[maker], {}, id=f"{target}-{maker.__name__}")
    for target in TARGETS
    for maker in GENERIC
] + [
    pytest.param(target, maker, words, opt, id=f"{target}-{i:02d}-" + re.sub(r"\W+", "-", str(words)[:32]).strip("-"))
    for i, (target, maker, words, opt) in enumerate(SPECIFIC)
]


def _snapshot(pipe):
    model = pipe.transformer
    return dict(model.attn_processors), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("target, maker, words, opt", CASES)
def test_bad_file_is_one_clean_value_error(target, maker, words, opt, pipe, tmp_path):
    spec = TARGETS[target]
    path = spec.where(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path = maker(path, spec.good(pipe), tmp_path) or path
    processors, weights = _snapshot(pipe)

    with pytest.raises(Exception) as info:
        spec.run(pipe, tmp_path, path, opt)
    exc = info.value
    assert type(exc) is ValueError, f"{type(exc).__name__}: {exc}"  # not a subclass such as JSONDecodeError
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    message = str(exc)
    assert repr(str(path)) in message, message
    assert words.search(message) if isinstance(words, re.Pattern) else words in message, message
    assert not (tmp_path / "code-ran").exists()  # a planted pickle never ran

    # nothing happened: the pipeline keeps its processors and weights, training wrote nothing
    now_processors, now_weights = _snapshot(pipe)
    assert all(now_processors[k] is v for k, v in processors.items())
    assert all(torch.equal(now_weights[k], v) for k, v in weights.items())
    assert not [p for p in spec.wrote(tmp_path) if p.exists()]


@pytest.mark.parametrize("target", list(TARGETS))
def test_the_good_files_are_accepted(target, pipe, tmp_path):
    """The files the cases damage are good: unchanged, each target reads them (proves the cases test the damage)."""
    spec = TARGETS[target]
    path = spec.where(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, *spec.good(pipe))
    if target in ("clear", "paro"):
        spec.run(pipe, tmp_path, path, {}).remove()
    elif target == "distill":  # the synthetic checkpoints pass every file check (they fit no model)
        assert _read_resume_checkpoint(path.parent, _distill_cfg(tmp_path))[1]["step"] == 5
    else:
        assert _read_checkpoint(path.parent, TOY_CFG)["losses"] == [0.25]


def test_the_planted_pickle_runs_code_when_unpickled(tmp_path):
    """The planted file really is dangerous: unpickled, it creates the marker the cases check for."""
    path = plant_pickle(tmp_path / "x.pt", tmp_path / "code-ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "code-ran").exists()


def test_there_are_enough_cases():
    assert len(CASES) >= 30
