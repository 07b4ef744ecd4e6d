"""Training of the toy models: the VAE, the evaluator, ``toy-sd`` and ``toy-flux``.

Every stage trains on the procedural dataset (:class:`attnpack.toy.data.ToyScenes`) and is reproducible from its
:class:`TrainConfig`: batch ``s`` holds scenes ``s*B ... s*B+B-1`` of ``data_seed``, and all noise of step ``s`` comes
from a generator seeded with ``(seed, s)``. A run therefore resumes exactly where it stopped (checkpoints hold the
weights, the EMA weights, the optimizer and the LR schedule as safetensors + JSON, never pickle, and are written
atomically), and runs under ``accelerate`` (``Accelerator``: CPU, one GPU, or ``accelerate launch`` with several
processes, each taking its slice of the global batch).

Objectives:

- ``vae``: ``AutoencoderKL`` with L1 + MSE reconstruction and a small KL term; afterwards ``scaling_factor`` and
  ``shift_factor`` are set from latent statistics of held-out scenes.
- ``evaluator``: :class:`~attnpack.toy.evaluator.ToyEvaluator`, CenterNet focal loss on augmented scenes.
- ``toy-sd``: epsilon prediction on SD's scaled-linear DDPM schedule (Ho et al., https://arxiv.org/abs/2006.11239),
  Min-SNR-gamma loss weights (Hang et al., https://arxiv.org/abs/2303.09556).
- ``toy-flux``: rectified flow / flow matching, velocity ``noise - x0`` at logit-normal sigmas (Esser et al., SD3,
  https://arxiv.org/abs/2403.03206), exactly the parameterisation ``FluxPipeline``'s Euler sampler integrates.

Both denoisers see empty captions with probability ``caption_dropout`` so that classifier-free guidance works.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import check_state_fields, load_state, pickle_checkpoint_error, save_state
from .data import ToyScenes
from .models import (
    FLUX_CONFIG,
    TEXT_LENGTH,
    UNET_CONFIG,
    VAE_CONFIG,
    build_flux_pipeline,
    build_flux_transformer,
    build_sd_pipeline,
    build_unet,
    build_vae,
)


logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "STAGES",
    "default_config",
    "recipe",
    "train",
    "train_recipe",
    "with_overrides",
    "atomic_dir",
    "CHECKPOINT_NAME",
]

STAGES = ("vae", "evaluator", "toy-sd", "toy-flux")
CHECKPOINT_NAME = "checkpoint.safetensors"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # pickle, written by earlier versions; never loaded
CHECKPOINT_KIND = "attnpack.toy_train_checkpoint"
LATENTS_KIND = "attnpack.toy_latents"
CONFIG_NAME = "train_config.json"
LOG_NAME = "train_log.json"


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``train_config.json`` next to the weights)."""

    stage: str
    steps: int
    batch_size: int
    lr: float
    data_seed: int = 0  # procedural dataset seed (ToyScenes(seed=data_seed))
    seed: int = 0  # weight init, noise, caption dropout
    text_seed: int = 0  # seed of the frozen random text encoders (denoisers)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: export the raw weights
    caption_dropout: float = 0.1
    dataset_size: int = 0  # 0: a fresh scene for every item; N: scenes 0..N-1, cycled (denoisers cache their latents)
    checkpoint_every: int = 250
    init: str = ""  # "": random init from `seed`; else a folder of this stage's trained weights (relative: to out_dir)
    data: dict = dataclasses.field(default_factory=dict)  # ToyScenes options, e.g. {"sizes": {...}}
    model: dict = dataclasses.field(default_factory=dict)  # architecture (constructor kwargs)
    loss: dict = dataclasses.field(default_factory=dict)  # stage-specific loss settings

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"`stage` must be one of {', '.join(STAGES)}, got {self.stage!r}.")
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr!r}.")
        if not isinstance(self.dataset_size, int) or self.dataset_size < 0:
            raise ValueError(f"`dataset_size` must be an integer >= 0, got {self.dataset_size!r}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}.")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as in the JSON file

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}; known keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _first_phase(stage: str) -> TrainConfig:
    """The from-scratch phase of ``stage`` (for toy-sd / toy-flux the shipped weights continue it, see :func:`recipe`)."""
    if stage == "vae":
        return TrainConfig(
            stage="vae",
            steps=1500,
            batch_size=32,
            lr=1e-3,
            data_seed=1,
            seed=1,
            ema_decay=0.0,
            data=dict(sizes=dict(small=[6.0, 8.0], large=[10.0, 12.5])),
            model=dict(VAE_CONFIG),
            loss=dict(mse_weight=1.0, kl_weight=1e-3, crop=32, stats_samples=2048),
        )
    if stage == "evaluator":
        return TrainConfig(
            stage="evaluator",
            steps=2500,
            batch_size=32,
            lr=2e-3,
            data_seed=2,
            seed=2,
            weight_decay=1e-4,
            data=dict(sizes=dict(small=[6.0, 10.0], large=[10.0, 14.5])),  # every size the models draw
            model=dict(channels=(16, 32, 64), threshold=0.3),
            loss=dict(blur=1.0, noise=0.06, contrast=0.15),
        )
    if stage == "toy-sd":
        return TrainConfig(
            stage="toy-sd",
            steps=6000,  # GPU, ~5 min
            batch_size=64,
            lr=1e-3,
            data_seed=3,
            seed=3,
            text_seed=3,
            ema_decay=0.999,
            dataset_size=32768,
            model=dict(UNET_CONFIG),
            loss=dict(snr_gamma=5.0),
        )
    if stage == "toy-flux":
        return TrainConfig(
            stage="toy-flux",
            steps=5000,  # GPU, ~5 min
            batch_size=64,
            lr=1e-3,
            data_seed=4,
            seed=4,
            text_seed=4,
            ema_decay=0.999,
            dataset_size=32768,
            model=dict(FLUX_CONFIG),
            loss=dict(logit_mean=0.0, logit_std=1.0),
        )
    raise ValueError(f"`stage` must be one of {', '.join(STAGES)}, got {stage!r}.")


# Continuation phases: (export name, config changes). Phase k > 0 starts from the weights phase k - 1 exported (its
# `init`), with a fresh optimizer, a fresh warmup + cosine schedule and new noise (`seed`); data and text encoders stay.
_CONTINUATIONS: dict[str, list[dict]] = {
    "toy-sd": [dict(steps=8000, lr=5e-4, seed=5)],  # CPU, 2 cores, ~40 min
    # CPU, 2 cores: 41 + 23 + 96 + 56 min
    "toy-flux": [
        dict(steps=9000, lr=1e-3, seed=6),
        dict(steps=6000, lr=5e-4, seed=7),
        dict(steps=26000, lr=1e-3, seed=8),
        dict(steps=12000, lr=5e-4, seed=9),
    ],
}


def recipe(stage: str) -> list[tuple[str, TrainConfig]]:
    """The phases that produce the shipped weights of ``stage``, as ``(name, config)``: phase ``name`` exports to
    ``out_dir/name``; the last phase is named ``stage``, earlier ones ``"<stage>.base"``, ``"<stage>.phase2"``, ...
    Each later phase starts from the one before (``config.init``)."""
    phases = [_first_phase(stage)]
    for changes in _CONTINUATIONS.get(stage, []):
        phases.append(dataclasses.replace(phases[0], **changes))
    names = [f"{stage}.base"] + [f"{stage}.phase{k + 1}" for k in range(1, len(phases))]
    names[-1] = stage
    for k in range(1, len(phases)):
        phases[k] = dataclasses.replace(phases[k], init=names[k - 1])
    return list(zip(names, phases, strict=True))


def default_config(stage: str) -> TrainConfig:
    """The configuration of the last phase of :func:`recipe` (what the shipped weights' ``train_config.json`` says)."""
    return recipe(stage)[-1][1]


# ------------------------------------------------------------------------------------------------- files
@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an old ``path`` is removed only
    after the new one is in place), on failure it is deleted and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


# ------------------------------------------------------------------------------------------------- stages
class _Stage(abc.ABC):
    """One training objective: a trainable module whose ``forward(**batch)`` returns the loss, a batch builder, and
    the export of the trained weights."""

    def __init__(
        self, cfg: TrainConfig, device: torch.device, vae_path: Path | None, work_dir: Path, progress: bool = False
    ):
        self.cfg, self.device, self.vae_path, self.work_dir, self.progress = cfg, device, vae_path, work_dir, progress
        self.data = ToyScenes(seed=cfg.data_seed, **cfg.data)

    def indices(self, indices: list[int]) -> list[int]:
        return [i % self.cfg.dataset_size for i in indices] if self.cfg.dataset_size else indices

    network: nn.Module  # the part that is trained and exported (EMA-averaged when ema_decay > 0)
    module: nn.Module  # the loss module (wraps network)

    @abc.abstractmethod
    def batch(self, indices: list[int], gen: torch.Generator, rng: np.random.Generator) -> dict:
        """Inputs of ``module.forward`` for the dataset items ``indices``, all randomness drawn from ``gen``/``rng``."""

    @abc.abstractmethod
    def export(self, network: nn.Module, folder: Path) -> None:
        """Write the trained ``network`` (diffusers ``save_pretrained`` layout) into ``folder``."""

    def _frozen_vae(self):
        from diffusers import AutoencoderKL

        if self.vae_path is None or not (self.vae_path / "config.json").is_file():
            raise ValueError(
                f"`vae` folder {str(self.vae_path)!r} holds no trained VAE; train one first "
                "(`attnpack train-toy vae`) or pass --vae with a folder written by it."
            )
        return AutoencoderKL.from_pretrained(self.vae_path).to(self.device).eval().requires_grad_(False)

    def _captions(self, captions: list[str], rng: np.random.Generator) -> list[str]:
        drop = rng.random(len(captions)) < self.cfg.caption_dropout
        return ["" if d else c for c, d in zip(captions, drop, strict=True)]


class _Loss(nn.Module):
    def __init__(self, network: nn.Module, fn):
        super().__init__()
        self.network = network
        self._fn = fn

    def forward(self, **batch):
        return self._fn(self.network, **batch)


class _VAEStage(_Stage):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.network = build_vae(self.cfg.model, seed=self.cfg.seed)
        self.module = _Loss(self.network, self._loss)

    def batch(self, indices, gen, rng):
        pixels = self.data.batch(self.indices(indices))["pixel_values"]
        cfg = self.network.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        crop = self.cfg.loss.get("crop") or pixels.shape[-1]
        # the network is convolutional (no mid-block attention), so random crops (at latent-pixel offsets) teach it
        # the same thing as whole images at a fraction of the cost
        offsets = torch.randint(0, (pixels.shape[-1] - crop) // factor + 1, (pixels.shape[0], 2), generator=gen)
        pixels = torch.stack(
            [
                p[:, y * factor : y * factor + crop, x * factor : x * factor + crop]
                for p, (y, x) in zip(pixels, offsets)
            ]
        )
        eps = torch.randn(pixels.shape[0], cfg.latent_channels, crop // factor, crop // factor, generator=gen)
        return {"pixels": pixels.to(self.device), "eps": eps.to(self.device)}

    def _loss(self, vae, pixels, eps):
        posterior = vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        rec = (recon - pixels).abs().mean() + self.cfg.loss["mse_weight"] * (recon - pixels).pow(2).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        return rec + self.cfg.loss["kl_weight"] * kl

    def export(self, network, folder):
        # latent statistics of held-out scenes: FLUX uses (z - shift) * scale, SD uses z * scale
        held_out = ToyScenes(seed=self.cfg.data_seed + 1000, **self.cfg.data)
        n = self.cfg.loss.get("stats_samples", 2048)
        latents = []
        with torch.no_grad():
            for start in range(0, n, 64):
                px = held_out.batch(range(start, min(start + 64, n)))["pixel_values"].to(self.device)
                latents.append(network.encode(px).latent_dist.mean.float().cpu())
        z = torch.cat(latents)
        network.register_to_config(
            scaling_factor=round(1.0 / float(z.std()), 5), shift_factor=round(float(z.mean()), 5)
        )
        network.save_pretrained(folder)


class _EvaluatorStage(_Stage):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .evaluator import ToyEvaluator

        torch.manual_seed(self.cfg.seed)
        self.network = ToyEvaluator(**self.cfg.model)
        self.module = _Loss(self.network, self._loss)

    def batch(self, indices, gen, rng):
        from .evaluator import heatmap_targets

        items = self.data.batch(self.indices(indices))
        x = items["pixel_values"]
        aug = self.cfg.loss
        b = x.shape[0]
        # blur half of the images with a random Gaussian (sigma up to `blur` pixels), like decoded latents
        sigmas = torch.rand(b, generator=gen) * aug["blur"]
        blur = torch.rand(b, generator=gen) < 0.5
        taps = torch.arange(-3, 4, dtype=torch.float32)
        for i in torch.nonzero(blur).flatten().tolist():
            k = torch.exp(-(taps**2) / (2 * max(float(sigmas[i]), 0.05) ** 2))
            k = (k / k.sum()).view(1, 1, 1, 7)
            img = nn.functional.pad(x[i : i + 1].permute(1, 0, 2, 3), (3, 3, 3, 3), mode="replicate")
            img = nn.functional.conv2d(nn.functional.conv2d(img, k), k.transpose(2, 3))
            x[i] = img.permute(1, 0, 2, 3)[0]
        contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * aug["contrast"]
        shift = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * aug["contrast"] * 0.5
        noise = torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * aug["noise"]
        x = (x * contrast + shift + noise).clamp(-1, 1)
        net = self.network
        target = heatmap_targets(items["scene"], net.config.colors, net.config.shapes, grid=64 // net.stride)
        return {"images": x.to(self.device), "target": target.to(self.device)}

    @staticmethod
    def _loss(net, images, target):
        from .evaluator import focal_loss

        return focal_loss(net(images), target)

    def export(self, network, folder):
        network.save_pretrained(folder)


class _DenoiserStage(_Stage):
    """Shared by toy-sd and toy-flux: frozen VAE and text encoders, a pipeline around the trained denoiser."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vae = self._frozen_vae()
        self.pipe = self._build_pipeline()
        for component in self.pipe.components.values():
            if isinstance(component, nn.Module) and component is not self.network:
                component.to(self.device).requires_grad_(False)
        self.module = _Loss(self.network, self._loss)
        self.cache = self._encode_dataset() if self.cfg.dataset_size else None

    def _encode_dataset(self) -> dict:
        """VAE posteriors (mean, std) and captions of scenes ``0 .. dataset_size - 1``, computed once (and kept in
        ``work_dir`` keyed by the VAE weights and the data seed, so a resumed run does not encode again)."""
        from tqdm.auto import tqdm

        weights = next(self.vae_path.glob("*.safetensors"))
        key = hashlib.sha256(weights.read_bytes())
        key.update(json.dumps([self.cfg.data_seed, self.cfg.dataset_size, self.cfg.data], sort_keys=True).encode())
        path = self.work_dir / f"latents-{key.hexdigest()[:16]}.safetensors"
        if path.is_file():
            try:
                cache = load_state(path, LATENTS_KIND, "latent cache")
                check_state_fields(cache, {"mean": torch.Tensor, "std": torch.Tensor, "caption": list}, path)
                if len(cache["mean"]) == len(cache["std"]) == len(cache["caption"]) == self.cfg.dataset_size:
                    return cache
                logger.warning("latent cache %s does not hold %d scenes; encoding again", path, self.cfg.dataset_size)
            except ValueError as exc:
                logger.warning("%s; encoding the scenes again", exc)
        n, means, stds, captions = self.cfg.dataset_size, [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, n, 128), desc="encode scenes", disable=not self.progress):
                items = self.data.batch(range(start, min(start + 128, n)))
                posterior = self.vae.encode(items["pixel_values"].to(self.device)).latent_dist
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.half().cpu())
                captions += items["caption"]
        cache = {"mean": torch.cat(means), "std": torch.cat(stds), "caption": captions}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        save_state(path, cache, LATENTS_KIND)
        return cache

    def _scenes(self, indices: list[int], gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents sampled from the VAE posterior (``[B, C, h, w]``) and captions of dataset items ``indices``."""
        indices = self.indices(indices)
        if self.cache is not None:
            mean, std = self.cache["mean"][indices], self.cache["std"][indices].float()
            captions = [self.cache["caption"][i] for i in indices]
        else:
            items = self.data.batch(indices)
            with torch.no_grad():
                posterior = self.vae.encode(items["pixel_values"].to(self.device)).latent_dist
            mean, std, captions = posterior.mean.cpu(), posterior.std.cpu(), items["caption"]
        eps = torch.randn(mean.shape, generator=gen)
        return (mean + std * eps).to(self.device), captions

    def export(self, network, folder):
        self.pipe.register_modules(**{self.denoiser_name: network})
        self.pipe.save_pretrained(folder)
        for name in (CONFIG_NAME, LOG_NAME):  # the VAE's training record travels with it
            if (self.vae_path / name).is_file():
                shutil.copyfile(self.vae_path / name, folder / "vae" / name)


class _SDStage(_DenoiserStage):
    denoiser_name = "unet"

    def _build_pipeline(self):
        from diffusers import DDPMScheduler

        self.network = build_unet(self.cfg.model, seed=self.cfg.seed)
        pipe = build_sd_pipeline(self.vae, self.network, text_seed=self.cfg.text_seed)
        s = pipe.scheduler.config
        self.ddpm = DDPMScheduler(
            num_train_timesteps=s.num_train_timesteps,
            beta_start=s.beta_start,
            beta_end=s.beta_end,
            beta_schedule=s.beta_schedule,
        )
        return pipe

    def batch(self, indices, gen, rng):
        latents, captions = self._scenes(indices, gen)
        x0 = latents * self.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(0, self.ddpm.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        with torch.no_grad():
            embeds = self.pipe.encode_prompt(self._captions(captions, rng), self.device, 1, False)[0]
        alphas = self.ddpm.alphas_cumprod.to(self.device)[t.to(self.device)]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=self.cfg.loss["snr_gamma"]) / snr
        return {
            "noisy": self.ddpm.add_noise(x0, noise, t.to(self.device)),
            "t": t.to(self.device),
            "embeds": embeds,
            "noise": noise,
            "weight": weight,
        }

    @staticmethod
    def _loss(unet, noisy, t, embeds, noise, weight):
        pred = unet(noisy, t, encoder_hidden_states=embeds).sample
        return ((pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3)) * weight).mean()


class _FluxStage(_DenoiserStage):
    denoiser_name = "transformer"

    def _build_pipeline(self):
        self.network = build_flux_transformer(self.cfg.model, seed=self.cfg.seed)
        return build_flux_pipeline(self.vae, self.network, text_seed=self.cfg.text_seed)

    def batch(self, indices, gen, rng):
        from diffusers import FluxPipeline

        latents, captions = self._scenes(indices, gen)
        cfg_vae = self.vae.config
        z = (latents - cfg_vae.shift_factor) * cfg_vae.scaling_factor
        b, c, h, w = z.shape
        x0 = FluxPipeline._pack_latents(z, b, c, h, w)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        u = torch.randn(b, generator=gen) * self.cfg.loss["logit_std"] + self.cfg.loss["logit_mean"]
        sigma = torch.sigmoid(u).to(x0)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                self._captions(captions, rng), device=self.device, max_sequence_length=TEXT_LENGTH
            )
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, x0.dtype)
        return {
            "xt": xt,
            "sigma": sigma,
            "embeds": embeds,
            "pooled": pooled,
            "text_ids": text_ids,
            "img_ids": img_ids,
            "target": noise - x0,
        }

    @staticmethod
    def _loss(transformer, xt, sigma, embeds, pooled, text_ids, img_ids, target):
        pred = transformer(
            hidden_states=xt,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return (pred.float() - target.float()).pow(2).mean()


_STAGE_CLASSES = {"vae": _VAEStage, "evaluator": _EvaluatorStage, "toy-sd": _SDStage, "toy-flux": _FluxStage}


# ------------------------------------------------------------------------------------------------- loop
def _lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _load_init(st: _Stage, cfg: TrainConfig, out_dir: Path) -> dict:
    """Load the weights of ``cfg.init`` (a folder this stage exported, e.g. an earlier phase) into ``st.network``;
    returns ``init``, the SHA-256 of its weights file and its training config and log (recorded in train_log.json)."""
    folder = Path(cfg.init) if Path(cfg.init).is_absolute() else out_dir / cfg.init
    sub = folder / getattr(st, "denoiser_name", "")
    files = sorted(sub.glob("*.safetensors"))
    if not (sub / "config.json").is_file() or len(files) != 1:
        raise ValueError(
            f"`init` folder {str(folder)!r} holds no trained {cfg.stage} weights (expected config.json and one "
            f"safetensors file in {str(sub)!r}); train that phase first or fix `init` in the config."
        )
    from safetensors.torch import load_file

    state = load_file(files[0])
    record = {"folder": cfg.init, "sha256": hashlib.sha256(files[0].read_bytes()).hexdigest()}
    for key, fname in (("config", CONFIG_NAME), ("log", LOG_NAME)):  # provenance of the phase we continue
        if (sub / fname).is_file():
            record[key] = json.loads((sub / fname).read_text())
    own = st.network.state_dict()
    wrong = sorted(
        k for k in own.keys() | state.keys() if k not in own or k not in state or own[k].shape != state[k].shape
    )
    if wrong:
        raise ValueError(
            f"`init` weights in {str(files[0])!r} do not fit the {cfg.stage} architecture of this config "
            f"({len(wrong)} tensors differ, e.g. {wrong[:3]}); use the `model` settings of the phase they come from."
        )
    st.network.load_state_dict(state)
    return record


def _read_checkpoint(ckpt_dir: Path, cfg: TrainConfig) -> dict | None:
    """The checkpoint in ``ckpt_dir`` (``None``: none), read and checked against ``cfg``. A pickle checkpoint of an
    earlier version is never loaded: alone it is an error, next to a safetensors one it is ignored (logged)."""
    path, legacy = ckpt_dir / CHECKPOINT_NAME, ckpt_dir / LEGACY_CHECKPOINT_NAME
    if legacy.exists() and not path.exists():
        raise pickle_checkpoint_error(legacy)
    if legacy.exists():
        logger.warning("ignoring the pickle checkpoint %s (never loaded); resuming from %s", legacy, path.name)
    if not (path.exists() or path.is_symlink()):  # a dangling link is a damaged checkpoint, not none
        return None
    state = load_state(path, CHECKPOINT_KIND)
    fields = {"step": int, "config": dict, "network": dict, "ema": (dict, type(None)), "optimizer": dict,
              "scheduler": dict, "seconds": (float, int), "losses": list}  # fmt: skip
    check_state_fields(state, fields, path)
    if state["config"] != cfg.to_dict():
        raise ValueError(
            f"checkpoint {str(path)!r} was written with a different training config; pass the same config, "
            "or --no-resume to start over (the checkpoint is then replaced)."
        )
    return state


def train(
    stage: str,
    out_dir: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    vae: str | os.PathLike | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    mixed_precision: str = "no",
    cpu: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """Train one stage (or one phase of its :func:`recipe`); the result lands in ``out_dir/<stage>`` (``vae``, ``evaluator``, ``toy-sd``, ``toy-flux``).

    Args:
        stage: one of :data:`STAGES`.
        out_dir: working folder. ``out_dir/<stage>.ckpt/checkpoint.safetensors`` is the resumable checkpoint
            (tensors + JSON, never pickle; written atomically every ``config.checkpoint_every`` steps); the exported
            weights go to ``out_dir/<stage>`` (a diffusers folder: ``save_pretrained`` of the model or pipeline, with
            ``train_config.json`` and ``train_log.json`` next to the trained weights).
        config: the training configuration (default: :func:`default_config`, what the shipped weights used).
        vae: folder of a trained VAE for ``toy-sd`` / ``toy-flux`` (default ``out_dir/vae``).
        resume: continue from the checkpoint when there is one (its config must equal ``config``).
        stop_after: stop (after checkpointing) once this many steps are done in total, without exporting; for
            splitting a run into sessions and for tests.
        mixed_precision: passed to ``accelerate.Accelerator`` (``"no"``, ``"bf16"``, ``"fp16"``).
        cpu: force the CPU even when a GPU is present.
        progress: show a tqdm progress bar.
        name: export to ``out_dir/name`` (checkpoint ``out_dir/name.ckpt``) instead of ``out_dir/<stage>``; used for
            the phases of a :func:`recipe`.

    Returns:
        a summary: ``stage``, ``steps_done``, ``seconds`` (training time over all sessions), ``final_loss``,
        ``exported`` (the folder, or ``None`` when stopped early), ``device``.
    """
    cfg = config or default_config(stage)
    if cfg.stage != stage:
        raise ValueError(f"`config` is for stage {cfg.stage!r}, not {stage!r}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or stage
    ckpt_dir = out_dir / f"{name}.ckpt"
    vae_path = Path(vae) if vae is not None else out_dir / "vae"
    state = _read_checkpoint(ckpt_dir, cfg) if resume else None  # checked before any model is built

    run = _Run.build(cfg, out_dir, ckpt_dir, vae_path, mixed_precision=mixed_precision, cpu=cpu, progress=progress)
    start = run.restore(state) if state is not None else 0
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    run.fit(start, end)
    done = max(end, start)
    summary: dict[str, Any] = {
        "stage": stage,
        "name": name,
        "steps_done": done,
        "seconds": round(run.seconds, 3),  # a 2-step test run can take < 0.05 s
        "final_loss": float(np.mean(run.losses[-100:])) if run.losses else None,
        "device": str(run.accelerator.device),
        "processes": run.accelerator.num_processes,
        "exported": None,
    }
    if done < cfg.steps:
        return summary
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        summary["exported"] = str(run.export(out_dir / name, summary))
    return summary


@dataclasses.dataclass
class _Run:
    """One training run of a stage, by step: :meth:`build` (models, EMA, optimiser, schedule), :meth:`restore` (a
    checkpoint), :meth:`fit` (the loop, checkpointing as it goes), :meth:`export` (the diffusers folder)."""

    cfg: TrainConfig
    stage: _Stage
    accelerator: Any
    ema: nn.Module | None
    optimizer: Any
    scheduler: Any
    module: nn.Module
    ckpt_path: Path
    show: bool
    init: dict | None = None
    seconds: float = 0.0
    losses: list = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, cfg, out_dir: Path, ckpt_dir: Path, vae_path: Path, *, mixed_precision: str, cpu: bool,
              progress: bool) -> _Run:  # fmt: skip
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
        show = progress and accelerator.is_local_main_process
        vae = vae_path if cfg.stage in ("toy-sd", "toy-flux") else None
        st = _STAGE_CLASSES[cfg.stage](cfg, accelerator.device, vae, ckpt_dir, show)
        init = _load_init(st, cfg, out_dir) if cfg.init else None
        ema = copy.deepcopy(st.network).requires_grad_(False) if cfg.ema_decay > 0 else None
        params = [p for p in st.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
        return cls(cfg, st, accelerator, ema, optimizer, scheduler, st.module, ckpt_dir / CHECKPOINT_NAME, show, init)

    @property
    def network(self) -> nn.Module:
        return self.stage.network

    def restore(self, state: dict) -> int:
        """Load a checkpoint read by :func:`_read_checkpoint`; returns the step it was written at."""
        try:
            self.network.load_state_dict(state["network"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"checkpoint {str(self.ckpt_path)!r} does not fit this {self.cfg.stage} run ({exc}); pass "
                "--no-resume to start over."
            ) from None
        self.seconds, self.losses = state["seconds"], state["losses"]
        logger.info("resuming %s from step %d", self.cfg.stage, state["step"])
        return state["step"]

    def checkpoint(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "config": self.cfg.to_dict(),
            "network": self.network.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "seconds": self.seconds,
            "losses": self.losses,
        }
        save_state(self.ckpt_path, state, CHECKPOINT_KIND)

    def fit(self, start: int, end: int) -> None:
        """Steps ``start .. end - 1``; each process takes every ``world``-th item of the step's batch."""
        from tqdm.auto import tqdm

        cfg, accelerator = self.cfg, self.accelerator
        self.network.to(accelerator.device)
        if self.ema is not None:
            self.ema.to(accelerator.device)
        self.module, self.optimizer = accelerator.prepare(self.module, self.optimizer)
        params = [p for p in self.network.parameters() if p.requires_grad]
        world, rank = accelerator.num_processes, accelerator.process_index
        bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {cfg.stage}", disable=not self.show)
        running = None
        self.module.train()
        for step in bar:
            tick = time.perf_counter()
            indices = list(range(step * cfg.batch_size + rank, (step + 1) * cfg.batch_size, world))
            gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank))
            rng = np.random.default_rng([cfg.seed, step, rank, 1])
            batch = self.stage.batch(indices, gen, rng)
            with accelerator.autocast():
                loss = self.module(**batch)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(self.ema.parameters(), self.network.parameters(), strict=True):
                        e.lerp_(p.detach(), 1 - decay)
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            self.losses.append(round(value, 6))
            self.seconds += time.perf_counter() - tick
            bar.set_postfix(loss=f"{running:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                self.checkpoint(step + 1)
        bar.close()

    def export(self, target: Path, summary: dict) -> Path:
        """The trained (EMA) weights as a diffusers folder, with ``train_config.json`` and ``train_log.json``."""
        final = self.ema if self.ema is not None else self.network
        final.eval()
        with atomic_dir(target) as tmp:
            self.stage.export(final, tmp)
            sub = tmp / getattr(self.stage, "denoiser_name", "")
            (sub / CONFIG_NAME).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            log = {k: v for k, v in summary.items() if k != "exported"}
            if self.init is not None:
                log["init"] = self.init
            log.update(torch=torch.__version__, threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
            log["loss_curve"] = [float(np.mean(self.losses[i : i + 100])) for i in range(0, len(self.losses), 100)]
            (sub / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n")
        return target


def with_overrides(cfg: TrainConfig, steps: int | None = None, batch_size: int | None = None) -> TrainConfig:
    """``cfg`` with another number of steps (the warmup shrinks to at most a tenth of them) or batch size.

    The cached dataset shrinks to the scenes those steps visit (items ``0 .. steps x batch - 1``, in order), so a short
    run does not encode 32,768 scenes first; the items it trains on are the same as with the full cache."""
    changes: dict[str, Any] = {}
    if steps is not None:
        changes.update(steps=steps, warmup_steps=min(cfg.warmup_steps, max(steps // 10, 1)))
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if changes and cfg.dataset_size:
        visited = changes.get("steps", cfg.steps) * changes.get("batch_size", cfg.batch_size)
        if visited < cfg.dataset_size:
            changes["dataset_size"] = visited
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _exported(folder: Path, cfg: TrainConfig) -> bool:
    path = folder / getattr(_STAGE_CLASSES[cfg.stage], "denoiser_name", "") / CONFIG_NAME
    # through TrainConfig: files written before a field existed lack it (its default applies)
    return path.is_file() and TrainConfig.load(path).to_dict() == cfg.to_dict()


def train_recipe(
    stage: str,
    out_dir: str | os.PathLike,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    phases: list[tuple[str, TrainConfig]] | None = None,
    **kwargs,
) -> list[dict[str, Any]]:
    """Run the phases of :func:`recipe` in order; the result lands in ``out_dir/<stage>``.

    A phase already exported to ``out_dir`` with the same config is skipped (unless ``resume=False``); one stopped by
    ``stop_after`` ends the call (run again to resume). ``steps`` / ``batch_size`` change every phase (see
    :func:`with_overrides`); ``phases`` replaces the recipe (same form); ``kwargs`` go to :func:`train`. Returns one
    summary per phase run or skipped.
    """
    out_dir = Path(out_dir)
    summaries: list[dict[str, Any]] = []
    for name, cfg in phases if phases is not None else recipe(stage):
        cfg = with_overrides(cfg, steps, batch_size)
        if resume and _exported(out_dir / name, cfg):
            summaries.append({"stage": stage, "name": name, "skipped": True, "exported": str(out_dir / name)})
            continue
        summary = train(stage, out_dir, config=cfg, name=name, resume=resume, stop_after=stop_after, **kwargs)
        summaries.append(summary)
        if summary["exported"] is None:
            break
    return summaries
