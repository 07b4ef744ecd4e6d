"""A-STAR vs diffusers' Attend-and-Excite: peak memory and time per image, measured side by side.

Both pipelines (and the plain ``StableDiffusionPipeline`` as the SDPA reference) are built from the *same* components:
a UNet with Stable Diffusion 1.5's block structure (random weights; ``--unet sd15-small`` has fewer channels so that it
runs on a CPU, ``--unet sd15`` is the full-size SD 1.5 UNet for GPUs), a tiny CLIP text encoder of matching width, a
tiny VAE and the DDIM scheduler. Same prompt, seed, size, steps and guidance; each method keeps its own published
defaults (A&E: ``max_iter_to_alter=25``, thresholds ``{0: 0.05, 10: 0.5, 20: 0.8}``, ``scale_factor=20``; A-STAR:
every step altered). Both use the same map resolution (``attn_res=None``: ``ceil(size / 32)``, i.e. the five
16x16-equivalent layers ``down_blocks.2`` / ``up_blocks.1``).

Every measurement runs in a fresh subprocess:

- memory: on CPU the increase of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` during the generation over its
  value after the pipeline was built (the process's peak resident memory attributable to the generation); on CUDA
  ``torch.cuda.max_memory_allocated()`` minus the allocation before the call.
- time: wall time of the same generation (``--repeats`` subprocesses per method, interleaved; medians reported), and
  the process's CPU time (user + system) for it, which a machine shared with other jobs distorts far less than wall
  time. ``--warmup`` first runs a 2-step generation (on CPU it would raise the baseline of ``ru_maxrss``, so it is off
  by default; use it on GPUs, where the peak counter is reset after it).

The denoising loop is measured (``output_type="latent"``: no VAE decode). The number of UNet forwards is counted with
a forward pre-hook. Random weights change how often A&E's iterative refinement runs (it stops once its loss meets a
threshold), so the script also runs A&E with refinement off (``thresholds={}``) as its lower bound.

Peak memory is reported in MiB (``peak_mib``; results before the benchmark registry had ``peak_bytes`` per run).
Usage (default output: ``benchmarks/results/astar_<device>_<size>.json``, never overwritten without ``--force``)::

    python benchmarks/astar.py --size 256 --steps 50 --repeats 2 --out /tmp/astar_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time


PROMPT = "a bear and a turtle"  # single tokens in the tiny tokenizer, at positions 2 and 5 (the paper's example pair)
CONCEPTS = ["bear", "turtle"]
TOKEN_INDICES = [2, 5]
METHODS = ("sd", "ae", "ae-no-refinement", "astar")

UNETS = {
    # SD 1.5 structure (3 cross-attention levels + 1 plain, 2 layers per block, 8 heads), fewer channels
    "sd15-small": dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, text_hidden=32),
    # the full SD 1.5 UNet (860 M parameters) with random weights
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, text_hidden=768),
}


def build_pipeline(method: str, unet_name: str, device: str, dtype):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnpack.pipelines.astar import AStarPipeline
    from attnpack.toy.tiny import _ddim, _kl_vae, build_clip_tokenizer

    cfg = UNETS[unet_name]
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg["text_hidden"],
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=cfg["block_out_channels"],
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cfg["cross_attention_dim"],
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    components = dict(
        vae=_kl_vae(0, flow=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if method == "astar":
        cls = AStarPipeline
    elif method.startswith("ae"):
        from diffusers import StableDiffusionAttendAndExcitePipeline as cls
    else:
        cls = StableDiffusionPipeline
    pipe = cls(**components).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, method: str, size: int, steps: int):
    import torch

    kwargs = dict(
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
    )
    if method == "astar":
        return pipe(PROMPT, concepts=CONCEPTS, attn_res=None, **kwargs)
    if method == "ae":
        return pipe(PROMPT, token_indices=TOKEN_INDICES, attn_res=None, **kwargs)
    if method == "ae-no-refinement":
        return pipe(PROMPT, token_indices=TOKEN_INDICES, attn_res=None, thresholds={}, **kwargs)
    return pipe(PROMPT, **kwargs)


def memory_child(payload: dict) -> dict:
    """One measured generation, in a fresh process (``_common.peak_rss_child``); ``payload``: the settings."""
    import contextlib

    import torch
    from _common import PeakRSS, mib

    method, size, device = payload["method"], payload["size"], payload["device"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[payload["dtype"]]
    pipe = build_pipeline(method, payload["unet"], device, dtype)
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cuda = device.startswith("cuda")
    # CPU: the growth of ru_maxrss over its value after building the pipeline (warm-up included)
    with contextlib.nullcontext() if cuda else PeakRSS(reset=False) as rss:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if payload["warmup"]:  # GPUs: load kernels first, then reset the peak counter
            generate(pipe, method, size, 2)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        calls[0] = 0
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        generate(pipe, method, size, payload["steps"])
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return {
        "method": method,
        "peak_mib": mib(peak if cuda else rss.call_peak_bytes, None),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "unet_forwards": calls[0],
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): the work done, unlike wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--unet", choices=list(UNETS), default="sd15-small")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="subprocesses per method")
    parser.add_argument("--warmup", action="store_true", help="run a 2-step generation before the measured one")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")


def run(args: argparse.Namespace) -> dict:
    from _common import peak_rss_child

    settings = {name: getattr(args, name) for name in ("size", "steps", "unet", "device", "dtype", "warmup")}
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for r in range(args.repeats):
        for method in args.methods:  # interleaved, so that machine load affects every method alike
            result = peak_rss_child(__file__, {**settings, "method": method})
            runs[method].append(result)
            print(
                f"[{r + 1}/{args.repeats}] {method:17s} peak {result['peak_mib']:8.1f} MiB  time "
                f"{result['seconds']:7.2f} s  CPU {result['cpu_seconds']:7.2f} s  "
                f"UNet forwards {result['unet_forwards']}",
                file=sys.stderr,
            )
    summary = {
        m: {
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
            "unet_forwards": rs[0]["unet_forwards"],
        }
        for m, rs in runs.items()
    }
    ratios = {}
    for ref in ("ae", "ae-no-refinement", "sd"):
        if "astar" in summary and ref in summary:
            ratios[f"astar/{ref}"] = {
                "memory": summary["astar"]["peak_mib"] / max(summary[ref]["peak_mib"], 1e-9),
                "time": summary["astar"]["seconds"] / summary[ref]["seconds"],
                "cpu_time": summary["astar"]["cpu_seconds"] / summary[ref]["cpu_seconds"],
            }
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=2), file=sys.stderr)
    return {
        "benchmark": "A-STAR vs diffusers Attend-and-Excite (denoising loop, one image)",
        "settings": {
            "unet": args.unet,
            "unet_config": UNETS[args.unet],
            "size": args.size,
            "steps": args.steps,
            "guidance_scale": 7.5,
            "prompt": PROMPT,
            "device": args.device,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "memory": "CUDA max_memory_allocated delta"
            if args.device.startswith("cuda")
            else "ru_maxrss increase over the value after building the pipeline (fresh process per run)",
        },
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("astar", module=sys.modules[__name__]))
