"""``attnpack distill-clear``: distil CLEAR attention weights for a FLUX model (official recipe; see docs/clear.md).

Single GPU: ``attnpack distill-clear -m black-forest-labs/FLUX.1-dev --data DIR -o OUT``; several GPUs:
``accelerate launch -m attnpack distill-clear ...`` (each process takes its share of the data).
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    from ..pipelines.clear_distill import ClearDistillConfig

    d = ClearDistillConfig()
    p = sub.add_parser(
        "distill-clear",
        help="distil CLEAR local-attention weights from a dense FLUX teacher",
        description="Distil CLEAR attention weights (to_q/k/v/out + pooling) from a dense FLUX teacher: loss = flow "
        "matching + 0.5 x teacher prediction + 0.5 x attention outputs. Runs under `accelerate launch -m attnpack "
        "distill-clear ...` for several GPUs. Writes OUT/clear_local_<r>[_down_<d>].safetensors (official format), "
        "resumable checkpoints in OUT/checkpoints and the losses in OUT/log.jsonl.",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "-m", "--model", default=d.model, help=f"FLUX pipeline: Hub id, folder or built-in name ({d.model})"
    )
    g.add_argument("--dtype", default=d.dtype, help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--revision", default=None, help="Hub revision")
    g = p.add_argument_group("CLEAR")
    g.add_argument("--radius", type=int, default=d.radius, help=f"window radius in tokens (default {d.radius})")
    g.add_argument("--down-factor", type=int, default=d.down_factor, help="pooled tokens over d x d cells (1 = none)")
    g.add_argument("--init-weights", default=None, help="start from a CLEAR checkpoint (.safetensors)")
    g.add_argument("--backend", default=None, help="block-sparse kernel (flex, reference; default automatic)")
    g = p.add_argument_group("data (one of --data / --prompts)")
    g.add_argument("--data", default=None, help="folder of images with same-named .txt prompts (or .json {prompt})")
    g.add_argument("--prompts", default=None, help=".txt / .jsonl prompts: generate the data with the teacher first")
    g.add_argument(
        "--num-samples", type=int, default=None, help="teacher samples to generate (default: one per prompt)"
    )
    g.add_argument("--sample-steps", type=int, default=d.sample_steps, help="teacher sampling steps")
    g.add_argument("--sample-guidance", type=float, default=d.sample_guidance, help="teacher guidance scale")
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training resolution (default: the built-in model's size, 64 for toy-flux / tiny-flux; else 1024)",
    )
    g.add_argument("--max-sequence-length", type=int, default=d.max_sequence_length, help="T5 tokens (default 512)")
    g = p.add_argument_group("training")
    g.add_argument("-o", "--output-dir", required=True, help="output folder (checkpoints, cache, final weights)")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps}, as the paper)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="batch per process")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps")
    g.add_argument(
        "--optimizer", choices=("prodigy", "adamw"), default=d.optimizer, help="prodigy (official) or adamw"
    )
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: 1.0 prodigy, 1e-4 adamw)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help="guidance embedding (FLUX.1-dev)")
    g.add_argument("--attn-loss-every", type=int, default=d.attn_loss_every,
                   help="attention loss on single blocks with global index %% N == 0 (official 4)")  # fmt: skip
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in the output folder")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks to save memory")
    g.add_argument("--save-dtype", default=d.save_dtype, help="dtype of the final weights (default bf16, as released)")
    g.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.clear_distill import ClearDistillConfig, distill_clear

    cfg = ClearDistillConfig(
        model=args.model,
        output_dir=args.output_dir,
        radius=args.radius,
        down_factor=args.down_factor,
        data=args.data,
        prompts=args.prompts,
        num_samples=args.num_samples,
        sample_steps=args.sample_steps,
        sample_guidance=args.sample_guidance,
        resolution=args.resolution,
        max_sequence_length=args.max_sequence_length,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        guidance_scale=args.guidance_scale,
        attn_loss_every=args.attn_loss_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=not args.no_resume,
        seed=args.seed,
        dtype=args.dtype,
        save_dtype=args.save_dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        init_weights=args.init_weights,
        backend=args.backend,
        variant=args.variant,
        revision=args.revision,
    )
    result = distill_clear(cfg)
    print(f"wrote {result.weights} (step {result.step})", file=sys.stderr)
    return 0
