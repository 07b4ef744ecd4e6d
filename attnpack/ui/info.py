"""The Benchmarks / Info tab: versions, device, which attention backends work here, the registered techniques and
models (API endpoint ``/info``), and a side-by-side timing of a technique against stock attention on the same model,
prompt and seed (API endpoint ``/benchmark``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._layout import checked_request, make_settings, model_picker, number, pick_seed
from ._runtime import Runtime, installed, user_errors
from ._techniques import technique_controls


__all__ = ["build_info_tab", "environment_markdown"]


# the Benchmarks tab compares a technique with stock attention: GNA runs with its defaults on every DiT
BENCHMARK_DEFAULT = "gna"


def environment_markdown(report: Mapping[str, Any]) -> str:
    """The environment report as Markdown tables."""
    dev = report["device"]
    lines = [
        f"**Device**: {', '.join(f'{k}={v}' for k, v in dev.items())}  ",
        f"**Python** {report['python']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| attention backend | works here | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {'yes' if r['ok'] else 'no'} | {r['detail']} |" for name, r in report["backends"].items()]
    lines += ["", "| technique | models | summary |", "|---|---|---|"]
    lines += [
        f"| {n} | {', '.join(t['families']) or 'all'} | {t['summary']} |" for n, t in report["techniques"].items()
    ]
    lines += ["", "| model | |", "|---|---|"]
    lines += [f"| {n} | {d} |" for n, d in report["models"].items()]
    return "\n".join(lines)


def _first_frame(result) -> np.ndarray:
    image = result.images[0][0] if result.is_video else result.images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def build_info_tab(runtime: Runtime, techniques: Mapping[str, Any]) -> None:
    import gradio as gr

    from .._env import environment_report
    from ..pipelines.generation import run_generation
    from ..pipelines.loading import builtin_models

    config = runtime.config
    with gr.Tab("Benchmarks / Info", id="info"):
        check = gr.Button("Check this machine", variant="secondary")
        summary = gr.Markdown()
        with gr.Accordion("Full report (JSON)", open=False):
            report_json = gr.JSON(label="Environment report")

        gr.Markdown(
            "### Benchmark a technique\nRuns stock attention and the technique on the same model, prompt and seed "
            "(one warm-up run each, then the timed runs) and reports the median time per generation and how far "
            "the images differ."
        )
        with gr.Row():
            model = model_picker(config)
            controls = technique_controls(techniques, label="Technique to compare", default=BENCHMARK_DEFAULT)
        controls.add_options()
        with gr.Row():
            prompt = gr.Textbox(label="Benchmark prompt", value="a red circle left of a blue square", scale=3)
            repeats = gr.Number(label="Timed runs", value=2, minimum=1, maximum=20)
            steps = gr.Number(label="Benchmark steps", value=4, minimum=1, maximum=config.max_steps)
        with gr.Row():
            width = gr.Number(label="Benchmark width", value=0, info="0: the model's default")
            height = gr.Number(label="Benchmark height", value=0, info="0: the model's default")
            seed = gr.Number(label="Benchmark seed", value=0, minimum=0)
        bench = gr.Button("Run benchmark", variant="primary")
        table = gr.Dataframe(
            headers=["attention", "median seconds", "speed-up vs stock", "max |Δ| (0-255)", "mean |Δ| (0-255)"],
            label="Benchmark",
            interactive=False,
        )
        gallery = gr.Gallery(label="Stock | technique", columns=2, height="auto")

    def info():
        """Versions, device, working attention backends, registered techniques, built-in and loaded models."""
        with user_errors("Checking the machine"), runtime.lock:
            report = environment_report(config.device)
        report["techniques"] = {
            name: {"summary": t.summary, "families": list(t.families), "options": [o.name for o in t.options]}
            for name, t in techniques.items()
        }
        report["models"] = builtin_models()
        report["loaded_models"] = runtime.loaded_models()
        return environment_markdown(report), report

    check.click(
        info, None, [summary, report_json], api_name="info", concurrency_limit=1, concurrency_id=config.queue_id
    )

    @checked_request
    def benchmark(
        model: str,
        prompt: str,
        seed: float = 0,
        width: float = 0,
        height: float = 0,
        steps: float = 4,
        repeats: float = 2,
        technique: str = BENCHMARK_DEFAULT,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
        **technique_options: Any,
    ):
        """Time stock attention and ``technique`` on the same request; returns the table and both images."""
        with user_errors("Benchmark"):
            settings = make_settings(config, prompt, None, pick_seed(seed, False), width, height, steps)
            specs = controls.specs(technique, technique_options, config)
            if not specs:
                raise ValueError("`technique` is 'none'; pick a technique to compare with stock attention.")
            repeats = number("repeats", repeats, 1, 20, integer=True)
            rows, frames = [], []
            for name, spec in (("stock", []), (technique, specs)):
                progress(0.0, desc=f"{name}: warm-up")
                with runtime.session(model) as pipe, installed(pipe, spec):
                    run_generation(pipe, settings)
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        result = run_generation(pipe, settings)
                        times.append(time.perf_counter() - start)
                frames.append(_first_frame(result))
                rows.append([name, round(statistics.median(times), 4)])
            diff = np.abs(frames[1] - frames[0])
            rows[0] += [1.0, 0, 0.0]
            rows[1] += [round(rows[0][1] / rows[1][1], 3), int(diff.max()), round(float(diff.mean()), 3)]
        images = [(f.astype(np.uint8), label) for f, label in zip(frames, ("stock", technique))]
        return rows, images

    bench.click(
        benchmark,
        inputs=[model, prompt, seed, width, height, steps, repeats, controls.selector],
        inputs_kwargs=controls.widgets,
        outputs=[table, gallery],
        api_name="benchmark",
        concurrency_limit=1,
        concurrency_id=config.queue_id,
    )
