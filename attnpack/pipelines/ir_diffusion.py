"""IR-Diffusion pipeline: several subjects, each consistent with its own reference image, in one scene.

Paper: He et al., *Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and Reposition
Attention*, arXiv 2411.19261 (https://arxiv.org/abs/2411.19261); official code ``hehuiguo/DreamStory``. The attention
itself lives in :mod:`attnpack.attn_processors.ir_diffusion`; this module runs the phases of the official driver
(``pipe_test.py``):

1. **references**: one vanilla generation per subject prompt, all from the same initial noise (``seed``);
2. **layout**: a vanilla generation of the scene prompt from a fixed noise ``z_T`` (``layout_seed``), segmented into
   target subject masks; if a subject is missing, a new layout seed is tried (``max_layout_attempts``);
3. **masks**: reference masks (bottom sixth zeroed), target masks (closing, minimum size, overlap removal);
4. **final pass**: the batch ``[reference_1 .. reference_n, target]`` (per CFG half) from the reference noise and the
   same ``z_T``, with Isolation / Reposition self-attention and masked mutual cross-attention.

Mask sources: user masks or boxes; ``mask_source="attention"`` (built in: the model's own self- and cross-attention,
no extra weights); or any segmenter callable ``segmenter(image, words) -> [mask or None per word]`` (e.g. GroundingDINO
+ SAM through ``transformers``, see ``docs/ir-diffusion.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..attn_processors.context import ROLE_REFERENCE, ROLE_TARGET, run_overrides
from ..attn_processors.ir_diffusion import STATE_KEY, IRAttnState, apply_ir_diffusion, resolve_ir_layers
from ..attn_processors.processor import apply_processors
from .generation import check_text
from .ir_masks import (
    OFFICIAL_CLOSE_KERNEL,
    OFFICIAL_MIN_MASK_SIZE,
    AttentionSubjectMaps,
    SubjectMasks,
    as_mask,
    box_mask,
    close_mask,
    postprocess_target_masks,
    remove_overlaps,
    scaled_pixels,
    trim_bottom,
)


logger = logging.getLogger(__name__)

__all__ = [
    "IRDiffusionPipeline",
    "IRDiffusionPipelineOutput",
    "IRDiffusionSDPipeline",
    "IRSubject",
    "Segmenter",
    "ir_pipeline_for",
]

# segmenter(image, words) -> one mask (H x W, bool / 0-1 / 0-255, tensor / array / PIL) or None per word
Segmenter = Callable[[Any, Sequence[str]], Sequence[Any]]

_KEEP_DTYPES: contextvars.ContextVar[bool] = contextvars.ContextVar("attnpack_ir_keep_dtypes", default=False)

_RESERVED = ("prompt", "prompt_2", "latents", "generator", "num_images_per_prompt", "output_type", "return_dict")


def _refuse_head_guidance(unet) -> None:
    """IR-Diffusion and head guidance do not compose: both define the batch's rows (IR's reference and target rows,
    guidance's appended perturbed rows), and guidance only acts on plain [uncond, cond] batches, so it would silently
    do nothing during the IR phases. Refuse before any work (docs/architecture.md, "Composition")."""
    from .guidance import HOOK_NAME

    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(
            "IR-Diffusion does not compose with head guidance: IR-Diffusion builds its own batch (reference and "
            "target rows), where head guidance's perturbed rows are not defined. Remove the head-guidance handle "
            "(handle.remove()) before calling this pipeline."
        )


@dataclasses.dataclass(frozen=True)
class IRSubject:
    """One subject: ``prompt`` generates its reference image; ``word`` names it in that prompt and in the scene
    prompt (used by the built-in attention masks and passed to segmenters)."""

    prompt: str
    word: str

    @classmethod
    def parse(cls, value: IRSubject | Mapping[str, Any], index: int) -> IRSubject:
        if isinstance(value, IRSubject):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"`subjects[{index}]` must be a dict with 'prompt' and 'word', got {value!r}.")
        unknown = set(value) - {"prompt", "word"}
        if unknown or "prompt" not in value or "word" not in value:
            raise ValueError(
                f"`subjects[{index}]` must have exactly the keys 'prompt' and 'word', got {sorted(value)}; e.g. "
                '{"prompt": "a photo of a corgi", "word": "corgi"}.'
            )
        for key in ("prompt", "word"):
            if not isinstance(value[key], str) or not value[key].strip():
                raise ValueError(f"`subjects[{index}]['{key}']` must be a non-empty string, got {value[key]!r}.")
            check_text(f"subjects[{index}]['{key}']", value[key])
        return cls(value["prompt"], value["word"].strip())


@dataclasses.dataclass
class IRDiffusionPipelineOutput(BaseOutput):
    """Output of :class:`IRDiffusionPipeline`.

    Attributes:
        images: the multi-subject target image (a list of one, in ``output_type``).
        reference_images: one reference image per subject (vanilla generations from ``seed``).
        layout_images: the vanilla layout generation the target masks came from (empty when target masks were given).
        reference_masks / target_masks: ``bool [n, H, W]`` numpy arrays used by the attention.
        layout_seed: the seed of the target noise ``z_T`` that was used.
    """

    images: list
    reference_images: list
    layout_images: list
    reference_masks: np.ndarray
    target_masks: np.ndarray
    layout_seed: int


def _word_tokens(tokenizer, prompt: str, word: str, argument: str) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (first occurrence)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    wid = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(wid) + 1):
        if ids[i : i + len(wid)] == wid:
            return list(range(i, i + len(wid)))
    raise ValueError(
        f"subject word {word!r} does not occur in {argument} {prompt!r} (as tokens, within the first "
        f"{tokenizer.model_max_length}); use the exact word of the prompt, or give masks / a segmenter."
    )


def _per_subject(value, n: int, argument: str) -> list | None:
    if value is None:
        return None
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        value = list(value)
    if not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"`{argument}` must hold one entry per subject ({n}), got {value!r:.200}.")
    return list(value)


def _user_masks(masks, boxes, n: int, height: int, width: int, name: str) -> torch.Tensor | None:
    masks = _per_subject(masks, n, f"{name}_masks")
    boxes = _per_subject(boxes, n, f"{name}_boxes")
    if masks is not None and boxes is not None:
        raise ValueError(f"give either `{name}_masks` or `{name}_boxes`, not both.")
    if masks is not None:
        out = [as_mask(m, argument=f"{name}_masks[{i}]", size=(height, width)) for i, m in enumerate(masks)]
    elif boxes is not None:
        out = [box_mask(b, height, width, argument=f"{name}_boxes[{i}]") for i, b in enumerate(boxes)]
    else:
        return None
    for i, m in enumerate(out):
        if not bool(m.any()):
            raise ValueError(f"`{name}_masks[{i}]` is empty; every subject needs a non-empty region.")
    return torch.stack(out)


@dataclasses.dataclass(frozen=True)
class _Masking:
    """How the automatic masks are made (see :meth:`IRDiffusionPipeline.__call__`)."""

    source: str | Segmenter
    threshold: str | float
    size: tuple[int, int]
    attention_steps: tuple[float, float]
    bottom_trim: int
    min_size: int | None
    close_kernel: int
    ref_tokens: list[list[int]] | None  # built-in attention source: word tokens in each subject prompt
    scene_tokens: list[list[int]] | None  # ... and in the scene prompt


class _IRDiffusionMixin:
    """The IR-Diffusion phases on a UNet text-to-image pipeline class ``_base_pipeline`` (SDXL or SD 1.x/2.x): each
    phase is a call of that class's ``__call__``; the attention processors are the same for both."""

    _base_pipeline: type

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """Build from a loaded pipeline, sharing its components (no copy).

        Unlike ``DiffusionPipeline.from_pipe``, which casts every shared component to float32 unless ``torch_dtype``
        is given (changing the source pipeline too), the components keep their dtypes; pass ``torch_dtype`` to cast.
        The progress-bar settings are copied too.
        """
        token = None if "torch_dtype" in kwargs or "dtype" in kwargs else _KEEP_DTYPES.set(True)
        try:
            new = super().from_pipe(pipeline, **kwargs)
        finally:
            if token is not None:
                _KEEP_DTYPES.reset(token)
        if getattr(pipeline, "_progress_bar_config", None) is not None:
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    def to(self, *args, **kwargs):
        if _KEEP_DTYPES.get() and not args and set(kwargs) == {"dtype"}:
            return self  # the cast inside DiffusionPipeline.from_pipe (see from_pipe)
        return super().to(*args, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        subjects: Sequence[Mapping[str, str] | IRSubject],
        scene_prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        seed: int = 0,
        layout_seed: int | None = None,
        reference_masks: Sequence[Any] | None = None,
        reference_boxes: Sequence[Sequence[int]] | None = None,
        target_masks: Sequence[Any] | None = None,
        target_boxes: Sequence[Sequence[int]] | None = None,
        mask_source: str | Segmenter = "attention",
        mask_threshold: str | float = "otsu",
        isolation: bool = True,
        reposition: bool = True,
        mutual_cross_attention: bool = True,
        dropout: float = 0.5,
        dropout_seed: int | None = None,
        cross_attention_lambda: float = 0.9,
        reference_bias: float = 0.0,
        ir_layers=None,
        ir_steps: tuple[float, float] = (0.0, 1.0),
        reference_bottom_trim: int = 6,
        min_mask_size: int | None = None,
        close_kernel: int | None = None,
        attention_mask_steps: tuple[float, float] = (0.5, 1.0),
        max_layout_attempts: int = 20,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ) -> IRDiffusionPipelineOutput | tuple:
        r"""Generate one multi-subject scene consistent with per-subject references.

        Args:
            subjects: one ``{"prompt": ..., "word": ...}`` per subject: ``prompt`` makes the reference image, ``word``
                names the subject in it and in ``scene_prompt``.
            scene_prompt: the multi-subject scene.
            negative_prompt, height, width, num_inference_steps, guidance_scale: as in
                ``StableDiffusionXLPipeline`` (official: 1280x768, 50 steps, guidance 7.0), used by every phase.
            seed: initial noise of every reference (all references share it, as the official code).
            layout_seed: target noise ``z_T`` of the layout and final passes (default ``seed``, which is what the
                official code draws first); retries use ``layout_seed + 1``, ``+ 2``, ...
            reference_masks / reference_boxes: per-subject masks (``[H, W]`` bool / 0-1 / 0-255, tensors, arrays
                or PIL images) or pixel boxes ``(x0, y0, x1, y1)`` on the reference images; default: ``mask_source``.
            target_masks / target_boxes: the same for the target; when given, no layout pass is run.
            mask_source: ``"attention"`` (built in, :class:`~attnpack.pipelines.ir_masks.AttentionSubjectMaps`) or a
                segmenter ``segmenter(image: PIL.Image, words: list[str]) -> [mask or None per word]``.
            mask_threshold: binarisation of masks at each attention grid: ``"otsu"``, ``"dreamstory"`` (the official
                Otsu variant) or a number in (0, 1).
            isolation, reposition, mutual_cross_attention: switch each part (ablations); ``reposition=False`` keeps
                the extended attention with un-moved, dropout-masked reference keys (official
                ``is_rescale_self_attn=False``).
            dropout: target-query dropout for the reference attention, resampled every step (official 0.5).
            dropout_seed: seed of the dropout masks (default ``seed``).
            cross_attention_lambda: weight of the masked mutual cross-attention (official 0.9).
            reference_bias: additive logit bias of the reference keys (official ``ref_sa_lambda`` = 0).
            ir_layers: self-attention layers with Reposition Attention: ``None`` = the official decoder layers
                (:func:`~attnpack.attn_processors.ir_diffusion.default_ir_layers`), ``[]`` = none, or module names /
                regexes.
            ir_steps: ``(start, end)`` schedule fractions with Reposition Attention (official: all steps).
            reference_bottom_trim: zero the bottom ``1/d`` of automatic reference masks (official 6; 0 = off).
            min_mask_size: automatic target masks smaller than this (pixels; area, height or width) grow to a box;
                default: the official 256 px scaled by ``min(H, W) / 768``. 0 disables it.
            close_kernel: morphological closing kernel (pixels) of segmenter target masks; default: the official 128
                px scaled the same way. 0 disables it.
            attention_mask_steps: schedule fractions aggregated by the built-in attention masks.
            max_layout_attempts: layout seeds tried until every subject is found (official 20).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict: return an :class:`IRDiffusionPipelineOutput` (else a tuple ``(images, reference_images)``).
            **kwargs: further ``StableDiffusionXLPipeline`` arguments used by every phase (e.g.
                ``callback_on_step_end``); ``prompt``, ``latents``, ``generator`` and ``num_images_per_prompt`` are set
                by this pipeline.
        """
        items = [IRSubject.parse(s, i) for i, s in enumerate(subjects)] if isinstance(subjects, Sequence) else None
        if not items or isinstance(subjects, str):
            raise ValueError(
                f"`subjects` must be a non-empty list of {{'prompt', 'word'}} dicts, got {subjects!r:.200}."
            )
        if not isinstance(scene_prompt, str) or not scene_prompt.strip():
            raise ValueError(f"`scene_prompt` must be a non-empty string, got {scene_prompt!r}.")
        reserved = sorted(set(kwargs) & set(_RESERVED))
        if reserved:
            raise ValueError(f"{type(self).__name__} sets {reserved} itself; remove them from the call.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if not (mask_source == "attention" or callable(mask_source)):
            raise ValueError(f"`mask_source` must be 'attention' or a segmenter callable, got {mask_source!r}.")
        if not isinstance(max_layout_attempts, int) or max_layout_attempts < 1:
            raise ValueError(f"`max_layout_attempts` must be a positive integer, got {max_layout_attempts!r}.")
        for name, value in (("seed", seed), ("layout_seed", layout_seed), ("dropout_seed", dropout_seed)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        n = len(items)
        sample = getattr(self, "default_sample_size", None) or self.unet.config.sample_size  # SDXL / SD 1.x
        height = height or sample * self.vae_scale_factor
        width = width or sample * self.vae_scale_factor
        layout_seed = seed if layout_seed is None else layout_seed
        min_size = scaled_pixels(OFFICIAL_MIN_MASK_SIZE, height, width) if min_mask_size is None else min_mask_size
        kernel = scaled_pixels(OFFICIAL_CLOSE_KERNEL, height, width) if close_kernel is None else close_kernel
        state_args = dict(
            isolation=isolation,
            reposition=reposition,
            mutual_cross_attention=mutual_cross_attention,
            dropout=dropout,
            dropout_seed=seed if dropout_seed is None else dropout_seed,
            cross_attention_lambda=cross_attention_lambda,
            reference_bias=reference_bias,
            ir_steps=tuple(ir_steps),
        )
        IRAttnState(masks=None, **state_args)  # validates the options before any generation
        _refuse_head_guidance(self.unet)
        user_ref = _user_masks(reference_masks, reference_boxes, n, height, width, "reference")
        user_tgt = _user_masks(target_masks, target_boxes, n, height, width, "target")
        if user_tgt is not None:
            user_tgt = remove_overlaps(user_tgt)
            emptied = [i for i, m in enumerate(user_tgt) if not bool(m.any())]
            if emptied:
                raise ValueError(
                    f"target regions of subjects {emptied} lie inside other subjects' regions and vanish when overlaps "
                    "are removed (the smaller region gives up shared pixels); make the regions distinct."
                )
        resolve_ir_layers(self.unet, ir_layers)  # a bad layer name fails now, not after the first phases
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(self, "tokenizer_2", None)
        use_attention = mask_source == "attention"
        masking = _Masking(
            source=mask_source,
            threshold=mask_threshold,
            size=(height, width),
            attention_steps=tuple(attention_mask_steps),
            bottom_trim=reference_bottom_trim,
            min_size=min_size or None,
            close_kernel=kernel,
            ref_tokens=[
                _word_tokens(tokenizer, s.prompt, s.word, f"subjects[{i}]['prompt']") for i, s in enumerate(items)
            ]
            if use_attention and user_ref is None
            else None,
            scene_tokens=[_word_tokens(tokenizer, scene_prompt, s.word, "`scene_prompt`") for s in items]
            if use_attention and user_tgt is None
            else None,
        )
        common = dict(
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            **kwargs,
        )

        # 1. references: vanilla, one per subject, same initial noise
        ref_noise = self._noise(seed, height, width)
        references, ref_masks = self._references(items, ref_noise, common, masking, user_ref)

        # 2. layout: vanilla scene from z_T (retrying with new seeds until every subject is found), unless given
        layout_images: list = []
        if user_tgt is not None:
            tgt_masks, target_noise = user_tgt, self._noise(layout_seed, height, width)
        else:
            tgt_masks, target_noise, layout_seed, image = self._layout(
                items, scene_prompt, layout_seed, max_layout_attempts, common, masking
            )
            layout_images = [image]

        # 3. final pass: [ref_1 .. ref_n, target] per CFG half, reference noise + the same z_T
        state = IRAttnState(masks=SubjectMasks(ref_masks, tgt_masks, mask_threshold), **state_args)
        cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        roles = ([ROLE_REFERENCE] * n + [ROLE_TARGET]) * (2 if cfg else 1)
        latents = torch.cat([ref_noise] * n + [target_noise])
        handle = apply_ir_diffusion(self, ir_layers=ir_layers)
        try:
            with self._phase("IR final"), run_overrides(roles=roles, **{STATE_KEY: state}):
                final = self._base_pipeline.__call__(
                    self,
                    prompt=[s.prompt for s in items] + [scene_prompt],
                    latents=latents,
                    output_type="np",
                    **common,
                ).images
        finally:
            handle.remove()
        out = IRDiffusionPipelineOutput(
            images=self._convert([final[-1]], output_type),
            reference_images=self._convert(references, output_type),
            layout_images=self._convert(layout_images, output_type),
            reference_masks=ref_masks.numpy(),
            target_masks=tgt_masks.numpy(),
            layout_seed=layout_seed,
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return out.images, out.reference_images
        return out

    # ---------------------------------------------------------------- phases
    def _references(self, items, noise, common, masking: _Masking, user_masks):
        """Phase 1: one vanilla image per subject (``[H, W, 3]`` arrays) and the reference masks ``bool [n, H, W]``."""
        images, masks = [], []
        for i, subject in enumerate(items):
            maps = (
                AttentionSubjectMaps([masking.ref_tokens[i]], masking.attention_steps) if masking.ref_tokens else None
            )
            with self._phase(f"IR reference {i + 1}/{len(items)}"):
                image = self._vanilla(subject.prompt, noise, common, maps)
            images.append(image)
            if user_masks is not None:
                continue
            if maps is not None:
                mask = maps.masks(masking.size, masking.threshold)[0]
            else:
                found = masking.source(self._to_pil(image), [subject.word])
                mask = None if not found or found[0] is None else as_mask(found[0], size=masking.size)
            if mask is None or not bool(mask.any()):
                raise ValueError(
                    f"no mask found for subject {i} ({subject.word!r}) in its reference image; pass "
                    "`reference_masks` / `reference_boxes`, or change `seed` or the subject prompt."
                )
            trimmed = trim_bottom(mask, masking.bottom_trim)
            if not bool(trimmed.any()):
                logger.warning("subject %d lies in the bottom of its reference: its mask is kept untrimmed", i)
            masks.append(trimmed if bool(trimmed.any()) else mask)
        return images, (user_masks if user_masks is not None else torch.stack(masks))

    def _layout(self, items, scene_prompt, layout_seed, attempts, common, masking: _Masking):
        """Phase 2: vanilla scenes from ``layout_seed``, ``+ 1``, ... until every subject has a target mask.

        Returns ``(target_masks [n, H, W], z_T, the seed used, the layout image)``.
        """
        words = [s.word for s in items]
        for attempt in range(attempts):
            seed = layout_seed + attempt
            noise = self._noise(seed, *masking.size)
            maps = (
                AttentionSubjectMaps(masking.scene_tokens, masking.attention_steps) if masking.scene_tokens else None
            )
            with self._phase(f"IR layout (seed {seed})"):
                image = self._vanilla(scene_prompt, noise, common, maps)
            if maps is not None:
                found = list(maps.masks(masking.size, masking.threshold))
            else:
                found = list(masking.source(self._to_pil(image), words) or [])
                found = [
                    None if m is None else close_mask(as_mask(m, size=masking.size), masking.close_kernel)
                    for m in found
                ]
            missing = [w for w, m in zip(words, found + [None] * len(words)) if m is None or not bool(m.any())]
            if not missing and len(found) == len(words):
                masks = postprocess_target_masks(torch.stack(found), masking.min_size)
                missing = [w for w, m in zip(words, masks) if not bool(m.any())]  # lost to overlaps
                if not missing:
                    return masks, noise, seed, image
            logger.info("layout seed %d: subjects %s not found, retrying", seed, missing)
        raise ValueError(
            f"no layout with every subject found in {attempts} attempts (seeds {layout_seed}.."
            f"{layout_seed + attempts - 1}); raise `max_layout_attempts`, change the scene prompt, or pass "
            "`target_boxes`."
        )

    # ---------------------------------------------------------------- helpers
    def _noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        """The initial noise ``pipe(..., generator=torch.Generator("cpu").manual_seed(seed))`` would draw."""
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        encoder = getattr(self, "text_encoder_2", None) or self.text_encoder
        dtype = encoder.dtype if encoder is not None else self.unet.dtype
        generator = torch.Generator("cpu").manual_seed(seed)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)

    def _vanilla(
        self, prompt: str, noise: torch.Tensor, common: dict, maps: AttentionSubjectMaps | None
    ) -> np.ndarray:
        """One vanilla generation (``[H, W, 3]`` float in [0, 1]); with ``maps``, its attention is recorded."""
        handle = apply_processors(self, maps, description="IR attention masks") if maps is not None else None
        try:
            images = self._base_pipeline.__call__(
                self, prompt=prompt, latents=noise.clone(), output_type="np", **common
            ).images
        finally:
            if handle is not None:
                handle.remove()
        return images[0]

    @contextlib.contextmanager
    def _phase(self, desc: str):
        """Label the progress bar of one phase (the user's own progress-bar settings are kept)."""
        old = getattr(self, "_progress_bar_config", None)
        self._progress_bar_config = {"desc": desc, **(old or {})}
        try:
            yield
        finally:
            if old is None:
                del self._progress_bar_config
            else:
                self._progress_bar_config = old

    def _to_pil(self, image: np.ndarray):
        return self.image_processor.numpy_to_pil(image[None])[0]

    def _convert(self, images: list[np.ndarray], output_type: str) -> list:
        if output_type == "np":
            return list(images)
        if output_type == "pt":
            return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images]
        return [self._to_pil(im) for im in images]


class IRDiffusionPipeline(_IRDiffusionMixin, StableDiffusionXLPipeline):
    r"""IR-Diffusion (arXiv 2411.19261) on SDXL-architecture models (SDXL, Playground v2.5).

    Build it from a loaded SDXL pipeline without copying weights: ``IRDiffusionPipeline.from_pipe(sdxl_pipe)``.

    Examples:
        >>> pipe = IRDiffusionPipeline.from_pipe(sdxl_pipe)
        >>> out = pipe(
        ...     subjects=[
        ...         {"prompt": "a photo of a freckled boy with copper hair", "word": "boy"},
        ...         {"prompt": "a photo of a fluffy white cat with a monocle", "word": "cat"},
        ...     ],
        ...     scene_prompt="a boy with a slingshot and a cat sitting on a fence",
        ...     seed=0,
        ... )
        >>> out.images[0]  # the scene; out.reference_images, out.target_masks, ...
    """

    _base_pipeline = StableDiffusionXLPipeline


class IRDiffusionSDPipeline(_IRDiffusionMixin, StableDiffusionPipeline):
    r"""IR-Diffusion on SD 1.x / 2.x-architecture pipelines (e.g. the built-in ``toy-sd``): the same phases, options
    and attention processors as :class:`IRDiffusionPipeline` (whose ``__call__`` documents them), with
    ``StableDiffusionPipeline`` running each phase. The paper and the official code use SDXL; this variant exists so
    that subject isolation can be measured on the in-house toy model (docs/toy-models.md).

    Examples:
        >>> pipe = IRDiffusionSDPipeline.from_pipe(attnpack.load_pipeline("toy-sd"))
        >>> out = pipe(
        ...     subjects=[{"prompt": "a red circle", "word": "circle"}, {"prompt": "a blue square", "word": "square"}],
        ...     scene_prompt="a red circle left of a blue square",
        ...     num_inference_steps=20,
        ... )
    """

    _base_pipeline = StableDiffusionPipeline


def ir_pipeline_for(pipe, model: str | None = None):
    """The IR-Diffusion pipeline sharing ``pipe``'s components (no copies): :class:`IRDiffusionPipeline` for an SDXL
    architecture (a UNet and two text encoders), :class:`IRDiffusionSDPipeline` for SD 1.x / 2.x (a UNet and one);
    any other model is a ``ValueError`` naming it (``model``: the name the user gave, for the message)."""
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(
            f"IR-Diffusion needs a UNet model (SDXL, Playground v2.5, or SD 1.x/2.x such as toy-sd); "
            f"{model or type(pipe).__name__!r} is a {type(pipe).__name__}."
        )
    if getattr(pipe, "text_encoder_2", None) is not None:
        return IRDiffusionPipeline.from_pipe(pipe)
    return IRDiffusionSDPipeline.from_pipe(pipe)
