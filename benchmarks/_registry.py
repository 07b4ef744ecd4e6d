"""The benchmark registry: one declaration per benchmark, one runner, one output policy.

    python benchmarks/run.py --list                   # the registered benchmarks
    python benchmarks/run.py NAME [its options]       # = python benchmarks/NAME.py [its options]

A benchmark is a script ``benchmarks/<module>.py`` defining

- ``add_arguments(parser)``: its own options (the runner adds ``-o/--out`` and ``--force``; do not add them);
- ``run(args) -> dict``: the measurement; it prints its progress and returns what the JSON holds;

and optionally ``memory_child(payload) -> dict`` (the code ``_common.peak_rss_child(__file__, payload)`` runs in a
fresh process; the runner adds the hidden ``--memory-child JSON`` for it) and ``exit_status(result) -> int`` (default
0). It is registered by one :class:`Benchmark` line in ``BENCHMARKS`` below, and stays runnable directly::

    if __name__ == "__main__":
        from _registry import main

        sys.exit(main("NAME", module=sys.modules[__name__]))

The runner (:func:`main`) applies one policy to every benchmark: the output is ``-o/--out`` or the registered default
under ``benchmarks/results/``; an existing file (a committed result) is refused before any work unless ``--force``
(``_common.result_path``); the JSON is written atomically (``_common.write_json``) with a ``machine`` block
(``_common.machine_info``) of the benchmark's ``--device`` if it has one (unset: CUDA when available), else the CPU.
Memory values are in MiB (keys end in ``_mib``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
for _path in (str(HERE), str(ROOT)):  # this checkout's attnpack first, not an installed copy
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One registered benchmark.

    Attributes:
        name: what ``run.py NAME`` takes (for a script with one benchmark: its file name without ``.py``).
        description: one line, for ``--list`` and ``--help``.
        out: default output file under ``benchmarks/results/``; ``{option}`` fields are filled from the parsed
            arguments (``"astar_{device}_{size}.json"``), ``{device}`` with the device type (``cuda`` / ``cpu``).
        module: the script ``benchmarks/<module>.py`` (default: ``name``); several benchmarks may share one.
        add_arguments, run: the names of its two functions in that module.
    """

    name: str
    description: str
    out: str
    module: str = ""
    add_arguments: str = "add_arguments"
    run: str = "run"

    @property
    def script(self) -> Path:
        return HERE / f"{self.module or self.name}.py"

    def load(self) -> ModuleType:
        """Import the script (as the module ``<module>``, with ``benchmarks/`` on ``sys.path``)."""
        return importlib.import_module(self.module or self.name)

    def default_out(self, args: argparse.Namespace, device: str) -> Path:
        return RESULTS / self.out.format(**{**vars(args), "device": device})


BENCHMARKS: dict[str, Benchmark] = {}


def register(*benchmarks: Benchmark) -> None:
    for bench in benchmarks:
        if bench.name in BENCHMARKS:
            raise ValueError(f"benchmark {bench.name!r} is registered twice")
        BENCHMARKS[bench.name] = bench


register(
    Benchmark("astar", "A-STAR vs diffusers' Attend-and-Excite: peak memory and time per image, side by side",
              "astar_{device}_{size}.json"),
    Benchmark("head_guidance", "head perturbation guidance: memory and time of one guided step vs diffusers PAG",
              "head_guidance_cpu.json"),
    Benchmark("ir_diffusion", "IR-Diffusion attention memory and time: SDPA + boolean masks vs dense explicit scores",
              "ir_diffusion.json"),
    Benchmark("otsu_variants", "textbook Otsu vs the official IR-Diffusion variant: tokens put on opposite sides",
              "otsu_variants.json"),
    Benchmark("paro", "PARO block-sparse and INT8 / FP8 attention vs torch SDPA at CogVideoX and Wan 2.1 shapes",
              "paro-{device}.json"),
    Benchmark("paro_fidelity", "PARO fidelity vs dense attention: sparse, quantized, combined; with / without reorder",
              "paro_fidelity.json"),
    Benchmark("ring_traffic", "GNA under ring attention at Wan 720p: key shards visited and remote keys received",
              "ring-traffic-wan720p.json"),
    Benchmark("toy_adherence", "toy models: evaluator accuracy on held-out scenes and prompt adherence",
              "toy_adherence.json"),
    Benchmark("toy_astar", "A-STAR on toy-sd: prompt adherence of 2- and 3-object prompts with and without it",
              "toy_astar.json"),
    Benchmark("toy_fidelity", "toy models: PSNR of each registered technique vs dense attention, and adherence",
              "toy_fidelity.json"),
    Benchmark("toy_heads", "head guidance on toy-flux: searched heads vs plain toy-flux on held-out prompts",
              "toy_heads.json"),
    Benchmark("toy_ir", "IR-Diffusion on toy-sd: two subjects both drawn, and blended, with and without it",
              "toy_ir.json"),
    Benchmark("ui_first_run", "`attnpack ui`: start to answering, then each tab's first request with its defaults",
              "ui_first_run.json"),
)  # fmt: skip


def _device(args: argparse.Namespace) -> str:
    """The device type the benchmark ran on: its ``--device`` (unset: CUDA when available), else the CPU."""
    if not hasattr(args, "device"):
        return "cpu"
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type


def build_parser(bench: Benchmark, module: ModuleType, prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options, plus the runner's ``-o/--out``, ``--force`` and (hidden) ``--memory-child``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(module.__doc__ or bench.description).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    getattr(module, bench.add_arguments)(parser)
    parser.add_argument(
        "-o", "--out", default=None, help=f"JSON file to write (default: benchmarks/results/{bench.out})"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing file (a committed result?)")
    if hasattr(module, "memory_child"):
        parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser


def main(
    name: str, argv: list[str] | None = None, *, module: ModuleType | None = None, prog: str | None = None
) -> int:
    """Run the registered benchmark ``name`` with ``argv`` (default ``sys.argv[1:]``): the one entry point."""
    bench = BENCHMARKS[name]
    module = module if module is not None else bench.load()
    parser = build_parser(bench, module, prog)
    args = parser.parse_args(argv)
    if getattr(args, "memory_child", None) is not None:  # a fresh process started by _common.peak_rss_child
        print(json.dumps(module.memory_child(json.loads(args.memory_child))))
        return 0
    from _common import machine_info, result_path, write_json

    device = _device(args)
    out = result_path(parser, args.out or bench.default_out(args, device), args.force)  # before any work
    result: dict[str, Any] = getattr(module, bench.run)(args)
    import torch

    write_json(out, {**result, "machine": machine_info(torch.device(device))})
    print(f"wrote {out}", file=sys.stderr)
    return module.exit_status(result) if hasattr(module, "exit_status") else 0
