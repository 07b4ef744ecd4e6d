"""CLEAR high-resolution recipe on tiny FLUX: base image with the original attention, then a CLEAR SDEdit refine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clear_oracle import OracleCore
from PIL import Image

import attnpack
from attnpack.attn_processors import apply_processors
from attnpack.pipelines.clear_highres import clear_highres
from attnpack.toy.tiny import build_tiny_pipeline


def test_recipe_equals_its_manual_construction():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    pipe = build_tiny_pipeline("tiny-flux")
    original = pipe.transformer.attn_processors
    config = dict(pipe.scheduler.config)
    out = clear_highres(pipe, "a red circle", height=128, width=96, base_height=64, base_width=48, radius=2,
                        base_steps=2, steps=4, max_sequence_length=8, seed=3)  # fmt: skip
    assert out.image.size == (96, 128) and out.base_image.size == (48, 64)
    # stage 1: the stock pipeline
    base = pipe("a red circle", height=64, width=48, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=8, generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(base), np.asarray(out.base_image))
    # stage 2 by hand: static-shift schedule, RoPE theta x 10, the oracle CLEAR mask with proportional scale, VAE
    # tiling (the tiny VAE tiles above 32 px)
    img2img = FluxImg2ImgPipeline.from_pipe(
        pipe, scheduler=FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False)
    )
    pipe.transformer.pos_embed.theta = 100000
    pipe.vae.enable_tiling()
    with apply_processors(pipe.transformer, OracleCore(2, proportional=True)):
        ref = img2img(prompt="a red circle", image=base.resize((96, 128), Image.BICUBIC), strength=0.7, height=128,
                      width=96, num_inference_steps=4, guidance_scale=7.5, max_sequence_length=8,
                      generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    pipe.transformer.pos_embed.theta = 10000
    pipe.vae.disable_tiling()
    assert np.abs(np.asarray(ref, dtype=int) - np.asarray(out.image, dtype=int)).max() <= 1
    # without CLEAR's settings the refine differs (the recipe is not a no-op)
    plain = img2img(prompt="a red circle", image=base.resize((96, 128), Image.BICUBIC), strength=0.7, height=128,
                    width=96, num_inference_steps=4, max_sequence_length=8,
                    generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(out.image, dtype=int)).max() > 1
    # everything restored
    assert all(pipe.transformer.attn_processors[k] is original[k] for k in original)
    assert pipe.transformer.pos_embed.theta == 10000 and not pipe.vae.use_tiling
    assert dict(pipe.scheduler.config) == config


def test_weights_are_restored_and_errors(tmp_path):
    from safetensors.torch import save_file

    pipe = build_tiny_pipeline("tiny-flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    state = {n: torch.randn_like(p) for n, p in pipe.transformer.named_parameters() if ".attn.to_q." in n}
    save_file(state, str(tmp_path / "w.safetensors"))
    out = clear_highres(pipe, "a cat", height=64, width=64, radius=2, weights=tmp_path / "w.safetensors",
                        base_steps=1, steps=2, max_sequence_length=8)  # fmt: skip
    assert out.base_image.size == (16, 16) and out.parameters["weights"].endswith("w.safetensors")
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(ValueError, match="must be a FLUX.1 pipeline"):
        clear_highres(build_tiny_pipeline("tiny-sd3"), "a cat")
    with pytest.raises(ValueError, match="strength"):
        clear_highres(pipe, "a cat", height=64, width=64, strength=0.0)
    with pytest.raises(ValueError, match="multiples of 16 x down_factor = 64"):
        clear_highres(pipe, "a cat", height=96, width=64, down_factor=4)
    with attnpack.apply_clear(pipe, radius=2):
        with pytest.raises(ValueError, match="already has CLEAR installed"):
            clear_highres(pipe, "a cat", height=64, width=64)
