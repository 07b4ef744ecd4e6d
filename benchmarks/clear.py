"""CLEAR benchmarks: tile density tables (CPU), attention-only and end-to-end FLUX timings vs torch SDPA.

    python benchmarks/clear.py table                 # tile densities at 1024^2 / 2048^2 / 4096^2 (any machine)
    python benchmarks/clear.py attention             # CLEAR attention vs SDPA (CUDA: FLUX shapes; CPU: small case)
    python benchmarks/clear.py e2e                   # random-weight full-size FLUX transformer, stock vs CLEAR (CUDA)
    python benchmarks/clear.py all                   # everything this machine can run

Attention cases are registered in ``benchmarks/attention.py``'s case table (``flux-<res>-clear-r<r>[-d<d>]``) and
measured by its ``run_case`` (our kernel and SDPA's best backend side by side, tile bound, fraction reached), so
``python benchmarks/attention.py --cases flux-4096-clear-r16`` works too once this module is imported.
Results go to ``benchmarks/results/clear-<part>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention  # noqa: E402
from _common import machine_info, time_fn, write_json  # noqa: E402

from attnpack.kernels.clear import (  # noqa: E402
    ClearPatternCache,
    ClearSpec,
    clear_attention,
    clear_pair_count,
    clear_pattern,
    clear_tile_stats,
)


RESULTS = Path(__file__).resolve().parent / "results"
RESOLUTIONS = (1024, 2048, 4096)
CONFIGS = ((8, 1), (16, 1), (32, 1), (8, 4), (16, 4))  # (radius, down_factor): the released checkpoints + r32
TEXT = 512
# reference note section 2: FlexAttention 128 x 128 row-major block density (%), official mask
PUBLISHED_ROW_MAJOR = {
    1024: {(8, 1): 41.7, (16, 1): 57.4, (32, 1): 81.5, (8, 4): 44.2, (16, 4): 59.1},
    2048: {(8, 1): 16.7, (16, 1): 27.4, (32, 1): 46.6, (8, 4): 21.3, (16, 4): 31.3},
    4096: {(8, 1): 7.2, (16, 1): 13.1, (32, 1): 24.3, (8, 4): 12.6, (16, 4): 18.1},
}


# ------------------------------------------------------------------------------------------------- tile table
def tile_table() -> list[dict[str, Any]]:
    """Fraction of tiles visited: 128-token row-major (FlexAttention's layout), 128-token 2-D boxes (8 x 16), and
    attnpack's default (8 x 16 query / 8 x 8 key boxes, as work = visited area), plus the mask's own pair density."""
    rows = []
    for res in RESOLUTIONS:
        for r, d in CONFIGS:
            spec = ClearSpec((res // 16, res // 16), TEXT, r, d)
            row_major = clear_tile_stats(spec, q_tile=128, kv_tile=128)
            box = clear_tile_stats(spec, q_tile=(8, 16), kv_tile=(8, 16))
            default = clear_tile_stats(spec)
            rows.append(
                dict(
                    resolution=res,
                    radius=r,
                    down_factor=d,
                    published_row_major_pct=PUBLISHED_ROW_MAJOR[res][(r, d)],
                    row_major_pct=round(100 * row_major["density"], 1),
                    row_major_masked_pct=round(100 * row_major["masked"], 1),
                    box128_pct=round(100 * box["density"], 1),
                    box128_masked_pct=round(100 * box["masked"], 1),
                    default_work_pct=round(100 * default["work"], 1),
                    default_masked_pct=round(100 * default["masked"], 1),
                    row_major_partial_pct=round(100 * row_major["density"] * row_major["masked"], 1),
                    default_partial_pct=round(100 * default["work"] * default["masked"], 1),
                    pair_density_pct=round(100 * default["pairs"], 2),
                    tile_bound_row_major=round(row_major["tile_bound"], 2),
                    tile_bound_default=round(1 / default["work"], 2),
                )
            )
    return rows


def print_tile_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| res | r | d | row-major 128 (note) | row-major 128 (ours) | 2-D 8x16 | default 8x16 / 8x8 | partially masked: "
        "row-major -> default | mask pair density | tile-bound speedup: row-major -> default |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['resolution']} | {x['radius']} | {x['down_factor']} | {x['published_row_major_pct']}% | "
            f"{x['row_major_pct']}% | {x['box128_pct']}% | {x['default_work_pct']}% | "
            f"{x['row_major_partial_pct']}% -> {x['default_partial_pct']}% | {x['pair_density_pct']}% | "
            f"{x['tile_bound_row_major']}x -> {x['tile_bound_default']}x |"
        )


# ------------------------------------------------------------------------------------------------- attention cases
def clear_case(res: int, radius: int, down_factor: int, *, devices=("cuda",), heads=24, head_dim=128, text=TEXT,
               name=None) -> attention.Case:  # fmt: skip
    """CLEAR attention on FLUX's joint sequence (``text`` + (res/16)^2 tokens) vs SDPA over all (stock) keys."""
    grid = (res // 16, res // 16)

    def build(device: torch.device, dtype: torch.dtype, backend: str | None) -> attention.Workload:
        spec = ClearSpec(grid, text, radius, down_factor)
        n = spec.num_queries
        q, k, v = (attention._rand((1, heads, n, head_dim), device, dtype, s) for s in range(3))
        weight = torch.full((down_factor, down_factor), 1.0 / down_factor**2, device=device)
        cache = ClearPatternCache()
        kw = dict(grid=grid, text_len=text, radius=radius, down_factor=down_factor, backend=backend, cache=cache,
                  spatial_weight=weight if down_factor > 1 else None)  # fmt: skip

        def run():
            with torch.no_grad():
                return clear_attention(q, k, v, **kw)

        pattern = clear_pattern(spec)
        table = pattern.table
        stock_kv_tiles = table.num_kv_tiles - (-(-spec.num_pooled // pattern.kv_tile) if spec.num_pooled else 0)
        stats = pattern.stats()
        details = dict(
            resolution=res, grid=list(grid), radius=radius, down_factor=down_factor, text_tokens=text, heads=heads,
            head_dim=head_dim, tokens=n, keys=spec.num_keys, tiles=f"{pattern.q_tile}x{pattern.kv_tile} tokens",
            masked_tile_fraction=round(stats["masked_fraction"], 4),
        )  # fmt: skip
        # the bound against *stock* attention: all query tiles x the stock key tiles, over the tiles CLEAR visits
        tile_bound = table.num_q_tiles * stock_kv_tiles / table.visited_tiles()
        return attention.Workload(run, (q, k, v), clear_pair_count(spec) * heads, tile_bound, details)

    return attention.Case(
        name or f"flux-{res}-clear-r{radius}" + (f"-d{down_factor}" if down_factor > 1 else ""),
        f"CLEAR r={radius} d={down_factor} on FLUX {res}^2 ({grid[0]}x{grid[1]} tokens + {text} text), "
        f"{heads} heads x {head_dim}",
        devices,
        build,
    )


for _res in RESOLUTIONS:
    for _r, _d in CONFIGS:
        _case = clear_case(_res, _r, _d)
        attention.CASES[_case.name] = _case
_cpu = clear_case(512, 8, 1, devices=("cpu",), heads=4, head_dim=64, text=64, name="cpu-512-clear-r8")
attention.CASES[_cpu.name] = _cpu


def run_attention(device: torch.device, dtype: torch.dtype, backends: list[str], repeats: int) -> list[dict]:
    names = [n for n, c in attention.CASES.items() if "clear" in n and device.type in c.devices]
    results = []
    for name in names:
        for backend in backends:
            result = attention.run_case(attention.CASES[name], device, dtype, backend, repeats)
            print(
                f"{name:24s} {backend:9s} {result['time_ms']:10.3f} ms  sdpa[{result['sdpa_backend']}] "
                f"{result['sdpa_time_ms']:10.3f} ms  speedup {result['speedup_over_sdpa']:6.2f}x  tile bound "
                f"{result['tile_bound_speedup']}x  ({result['fraction_of_tile_bound']} of it)",
                flush=True,
            )
            results.append(result)
    return results


# ------------------------------------------------------------------------------------------------- end to end
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip


def run_e2e(device: torch.device, dtype: torch.dtype, radius: int, backend: str | None, repeats: int, *,
            config: dict | None = None, resolutions=RESOLUTIONS, text: int = TEXT) -> list[dict]:  # fmt: skip
    """One transformer forward (batch 1, 512 text tokens) of a random-weight FLUX.1-dev-sized model: stock attention
    (SDPA through diffusers' dispatcher) vs CLEAR, at each resolution. Latency does not depend on weight values."""
    config = dict(config or FLUX_DEV_CONFIG)
    from diffusers import FluxPipeline, FluxTransformer2DModel

    import attnpack

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    results = []
    for res in resolutions:
        h = w = res // 16
        g = torch.Generator(device="cpu").manual_seed(0)
        inputs = dict(
            hidden_states=torch.randn(1, h * w, config["in_channels"], generator=g).to(device, dtype),
            encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g).to(device, dtype),
            pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
            timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype),
            txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
            return_dict=False,
        )
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)

        def forward(inputs=inputs):
            with torch.no_grad():
                return model(**inputs)

        stock = time_fn(forward, device, warmup=1, repeats=repeats)
        with attnpack.apply_clear(model, radius=radius, backend=backend):
            ours = time_fn(forward, device, warmup=1, repeats=repeats)
        row = dict(
            resolution=res, radius=radius, backend=backend, stock_ms=round(stock["median_ms"], 2),
            clear_ms=round(ours["median_ms"], 2), speedup=round(stock["median_ms"] / ours["median_ms"], 3),
        )  # fmt: skip
        print(row, flush=True)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("table", "attention", "e2e", "all"))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--backend", nargs="*", default=None, help="triton / flex / reference (default: triton "
                        "and flex on CUDA, reference on CPU)")  # fmt: skip
    parser.add_argument("--radius", type=int, default=16, help="radius of the end-to-end run (default 16)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from attnpack._utils import parse_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    backends = args.backend or (["triton", "flex"] if device.type == "cuda" else ["reference"])
    machine = machine_info(device)
    if args.part in ("table", "all"):
        rows = tile_table()
        print_tile_table(rows)
        write_json(RESULTS / "clear-table.json", {"machine": machine, "rows": rows})
    if args.part in ("attention", "all"):
        results = run_attention(device, dtype, backends, args.repeats)
        write_json(RESULTS / f"clear-attention-{device.type}.json", {"machine": machine, "cases": results})
    if args.part in ("e2e", "all"):
        if device.type != "cuda":
            print("e2e: a full-size FLUX transformer needs a CUDA GPU; skipped on", device.type)
        else:
            rows = run_e2e(device, dtype, args.radius, backends[0], max(3, args.repeats // 3))
            write_json(RESULTS / f"clear-e2e-{device.type}.json", {"machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
