"""A-STAR store and pipelines on tiny SD 1.5 / SDXL models (random weights, CPU)."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import RecordingCore

from attnpack import AStarPipeline, AStarXLPipeline, apply_processors, list_layers, run_overrides
from attnpack.attn_processors.astar import (
    STORE_KEY,
    AStarAttnProcessor,
    CrossAttentionStore,
    apply_cross_attention_store,
    select_store_layers,
    unet_cross_attention_grids,
)
from attnpack.toy.tiny import build_tiny_pipeline


PROMPT = "a cat and a zebra"
CONCEPTS = ["cat", "zebra"]  # the tiny tokenizer splits "zebra" into several tokens
SETTINGS = {
    "tiny-sd15": (AStarPipeline, 8),  # the 8x8 layers (down_blocks.0, up_blocks.1) of the tiny SD 1.5 UNet
    "tiny-sdxl": (AStarXLPipeline, 4),  # the tiny SDXL UNet has cross-attention at 4x4 only
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def pipes(request):
    base = build_tiny_pipeline(request.param)
    base.set_progress_bar_config(disable=True)
    cls, res = SETTINGS[request.param]
    astar = cls.from_pipe(base)
    astar.set_progress_bar_config(disable=True)
    return base, astar, res


def _kwargs(**extra):
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np")
    kw.update(extra)
    return kw


def _gen():
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------------------------- neutral settings
def test_zero_weights_reproduce_base_pipeline_exactly(pipes):
    base, astar, res = pipes
    ref = base([PROMPT, "a bear and a frog"], generator=_gen(), num_images_per_prompt=2, **_kwargs()).images
    out = astar(
        [PROMPT, "a bear and a frog"],
        concepts=[CONCEPTS, ["bear", "frog"]],
        generator=_gen(),
        num_images_per_prompt=2,
        attn_res=res,
        segregation_weight=0.0,
        retention_weight=0.0,
        **_kwargs(),
    )
    assert out.images.shape == ref.shape
    assert abs(out.images - ref).max() == 0.0
    assert all("total" in r for r in out.losses)  # the gradient pass ran at every step
    changed = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, **_kwargs()).images
    reference = base(PROMPT, generator=_gen(), **_kwargs()).images
    assert abs(changed - reference).max() > 1e-4  # the default weights do change the image


def test_zero_weights_exact_with_a_scaling_scheduler():
    """Euler: init_noise_sigma != 1 and scale_model_input is not the identity (the gradient pass scales too)."""
    from diffusers import EulerDiscreteScheduler

    base = build_tiny_pipeline("tiny-sd15")
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    astar = AStarPipeline.from_pipe(base)
    ref = base(PROMPT, generator=_gen(), **_kwargs()).images
    out = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), segregation_weight=0, retention_weight=0, **_kwargs())
    assert abs(out.images - ref).max() == 0.0
    moved = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), **_kwargs())
    assert all(r["total_after"] < r["total"] for r in moved.losses)


def test_attention_backend_carries_over_to_the_store_layers(pipes):
    from diffusers.models.attention_dispatch import AttentionBackendName

    from attnpack import set_attention_backend

    _, astar, res = pipes
    seen = set()

    def callback(pipe, i, t, tensors):
        seen.update(
            p._attention_backend for p in pipe.unet.attn_processors.values() if isinstance(p, AStarAttnProcessor)
        )
        return tensors

    with set_attention_backend(astar, "_native_math"):
        astar(PROMPT, concepts=CONCEPTS, attn_res=res, callback_on_step_end=callback, **_kwargs(num_inference_steps=1))
    assert seen == {AttentionBackendName._NATIVE_MATH}


def test_from_pipe_shares_components_and_restores_processors(pipes):
    base, astar, res = pipes
    assert astar.unet is base.unet and astar.vae is base.vae
    before = dict(base.unet.attn_processors)
    grad_flags = [p.requires_grad for p in base.unet.parameters()]
    seen = {}

    def callback(pipe, i, t, tensors):
        seen.update({k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()})
        return tensors

    astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, callback_on_step_end=callback, **_kwargs())
    expected = {
        f"{name}.processor"
        for name, grid in unet_cross_attention_grids(base.unet, (8, 8)).items()
        if grid == (res, res)
    }
    assert {k for k, v in seen.items() if v == AStarAttnProcessor.__name__} == expected
    assert {v for k, v in seen.items() if k not in expected} == {"AttnProcessor2_0"}
    after = base.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert [p.requires_grad for p in base.unet.parameters()] == grad_flags
    assert all(p.grad is None for p in base.unet.parameters())


# ------------------------------------------------------------------------------------------------- the update
def test_loss_falls_across_the_update_as_the_gradient_predicts(pipes):
    """``total_after`` comes from an independent forward at z' = z - alpha g: it must fall by ~alpha |g|^2."""
    _, astar, res = pipes
    out = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, **_kwargs(num_inference_steps=4))
    assert len(out.losses) == 4
    for r in out.losses:
        drop = r["total"] - r["total_after"]
        predicted = r["step_size"] * r["grad_norm"] ** 2
        assert drop > 0, r
        assert drop == pytest.approx(predicted, rel=0.2), r
    assert out.losses[0]["retention"] == 0.0 and out.losses[1]["retention"] > 0.5  # masks exist from step 1 on


def test_early_stop_does_not_change_the_result(pipes):
    _, astar, res = pipes
    a = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, early_stop=True, **_kwargs())
    b = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, early_stop=False, **_kwargs())
    assert abs(a.images - b.images).max() < 1e-5
    assert [r["total"] for r in a.losses] == pytest.approx([r["total"] for r in b.losses], abs=1e-6)


def test_token_indices_equal_concepts_and_max_steps_to_alter(pipes):
    _, astar, res = pipes
    by_word = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, **_kwargs())
    indices = by_word.token_indices[0]
    by_index = astar(PROMPT, token_indices=indices, generator=_gen(), attn_res=res, **_kwargs())
    assert abs(by_word.images - by_index.images).max() == 0.0
    one = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, max_steps_to_alter=1, **_kwargs())
    assert ["total" in r for r in one.losses] == [True, False]


def test_attention_maps_output(pipes):
    _, astar, res = pipes
    out = astar(PROMPT, concepts=CONCEPTS, generator=_gen(), attn_res=res, return_attention_maps=True, **_kwargs())
    assert out.attention_maps.shape == (2, 1, 2, res, res)
    assert out.attention_maps.min() >= 0
    torch.testing.assert_close(out.attention_maps.amax(dim=(-2, -1)), torch.ones(2, 1, 2))
    assert out.concepts == CONCEPTS


def test_layout_masks_are_the_retention_target(pipes):
    _, astar, res = pipes
    left = torch.zeros(64, 64)
    left[:, :32] = 1.0
    masks = [left, 1.0 - left]
    out = astar(
        PROMPT,
        concepts=CONCEPTS,
        generator=_gen(),
        attn_res=res,
        layout_masks=masks,
        segregation_weight=0.0,
        **_kwargs(),
    )
    assert out.losses[0]["retention"] > 0.5  # a target exists at the first step already
    from attnpack.pipelines._astar_maps import layout_masks_to_grid

    resized = layout_masks_to_grid(masks, 2, 1, (res, res), "cpu")
    assert resized[0, 0, :, : res // 2].all() and not resized[0, 0, :, res // 2 :].any()
    assert torch.equal(resized[0, 1], ~resized[0, 0])


def test_user_errors(pipes):
    _, astar, res = pipes
    with pytest.raises(ValueError, match="horse"):
        astar(PROMPT, concepts=["horse"], attn_res=res, **_kwargs())
    with pytest.raises(ValueError, match="exactly one"):
        astar(PROMPT, concepts=CONCEPTS, token_indices=[1], attn_res=res, **_kwargs())
    with pytest.raises(ValueError, match=r"1\.\.8"):
        astar(PROMPT, token_indices=[2, 10], attn_res=res, **_kwargs())
    with pytest.raises(ValueError, match="available grids"):
        astar(PROMPT, concepts=CONCEPTS, attn_res=16, **_kwargs())
    with pytest.raises(ValueError, match="binarize"):
        astar(PROMPT, concepts=CONCEPTS, attn_res=res, binarize="mean", **_kwargs())
    with pytest.raises(ValueError, match="segregation_weight"):
        astar(PROMPT, concepts=CONCEPTS, attn_res=res, segregation_weight=-1, **_kwargs())
    with pytest.raises(ValueError, match="layout_masks"):
        astar(PROMPT, concepts=CONCEPTS, attn_res=res, layout_masks=[torch.ones(8, 8)], **_kwargs())
    with pytest.raises(TypeError, match="unexpected"):
        astar(PROMPT, concepts=CONCEPTS, attn_res=res, prompt_3="x", **_kwargs())


# ------------------------------------------------------------------------------------------------- the store
def _stock_cross_maps(unet, inputs, names, cond_rows):
    """Head- and layer-averaged probabilities from diffusers' own ``Attention.get_attention_scores``."""
    captured = {}
    modules = dict(unet.named_modules())
    hooks = [
        modules[n].register_forward_pre_hook(
            lambda m, a, kw, n=n: captured.__setitem__(n, (a[0] if a else kw["hidden_states"], kw)),
            with_kwargs=True,
        )
        for n in names
    ]
    with torch.no_grad():
        unet(**inputs)
    for h in hooks:
        h.remove()
    maps = []
    for n in names:
        attn = modules[n]
        hidden, kw = captured[n]
        q = attn.head_to_batch_dim(attn.to_q(hidden))
        k = attn.head_to_batch_dim(attn.to_k(kw["encoder_hidden_states"]))
        probs = attn.get_attention_scores(q, k, None)
        probs = probs.reshape(hidden.shape[0], attn.heads, *probs.shape[1:]).mean(1)
        maps.append(probs[cond_rows])
    return torch.stack(maps).mean(0)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_store_records_the_conditional_rows_like_diffusers(name):
    pipe = build_tiny_pipeline(name)
    unet = pipe.unet
    grids = unet_cross_attention_grids(unet, (8, 12))
    finest = max(grids.values())  # sd15: 8x12 (3 layers), sdxl: 4x6 (8 layers)
    layers = {n: g for n, g in grids.items() if g == finest}
    torch.manual_seed(0)
    inputs = dict(sample=torch.randn(4, 4, 8, 12), timestep=torch.tensor(500), return_dict=False)
    inputs["encoder_hidden_states"] = torch.randn(4, 77, unet.config.cross_attention_dim)
    if isinstance(pipe, StableDiffusionXLPipeline):
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(4, 32), "time_ids": torch.randn(4, 6)}
    expected = _stock_cross_maps(unet, inputs, list(layers), [2, 3])
    stock_out = unet(**inputs)[0]
    store = CrossAttentionStore(layers)
    with apply_cross_attention_store(unet, layers), torch.no_grad():
        with run_overrides(roles=["uncond", "uncond", "cond", "cond"], **{STORE_KEY: store}):
            out = unet(**inputs)[0]
    assert torch.equal(out, stock_out)  # the store processors leave the output untouched
    h, w = next(iter(layers.values()))
    torch.testing.assert_close(store.average(), expected.reshape(2, h, w, 77), atol=1e-6, rtol=0)


def _sd15_shaped_unet(sdxl: bool = False):
    """SD 1.5 / SDXL block structure with few channels (the real models' level layout, small weights)."""
    torch.manual_seed(0)
    if sdxl:
        return UNet2DConditionModel(
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 8),
            cross_attention_dim=32,
            norm_num_groups=32,
        ).eval()
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


@pytest.mark.parametrize("sdxl", [False, True])
def test_layer_grids_match_the_run_context(sdxl):
    unet = _sd15_shaped_unet(sdxl)
    latent = (10, 14)  # non-square, not a multiple of 8: the levels round up (10x14, 5x7, 3x4, 2x2)
    core = RecordingCore()
    with apply_processors(unet, core, kinds=["cross"]), torch.no_grad():
        unet(torch.randn(1, 4, *latent), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    observed = {c.layer.name: tuple(c.layout.grid) for c in core.calls}
    assert observed == unet_cross_attention_grids(unet, latent)
    assert len(observed) == sum(i.kind == "cross" for i in list_layers(unet))


def test_default_attn_res_selects_the_paper_layers():
    sd = _sd15_shaped_unet()
    chosen = select_store_layers(sd, (64, 64), (512, 512))
    assert set(chosen.values()) == {(16, 16)}
    assert sorted(n.split(".transformer_blocks")[0] for n in chosen) == [
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
    ]
    xl = select_store_layers(_sd15_shaped_unet(sdxl=True), (128, 128), (1024, 1024))
    assert set(xl.values()) == {(32, 32)}
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in xl} == {
        "down_blocks.2",
        "mid_block.attentions",
        "up_blocks.0",
    }
    tiny = build_tiny_pipeline("tiny-sd15").unet  # 64 px: no 2x2 layer, the closest grid (4x4, mid block) is used
    assert set(select_store_layers(tiny, (8, 8), (64, 64)).values()) == {(4, 4)}
