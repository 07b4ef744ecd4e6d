"""Tiny random-weight diffusers pipelines, built offline from configs in code.

They exist so that the CLI, the UI and the test suite run anywhere without downloading a byte: every component
(tokenizers included) is built from a config, deterministically for a seed. They prove that code runs end to end;
their images are noise. Each builder returns an ordinary diffusers pipeline that supports ``save_pretrained`` and
reloads with ``DiffusionPipeline.from_pretrained(dir)``.

Component sizes follow ``shared/reference/diffusers-integration.md`` §5 (the configs that are known to work).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable

import torch


__all__ = [
    "TINY_MODELS",
    "build_tiny_pipeline",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "tiny_sd3_transformer",
    "tiny_wan_transformer",
    "tiny_hunyuan_video_transformer",
    "tiny_cogvideox_transformer",
    "tiny_flux_transformer",
]

# Words that tokenize to a single token in the tiny tokenizers (anything else splits into characters, which is fine).
BASE_WORDS: tuple[str, ...] = tuple(
    """a an the of and with on in at to by is are this that photo picture painting image drawing of
    left right above below top bottom middle center next beside near small large big tiny
    red green blue yellow orange purple pink white black gray grey brown cyan magenta
    circle square triangle star rectangle hexagon cross heart diamond ring
    cat dog bird horse car tree house boat flower apple bear turtle frog crown monkey dance
    man woman boy girl person sky sea mountain city street forest beach night day sunset
    cinematic lighting portrait landscape astronaut riding""".split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table: 256 printable stand-ins for the 256 byte values."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_clip_tokenizer(words: Iterable[str] = BASE_WORDS, model_max_length: int = 77):
    """A byte-level BPE CLIP tokenizer whose merges make every listed lowercase word a single token.

    Every byte has a token (so any text tokenizes). Merges are added word by word: each word is encoded with the
    merges so far, and the pieces left are joined by new merges (ranked after all earlier ones, so earlier words keep
    their single token).
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if not word or any(ch not in string.ascii_lowercase for ch in word):
            continue
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    merges = sorted(ranks, key=ranks.__getitem__)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(words: Iterable[str] = BASE_WORDS, model_max_length: int = 512):
    """A Unigram T5 tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, letters, digits and whole ``words``."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in string.ascii_lowercase + string.digits + ".,;:!?'-":
        pieces.append((c, -5.0))
        pieces.append(("▁" + c, -5.5))
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) > 1:
            pieces.append(("▁" + word, -1.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------------- text encoders
def _clip_text_encoder(tokenizer, seed: int, hidden: int = 32, projection: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_text_encoder(tokenizer, seed: int, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


# ----------------------------------------------------------------------------------------------- VAEs
def _kl_vae(seed: int, flow: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
    )
    if flow:
        kwargs.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    else:
        kwargs.update(scaling_factor=0.18215)
    return AutoencoderKL(**kwargs).eval()


def _ddim(**extra):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **extra,
    )


# ----------------------------------------------------------------------------------------------- denoisers
def tiny_unet_sd15(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tiny_unet_sdxl(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=32,
    ).eval()


def tiny_sd3_transformer(seed: int = 0, dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None):
    """SD3 (default) or SD3.5-style (``dual_attention_layers`` + ``qk_norm="rms_norm"``) tiny MMDiT."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    ).eval()


def tiny_flux_transformer(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=False,
    ).eval()


def tiny_wan_transformer(seed: int = 0, i2v: bool = False, text_dim: int = 32):
    """Wan 2.1 tiny DiT; ``i2v=True`` adds the image-context keys of the I2V variant (``image_dim``)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    kwargs = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    if i2v:
        kwargs.update(image_dim=16, added_kv_proj_dim=24, in_channels=36)
    return WanTransformer3DModel(**kwargs).eval()


def tiny_cogvideox_transformer(seed: int = 0, text_dim: int = 32):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=text_dim,
        num_layers=1,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    ).eval()


def tiny_hunyuan_video_transformer(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()


# ----------------------------------------------------------------------------------------------- pipelines
def _sd15(seed: int):
    from diffusers import StableDiffusionPipeline

    tokenizer = build_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_kl_vae(seed, flow=False),
        text_encoder=_clip_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=tiny_unet_sd15(seed),
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(seed: int):
    from diffusers import StableDiffusionXLPipeline

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_kl_vae(seed, flow=False),
        text_encoder=_clip_text_encoder(tokenizer, seed),
        text_encoder_2=_clip_text_encoder(tokenizer_2, seed + 1, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_unet_sdxl(seed),
        scheduler=_ddim(timestep_spacing="leading"),
    )


def _sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok1, tok2, tok3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(seed, flow=True),
        text_encoder=_clip_text_encoder(tok1, seed, with_projection=True),
        tokenizer=tok1,
        text_encoder_2=_clip_text_encoder(tok2, seed + 1, with_projection=True),
        tokenizer_2=tok2,
        text_encoder_3=_t5_text_encoder(tok3, seed + 2, d_model=64),
        tokenizer_3=tok3,
    )


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok1, tok2 = build_clip_tokenizer(), build_t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_kl_vae(seed, flow=True),
        text_encoder=_clip_text_encoder(tok1, seed),
        tokenizer=tok1,
        text_encoder_2=_t5_text_encoder(tok2, seed + 1, d_model=32),
        tokenizer_2=tok2,
        transformer=tiny_flux_transformer(seed),
    )


def _wan(seed: int):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_text_encoder(tokenizer, seed, d_model=32, umt5=True),
        transformer=tiny_wan_transformer(seed),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _cogvideox(seed: int):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_text_encoder(tokenizer, seed, d_model=32),
        vae=vae,
        transformer=tiny_cogvideox_transformer(seed),
        scheduler=CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=True,
        ),
    )


# name -> (builder, description, default call kwargs that make a fast, valid generation)
TINY_MODELS: dict[str, tuple[Callable[[int], object], str, dict]] = {
    "tiny-sd15": (_sd15, "Stable Diffusion 1.x architecture (UNet, CLIP), random weights", dict(height=64, width=64)),
    "tiny-sdxl": (_sdxl, "SDXL architecture (UNet, two CLIPs), random weights", dict(height=64, width=64)),
    "tiny-sd3": (
        _sd3,
        "SD3 architecture (MMDiT, two CLIPs + T5), random weights",
        dict(height=64, width=64, max_sequence_length=32),
    ),
    "tiny-flux": (
        _flux,
        "FLUX.1 architecture (double/single-stream DiT, CLIP + T5), random weights",
        dict(height=64, width=64, max_sequence_length=32),
    ),
    "tiny-wan": (
        _wan,
        "Wan 2.1 T2V architecture (3-D DiT, UMT5), random weights",
        dict(height=16, width=16, num_frames=9, max_sequence_length=16),
    ),
    "tiny-cogvideox": (
        _cogvideox,
        "CogVideoX architecture (3-D DiT, T5), random weights",
        dict(height=32, width=32, num_frames=9, max_sequence_length=16),
    ),
}


def build_tiny_pipeline(name: str, seed: int = 0):
    """Build the built-in tiny pipeline ``name`` (one of :data:`TINY_MODELS`) with weights drawn from ``seed``."""
    if name not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {name!r}. Built-in tiny models: {', '.join(TINY_MODELS)}.")
    builder = TINY_MODELS[name][0]
    pipe = builder(seed)
    if hasattr(pipe, "default_sample_size") and "height" in TINY_MODELS[name][2]:
        # direct `pipe(prompt)` calls default to the small size too (FLUX would otherwise default to 1024 px)
        pipe.default_sample_size = TINY_MODELS[name][2]["height"] // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------- bare denoisers
TINY_DENOISERS: dict[str, Callable[[int], torch.nn.Module]] = {
    "unet-sd15": tiny_unet_sd15,
    "unet-sdxl": tiny_unet_sdxl,
    "sd3": tiny_sd3_transformer,
    "sd35": lambda seed=0: tiny_sd3_transformer(seed, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "flux": tiny_flux_transformer,
    "wan": tiny_wan_transformer,
    "wan-i2v": lambda seed=0: tiny_wan_transformer(seed, i2v=True),
    "cogvideox": tiny_cogvideox_transformer,
    "hunyuan_video": tiny_hunyuan_video_transformer,
}


def build_tiny_denoiser(name: str, seed: int = 0) -> torch.nn.Module:
    """A bare tiny denoiser (see :data:`TINY_DENOISERS`), e.g. for attention-processor tests."""
    if name not in TINY_DENOISERS:
        raise ValueError(f"Unknown tiny denoiser {name!r}; choose from {', '.join(TINY_DENOISERS)}.")
    return TINY_DENOISERS[name](seed)


def denoiser_inputs(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    grid: tuple[int, ...] | None = None,
    text_len: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Random keyword inputs for one forward of a tiny denoiser built here.

    ``grid`` is the token grid at the attention layers: ``(H, W)`` for images (for UNets: the latent size), and
    ``(F, H, W)`` for videos.
    """
    from attnpack.attn_processors.families import family_of_model

    family = family_of_model(model)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cfg = model.config
    b = batch_size
    if family == "unet":
        h, w = grid or (8, 8)
        kw = dict(
            sample=rand(b, cfg.in_channels, h, w),
            timestep=torch.tensor(500),
            encoder_hidden_states=rand(b, text_len, cfg.cross_attention_dim),
        )
        if cfg.addition_embed_type == "text_time":
            proj = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = dict(text_embeds=rand(b, proj), time_ids=rand(b, 6))
        return kw
    if family == "sd3":
        h, w = grid or (4, 4)
        p = cfg.patch_size
        return dict(
            hidden_states=rand(b, cfg.in_channels, h * p, w * p),
            encoder_hidden_states=rand(b, text_len, cfg.joint_attention_dim),
            pooled_projections=rand(b, cfg.pooled_projection_dim),
            timestep=torch.full((b,), 500.0),
        )
    if family == "flux":
        h, w = grid or (4, 4)
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        kw = dict(
            hidden_states=rand(b, h * w, cfg.in_channels),
            encoder_hidden_states=rand(b, text_len, cfg.joint_attention_dim),
            pooled_projections=rand(b, cfg.pooled_projection_dim),
            timestep=torch.full((b,), 0.5),
            img_ids=img_ids.reshape(h * w, 3),
            txt_ids=torch.zeros(text_len, 3),
        )
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((b,), 3.5)
        return kw
    if family == "wan":
        f, h, w = grid or (2, 4, 4)
        pt, ph, pw = cfg.patch_size
        kw = dict(hidden_states=rand(b, cfg.in_channels, f * pt, h * ph, w * pw), timestep=torch.full((b,), 500.0))
        if cfg.image_dim is not None:  # I2V: the text context must be 512 tokens (hard-coded in diffusers)
            kw["encoder_hidden_states"] = rand(b, 512, cfg.text_dim)
            kw["encoder_hidden_states_image"] = rand(b, 4, cfg.image_dim)
        else:
            kw["encoder_hidden_states"] = rand(b, text_len, cfg.text_dim)
        return kw
    if family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        f, h, w = grid or (3, 2, 2)
        p = cfg.patch_size
        kw = dict(
            hidden_states=rand(b, f, cfg.in_channels, h * p, w * p),
            encoder_hidden_states=rand(b, text_len, cfg.text_embed_dim),
            timestep=torch.full((b,), 500),
        )
        if cfg.use_rotary_positional_embeddings:
            crops = get_resize_crop_region_for_grid((h, w), cfg.sample_width // p, cfg.sample_height // p)
            kw["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(h, w), temporal_size=f
            )
        return kw
    if family == "hunyuan_video":
        f, h, w = grid or (2, 4, 4)
        p, pt = cfg.patch_size, cfg.patch_size_t
        mask = torch.ones(b, text_len)
        mask[:, -2:] = 0  # some padding, to exercise the text mask
        return dict(
            hidden_states=rand(b, cfg.in_channels, f * pt, h * p, w * p),
            timestep=torch.full((b,), 500),
            encoder_hidden_states=rand(b, text_len, cfg.text_embed_dim),
            encoder_attention_mask=mask,
            pooled_projections=rand(b, cfg.pooled_projection_dim),
            guidance=torch.full((b,), 3500.0),
        )
    raise ValueError(f"no inputs for family {family!r}")
