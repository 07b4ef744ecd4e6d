"""HeadHunter head search: a planted objective is found, interrupted searches resume identically, objectives, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import attnpack.pipelines.head_search as head_search
from attnpack import read_parameters, search_heads
from attnpack.cli import main
from attnpack.pipelines.guidance import apply_head_perturbation
from attnpack.pipelines.objectives import (
    ClipScore,
    PickScore,
    brightness,
    contrast,
    get_objective,
    saturation,
    sharpness,
)
from attnpack.toy.tiny import build_tiny_pipeline


KW = dict(height=64, width=64, max_sequence_length=32, guidance_scale=1.0)
PAIRS = (["a red cat", "a blue dog"], [0, 1])
PLANTED = "L1H2"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-sd3")


@pytest.fixture(scope="module")
def planted(pipe):
    """An objective rewarding closeness to the images made with head L1H2 perturbed (and nothing else)."""
    with apply_head_perturbation(pipe, PLANTED, scale=3.0):
        targets = {
            prompt: np.asarray(
                pipe(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(seed), **KW).images[0],
                dtype=np.float64,
            )
            for prompt, seed in zip(*PAIRS)
        }

    class Planted:
        __name__ = "planted"

        def __init__(self):
            self.calls = 0

        def __call__(self, images, prompts):
            self.calls += 1
            return [-np.abs(np.asarray(im, dtype=np.float64) - targets[p]).mean() for im, p in zip(images, prompts)]

    return Planted


def _search(pipe, objective, **kwargs):
    args = dict(rounds=1, top_k=1, candidates="L0H1,L1", num_inference_steps=1, pipeline_kwargs=KW, progress=False)
    args.update(kwargs)
    return search_heads(pipe, *PAIRS, objective, **args)


def test_search_finds_the_planted_head(pipe, planted, tmp_path):
    objective = planted()
    result = _search(pipe, objective, output_dir=tmp_path, state_path=tmp_path / "state.json")
    assert result.heads == [PLANTED]
    (report,) = result.rounds
    assert report.scores[PLANTED] == 0.0 and all(s < -1e-3 for h, s in report.scores.items() if h != PLANTED)
    assert sorted(report.scores) == sorted(["L0H1", "L1H0", "L1H1", "L1H2", "L1H3"])
    assert objective.calls == 1 + 5  # baseline + every candidate
    assert (tmp_path / "heads.txt").read_text() == "L1H2\n"
    assert json.loads((tmp_path / "heads.json").read_text())["heads"] == [PLANTED]
    assert "| 1 |" in (tmp_path / "report.md").read_text() and "L1H2 (0)" in (tmp_path / "report.md").read_text()
    sheet = Image.open(tmp_path / "round_00.png")
    assert sheet.size == (150 + 2 * 132, 2 * 132)  # baseline row + one selected head, one column per pair
    assert read_parameters(tmp_path / "round_00.png")["round"] == 1


class _Stop(Exception):
    pass


def test_interrupted_search_resumes_with_the_same_result(pipe, planted, tmp_path):
    full = _search(pipe, planted(), rounds=2)
    assert full.heads[0] == PLANTED and len(full.heads) == 2

    class Interrupted(planted):
        def __call__(self, images, prompts):  # round 1: baseline + 5; round 2: baseline + 1, then "killed"
            if self.calls == 8:
                raise _Stop
            return super().__call__(images, prompts)

    interrupted = Interrupted()
    state = tmp_path / "state.json"
    with pytest.raises(_Stop):
        _search(pipe, interrupted, rounds=2, state_path=state)
    saved = json.loads(state.read_text())
    assert saved["selected"] == [PLANTED] and len(saved["partial"]["scores"]) == 1  # half of round 2 is on disk

    resumed_objective = planted()
    resumed = _search(pipe, resumed_objective, rounds=2, state_path=state)
    assert resumed.heads == full.heads
    assert [r.scores for r in resumed.rounds] == [r.scores for r in full.rounds]
    assert resumed_objective.calls == 3  # only the three candidates left in round 2
    again = planted()
    assert _search(pipe, again, rounds=2, state_path=state).heads == full.heads and again.calls == 0  # finished

    with pytest.raises(ValueError, match="other settings \\(scale differ"):
        _search(pipe, planted(), rounds=2, state_path=state, scale=2.0)


def test_distributed_slices_are_merged_on_resume(pipe, planted, tmp_path, monkeypatch):
    """Process 1 of 2 scores its slice (every other remaining candidate) into its own rank file; a later run merges
    it and scores only the rest, with the same outcome as a single process."""
    full = _search(pipe, planted())

    class SecondOfTwo(head_search._Processes):
        def __init__(self):
            self.index, self.count = 1, 2

        def gather(self, obj):
            raise _Stop  # the other process never arrives: the run is stopped here

        def barrier(self):
            pass  # the start-up barrier: the other process is simulated as having read the state too

    monkeypatch.setattr(head_search, "_Processes", SecondOfTwo)
    state = tmp_path / "state.json"
    rank1 = planted()
    with pytest.raises(_Stop):
        _search(pipe, rank1, state_path=state)
    assert rank1.calls == 2  # candidates 1 and 3 of the 5 (no baseline: that is the main process's job)
    part = json.loads((tmp_path / "state.json.rank1.json").read_text())
    assert sorted(part["scores"]) == ["L1H0", "L1H2"]
    monkeypatch.undo()

    rest = planted()
    merged = _search(pipe, rest, state_path=state)
    assert rest.calls == 1 + 3 and merged.heads == full.heads
    assert merged.rounds[0].scores == full.rounds[0].scores
    assert not (tmp_path / "state.json.rank1.json").exists()  # cleaned up after the round


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("processes", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_torchrun_processes_match_one(tmp_path, processes):
    """The distributed search (2 or 3 processes over gloo, `torchrun`) writes the files of a one-process search: the
    same file names, the same rounds, scores and selected heads (timings aside)."""
    args = ["-m", "tiny-sd3", "-p", "a red cat", "--seeds", "0,1", "--objective", "brightness", "--rounds", "2"]
    args += ["--top-k", "1", "--candidates", "L1", "--steps", "1", "--guidance", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
            "-m",
            "attnpack",
            "search-heads",
            *[a for a in args if a != "--no-progress"],  # progress bars name the process: the work was split
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr
    assert all(f"round 1/2 [{i}]" in two.stderr for i in range(processes)), two.stderr[-2000:]
    assert main(["search-heads", *args, "-o", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "state.json").read_text())
    two = json.loads((tmp_path / "two" / "state.json").read_text())
    assert one["rounds"] == two["rounds"] and one["selected"] == two["selected"]
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))  # no rank slices left


def test_search_argument_errors(pipe):
    with pytest.raises(ValueError, match="paired one to one"):
        search_heads(pipe, ["a", "b"], [0, 1, 2], "brightness")
    with pytest.raises(ValueError, match="`top_k` must be an integer >= 1"):
        search_heads(pipe, "a", 0, "brightness", top_k=0)
    with pytest.raises(ValueError, match="Unknown objective"):
        search_heads(pipe, "a", 0, "aesthetics")
    with pytest.raises(ValueError, match="perturbable layers"):
        search_heads(pipe, "a", 0, "brightness", candidates="L5")


# ------------------------------------------------------------------------------------------------- objectives
def test_image_statistics_against_hand_computed_values():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    gray = Image.new("RGB", (8, 8), (128, 128, 128))
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, 4:] = 255  # left black, right white
    checker = (np.indices((6, 6)).sum(0) % 2).astype(np.float64)[..., None].repeat(3, -1)
    assert brightness([red, gray], None) == pytest.approx([0.299, 128 / 255])
    assert saturation([red, gray, Image.new("RGB", (2, 2), (200, 100, 0))], None) == pytest.approx([1.0, 0.0, 1.0])
    assert contrast([half, gray], None) == pytest.approx([0.5, 0.0])
    # interior Laplacian of a 0/1 checkerboard is +-4, so its variance is 16
    assert sharpness([checker, gray], None) == pytest.approx([16.0, 0.0])
    assert get_objective("-brightness")([red], ["x"]) == pytest.approx([-0.299])
    assert get_objective("brightness") is brightness
    with pytest.raises(ValueError, match="Unknown objective"):
        get_objective("-clip")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Random-weight CLIP + processor saved like a Hub checkpoint (no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attnpack.toy.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=2.0)
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model.eval(), processor


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_pickscore_and_clip_score_match_clip_logits(tiny_clip):
    path, model, processor = tiny_clip
    images, prompts = _images(), ["a red cat", "a dog on the beach", "a photo of a blue house"]
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        logits = model(**inputs).logits_per_image.diag()  # exp(logit_scale) * cosine, per image with its prompt
    scale = model.logit_scale.exp()
    pick = PickScore(str(path), device="cpu")(images, prompts)
    clip = get_objective(f"clip:{path}")(images, prompts)
    assert pick == pytest.approx(logits.tolist(), abs=1e-5)
    assert clip == pytest.approx((100 * (logits / scale).clamp(min=0)).tolist(), abs=1e-4)
    templated = ClipScore(str(path), template="A photo depicts {prompt}", device="cpu")(images, prompts)
    assert templated != pytest.approx(clip, abs=1e-6)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_search_heads_and_resume(tmp_path, capsys):
    args = ["search-heads", "-m", "tiny-sd3", "-p", "a red cat", "--seeds", "0", "--objective=-brightness"]
    args += ["--rounds", "1", "--top-k", "2", "--candidates", "L1H0,L1H3,L0H2", "--steps", "1", "--guidance", "1"]
    args += ["-o", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    heads = capsys.readouterr().out.strip().split(",")
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    scores = state["rounds"][0]["scores"]
    assert heads == sorted(scores, key=lambda h: -scores[h])[:2]  # the two darkest
    assert main(args) == 0 and capsys.readouterr().out.strip().split(",") == heads  # resumed: nothing left to do
    assert main([*args[:-3], "--objective=nonsense", "-o", str(tmp_path / "x")]) == 2
    assert main(["search-heads", "-m", "tiny-sd3", "-o", str(tmp_path / "y")]) == 2  # no prompts


def test_hub_objectives_fail_in_seconds_offline(capsys):
    """Issue 21: offline (the suite sets HF_HUB_OFFLINE=1), the default `pickscore` objective fails at once with the
    fix, instead of retrying the Hub for minutes after the model is loaded."""
    import time

    start = time.perf_counter()
    for name in ("pickscore", "clip", "pickscore:org/not-cached"):
        with pytest.raises(ValueError, match="offline here .*not in the cache: download it"):
            get_objective(name)
    rc = main(["search-heads", "-m", "tiny-sd3", "-p", "a red cat", "--seeds", "0", "-o", "unused"])
    assert rc == 2 and "which is offline here" in capsys.readouterr().err
    assert time.perf_counter() - start < 30


def test_toy_adherence_objective_scores_what_the_evaluator_sees():
    """The `toy-adherence` objective: 1.0 for a clean render of its own caption, less for another scene's caption
    (the evaluator is independent of the objective's averaging)."""
    from PIL import Image

    from attnpack.toy.data import render_scene, sample_scene

    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng, num_objects=1) for _ in range(6)]
    images = [Image.fromarray(render_scene(s)) for s in scenes]
    objective = get_objective("toy-adherence")
    own = objective(images, [s.caption for s in scenes])
    swapped = objective(images, [scenes[(i + 1) % 6].caption for i in range(6)])
    assert np.mean(own) > 0.9 and np.mean(swapped) < np.mean(own) - 0.3
    assert all(0.0 <= v <= 1.0 for v in own + swapped)
