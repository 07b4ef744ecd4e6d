"""Objectives for the HeadHunter head search: ``objective(images, prompts) -> one score per image`` (higher is better).

Built in:

- image statistics that need no weights: ``brightness`` (mean Rec. 601 luma), ``saturation`` (mean HSV saturation),
  ``contrast`` (standard deviation of luma) and ``sharpness`` (variance of the 4-neighbour Laplacian of luma), all on
  ``[0, 1]`` pixel values; prefix a ``-`` to minimise (``"-brightness"`` finds darkening heads);
- :class:`ClipScore`: ``100 * max(cos(image, text), 0)`` with a CLIP model (Hessel et al. / torchmetrics convention);
- :class:`PickScore`: ``exp(logit_scale) * cos(image, text)`` with the PickScore model (Kirstain et al., 2023), the
  objective of the HeadHunter paper.

CLIP and PickScore load through ``transformers`` from a local folder or a Hub id (``from_pretrained``), lazily, on
the first call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


__all__ = [
    "Objective",
    "brightness",
    "saturation",
    "contrast",
    "sharpness",
    "ClipScore",
    "PickScore",
    "ToyAdherence",
    "IMAGE_STATISTICS",
    "get_objective",
]

Objective = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]

CLIP_DEFAULT = "openai/clip-vit-large-patch14"
PICKSCORE_DEFAULT = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_DEFAULT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _rgb(image) -> np.ndarray:
    """``[H, W, 3]`` float64 in ``[0, 1]`` from a PIL image or an array."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def brightness(images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[float]:
    """Mean Rec. 601 luma per image, in ``[0, 1]``."""
    return [float(_luma(_rgb(im)).mean()) for im in images]


def saturation(images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[float]:
    """Mean HSV saturation ``(max - min) / max`` per image (0 where ``max`` is 0)."""
    out = []
    for im in images:
        rgb = _rgb(im)
        high, low = rgb.max(-1), rgb.min(-1)
        sat = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
        out.append(float(sat.mean()))
    return out


def contrast(images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[float]:
    """Standard deviation of luma per image."""
    return [float(_luma(_rgb(im)).std()) for im in images]


def sharpness(images: Sequence[Any], prompts: Sequence[str] | None = None) -> list[float]:
    """Variance of the 4-neighbour Laplacian of luma (interior pixels) per image."""
    out = []
    for im in images:
        y = _luma(_rgb(im))
        lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
        out.append(float(lap.var()))
    return out


IMAGE_STATISTICS: dict[str, Objective] = {
    "brightness": brightness,
    "saturation": saturation,
    "contrast": contrast,
    "sharpness": sharpness,
}


class _Negated:
    def __init__(self, fn: Objective, name: str):
        self.fn = fn
        self.__name__ = f"-{name}"

    def __call__(self, images, prompts):
        return [-float(s) for s in self.fn(images, prompts)]


class _ClipLike:
    """A CLIP-style scorer (model + processor from transformers), loaded on first use."""

    def __init__(
        self, model: str, processor: str | None, device: str | torch.device | None, dtype: torch.dtype | None
    ):
        self.model_id = str(model)
        self.processor_id = str(processor or model)
        self.device = device
        self.dtype = dtype
        self._model = None
        self._processor = None

    def _load(self):
        if self._model is None:
            from transformers import AutoProcessor, CLIPModel

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = self.dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
            self._processor = AutoProcessor.from_pretrained(self.processor_id)
            self._model = CLIPModel.from_pretrained(self.model_id, torch_dtype=dtype).eval().to(device)
        return self._model, self._processor

    @staticmethod
    def _features(output) -> torch.Tensor:
        # transformers 5 returns an output object (projection in pooler_output); 4.x returns the tensor
        return output if torch.is_tensor(output) else output.pooler_output

    @torch.no_grad()
    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarity of each image with its own text, and the model's ``exp(logit_scale)``."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} prompts; pass one prompt per image.")
        model, processor = self._load()
        device = next(model.parameters()).device
        pixel = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device, model.dtype)
        tokens = processor(text=list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
        image_emb = self._features(model.get_image_features(pixel_values=pixel)).float()
        text_emb = self._features(model.get_text_features(**tokens)).float()
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (image_emb * text_emb).sum(-1).cpu(), model.logit_scale.exp().float().cpu()


class ClipScore(_ClipLike):
    """CLIP score ``100 * max(cos(image, template.format(prompt=p)), 0)``.

    Args:
        model: CLIP weights (local folder or Hub id), default ``openai/clip-vit-large-patch14`` (HeadHunter's).
        template: text for each prompt, e.g. ``"A photo depicts {prompt}"`` (HeadHunter's CLIP text).
        device / dtype: where to run it (default: CUDA in fp16 when available, else CPU fp32).
    """

    def __init__(self, model: str = CLIP_DEFAULT, template: str = "{prompt}", device=None, dtype=None):
        super().__init__(model, None, device, dtype)
        self.template = template
        self.__name__ = f"clip:{self.model_id}"

    def __call__(self, images, prompts) -> list[float]:
        cos, _ = self.cosine(images, [self.template.format(prompt=p) for p in prompts])
        return (100.0 * cos.clamp(min=0)).tolist()


class PickScore(_ClipLike):
    """PickScore ``exp(logit_scale) * cos(image, prompt)`` (https://arxiv.org/abs/2305.01569).

    Args:
        model: PickScore weights, default ``yuvalkirstain/PickScore_v1``.
        processor: its processor, default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (as the PickScore authors use).
        device / dtype: as :class:`ClipScore`.
    """

    def __init__(self, model: str = PICKSCORE_DEFAULT, processor: str | None = None, device=None, dtype=None):
        if processor is None:
            processor = PICKSCORE_PROCESSOR_DEFAULT if str(model) == PICKSCORE_DEFAULT else model
        super().__init__(model, processor, device, dtype)
        self.__name__ = f"pickscore:{self.model_id}"

    def __call__(self, images, prompts) -> list[float]:
        cos, logit_scale = self.cosine(images, list(prompts))
        return (logit_scale * cos).tolist()


class ToyAdherence:
    """How well toy-model images follow their prompts, as the shipped toy evaluator judges them (no download): per
    image, the mean of its checks (objects named are drawn; nothing else is drawn; the relation or the cell when the
    prompt has one; see :func:`attnpack.toy.evaluator.score_prompt`). Only for the toy vocabulary (colored shapes)."""

    __name__ = "toy-adherence"

    def __init__(self):
        self._evaluator = None

    def __call__(self, images, prompts):
        from ..toy.evaluator import evaluate_images
        from ..toy.loader import load_evaluator

        if self._evaluator is None:
            self._evaluator = load_evaluator(device="cpu")
        results = evaluate_images(self._evaluator, images, list(prompts))["per_image"]
        return [float(sum(bool(v) for v in r.values() if v is not None)) / sum(v is not None for v in r.values())
                for r in results]  # fmt: skip


def _check_weights_reachable(repo: str, objective: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the fix, when ``objective``'s weights can be had neither from a local folder, nor from
    the Hugging Face cache, nor from the Hub (offline by ``HF_HUB_OFFLINE``, or no answer within ``timeout``);
    transformers would otherwise retry the Hub for minutes before failing."""
    import os

    if os.path.isdir(os.path.expanduser(repo)):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    fix = (
        f"download it where the Hub is reachable (`hf download {repo}`) so it is in the cache, or give a local "
        f"folder (`{objective.split(':')[0]}:<folder>`), or use an image statistic such as `brightness`"
    )
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"objective {objective!r} needs {repo!r} from the Hugging Face Hub, which is offline here (HF_HUB_OFFLINE) "
            f"and the files are not in the cache: {fix}."
        )
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, timeout=timeout)
    except Exception as exc:  # no network, DNS, timeout, unknown repo: one try, then the fix
        raise ValueError(
            f"objective {objective!r} needs {repo!r} from the Hugging Face Hub, which did not answer "
            f"({type(exc).__name__}); {fix}."
        ) from None


def get_objective(spec: str | Objective) -> Objective:
    """An objective from a callable or a name: ``brightness``, ``-saturation``, ``clip``, ``clip:<path or hub id>``,
    ``pickscore``, ``pickscore:<path or hub id>``, ``toy-adherence`` (the toy models' evaluator)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"`objective` must be a callable (images, prompts) -> scores or a name, got {spec!r}.")
    name = spec.strip()
    negate = name.startswith("-")
    base = name[1:] if negate else name
    if base == "toy-adherence" and not negate:
        return ToyAdherence()
    if base in IMAGE_STATISTICS:
        fn = IMAGE_STATISTICS[base]
        return _Negated(fn, base) if negate else fn
    kind, _, source = base.partition(":")
    if kind in ("clip", "pickscore") and not negate:
        scorer = (
            (ClipScore(source) if source else ClipScore())
            if kind == "clip"
            else (PickScore(source) if source else PickScore())
        )
        for repo in dict.fromkeys((scorer.model_id, scorer.processor_id)):
            _check_weights_reachable(repo, name)
        return scorer
    raise ValueError(
        f"Unknown objective {spec!r}. Use one of {', '.join(IMAGE_STATISTICS)} (prefix '-' to minimise), 'clip', "
        "'clip:<weights path or hub id>', 'pickscore', 'pickscore:<weights path or hub id>', 'toy-adherence', or pass a callable "
        "(images, prompts) -> scores."
    )
