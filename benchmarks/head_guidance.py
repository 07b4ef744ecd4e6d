"""Head perturbation guidance: peak memory and time of one guided denoiser step, side by side with diffusers PAG.

Model: an SD3-medium-shaped MMDiT (24 heads x 64 = 1536 wide, joint attention over image + 333 text tokens) cut to
``--layers`` blocks, random weights (latency and memory do not depend on weight values). One denoising step of a CFG
pipeline, perturbing all 24 heads of layer 0 (identity, as diffusers PAG does):

- ``stock_cfg``:        stock processors, batch [uncond, cond] (the step without perturbation guidance);
- ``stock_batch3``:     stock processors, batch of 3 (an unperturbed batched step of the perturbed step's size);
- ``attnpack``:         ``apply_head_perturbation`` hook on the batch [uncond, cond] (it appends the perturbed row),
                        ``token_scope="image"`` (diffusers PAG semantics), softness 1;
- ``attnpack_soft``:    same, ``token_scope="full"``, softness 0.5 (SoftPAG blend path);
- ``attnpack_separate``: ``separate_pass=True`` (the perturbed row as a second forward);
- ``diffusers_pag``:    diffusers' ``PAGCFGJointAttnProcessor2_0`` on layer 0, batch [uncond, cond, cond] (what
                        ``StableDiffusion3PAGPipeline`` runs);
- ``explicit_maps``:    the official HeadHunter way: full ``softmax(QK^T)`` maps materialised for the perturbed layer
                        (batch 3), blended with the identity and multiplied by V (only at sizes where it fits).

Each (mode, size) runs in a fresh subprocess with glibc's mmap threshold fixed (freed tensors go back to the OS, so
the resident size follows live memory). After one warm-up step the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``, ``_common.PeakRSS``) and one step is measured: ``peak_rss_mib`` is the process peak
during that step, ``activation_peak_mib`` the peak minus the resident size before it (weights, inputs),
``peak_over_weights_mib`` the peak minus the resident size right after building the model (so the step's inputs count
too); all in MiB (results before the benchmark registry named them ``*_mb``, same unit). Times are the median of
``--repeats`` further steps.

A second part times one joint attention layer (batch 3, one perturbed row) with each processor, interleaved in one
process, as ratios against the stock SDPA processor and the theoretical extra work (``--layer-sizes``).

    python benchmarks/head_guidance.py --sizes 512 1024 --layer-sizes --out /tmp/head_guidance_cpu.json
    python benchmarks/head_guidance.py --sizes --layer-sizes 512 1024 --out /tmp/head_guidance_layer_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time


MODES = (
    "stock_cfg",
    "stock_batch3",
    "attnpack",
    "attnpack_soft",
    "attnpack_separate",
    "diffusers_pag",
    "explicit_maps",
)
TEXT_TOKENS = 333  # SD3: 77 CLIP + 256 T5


def _model(layers: int):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    ).eval()


def _inputs(model, batch: int, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    latent = size // 8
    return dict(
        hidden_states=torch.randn(batch, 16, latent, latent, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 4096, generator=g),
        pooled_projections=torch.randn(batch, 2048, generator=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )


class _ExplicitMapsCore:
    """HeadHunter's official computation: materialise softmax(QK^T) per (batch, head), blend with the identity."""

    def __init__(self, softness: float):
        self.softness = softness

    def __call__(self, q, k, v, call):
        import torch

        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        eye = torch.eye(q.shape[-2], dtype=q.dtype).expand_as(probs)
        rows = call.run.rows("perturbed") if call.run is not None else []
        probs[rows] = (1 - self.softness) * probs[rows] + self.softness * eye[rows]
        return probs @ v


def worker(mode: str, size: int, layers: int, repeats: int) -> dict:
    import torch
    from _common import PeakRSS, mib, rss_bytes

    torch.set_grad_enabled(False)
    import attnpack
    from attnpack.attn_processors import apply_processors, run_overrides

    model = _model(layers)
    gc.collect()
    model_rss = rss_bytes()
    batch = 2 if mode in ("stock_cfg", "attnpack", "attnpack_soft", "attnpack_separate") else 3
    inputs = _inputs(model, batch, size)
    handle = None
    roles = None
    if mode.startswith("attnpack"):
        # a bare denoiser treats every row as conditional; mark the CFG halves as a pipeline would
        roles = ("uncond", "cond")
        soft = mode == "attnpack_soft"
        handle = attnpack.apply_head_perturbation(
            model,
            "L0",
            scale=3.0,
            softness=0.5 if soft else 1.0,
            token_scope="full" if soft else "image",
            separate_pass=mode == "attnpack_separate",
        )
    elif mode == "diffusers_pag":
        from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0

        model.transformer_blocks[0].attn.set_processor(PAGCFGJointAttnProcessor2_0())
    elif mode == "explicit_maps":
        roles = ("uncond", "cond", "perturbed")
        handle = apply_processors(model, _ExplicitMapsCore(1.0), layers="transformer_blocks.0.attn")

    def step():
        if roles is None:
            return model(**inputs)[0]
        with run_overrides(roles=roles):
            return model(**inputs)[0]

    start = time.perf_counter()
    step()  # warm-up: lazy imports and one-time initialisation stay out of the measured peak
    first = time.perf_counter() - start
    with PeakRSS(reset=True) as mem:  # VmHWM reset after gc.collect(); without clear_refs: ru_maxrss growth
        out = step()
    before, peak = mem.before_bytes, mem.peak_bytes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if handle is not None:
        handle.remove()
    return {
        "mode": mode,
        "size": size,
        "image_tokens": (size // 16) ** 2,
        "text_tokens": TEXT_TOKENS,
        "batch_in": batch,
        "out_batch": int(out.shape[0]),
        "rss_before_step_mib": mib(before),
        "peak_rss_mib": mib(peak),
        "activation_peak_mib": mib(peak - before),
        "peak_over_weights_mib": mib(peak - model_rss),
        "first_step_s": round(first, 3),
        "step_s_median": round(statistics.median(times), 3) if times else None,
    }


def layer_times(size: int, repeats: int) -> list[dict]:
    """One SD3-medium joint attention layer, batch [uncond, cond, perturbed]: stock SDPA processor, attnpack head
    perturbation (all 24 heads with image scope; 3 heads soft with full scope) and diffusers' PAG processor, timed
    interleaved in one process (median of ``repeats`` after a warm-up round)."""
    import torch
    from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGCFGJointAttnProcessor2_0

    from attnpack.attn_processors import list_layers
    from attnpack.attn_processors.context import _CURRENT, RunState
    from attnpack.attn_processors.head_perturbation import HeadPerturbationAttnProcessor, HeadPerturbationCore

    torch.set_grad_enabled(False)
    model = _model(1)
    attn = model.transformer_blocks[0].attn
    info = list_layers(model)[0]
    g = torch.Generator().manual_seed(0)
    n_img = (size // 16) ** 2
    hidden = torch.randn(3, n_img, 1536, generator=g)
    context = torch.randn(3, TEXT_TOKENS, 1536, generator=g)
    processors = {
        "sdpa": JointAttnProcessor2_0(),
        "attnpack_all_heads_image": HeadPerturbationAttnProcessor(
            HeadPerturbationCore(range(24), token_scope="image"), info
        ),
        "attnpack_3_heads_soft_full": HeadPerturbationAttnProcessor(
            HeadPerturbationCore([1, 5, 17], softness=0.5), info
        ),
        "diffusers_pag": PAGCFGJointAttnProcessor2_0(),
    }
    # the run context a denoiser hook would set: the third row is the perturbed one (private API: benchmark only)
    token = _CURRENT.set(RunState(family="sd3", batch_size=3, roles=("uncond", "cond", "perturbed")))
    times: dict[str, list[float]] = {name: [] for name in processors}
    try:
        for _ in range(repeats + 1):
            for name, proc in processors.items():
                attn.set_processor(proc)
                start = time.perf_counter()
                attn(hidden_states=hidden, encoder_hidden_states=context)
                times[name].append(time.perf_counter() - start)
    finally:
        _CURRENT.reset(token)
    base = statistics.median(times["sdpa"][1:])
    # extra work over the batch-3 SDPA: the image-scope target attends the perturbed row's image queries over the text
    # keys plus one extra key (n_txt + 1 of n keys, 1 of 3 rows); the other variants only copy or blend
    extra = {"attnpack_all_heads_image": (TEXT_TOKENS + 1) / (n_img + TEXT_TOKENS) / 3}
    rows = []
    for name, values in times.items():
        median = statistics.median(values[1:])
        rows.append(
            {
                "layer_mode": name,
                "size": size,
                "tokens": n_img + TEXT_TOKENS,
                "batch": 3,
                "median_s": round(median, 4),
                "vs_sdpa": round(median / base, 3),
                "theoretical_vs_sdpa": round(1 + extra.get(name, 0.0), 3),
            }
        )
    return rows


def memory_child(payload: dict) -> dict:
    """One (mode, size) in a fresh process (``_common.peak_rss_child``)."""
    import torch

    if payload["threads"]:
        torch.set_num_threads(payload["threads"])
    return worker(payload["mode"], payload["size"], payload["layers"], payload["repeats"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="*", default=[512], help="image sizes for the step memory / time")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--explicit-max-size", type=int, default=512, help="skip explicit_maps above this size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers")
    parser.add_argument("--layer-sizes", type=int, nargs="*", default=[512], help="image sizes for the layer timing")
    parser.add_argument("--layer-repeats", type=int, default=3)


# a fixed mmap threshold makes glibc return every freed tensor to the OS, so RSS follows live memory
CHILD_ENV = {"PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}


def run(args: argparse.Namespace) -> dict:
    import torch
    from _common import peak_rss_child

    results = []
    for size in args.sizes:
        for mode in args.modes:
            if mode == "explicit_maps" and size > args.explicit_max_size:
                continue
            payload = dict(mode=mode, size=size, layers=args.layers, repeats=args.repeats, threads=args.threads)
            row = peak_rss_child(__file__, payload, env=CHILD_ENV)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    for size in args.sizes:
        rows = {r["mode"]: r for r in results if r["size"] == size}
        base = rows.get("stock_batch3")
        cfg = rows.get("stock_cfg")
        for r in rows.values():
            if base:
                r["peak_vs_stock_batch3"] = round(r["peak_rss_mib"] / base["peak_rss_mib"], 3)
                r["activation_vs_stock_batch3"] = round(r["activation_peak_mib"] / base["activation_peak_mib"], 3)
                r["over_weights_vs_stock_batch3"] = round(
                    r["peak_over_weights_mib"] / base["peak_over_weights_mib"], 3
                )
                r["time_vs_stock_batch3"] = round(r["step_s_median"] / base["step_s_median"], 3)
            if cfg:
                r["time_vs_stock_cfg"] = round(r["step_s_median"] / cfg["step_s_median"], 3)
    layer = []
    for size in args.layer_sizes:
        if args.threads:
            torch.set_num_threads(args.threads)
        layer += layer_times(size, args.layer_repeats)
        print(json.dumps(layer[-4:]), file=sys.stderr)
    return {
        "threads": args.threads or torch.get_num_threads(),
        "layers": args.layers,
        "theoretical_time_vs_stock_cfg": 1.5,  # one extra row in a batch of 2
        "results": results,
        "layer_timing": layer,
    }


if __name__ == "__main__":
    from _registry import main

    sys.exit(main("head_guidance", module=sys.modules[__name__]))
