"""The distillation step: student and teacher forwards, the three losses, attention outputs captured by hooks, the
optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import ClearDistillConfig


def attention_loss_layers(transformer: torch.nn.Module, every: int = 4) -> list[str]:
    """Single-stream attention layers whose global index (double blocks first) is a multiple of ``every``: the
    official ``'single' in name and idx % 4 == 0`` (FLUX.1-dev: single blocks 1, 5, ..., 37, ten layers)."""
    names = [key[: -len(".processor")] for key in transformer.attn_processors]
    chosen = [n for i, n in enumerate(names) if n.startswith("single_transformer_blocks.") and i % every == 0]
    if not chosen:
        single = [i for i, n in enumerate(names) if n.startswith("single_transformer_blocks.")]
        working = [k for k in range(1, every) if any(i % k == 0 for i in single)]
        raise ValueError(
            f"no single-stream attention layer of this transformer has a global index divisible by "
            f"attn_loss_every={every} ({len(names)} layers, single-stream at {single[:1] + single[-1:]}); "
            f"choose `attn_loss_every` among {working or [1]}."
        )
    return chosen


class _AttentionOutputs:
    """Forward hooks keeping the latest output of some attention modules (recomputation overwrites, never grows)."""

    def __init__(self, model: torch.nn.Module, names: list[str], detach: bool):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n, detach)) for n in names]

    def _hook(self, name: str, detach: bool) -> Callable:
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.outputs[name] = out.detach() if detach else out

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _Student(torch.nn.Module):
    """The student transformer and its pooling weights as one module (so data-parallel wrappers see every trainable
    parameter); ``forward`` returns the predicted velocity."""

    def __init__(self, transformer: torch.nn.Module, pooling: torch.nn.Module | None):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling

    def forward(self, **inputs) -> torch.Tensor:
        return self.transformer(**inputs, return_dict=False)[0]


class ClearDistiller:
    """The CLEAR distillation objective for one student / teacher pair.

    Args:
        student: the student transformer with CLEAR installed (``apply_clear``); trainable parameters are set here.
        pooling: the handle's :class:`~attnpack.attn_processors.clear_weights.ClearPooling` (``None`` for ``d = 1``).
        teacher: the frozen dense transformer.
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` freshly built from the pipeline's config: its initial
            ``timesteps`` / ``sigmas`` (1000 training steps) are sampled uniformly, as the official script does.
        vae_shift / vae_scale: the VAE's ``shift_factor`` / ``scaling_factor``.
    """

    def __init__(self, student, pooling, teacher, scheduler, vae_shift: float, vae_scale: float,
                 guidance_scale: float = 3.5, pred_weight: float = 0.5, attn_weight: float = 0.5,
                 attn_loss_every: int = 4, fm_weight: float = 1.0):  # fmt: skip
        self.student, self.pooling, self.teacher = student, pooling, teacher
        self.timesteps = scheduler.timesteps.clone().float()
        self.sigmas = scheduler.sigmas[: len(self.timesteps)].clone().float()
        self.vae_shift, self.vae_scale = vae_shift, vae_scale
        self.guidance_scale = guidance_scale
        self.fm_weight, self.pred_weight, self.attn_weight = fm_weight, pred_weight, attn_weight
        from ...attn_processors.clear_weights import clear_parameter_names

        self.layers = attention_loss_layers(student, attn_loss_every)
        teacher.requires_grad_(False).eval()
        student.requires_grad_(False)
        names = set(clear_parameter_names(student))
        for name, p in student.named_parameters():
            p.requires_grad_(name in names)
        if pooling is not None:
            pooling.requires_grad_(True)
        self.module = _Student(student, pooling)
        self._student_out = _AttentionOutputs(student, self.layers, detach=False)
        self._teacher_out = _AttentionOutputs(teacher, self.layers, detach=True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable weights under their official keys."""
        from ...attn_processors.clear_weights import clear_parameter_names

        params = dict(self.student.named_parameters())
        state = {k: params[k] for k in clear_parameter_names(self.student)}
        if self.pooling is not None:
            state.update(self.pooling.official_state_dict())
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state()
        if set(state) != set(own):
            raise ValueError("the checkpoint's trainable weights do not match this student (different model or d).")
        wrong = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"the checkpoint's trainable weights {wrong[:3]} do not have this student's shapes.")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))

    def make_batch(self, cached: dict[str, torch.Tensor], generator: torch.Generator, device, dtype) -> dict:
        """Model inputs from cached rows: a latent sample ``mean + std * e``, noise, a uniform training timestep."""
        mean, std = cached["mean"].float(), cached["std"].float()
        x0 = (mean + std * torch.randn(mean.shape, generator=generator) - self.vae_shift) * self.vae_scale
        noise = torch.randn(x0.shape, generator=generator)
        idx = (torch.rand(x0.shape[0], generator=generator) * len(self.timesteps)).long()
        return {
            "x0": x0.to(device),
            "noise": noise.to(device),
            "sigmas": self.sigmas[idx].to(device),
            "timesteps": self.timesteps[idx].to(device),
            "prompt_embeds": cached["prompt_embeds"].to(device, dtype),
            "pooled_prompt_embeds": cached["pooled_prompt_embeds"].to(device, dtype),
        }

    def losses(self, batch: dict, model: Callable | None = None) -> dict[str, torch.Tensor]:
        """``{"loss", "fm", "pred", "attn"}`` for one batch (``x0`` / ``noise`` ``[B, C, h, w]``, ``sigmas``,
        ``timesteps`` ``[B]``, prompt embeddings). ``model`` is the (possibly wrapped) student module."""
        from diffusers import FluxPipeline

        model = model or self.module
        x0, noise = batch["x0"], batch["noise"]
        b, c, h, w = x0.shape
        dtype = batch["prompt_embeds"].dtype
        s = batch["sigmas"].view(b, 1, 1, 1)
        xt = FluxPipeline._pack_latents((1.0 - s) * x0 + s * noise, b, c, h, w).to(dtype)
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w).float()
        device = x0.device
        inputs = dict(
            hidden_states=xt,
            timestep=(batch["timesteps"] / 1000).to(dtype),
            pooled_projections=batch["pooled_prompt_embeds"],
            encoder_hidden_states=batch["prompt_embeds"],
            txt_ids=torch.zeros(batch["prompt_embeds"].shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
        )
        if self.student.config.guidance_embeds:
            inputs["guidance"] = torch.full((b,), self.guidance_scale, device=device, dtype=dtype)
        self._student_out.outputs.clear()
        self._teacher_out.outputs.clear()
        with torch.no_grad():
            teacher = self.teacher(**inputs, return_dict=False)[0].float()
        pred = model(**inputs).float()
        fm = torch.mean((pred - target) ** 2)
        distill = torch.mean((pred - teacher) ** 2)
        attn = sum(
            torch.mean((self._student_out.outputs[n].float() - self._teacher_out.outputs[n].float()) ** 2)
            for n in self.layers
        ) / len(self.layers)
        loss = self.fm_weight * fm + self.pred_weight * distill + self.attn_weight * attn
        return {"loss": loss, "fm": fm, "pred": distill, "attn": attn}

    def close(self) -> None:
        self._student_out.remove()
        self._teacher_out.remove()


def make_optimizer(params, cfg: ClearDistillConfig) -> torch.optim.Optimizer:
    """Prodigy (official: lr 1.0, decoupled weight decay 1e-4, bias correction, safeguard warm-up) or AdamW."""
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ImportError(
                "`optimizer='prodigy'` (the official recipe) requires `prodigyopt`. Please install it with "
                "`pip install attnpack[distill]`, or use --optimizer adamw --lr 1e-4."
            ) from None
        return Prodigy(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, decouple=True,
                       use_bias_correction=True, safeguard_warmup=True)  # fmt: skip
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
