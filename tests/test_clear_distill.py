"""CLEAR distillation on tiny FLUX: the objective, a falling loss on a fixed batch, the CLI end to end, resume."""

from __future__ import annotations

import copy
import json
import logging
import sys

import numpy as np
import pytest
import torch
from helpers import plant_pickle
from PIL import Image

import attnpack
from attnpack.attn_processors.clear_weights import clear_parameter_names
from attnpack.cli import main
from attnpack.pipelines.clear_distill import (
    ClearDistillConfig,
    ClearDistiller,
    attention_loss_layers,
    distill_clear,
    find_image_prompts,
)
from attnpack.toy.tiny import build_tiny_pipeline, tiny_flux_transformer


def _distiller(radius, down_factor, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_tiny_pipeline("tiny-flux")
    teacher = pipe.transformer
    student = copy.deepcopy(teacher)
    handle = attnpack.apply_clear(student, radius=radius, down_factor=down_factor)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    vae = pipe.vae.config
    return ClearDistiller(student, handle.clear.pooling, teacher, scheduler, vae.shift_factor, vae.scaling_factor,
                          attn_loss_every=2, **kw), handle  # fmt: skip


def _cached(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return {
        "mean": torch.randn(batch, 4, 8, 8, generator=g),
        "std": torch.rand(batch, 4, 8, 8, generator=g) * 0.1,
        "prompt_embeds": torch.randn(batch, 8, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, 32, generator=g),
    }


def test_attention_loss_layers_are_the_official_ones():
    """distill.py: ``'single' in name and idx % 4 == 0`` over all 57 processors -> single blocks 1, 5, ..., 37."""
    flux_dev_shape = tiny_flux_transformer(num_layers=19, num_single_layers=38)
    names = attention_loss_layers(flux_dev_shape, 4)
    assert names == [f"single_transformer_blocks.{i}.attn" for i in range(1, 38, 4)] and len(names) == 10
    with pytest.raises(ValueError, match="attn_loss_every=4"):
        attention_loss_layers(tiny_flux_transformer(), 4)  # 1 double + 2 single: indices 1, 2


def test_neutral_student_matches_teacher_and_flow_matching_target():
    """With a window covering the image the student is the teacher: L_pred = L_attn = 0 and L_fm is the teacher's
    flow-matching loss, computed here from the packed latents directly."""
    from diffusers import FluxPipeline

    dist, handle = _distiller(radius=20, down_factor=1)
    batch = dist.make_batch(_cached(), torch.Generator().manual_seed(1), "cpu", torch.float32)
    losses = {k: v.detach() for k, v in dist.losses(batch).items()}
    assert float(losses["pred"]) < 1e-10 and float(losses["attn"]) < 1e-10
    x0, e, s = batch["x0"], batch["noise"], batch["sigmas"].view(-1, 1, 1, 1)
    assert torch.all((s > 0) & (s <= 1)) and torch.allclose(batch["timesteps"], 1000 * batch["sigmas"])
    pack = lambda x: FluxPipeline._pack_latents(x, 2, 4, 8, 8)  # noqa: E731
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    with torch.no_grad():
        v = dist.teacher(hidden_states=pack((1 - s) * x0 + s * e), timestep=batch["timesteps"] / 1000,
                         pooled_projections=batch["pooled_prompt_embeds"], encoder_hidden_states=batch["prompt_embeds"],
                         txt_ids=torch.zeros(8, 3), img_ids=ids.view(16, 3), return_dict=False)[0]  # fmt: skip
    assert float(losses["fm"]) == pytest.approx(float(torch.mean((v - pack(e - x0)) ** 2)), rel=1e-5)
    dist.close()
    handle.remove()


@pytest.mark.parametrize("fm_weight", [1.0, 0.0])
def test_loss_falls_on_a_fixed_batch(fm_weight):
    dist, handle = _distiller(radius=2, down_factor=2, fm_weight=fm_weight)
    frozen = {n: p.detach().clone() for n, p in dist.student.named_parameters() if not p.requires_grad}
    trainable = set(clear_parameter_names(dist.student))
    assert trainable and not trainable & set(frozen)
    batch = dist.make_batch(_cached(), torch.Generator().manual_seed(1), "cpu", torch.float32)
    opt = torch.optim.AdamW(dist.trainable_parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        losses = dist.losses(batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    if fm_weight == 0.0:  # pure distillation: the student learns to imitate the teacher's outputs
        assert history[-1]["pred"] < 0.5 * history[0]["pred"] and history[-1]["attn"] < 0.5 * history[0]["attn"]
    # only the CLEAR weights moved (and the pooling weights, which started at 1/d^2)
    assert all(torch.equal(p, frozen[n]) for n, p in dist.student.named_parameters() if n in frozen)
    assert any(not torch.equal(w, torch.full_like(w, 0.25)) for w in handle.clear.pooling.weights)
    dist.close()
    handle.remove()


def _image_folder(path, n=3):
    path.mkdir()
    for i, prompt in enumerate(["a red circle", "a blue square", "a cat"][:n]):
        pixels = (np.random.RandomState(i).rand(80, 72, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(path / f"img{i}.png")
        (path / f"img{i}.txt").write_text(prompt)
    return path


def _cli(data, out, steps, *extra, rc=0):
    args = ["distill-clear", "-m", "tiny-flux", "--data", str(data), "-o", str(out), "--resolution", "64",
            "--max-sequence-length", "16", "--steps", str(steps), "--checkpoint-every", "3", "--optimizer", "adamw",
            "--lr", "1e-3", "--attn-loss-every", "2", "--radius", "2", "--down-factor", "2", "--batch-size", "2",
            "--save-dtype", "fp32", *extra]  # fmt: skip
    assert main(args) == rc


def test_cli_end_to_end_reload_and_resume(tmp_path):
    from safetensors import safe_open

    data = _image_folder(tmp_path / "data")
    _cli(data, tmp_path / "a", 3)
    weights = tmp_path / "a" / "clear_local_2_down_2.safetensors"
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["attn"] > 0 for r in log)
    # official key format, reloadable through apply_clear
    model = tiny_flux_transformer()
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["radius"] == "2" and f.metadata()["down_factor"] == "2"
    layers = [k[: -len(".processor")] for k in model.attn_processors]
    assert keys == set(clear_parameter_names(model)) | {f"{n}.processor.spatial_weight" for n in layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with attnpack.apply_clear(model, radius=2, down_factor=2, weights=weights) as handle:
        assert handle.clear.report.missing == []
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == set(clear_parameter_names(model))
    # resume: 3 more steps in the same folder continue from the checkpoint and equal 6 steps in one go
    _cli(data, tmp_path / "a", 6)
    _cli(data, tmp_path / "b", 6)
    with (
        safe_open(str(weights), framework="pt") as fa,
        safe_open(str(tmp_path / "b" / "clear_local_2_down_2.safetensors"), framework="pt") as fb,
    ):
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in keys)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "step-0000003.safetensors",
        "step-0000006.safetensors",
    ]
    # changed settings refuse to resume
    with pytest.raises(ValueError, match="settings changed .*resolution"):
        distill_clear(ClearDistillConfig(model="tiny-flux", output_dir=str(tmp_path / "a"), data=str(data),
                                         radius=2, down_factor=2, resolution=128, max_sequence_length=16, steps=7,
                                         optimizer="adamw", attn_loss_every=2), show_progress=False)  # fmt: skip


def test_planted_pickle_checkpoint_is_never_loaded(tmp_path, capsys, caplog):
    """A pickle ``step-*.pt`` in the output folder (earlier versions' format, or planted) is never unpickled: alone it
    stops the command before any model work with an error naming it; after --no-resume it is ignored (logged)."""
    data = _image_folder(tmp_path / "data", n=2)
    out, marker = tmp_path / "o", tmp_path / "code-ran"
    planted = plant_pickle(out / "checkpoints" / "step-0000005.pt", marker)
    _cli(data, out, 1, rc=2)
    err = capsys.readouterr().err
    assert f"{str(planted)!r} is a checkpoint in the pickle format" in err and "no longer reads it" in err
    assert not marker.exists() and not (out / "cache").exists()  # refused before loading or caching anything
    _cli(data, out, 1, "--no-resume")  # starts over; writes step-0000001.safetensors
    with caplog.at_level(logging.WARNING, logger="attnpack.pipelines.clear_distill"):
        _cli(data, out, 2)  # resumes from the safetensors checkpoint
    assert "ignoring 1 pickle checkpoints" in caplog.text and "step-0000005.pt" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 2 continued step 1 instead of starting over
    assert not marker.exists() and planted.is_file()


def test_teacher_samples_then_distillation(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na cat\n")
    args = ["--steps", "1", "--num-samples", "3", "--sample-steps", "2", "--radius", "3", "--down-factor", "1"]
    _cli_args = ["distill-clear", "-m", "tiny-flux", "--prompts", str(prompts), "-o", str(tmp_path / "o"),
                 "--resolution", "64", "--max-sequence-length", "16", "--optimizer", "adamw", "--attn-loss-every",
                 "2", *args]  # fmt: skip
    assert main(_cli_args) == 0
    items = find_image_prompts(tmp_path / "o" / "samples")
    assert [p for _, p in items] == ["a red circle", "a cat", "a red circle"]
    assert attnpack.read_parameters(items[1][0])["prompt"] == "a cat"
    assert (tmp_path / "o" / "clear_local_3.safetensors").is_file()


def test_errors(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "x.png")
    with pytest.raises(ValueError, match="has no prompt file: add x.txt"):
        find_image_prompts(data)
    with pytest.raises(ValueError, match="exactly one of `data`"):
        ClearDistillConfig(data=str(data), prompts=str(data / "p.txt")).validate()
    with pytest.raises(ValueError, match="multiple of 16 x down_factor = 64"):
        ClearDistillConfig(data=str(data), resolution=1000, down_factor=4).validate()
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # not installed
    (data / "x.txt").write_text("a cat")
    rc = main(["distill-clear", "--data", str(data), "-o", str(tmp_path / "o"), "-m", "tiny-flux"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install attnpack[distill]" in err
    # issue 21: an attn_loss_every that fits no layer is refused right after loading, before any sampling or caching
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "o2"
    args = ["distill-clear", "--prompts", str(prompts), "-o", str(out), "-m", "tiny-flux", "--optimizer", "adamw"]
    assert main([*args, "--resolution", "64"]) == 2
    assert "choose `attn_loss_every` among [1, 2]" in capsys.readouterr().err
    assert not (out / "samples").exists() and not (out / "cache").exists()


@pytest.mark.slow
def test_two_process_data_parallel_run(tmp_path):
    """Two processes (gloo DDP on CPU, as `accelerate launch` would start them): sharded cache, one log, one file."""
    import os
    import shutil
    import subprocess

    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    args = [shutil.which("torchrun") or "torchrun", "--nproc_per_node", "2", "-m", "attnpack", "distill-clear",
            "-m", "tiny-flux", "--data", str(data), "-o", str(out), "--resolution", "64", "--max-sequence-length", "16",
            "--steps", "3", "--optimizer", "adamw", "--attn-loss-every", "2", "--radius", "2", "--down-factor", "2",
            "--gradient-checkpointing"]  # fmt: skip
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert len(list((out / "cache").glob("*.safetensors"))) == 3
    with attnpack.apply_clear(tiny_flux_transformer(), 2, 2, weights=out / "clear_local_2_down_2.safetensors") as h:
        assert h.clear.report.missing == []


def test_built_in_models_distill_at_their_own_size(tmp_path):
    """Issue 21: without --resolution a built-in model samples and trains at its own size (64 px for tiny-flux), not
    at FLUX.1's 1024 px; real checkpoints keep 1024."""
    import json

    from PIL import Image

    from attnpack.pipelines.loading import builtin_defaults

    assert builtin_defaults("tiny-flux")["height"] == 64 and builtin_defaults("black-forest-labs/FLUX.1-dev") == {}
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "o"
    args = ["distill-clear", "-m", "tiny-flux", "--prompts", str(prompts), "-o", str(out), "--steps", "1",
            "--sample-steps", "2", "--optimizer", "adamw", "--attn-loss-every", "2", "--max-sequence-length", "16",
            "--radius", "2"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["resolution"] == 64
    (sample,) = sorted((out / "samples").glob("*.png"))
    assert Image.open(sample).size == (64, 64)
