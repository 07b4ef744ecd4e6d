"""High-resolution FLUX generation with CLEAR: the official recipe (``inference_t2i_highres.ipynb``).

Paper: https://arxiv.org/abs/2412.16112; reference note ``shared/reference/clear.md`` section 8.

1. Generate at a base resolution with the **original** attention (e.g. 512 x 1024, 20 steps, guidance 3.5).
2. Upsample the image to the target size (bicubic).
3. Refine with FLUX img2img (SDEdit) and CLEAR: strength 0.7, 20 steps, guidance 7.5, RoPE ``theta x 10`` (NTK
   factor), proportional attention, dynamic timestep shifting off (sigmas ``linspace(1, 1/steps)`` with the
   scheduler's static shift), VAE tiling on.

The img2img pipeline shares the text-to-image pipeline's components. It is built with ``FluxImg2ImgPipeline``'s
constructor rather than ``FluxImg2ImgPipeline.from_pipe``: in diffusers 0.42 ``from_pipe`` ends with
``new_pipeline.to(dtype=torch_dtype or float32)``, which casts the *shared* modules in place (a bf16 FLUX would be
silently turned into fp32). Everything this helper changes (processors, attention weights, RoPE theta, VAE tiling)
is restored when it returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image


__all__ = ["ClearHighResOutput", "clear_highres", "shared_flux_pipeline"]


@dataclasses.dataclass
class ClearHighResOutput:
    image: Image.Image
    base_image: Image.Image
    parameters: dict[str, Any]


def _multiple_of_16(x: float) -> int:
    return max(16, int(round(x / 16)) * 16)


def shared_flux_pipeline(cls, pipe, scheduler=None):
    """A FLUX pipeline of class ``cls`` (``FluxPipeline``, ``FluxImg2ImgPipeline``) sharing ``pipe``'s components,
    with no dtype cast (see the module docstring); ``scheduler`` replaces the scheduler."""
    c = pipe.components
    names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    new = cls(
        scheduler=scheduler if scheduler is not None else c["scheduler"],
        image_encoder=c.get("image_encoder"),
        feature_extractor=c.get("feature_extractor"),
        **{name: c[name] for name in names},
    )
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


def clear_highres(
    pipe,
    prompt: str,
    *,
    height: int = 2048,
    width: int = 2048,
    base_height: int | None = None,
    base_width: int | None = None,
    radius: int = 16,
    down_factor: int = 1,
    weights=None,
    strength: float = 0.7,
    base_steps: int = 20,
    steps: int = 20,
    base_guidance: float = 3.5,
    guidance: float = 7.5,
    ntk_factor: float = 10.0,
    proportional_attention: bool = True,
    vae_tiling: bool = True,
    seed: int = 0,
    max_sequence_length: int = 512,
    base_image: Image.Image | None = None,
    backend: str | None = None,
) -> ClearHighResOutput:
    """Generate ``height x width`` with FLUX: a base image with the original attention, then a CLEAR SDEdit refine.

    Parameters:
        pipe: a FLUX text-to-image pipeline (``FluxPipeline``) holding the *original* weights.
        prompt: the text prompt.
        height, width: target size in pixels (multiples of ``16 * down_factor``).
        base_height, base_width: base size (default: a quarter of the target per side, as the official notebook's
            512 x 1024 -> 2048 x 4096), rounded to multiples of 16.
        radius, down_factor, weights: CLEAR settings and checkpoint (see :func:`attnpack.apply_clear`); use the
            weights distilled for that radius / down factor (``Huage001/CLEAR`` or ``attnpack distill-clear``).
        strength: SDEdit strength of the refine (0.7: the last 70% of the schedule).
        base_steps, base_guidance: base generation (official 20, 3.5).
        steps, guidance: refine (official 20 before strength, 7.5).
        ntk_factor: RoPE ``theta`` multiplier during the refine (official 10; 1 = off).
        proportional_attention: the official length-dependent softmax scale during the refine.
        vae_tiling: decode / encode the large image in tiles.
        seed: seeds both stages (CPU generators).
        base_image: skip stage 1 and refine this image.

    Returns:
        :class:`ClearHighResOutput` with the refined image, the base image and the settings.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline

    from ..attn_processors.clear import ClearAttnProcessor, apply_clear

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module) or type(transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"`pipe` must be a FLUX.1 pipeline (FluxPipeline), got {type(pipe).__name__}.")
    if any(isinstance(p, ClearAttnProcessor) for p in transformer.attn_processors.values()):
        raise ValueError(
            "`pipe` already has CLEAR installed; remove it (handle.remove()) first: the base image uses the original "
            "attention and weights, and clear_highres installs CLEAR for the refine itself."
        )
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be in (0, 1], got strength={strength!r}.")
    if height % (16 * down_factor) or width % (16 * down_factor):
        raise ValueError(
            f"`height` and `width` must be multiples of 16 x down_factor = {16 * down_factor}, got {height} x {width}."
        )
    base_height = base_height or _multiple_of_16(height / 4)
    base_width = base_width or _multiple_of_16(width / 4)
    parameters = dict(
        prompt=prompt, height=height, width=width, base_height=base_height, base_width=base_width, radius=radius,
        down_factor=down_factor, weights=str(weights) if weights is not None else None, strength=strength,
        base_steps=base_steps, steps=steps, base_guidance=base_guidance, guidance=guidance, ntk_factor=ntk_factor,
        proportional_attention=proportional_attention, seed=seed, max_sequence_length=max_sequence_length,
    )  # fmt: skip

    def run(target, **kwargs) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed)
        return target(prompt, max_sequence_length=max_sequence_length, generator=generator, **kwargs).images[0]

    # 1. base image, original attention
    if base_image is None:
        t2i = pipe if isinstance(pipe, FluxPipeline) else shared_flux_pipeline(FluxPipeline, pipe)
        base_image = run(t2i, height=base_height, width=base_width, num_inference_steps=base_steps,
                         guidance_scale=base_guidance)  # fmt: skip
    # 2. upsample
    upsampled = base_image.convert("RGB").resize((width, height), Image.BICUBIC)
    # 3. CLEAR img2img with static timestep shift, NTK RoPE, proportional attention, VAE tiling
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False)
    img2img = shared_flux_pipeline(FluxImg2ImgPipeline, pipe, scheduler)
    vae = img2img.vae
    tiling_before = getattr(vae, "use_tiling", False)
    theta_before = transformer.pos_embed.theta
    handle = apply_clear(transformer, radius, down_factor, weights, proportional_attention, backend=backend)
    try:
        if vae_tiling:
            vae.enable_tiling()
        transformer.pos_embed.theta = theta_before * ntk_factor
        image = run(img2img, image=upsampled, strength=strength, height=height, width=width,
                    num_inference_steps=steps, guidance_scale=guidance)  # fmt: skip
    finally:
        transformer.pos_embed.theta = theta_before
        if vae_tiling and not tiling_before:
            vae.disable_tiling()
        handle.remove()
    return ClearHighResOutput(image, base_image, parameters)
