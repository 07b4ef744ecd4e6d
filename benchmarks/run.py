"""Run a registered benchmark (``benchmarks/_registry.py``), or list them. Every benchmark goes through here; a
script run directly (``python benchmarks/otsu_variants.py --maps 5``) is the same as ``run.py`` with its name.

    python benchmarks/run.py --list
    python benchmarks/run.py otsu_variants --maps 5 -o /tmp/otsu.json
    python benchmarks/run.py NAME --help             # the benchmark's own options
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from _registry import BENCHMARKS, main  # noqa: E402


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        if not argv or argv[0] != "--list":
            print(__doc__.strip() + "\n")
        width = max(len(name) for name in BENCHMARKS)
        for bench in BENCHMARKS.values():
            print(f"{bench.name:{width}s}  {bench.description}  (results/{bench.out})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"run.py: unknown benchmark {name!r}; `python benchmarks/run.py --list` shows them", file=sys.stderr)
        return 2
    return main(name, rest, prog=f"run.py {name}")


if __name__ == "__main__":
    sys.exit(cli())
