"""Architectures of the toy models and builders of their diffusers components.

- ``toy-sd``: :class:`~diffusers.StableDiffusionPipeline` = ``UNet2DConditionModel`` (convolutions at the 16x16
  latent level; self- and cross-attention at the 8x8 level and in the mid block) + CLIP text encoder +
  ``AutoencoderKL`` (64x64 RGB <-> 16x16x4 latents).
- ``toy-flux``: :class:`~diffusers.FluxPipeline` = ``FluxTransformer2DModel`` (double- and single-stream blocks on an
  8x8 token grid after FLUX's 2x2 latent packing) + CLIP (pooled) + T5 (sequence) + the same ``AutoencoderKL``.

The text encoders are built from a seed and stay frozen at that random initialisation (the denoisers learn to read
them); all caption words are single tokens of the offline tokenizers. Prompts are padded to :data:`TEXT_LENGTH`
tokens: pass ``max_sequence_length=24`` to ``FluxPipeline`` calls (``load_pipeline`` records it as a default).
"""

from __future__ import annotations

import torch


__all__ = [
    "TEXT_LENGTH",
    "VAE_CONFIG",
    "UNET_CONFIG",
    "FLUX_CONFIG",
    "CLIP_CONFIG",
    "T5_CONFIG",
    "build_vae",
    "build_unet",
    "build_flux_transformer",
    "build_clip",
    "build_t5",
    "build_sd_pipeline",
    "build_flux_pipeline",
    "sd_scheduler",
    "flux_scheduler",
]

TEXT_LENGTH = 24  # tokens per prompt (CLIP incl. start/end, T5 incl. </s>); the longest toy caption needs 18

VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)
UNET_CONFIG: dict = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    # attention (self + cross) at the 8x8 level and in the mid block; the 16x16 level is convolutional (CPU budget)
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=2,  # the number of heads, in diffusers' UNet naming: head dims 16 and 32 (fast on CPUs)
    norm_num_groups=8,
)
FLUX_CONFIG: dict = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    axes_dims_rope=(4, 6, 6),
    guidance_embeds=False,
)
CLIP_CONFIG: dict = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu"
)
T5_CONFIG: dict = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
)


def build_vae(config: dict | None = None, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**(config or VAE_CONFIG))


def build_unet(config: dict | None = None, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(config or UNET_CONFIG))


def build_flux_transformer(config: dict | None = None, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**(config or FLUX_CONFIG))


def build_clip(seed: int, config: dict | None = None):
    """Offline CLIP tokenizer (prompts padded to :data:`TEXT_LENGTH`) and a CLIP text encoder drawn from ``seed``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=TEXT_LENGTH)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(config or CLIP_CONFIG),
    )
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(cfg).eval().requires_grad_(False)


def build_t5(seed: int, config: dict | None = None):
    """Offline T5 tokenizer and a T5 encoder drawn from ``seed``."""
    from transformers import T5Config, T5EncoderModel

    from .tiny import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(model_max_length=TEXT_LENGTH)
    cfg = T5Config(
        vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **(config or T5_CONFIG)
    )
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(cfg).eval().requires_grad_(False)


def sd_scheduler():
    """DPM-Solver++ (2M) over SD's scaled-linear 1000-step schedule (the training schedule)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, prediction_type="epsilon"
    )


def flux_scheduler():
    """Flow-matching Euler with a fixed shift of 1 (64 image tokens need no resolution shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def build_sd_pipeline(vae, unet, text_seed: int):
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder = build_clip(text_seed)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_flux_pipeline(vae, transformer, text_seed: int):
    from diffusers import FluxPipeline

    tokenizer, text_encoder = build_clip(text_seed)
    tokenizer_2, text_encoder_2 = build_t5(text_seed + 1)
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
