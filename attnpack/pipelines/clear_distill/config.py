"""Settings and result of CLEAR distillation, and the released weights' file names."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class ClearDistillConfig:
    """Settings of :func:`distill_clear` (defaults: the official ``distill.sh``, one GPU's share).

    The official run: 4 GPUs x batch 2 x accumulation 4 (effective batch 32), Prodigy lr 1.0, 1024 px, 10K steps in
    the paper (50K in ``distill.sh``).
    """

    model: str = "black-forest-labs/FLUX.1-dev"
    output_dir: str = "clear-distill"
    radius: int = 16
    down_factor: int = 1
    data: str | None = None
    prompts: str | None = None
    num_samples: int | None = None
    sample_steps: int = 28
    sample_guidance: float = 3.5
    resolution: int | None = None  # None: the built-in model's size (64 for toy / tiny FLUX), else 1024
    max_sequence_length: int = 512
    steps: int = 10_000
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "prodigy"
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    guidance_scale: float = 3.5
    fm_weight: float = 1.0
    pred_weight: float = 0.5
    attn_weight: float = 0.5
    attn_loss_every: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0
    dtype: str = "auto"
    save_dtype: str = "bf16"
    gradient_checkpointing: bool = False
    init_weights: str | None = None
    backend: str | None = None
    variant: str | None = None
    revision: str | None = None

    def validate(self) -> None:
        if (self.data is None) == (self.prompts is None):
            raise ValueError("give exactly one of `data` (a folder of images + prompts) or `prompts` (a prompt file).")
        for name in ("radius", "down_factor", "steps", "batch_size", "grad_accum", "checkpoint_every", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {name}={value!r}.")
        if self.attn_loss_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("`attn_loss_every` and `keep_checkpoints` must be >= 1.")
        if self.resolution is not None and (
            isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 16
        ):
            raise ValueError(f"`resolution` must be an int >= 16 or None (the model's size), got {self.resolution!r}.")
        if self.resolution is not None and self.resolution % (16 * self.down_factor):
            raise ValueError(
                f"`resolution`={self.resolution} must be a multiple of 16 x down_factor = {16 * self.down_factor}."
            )
        if self.optimizer not in ("prodigy", "adamw"):
            raise ValueError(f"`optimizer` must be 'prodigy' or 'adamw', got {self.optimizer!r}.")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"`data` folder {self.data!r} does not exist.")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ValueError(f"`prompts` file {self.prompts!r} does not exist.")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "prodigy" else 1e-4


@dataclasses.dataclass
class DistillResult:
    weights: Path
    step: int
    losses: list[dict[str, float]]


def weights_file_name(radius: int, down_factor: int) -> str:
    """The released files' naming: ``clear_local_16.safetensors``, ``clear_local_8_down_4.safetensors``."""
    return f"clear_local_{radius}" + (f"_down_{down_factor}" if down_factor > 1 else "") + ".safetensors"


# ------------------------------------------------------------------------------------------------- data
