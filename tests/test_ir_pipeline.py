"""IRDiffusionPipeline end to end on the tiny SDXL (random weights: the images are noise, the plumbing is real)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnpack.attn_processors import ir_diffusion as isolation
from attnpack.pipelines import ir_diffusion
from attnpack.pipelines.ir_diffusion import IRDiffusionPipeline
from attnpack.pipelines.ir_masks import box_mask
from attnpack.toy.tiny import build_tiny_pipeline


SIZE, STEPS = 128, 2  # 128 px -> 16x16 latent -> 8x8 attention grid on the tiny UNet
SUBJECTS = [
    {"prompt": "a photo of a red cat", "word": "cat"},
    {"prompt": "a photo of a blue dog", "word": "dog"},
]
SCENE = "a cat and a dog on a beach"
TARGET_BOXES = [(0, 16, 64, 128), (64, 0, 128, 96)]
REFERENCE_BOXES = [(32, 32, 96, 96), (16, 0, 112, 128)]
SMALL_BOXES = [(0, 0, 32, 64), (32, 0, 64, 64)]  # target boxes for 64 px runs


@pytest.fixture(scope="module")
def base():
    return build_tiny_pipeline("tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(base):
    return IRDiffusionPipeline.from_pipe(base)


def vanilla(base, prompt, seed, size=SIZE, steps=STEPS, guidance=7.0):
    generator = torch.Generator("cpu").manual_seed(seed)
    return base(
        prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="np",
    ).images[0]


def observed_run(pipe, monkeypatch, **kwargs):
    """Run the pipeline with an observer on the IR state; returns (output, records, state)."""
    records, states = [], []

    def observer(kind, call, q, k, v, out, info):
        records.append(dict(kind=kind, layer=call.layer.name, step=call.run.step_index, q=q, out=out, **info))

    def factory(**options):
        state = isolation.IRAttnState(observer=observer, **options)
        states.append(state)
        return state

    monkeypatch.setattr(ir_diffusion, "IRAttnState", factory)
    out = pipe(SUBJECTS, SCENE, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", **kwargs)
    return out, records, states[-1]


@pytest.fixture(scope="module")
def boxes_run(pipe):
    with pytest.MonkeyPatch.context() as mp:
        return observed_run(pipe, mp, seed=3, target_boxes=TARGET_BOXES, reference_boxes=REFERENCE_BOXES)


def test_references_bit_identical_to_vanilla(base, boxes_run):
    out, _, _ = boxes_run
    for subject, image in zip(SUBJECTS, out.reference_images):
        assert np.array_equal(image, vanilla(base, subject["prompt"], seed=3))


def test_given_boxes_end_to_end(base, boxes_run):
    out, records, _ = boxes_run
    assert out.images[0].shape == (SIZE, SIZE, 3) and np.isfinite(out.images[0]).all()
    assert out.layout_images == [] and out.layout_seed == 3
    for i, b in enumerate(TARGET_BOXES):
        expected = box_mask(b, SIZE, SIZE).numpy()
        if i == 0:  # the smaller box gives up the overlap
            expected &= ~box_mask(TARGET_BOXES[1], SIZE, SIZE).numpy()
        assert np.array_equal(out.target_masks[i], expected)
    # the scene is not the vanilla scene from the same z_T
    assert np.abs(out.images[0] - vanilla(base, SCENE, seed=3)).max() > 1e-3
    kinds = {(r["kind"], r["layer"]) for r in records}
    assert len(kinds) == 16  # every attention layer of the tiny UNet took part
    steps = {r["step"] for r in records}
    assert steps == set(range(STEPS))


def test_captured_probabilities_in_the_pipeline(boxes_run):
    """Every self-attention call of the final pass, every step: recompute probabilities from the captured keys and
    mask, check they give our output, and check the routing rules on them."""
    _, records, state = boxes_run
    checked = 0
    for r in records:
        if r["kind"] != "self":
            continue
        targets, mask = r["targets"], r["mask"]
        q = r["q"][targets]
        scores = q @ r["keys"].transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[0, 0], float("-inf"))
        probs = scores.softmax(-1)
        torch.testing.assert_close(probs @ r["values"], r["out"][targets], atol=2e-5, rtol=0)
        n_tok = q.shape[2]
        side = int(n_tok**0.5)
        ref, tgt = state.masks.at((side, side))
        subject, position = r["key_subject"], r["key_position"]
        owner = torch.full((n_tok,), -1)
        for i in range(2):
            owner[tgt[i]] = i
        key_owner = torch.where(subject >= 0, -2, owner[position])
        for i, j in ((0, 1), (1, 0)):
            rows = probs[:, :, tgt[i]]
            assert torch.count_nonzero(rows[..., key_owner == j]) == 0
            assert torch.count_nonzero(rows[..., subject == j]) == 0
        assert torch.count_nonzero(probs[:, :, ~tgt.any(0)][..., subject >= 0]) == 0
        if r["extended"]:
            keep = state.keep_mask((side, side), r["step"], torch.device("cpu"))
            for i in range(2):
                attends = probs[0, 0][:, subject == i].sum(-1) > 0
                assert torch.equal(attends, tgt[i] & keep[i])
        checked += 1
    assert checked == STEPS * 8  # 8 self-attention layers per UNet call
    keeps = [state.keep_mask((8, 8), s, torch.device("cpu")) for s in range(STEPS)]
    assert not torch.equal(keeps[0], keeps[1])  # resampled per step


def test_builtin_attention_masks_end_to_end(base, pipe):
    out = pipe(SUBJECTS, SCENE, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", seed=5)
    assert len(out.layout_images) == 1
    assert np.array_equal(out.layout_images[0], vanilla(base, SCENE, seed=out.layout_seed))
    assert out.reference_masks.shape == out.target_masks.shape == (2, SIZE, SIZE)
    assert all(m.any() for m in out.target_masks) and all(m.any() for m in out.reference_masks)
    assert not (out.target_masks[0] & out.target_masks[1]).any()
    assert not out.reference_masks[:, (SIZE // 6) * 5 :].any()  # bottom sixth trimmed
    # recording attention for the masks leaves the references bit-identical to vanilla
    for subject, image in zip(SUBJECTS, out.reference_images):
        assert np.array_equal(image, vanilla(base, subject["prompt"], seed=5))
    assert np.isfinite(out.images[0]).all()


def test_every_part_off_gives_the_vanilla_scene(base, pipe):
    """Neutral settings: no isolation, no reposition layers, no mutual cross-attention -> the target row of the
    batched final pass is the vanilla scene from the same z_T."""
    common = dict(height=64, width=64, num_inference_steps=2, output_type="np", seed=1, target_boxes=SMALL_BOXES)
    before = dict(base.unet.attn_processors)
    off = pipe(SUBJECTS, SCENE, isolation=False, mutual_cross_attention=False, ir_layers=[], **common)
    np.testing.assert_allclose(off.images[0], vanilla(base, SCENE, seed=1, size=64, steps=2), atol=1e-5, rtol=0)
    on = pipe(SUBJECTS, SCENE, isolation=True, mutual_cross_attention=False, ir_layers=[], **common)
    assert np.abs(on.images[0] - off.images[0]).max() > 1e-4  # isolation alone changes the scene
    assert all(base.unet.attn_processors[k] is v for k, v in before.items())  # processors restored


def test_segmenter_callable_and_layout_retry(base, pipe):
    calls = []

    def segmenter(image, words):
        calls.append((image.size, list(words)))
        if len(words) == 2 and sum(len(w) == 2 for _, w in calls) == 1:
            return [None, np.ones((64, 64))]  # first layout: the cat is missing -> retry with the next seed
        boxes = {"cat": (0, 0, 32, 64), "dog": (32, 0, 64, 64)}
        return [box_mask(boxes[w], 64, 64).numpy().astype(np.uint8) * 255 for w in words]

    out = pipe(
        SUBJECTS,
        SCENE,
        height=64,
        width=64,
        num_inference_steps=1,
        output_type="pil",
        seed=7,
        mask_source=segmenter,
        min_mask_size=0,
        close_kernel=0,
    )
    assert calls == [((64, 64), ["cat"]), ((64, 64), ["dog"]), ((64, 64), ["cat", "dog"]), ((64, 64), ["cat", "dog"])]
    assert out.layout_seed == 8 and out.images[0].size == (64, 64)
    assert out.target_masks[0][:, :32].all() and not out.target_masks[0][:, 32:].any()
    assert out.reference_masks[0][: (64 // 6) * 5, :32].all() and not out.reference_masks[0][(64 // 6) * 5 :].any()

    def never(image, words):
        return [np.ones((64, 64))] if len(words) == 1 else [None] * len(words)

    with pytest.raises(ValueError, match="2 attempts"):
        pipe(SUBJECTS, SCENE, height=64, width=64, num_inference_steps=1, mask_source=never, max_layout_attempts=2)


def test_dropout_is_seeded(pipe, boxes_run):
    _, _, state = boxes_run
    assert state.dropout == 0.5 and state.dropout_seed == 3  # default: the generation seed
    common = dict(height=64, width=64, num_inference_steps=1, output_type="np", seed=2, target_boxes=SMALL_BOXES)
    a = pipe(SUBJECTS, SCENE, **common).images[0]
    assert np.array_equal(a, pipe(SUBJECTS, SCENE, **common).images[0])
    assert not np.array_equal(a, pipe(SUBJECTS, SCENE, dropout_seed=99, **common).images[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(subjects=[]), "non-empty list"),
        (dict(subjects=[{"prompt": "a cat"}]), "exactly the keys"),
        (dict(subjects=[{"prompt": "a cat", "word": "cat", "extra": 1}]), "exactly the keys"),
        (dict(scene_prompt="a horse on a beach"), "'cat' does not occur in `scene_prompt`"),
        (dict(latents=torch.zeros(1)), "sets \\['latents'\\] itself"),
        (dict(output_type="latent"), "output_type"),
        (dict(target_boxes=[(0, 0, 8, 8)], target_masks=[np.ones((8, 8))]), "either"),
        (dict(target_boxes=[(0, 0, 8, 8)] * 2), "one entry per subject"),
        (dict(subjects=SUBJECTS, scene_prompt=SCENE, target_boxes=[(0, 0, 8, 8), (0, 0, 8, 8)]), "vanish"),
        (dict(reference_masks=[np.zeros((64, 64))]), "empty"),
        (dict(dropout=1.5), "dropout"),
        (dict(mask_source="sam"), "mask_source"),
        (dict(seed=-1), "seed"),
        (dict(ir_layers="down_blocks.7"), "`ir_layers` entry"),
    ],
)
def test_user_errors(pipe, kwargs, match):
    args = dict(subjects=SUBJECTS[:1], scene_prompt="a cat on a beach", height=64, width=64, num_inference_steps=1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**args)


def test_from_pipe_keeps_dtypes_and_shares_components():
    base = build_tiny_pipeline("tiny-sdxl").to(dtype=torch.bfloat16)
    ir = IRDiffusionPipeline.from_pipe(base)
    assert ir.unet is base.unet and ir.unet.dtype == torch.bfloat16 and base.vae.dtype == torch.bfloat16
    cast = IRDiffusionPipeline.from_pipe(build_tiny_pipeline("tiny-sdxl"), torch_dtype=torch.float16)
    assert cast.unet.dtype == torch.float16
