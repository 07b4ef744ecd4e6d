"""A-STAR pipelines for SD 1.x/2.x and SDXL: test-time attention segregation and retention.

Paper: Agarwal et al., "A-STAR: Test-time Attention Segregation and Retention for Text-to-image Synthesis", ICCV 2023,
https://arxiv.org/abs/2306.14544.

At every denoising step ``t`` (up to ``max_steps_to_alter``):

1. the conditional branch alone runs the UNet on ``z_t`` with gradients; the cross-attention store
   (:mod:`attnpack.attn_processors.astar`) collects the concept tokens' maps at ``attn_res``;
2. ``L = w_seg L_seg + w_ret L_ret`` (Eq. 2 and 3; the paper uses ``w_seg = w_ret = 1``) and one gradient step
   ``z'_t = z_t - alpha_t grad_z L``;
3. the normal classifier-free-guidance step denoises ``z'_t``. Its conditional half also yields the maps at ``z'_t``:
   they are binarised into the masks ``B_t`` that the retention loss uses at the next step, and returned for viewing.

Use an existing pipeline: ``AStarPipeline.from_pipe(pipe)`` / ``AStarXLPipeline.from_pipe(pipe)`` share its weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import BaseOutput

from .._utils import check_number
from ..attn_processors.astar import (
    STORE_KEY,
    CrossAttentionStore,
    StoreComplete,
    apply_cross_attention_store,
    select_store_layers,
)
from ..attn_processors.context import ROLE_COND, ROLE_UNCOND, run_overrides
from ._astar_maps import (
    TOKEN_NORMALIZATIONS,
    binarize_maps,
    concept_maps,
    concept_token_indices,
    layout_masks_to_grid,
    otsu_thresholds,
    prompt_token_count,
    prompt_tokens,
    retention_loss,
    save_attention_maps,
    segregation_loss,
    smooth_maps,
    step_size_schedule,
)


logger = logging.getLogger(__name__)

__all__ = [
    "AStarPipeline",
    "AStarXLPipeline",
    "AStarPipelineOutput",
    "segregation_loss",
    "retention_loss",
    "binarize_maps",
    "otsu_thresholds",
    "smooth_maps",
    "concept_maps",
    "concept_token_indices",
    "prompt_tokens",
    "astar_pipeline_for",
    "astar_parameters",
    "step_size_schedule",
    "save_attention_maps",
]


@dataclasses.dataclass
class AStarPipelineOutput(BaseOutput):
    """Output of :class:`AStarPipeline` / :class:`AStarXLPipeline`.

    Attributes:
        images: PIL images, or a numpy array / tensor depending on ``output_type``.
        nsfw_content_detected: the safety checker's flags (SD 1.x/2.x with a checker), else ``None``.
        attention_maps: with ``return_attention_maps=True``, ``[T, B, K, h, w]`` float32 (CPU): each concept's map
            at each step (after that step's update), as the losses see them.
        losses: per step, ``{"step", "timestep", "step_size", "segregation", "retention", "total", "grad_norm",
            "total_after"}`` (means over the batch; ``grad_norm`` is the L2 norm of ``d L / d z`` per sample,
            ``total_after`` the loss at the updated latent with the same masks). Steps
            without an update have only ``step`` and ``timestep``.
        token_indices: per sample, per concept, the token positions used (0 = start token).
        concepts: the concept labels (words, or ``"tokens [i, j]"``).
    """

    images: Any
    nsfw_content_detected: list[bool] | None = None
    attention_maps: torch.Tensor | None = None
    losses: list[dict[str, float]] | None = None
    token_indices: list[list[list[int]]] | None = None
    concepts: list[str] | None = None

    def save_attention_maps(self, path: str | os.PathLike, sample: int = 0, **kwargs):
        """Write the attention maps of one sample as a grid PNG or an animated GIF (see :func:`save_attention_maps`)."""
        if self.attention_maps is None:
            raise ValueError("this output has no attention maps; call the pipeline with `return_attention_maps=True`.")
        return save_attention_maps(self.attention_maps, path, concepts=self.concepts, sample=sample, **kwargs)


@contextlib.contextmanager
def _frozen_parameters(module: torch.nn.Module):
    """Turn off ``requires_grad`` of ``module``'s parameters: the gradient pass only needs ``d loss / d latent``, and
    frozen weights spare autograd from saving every linear layer's input for weight gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclasses.dataclass
class _Targets:
    """Concept tokens per sample."""

    groups: list[list[list[int]]]  # per sample, per concept, token positions
    lengths: list[int]  # per sample, prompt tokens between start and end
    labels: list[str]


class _AStarMixin:
    """The A-STAR denoising loop, shared by the SD 1.x/2.x and SDXL pipelines.

    Subclasses implement ``_astar_default_size``, ``_astar_check``, ``_astar_encode`` and ``_astar_decode``.
    """

    _astar_set_begin_index = False

    # ---------------------------------------------------------------- concepts
    def _astar_tokenizer(self):
        tokenizer = getattr(self, "tokenizer", None) or getattr(self, "tokenizer_2", None)
        if tokenizer is None:
            raise ValueError("A-STAR needs the pipeline's tokenizer to find the concept tokens.")
        return tokenizer

    def _astar_targets(self, prompts: list[str], concepts, token_indices, num_images_per_prompt: int) -> _Targets:
        if (concepts is None) == (token_indices is None):
            raise ValueError("Give exactly one of `concepts` (words of the prompt) and `token_indices`.")
        tokenizer = self._astar_tokenizer()
        lengths = [prompt_token_count(tokenizer, p) for p in prompts]
        per_prompt: list[list[list[int]]] = []
        if concepts is not None:
            if isinstance(concepts, str) or not isinstance(concepts, Sequence) or not concepts:
                raise TypeError(f"`concepts` must be a non-empty list of words, got {concepts!r}.")
            if all(isinstance(c, str) for c in concepts):
                words = [list(concepts)] * len(prompts)
            elif len(concepts) == len(prompts) and all(not isinstance(c, str) for c in concepts):
                words = [list(c) for c in concepts]
            else:
                raise TypeError(
                    f"`concepts` must be a list of words, or one list of words per prompt ({len(prompts)}), "
                    f"got {concepts!r}."
                )
            per_prompt = [concept_token_indices(tokenizer, p, w) for p, w in zip(prompts, words)]
            labels = [str(w) for w in words[0]]
        else:
            if isinstance(token_indices, (int, str)) or not isinstance(token_indices, Sequence) or not token_indices:
                raise TypeError(
                    f"`token_indices` must be a non-empty list of ints or lists of ints, got {token_indices!r}."
                )
            groups = []
            for item in token_indices:
                group = [item] if isinstance(item, int) else list(item) if isinstance(item, Sequence) else None
                if not group or any(isinstance(i, bool) or not isinstance(i, int) for i in group):
                    raise TypeError(f"`token_indices` entries must be ints or lists of ints, got {item!r}.")
                groups.append(group)
            per_prompt = [groups] * len(prompts)
            labels = [f"tokens {g}" if len(g) > 1 else f"token {g[0]}" for g in groups]
        sizes = {len(g) for g in per_prompt}
        if len(sizes) != 1:
            raise ValueError(f"every prompt needs the same number of concepts, got {sorted(sizes)}.")
        for prompt, groups, n in zip(prompts, per_prompt, lengths):
            for group in groups:
                if any(not 1 <= i <= n for i in group):
                    raise ValueError(
                        f"`token_indices` {group} out of range for prompt {prompt!r}: its tokens are at positions "
                        f"1..{n} (0 is the start token)."
                    )
        repeat = num_images_per_prompt
        return _Targets(
            groups=[g for g in per_prompt for _ in range(repeat)],
            lengths=[n for n in lengths for _ in range(repeat)],
            labels=labels,
        )

    # ---------------------------------------------------------------- one A-STAR update
    def _astar_maps(self, store: CrossAttentionStore, targets: _Targets, opts: dict) -> torch.Tensor:
        return concept_maps(
            store.average(),
            targets.groups,
            targets.lengths,
            token_normalization=opts["token_normalization"],
            smoothing=opts["smooth_attentions"],
            kernel_size=opts["kernel_size"],
            sigma=opts["sigma"],
            max_normalize=opts["max_normalize"],
        )

    def _astar_losses(self, maps, masks, opts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seg = segregation_loss(maps)
        ret = retention_loss(maps, masks)
        return seg, ret, opts["segregation_weight"] * seg + opts["retention_weight"] * ret

    def _astar_update(self, latents, t, alpha, masks, cond_inputs, layers, targets, opts):
        """One gradient step on the conditional branch: ``z - alpha * d L / d z``; returns ``(z', record)``."""
        store = CrossAttentionStore(layers, stop_when_complete=opts["early_stop"])
        z = latents.detach().clone().requires_grad_(True)
        roles = [ROLE_COND] * z.shape[0]
        with torch.enable_grad(), _frozen_parameters(self.unet), run_overrides(roles=roles, **{STORE_KEY: store}):
            try:
                self.unet(
                    self.scheduler.scale_model_input(z, t),
                    t,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                    **cond_inputs,
                )
            except StoreComplete:
                pass
            maps = self._astar_maps(store, targets, opts)
            seg, ret, total = self._astar_losses(maps, masks, opts)
            (grad,) = torch.autograd.grad(total.sum(), z)
        record = {
            "step_size": float(alpha),
            "segregation": seg.mean().item(),
            "retention": ret.mean().item(),
            "total": total.mean().item(),
            "grad_norm": grad.float().flatten(1).norm(dim=1).mean().item(),
        }
        return (latents - alpha * grad).detach(), record

    # ---------------------------------------------------------------- the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        concepts: Sequence[str] | Sequence[Sequence[str]] | None = None,
        token_indices: Sequence[int | Sequence[int]] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        timesteps: list[int] | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        step_size: float | Sequence[float] | None = None,
        scale_factor: float = 20.0,
        max_steps_to_alter: int | None = None,
        segregation_weight: float = 1.0,
        retention_weight: float = 1.0,
        binarize: str | float = "otsu",
        layout_masks=None,
        attn_res: int | tuple[int, int] | None = None,
        token_normalization: str = "sum",
        smooth_attentions: bool = True,
        sigma: float = 0.5,
        kernel_size: int = 3,
        max_normalize: bool = True,
        early_stop: bool = True,
        return_attention_maps: bool = False,
        **family_kwargs,
    ):
        r"""Generate images with A-STAR (one latent update per denoising step, then the usual CFG step).

        Args:
            prompt: the prompt(s).
            concepts: words (or phrases) of the prompt whose attention is segregated and retained, e.g.
                ``["cat", "dog"]``; words the tokenizer splits into several tokens are handled (their token maps are
                averaged). One list for all prompts, or one list per prompt.
            token_indices: instead of ``concepts``, token positions in the tokenized prompt (0 = start token), one
                int or list of ints per concept, used for every prompt (``pipe.tokenizer.tokenize`` shows them).
            height, width, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt, eta,
                generator, latents, output_type, return_dict, cross_attention_kwargs, guidance_rescale, clip_skip,
                timesteps, callback_on_step_end, callback_on_step_end_tensor_inputs: as in the base diffusers
                pipeline (the callback receives ``latents`` and ``prompt_embeds``).
            step_size: ``alpha_t``: ``None`` for ``scale_factor * sqrt(linspace(1, 0.5, T))``, a number, or one
                value per step.
            scale_factor: scale of the default schedule (20, as diffusers' Attend-and-Excite; the paper gives none).
            max_steps_to_alter: update the latent at the first this many steps (default: all, as the paper).
            segregation_weight, retention_weight: loss weights (the paper: 1 and 1). ``0, 0`` reproduces the base
                pipeline exactly.
            binarize: how the retention masks ``B`` are made from a step's maps: ``"otsu"`` or a fraction ``f``
                (``A >= f * max A``). Unspecified in the paper.
            layout_masks: one mask per concept (PIL images, ``[H, W]`` arrays, or a tensor ``[K, H, W]`` /
                ``[B, K, H, W]``) used as the retention target at every step instead of the previous step's masks
                (paper Fig. 12); resized to the map grid, ``>= 0.5`` is inside.
            attn_res: map grid ``(h, w)`` or int: the cross-attention layers at that grid are used. Default as
                diffusers' Attend-and-Excite: ``(ceil(height / 32), ceil(width / 32))`` (SD 1.x 512 px: 16x16, the
                five layers of the paper; SDXL 1024 px: 32x32), or the closest grid the UNet has.
            token_normalization: ``"sum"`` (renormalise the text tokens' probabilities to sum to 1, excluding the
                start, end and padding tokens), ``"softmax"`` (Attend-and-Excite's ``softmax(100 A)``) or ``"none"``.
            smooth_attentions, sigma, kernel_size: Gaussian smoothing of each concept map (default 3x3, sigma 0.5).
            max_normalize: divide each concept map by its maximum (so the binary masks and maps share one scale).
            early_stop: end the gradient pass's UNet forward after the last map layer (same loss and gradient,
                less time and memory).
            return_attention_maps: return the maps ``[T, B, K, h, w]`` of every step.
            family_kwargs: SDXL only: ``prompt_2``, ``negative_prompt_2``, ``original_size``,
                ``crops_coords_top_left``, ``target_size``.

        Returns:
            :class:`AStarPipelineOutput` (or a tuple ``(images, nsfw_content_detected)`` with ``return_dict=False``).
        """
        height, width = (height or self._astar_default_size()), (width or self._astar_default_size())
        tensor_inputs = list(callback_on_step_end_tensor_inputs)
        unknown = [k for k in tensor_inputs if k not in ("latents", "prompt_embeds")]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may hold 'latents', 'prompt_embeds'; got {unknown}."
            )
        self._astar_check(prompt, height, width, negative_prompt, family_kwargs)
        for name, value in (("segregation_weight", segregation_weight), ("retention_weight", retention_weight)):
            check_number(name, value, 0.0)
        if token_normalization not in TOKEN_NORMALIZATIONS:
            raise ValueError(
                f"`token_normalization` must be one of {TOKEN_NORMALIZATIONS}, got {token_normalization!r}."
            )
        binarize_maps(torch.zeros(1, 2, 2), binarize)  # validates `binarize`
        opts = dict(
            segregation_weight=float(segregation_weight),
            retention_weight=float(retention_weight),
            token_normalization=token_normalization,
            smooth_attentions=bool(smooth_attentions),
            sigma=sigma,
            kernel_size=kernel_size,
            max_normalize=bool(max_normalize),
            early_stop=bool(early_stop),
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        targets = self._astar_targets(prompts, concepts, token_indices, num_images_per_prompt)
        device = self._execution_device
        layers = select_store_layers(
            self.unet, (height // self.vae_scale_factor, width // self.vae_scale_factor), (height, width), attn_res
        )
        grid = next(iter(layers.values()))
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        cond_inputs, full_inputs = self._astar_encode(
            prompt, negative_prompt, device, num_images_per_prompt, clip_skip, lora_scale, height, width, family_kwargs
        )
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
        batch = len(prompts) * num_images_per_prompt
        prompt_embeds = full_inputs["encoder_hidden_states"]
        latents = self.prepare_latents(
            batch,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch)
            cond = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim)
            cond_inputs["timestep_cond"] = full_inputs["timestep_cond"] = cond.to(device=device, dtype=latents.dtype)

        num_alter = len(timesteps) if max_steps_to_alter is None else max_steps_to_alter
        if isinstance(num_alter, bool) or not isinstance(num_alter, int) or num_alter < 0:
            raise ValueError(f"`max_steps_to_alter` must be None or a non-negative int, got {max_steps_to_alter!r}.")
        alphas = step_size_schedule(len(timesteps), scale_factor, step_size)
        k = len(targets.labels)
        fixed_masks = None if layout_masks is None else layout_masks_to_grid(layout_masks, k, batch, grid, device)
        cfg = self.do_classifier_free_guidance
        roles = [ROLE_UNCOND] * batch + [ROLE_COND] * batch if cfg else [ROLE_COND] * batch

        prev_masks = None
        history: list[torch.Tensor] = []
        losses: list[dict[str, float]] = []
        self._num_timesteps = len(timesteps)
        if self._astar_set_begin_index and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        handle = apply_cross_attention_store(self, layers)
        try:
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    masks = fixed_masks if fixed_masks is not None else prev_masks
                    record: dict[str, float] = {"step": i, "timestep": float(t)}
                    if i < num_alter:
                        latents, update = self._astar_update(
                            latents, t, alphas[i], masks, cond_inputs, layers, targets, opts
                        )
                        record.update(update)

                    store = CrossAttentionStore(layers)
                    model_input = torch.cat([latents] * 2) if cfg else latents
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    with run_overrides(roles=roles, **{STORE_KEY: store}):
                        noise_pred = self.unet(
                            model_input,
                            t,
                            cross_attention_kwargs=self.cross_attention_kwargs,
                            return_dict=False,
                            **full_inputs,
                        )[0]
                    maps = self._astar_maps(store, targets, opts)
                    if i < num_alter:
                        record["total_after"] = self._astar_losses(maps, masks, opts)[2].mean().item()
                    losses.append(record)
                    prev_masks = binarize_maps(maps, binarize)
                    if return_attention_maps:
                        history.append(maps.cpu())

                    if cfg:
                        noise_uncond, noise_text = noise_pred.chunk(2)
                        noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                        if self.guidance_rescale > 0.0:
                            noise_pred = rescale_noise_cfg(
                                noise_pred, noise_text, guidance_rescale=self.guidance_rescale
                            )
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        values = {"latents": latents, "prompt_embeds": prompt_embeds}
                        outputs = callback_on_step_end(self, i, t, {k_: values[k_] for k_ in tensor_inputs}) or {}
                        latents = outputs.pop("latents", latents)
                    progress_bar.update()
        finally:
            handle.remove()

        if output_type == "latent":
            images, nsfw = latents, None
        else:
            images, nsfw = self._astar_decode(latents, output_type, generator, device, prompt_embeds.dtype)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return AStarPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            attention_maps=torch.stack(history) if history else None,
            losses=losses,
            token_indices=targets.groups,
            concepts=targets.labels,
        )


class AStarPipeline(_AStarMixin, StableDiffusionPipeline):
    """A-STAR (https://arxiv.org/abs/2306.14544) for Stable Diffusion 1.x/2.x.

    ``AStarPipeline.from_pipe(pipe)`` turns an existing ``StableDiffusionPipeline`` into an A-STAR pipeline that shares
    its components; see :meth:`_AStarMixin.__call__` for the arguments.

    Example:
        >>> pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4").to("cuda")
        >>> astar = AStarPipeline.from_pipe(pipe)
        >>> out = astar("a cat and a dog", concepts=["cat", "dog"], generator=torch.Generator().manual_seed(0),
        ...             return_attention_maps=True)
        >>> out.images[0].save("cat_dog.png"); out.save_attention_maps("cat_dog_maps.png")
    """

    def _astar_default_size(self) -> int:
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def _astar_check(self, prompt, height, width, negative_prompt, family_kwargs) -> None:
        if family_kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(family_kwargs)}.")
        self.check_inputs(prompt, height, width, None, negative_prompt=negative_prompt)

    def _astar_encode(self, prompt, negative_prompt, device, n, clip_skip, lora_scale, height, width, family_kwargs):
        positive, negative = self.encode_prompt(
            prompt,
            device,
            n,
            self.do_classifier_free_guidance,
            negative_prompt,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        full = torch.cat([negative, positive]) if self.do_classifier_free_guidance else positive
        return {"encoder_hidden_states": positive}, {"encoder_hidden_states": full}

    def _astar_decode(self, latents, output_type, generator, device, dtype):
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw


class AStarXLPipeline(_AStarMixin, StableDiffusionXLPipeline):
    """A-STAR (https://arxiv.org/abs/2306.14544) for SDXL.

    ``AStarXLPipeline.from_pipe(pipe)`` turns an existing ``StableDiffusionXLPipeline`` into an A-STAR pipeline; the
    maps come from the 32x32 cross-attention layers at 1024 px by default. Extra arguments: ``prompt_2``,
    ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``, ``target_size`` (as in SDXL).
    """

    _astar_set_begin_index = True

    def _astar_default_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _astar_check(self, prompt, height, width, negative_prompt, family_kwargs) -> None:
        allowed = {"prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size"}
        unknown = sorted(set(family_kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {unknown}; SDXL extras: {sorted(allowed)}."
            )
        self.check_inputs(
            prompt,
            family_kwargs.get("prompt_2"),
            height,
            width,
            None,
            negative_prompt=negative_prompt,
            negative_prompt_2=family_kwargs.get("negative_prompt_2"),
        )

    def _astar_encode(self, prompt, negative_prompt, device, n, clip_skip, lora_scale, height, width, family_kwargs):
        cfg = self.do_classifier_free_guidance
        positive, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            prompt_2=family_kwargs.get("prompt_2"),
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
            negative_prompt_2=family_kwargs.get("negative_prompt_2"),
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        projection_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            tuple(family_kwargs.get("original_size") or (height, width)),
            tuple(family_kwargs.get("crops_coords_top_left") or (0, 0)),
            tuple(family_kwargs.get("target_size") or (height, width)),
            dtype=positive.dtype,
            text_encoder_projection_dim=projection_dim,
        ).to(device)
        batch = positive.shape[0]
        cond = {
            "encoder_hidden_states": positive,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(batch, 1)},
        }
        if not cfg:
            return cond, dict(cond)
        full = {
            "encoder_hidden_states": torch.cat([negative, positive]),
            "added_cond_kwargs": {
                "text_embeds": torch.cat([negative_pooled, pooled]),
                "time_ids": time_ids.repeat(2 * batch, 1),
            },
        }
        return cond, full

    def _astar_decode(self, latents, output_type, generator, device, dtype):
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            self.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type), None


def astar_pipeline_for(pipe, model: str | None = None) -> AStarPipeline | AStarXLPipeline:
    """The A-STAR pipeline for an existing pipeline (sharing its components): :class:`AStarXLPipeline` for an SDXL
    pipeline, :class:`AStarPipeline` for an SD 1.x/2.x one.

    Raises:
        ValueError: for any other pipeline (A-STAR needs a UNet with text cross-attention); ``model`` names it.
    """
    if isinstance(pipe, StableDiffusionXLPipeline):
        return AStarXLPipeline.from_pipe(pipe)
    if isinstance(pipe, StableDiffusionPipeline):
        return AStarPipeline.from_pipe(pipe)
    name = f"{model!r} is" if model else "this is"
    raise ValueError(
        f"A-STAR runs on Stable Diffusion 1.x/2.x and SDXL pipelines (a UNet with text cross-attention); {name} a "
        f"{type(pipe).__name__}. Pick an SD or SDXL model (built in: tiny-sd15, tiny-sdxl)."
    )


def astar_parameters(astar, result: AStarPipelineOutput, options: Mapping[str, Any], **base: Any) -> dict[str, Any]:
    """The parameters to embed in an A-STAR image: ``base`` (model, prompt, seed, steps, size, ...), then the
    pipeline, the concepts and their token positions (first sample), the A-STAR ``options`` the call used (without
    the concept choice), the losses at the first and last altered steps, dtype, device and package versions."""
    from .._utils import package_versions

    altered = [r for r in (result.losses or []) if "total" in r]
    skip = ("concepts", "token_indices", "negative_prompt")
    return {
        **base,
        "pipeline": type(astar).__name__,
        "technique": "a-star",
        "concepts": result.concepts,
        "token_indices": result.token_indices[0] if result.token_indices else None,
        "astar": {k: v for k, v in options.items() if k not in skip},
        "loss_first_step": altered[0] if altered else None,
        "loss_last_step": altered[-1] if altered else None,
        "dtype": str(astar.unet.dtype).replace("torch.", ""),
        "device": str(astar.unet.device),
        "versions": package_versions(),
    }
