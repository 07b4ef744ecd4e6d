"""`distill_clear`: validate, prepare the data, train, write the weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...io import atomic_path
from .checkpoints import _load_checkpoint, _read_resume_checkpoint, _save_checkpoint
from .config import ClearDistillConfig, DistillResult, weights_file_name
from .data import CachedSamples, cache_samples, find_image_prompts, generate_samples, read_prompts
from .distiller import ClearDistiller, attention_loss_layers, make_optimizer


logger = logging.getLogger(__name__)


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 4099 + rank)


def distill_clear(
    cfg: ClearDistillConfig, *, accelerator=None, pipe=None, show_progress: bool = True
) -> DistillResult:
    """Run CLEAR distillation (see the module docstring); returns the final weights' path and the loss history.

    ``accelerator``: an ``accelerate.Accelerator`` (default: a new one, which picks up ``accelerate launch``).
    ``pipe``: an already loaded FLUX pipeline (default: ``load_pipeline(cfg.model)``).
    """
    from accelerate import Accelerator

    from ...attn_processors.clear_weights import save_clear_checkpoint
    from ..loading import load_pipeline

    if cfg.resolution is None:  # a built-in model trains at its own size; real FLUX checkpoints at 1024 px
        from ..loading import builtin_defaults

        cfg = dataclasses.replace(cfg, resolution=int(builtin_defaults(cfg.model).get("height") or 1024))
    cfg.validate()
    if cfg.optimizer == "prodigy":
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)  # fail before loading anything
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = _read_resume_checkpoint(ckpt_dir, cfg) if cfg.resume else None
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    main = accelerator.is_main_process
    show = show_progress and accelerator.is_local_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    accelerator.wait_for_everyone()

    if pipe is None:
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=accelerator.device, variant=cfg.variant,
                             revision=cfg.revision)  # fmt: skip
    if type(pipe.transformer).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"CLEAR distillation needs a FLUX.1 pipeline, got {type(pipe).__name__}.")
    attention_loss_layers(pipe.transformer, cfg.attn_loss_every)  # before any sampling or caching
    paths = _prepare_data(pipe, cfg, out, accelerator, show)
    distiller = _build_distiller(pipe, cfg)
    del pipe  # text encoders and VAE are no longer needed
    optimizer = make_optimizer(distiller.trainable_parameters(), cfg)
    start = 0
    if resume_from is not None:
        start = _load_checkpoint(*resume_from, distiller, optimizer)
        logger.info("resuming CLEAR distillation at step %d", start)
    history = _train(distiller, optimizer, CachedSamples(paths, cfg.seed), cfg, start, out, accelerator, show)
    weights = out / weights_file_name(cfg.radius, cfg.down_factor)
    if main:
        from ..._utils import parse_dtype

        save_clear_checkpoint(
            weights, distiller.student, distiller.pooling, dtype=parse_dtype(cfg.save_dtype),
            metadata={"radius": cfg.radius, "down_factor": cfg.down_factor, "base_model": cfg.model,
                      "steps": max(start, cfg.steps), "resolution": cfg.resolution},
        )  # fmt: skip
    accelerator.wait_for_everyone()
    return DistillResult(weights, max(start, cfg.steps), history)


def _prepare_data(pipe, cfg: ClearDistillConfig, out: Path, accelerator, show: bool) -> list[Path]:
    """Teacher samples (with ``prompts``) or the image folder (``data``), then the cache training reads."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.data is not None:
        items = find_image_prompts(cfg.data)
    else:
        samples = out / "samples"
        generate_samples(pipe, read_prompts(cfg.prompts), samples, cfg, rank, world, show)
        accelerator.wait_for_everyone()
        items = find_image_prompts(samples)
    paths = cache_samples(pipe, items, out / "cache", cfg, rank, world, show)
    accelerator.wait_for_everyone()
    return paths


def _build_distiller(pipe, cfg: ClearDistillConfig) -> ClearDistiller:
    """The frozen teacher (the pipeline's transformer) and a student copy with CLEAR installed (with its pooling
    module when ``down_factor > 1``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ...attn_processors.clear import apply_clear
    from ...attn_processors.context import checkpoint_with_run_context

    teacher = pipe.transformer
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    vae_shift = float(pipe.vae.config.shift_factor or 0.0)
    vae_scale = float(pipe.vae.config.scaling_factor)
    student = copy.deepcopy(teacher)
    handle = apply_clear(student, cfg.radius, cfg.down_factor, weights=cfg.init_weights, backend=cfg.backend)
    distiller = ClearDistiller(student, handle.clear.pooling, teacher, scheduler, vae_shift, vae_scale,
                               cfg.guidance_scale, cfg.pred_weight, cfg.attn_weight, cfg.attn_loss_every,
                               cfg.fm_weight)  # fmt: skip
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_run_context)
    student.train()
    return distiller


def _train(distiller: ClearDistiller, optimizer, data: CachedSamples, cfg: ClearDistillConfig, start: int, out: Path,
           accelerator, show: bool) -> list[dict[str, float]]:  # fmt: skip
    """Steps ``start .. cfg.steps - 1``: batches, noise and timesteps from (seed, step, micro-step, rank), so a resumed
    run continues exactly; the log (``log.jsonl``) and checkpoints are written by the main process."""
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device, dtype = accelerator.device, distiller.student.dtype
    model, optimizer = accelerator.prepare(distiller.module, optimizer)
    history: list[dict[str, float]] = []
    bar = tqdm(total=cfg.steps, initial=start, desc=f"distilling CLEAR r={cfg.radius} d={cfg.down_factor}",
               disable=not show)  # fmt: skip
    try:
        for step in range(start, cfg.steps):
            totals = dict.fromkeys(("loss", "fm", "pred", "attn"), 0.0)
            for micro in range(cfg.grad_accum):
                gen = _step_generator(cfg.seed, step, micro, rank)
                first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
                cached = data.load(range(first, first + cfg.batch_size))
                batch = distiller.make_batch(cached, gen, device, dtype)
                with accelerator.accumulate(model):
                    losses = distiller.losses(batch, model)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(distiller.trainable_parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k in totals:
                    totals[k] += losses[k].detach() / cfg.grad_accum
            if world > 1:  # log the mean over processes
                totals = {k: accelerator.reduce(v, reduction="mean") for k, v in totals.items()}
            totals = {k: float(v) for k, v in totals.items()}
            record = {"step": step + 1, **totals}
            history.append(record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in totals.items()})
            done = step + 1
            if main:
                with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    _save_checkpoint(out / "checkpoints", done, distiller, optimizer, cfg, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    finally:
        bar.close()
        distiller.close()
    return history
