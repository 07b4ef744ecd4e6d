"""The benchmark registry (benchmarks/_registry.py) and its one runner (benchmarks/run.py): every script is registered
(or listed below as not yet), the output policy refuses an existing file before any work, and one cheap benchmark runs
end to end through run.py to a JSON with the machine block."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# Scripts not on the registry yet (being changed elsewhere; issue 25 item 6). Registering one = its Benchmark line in
# benchmarks/_registry.py, add_arguments / run in the script, and its name removed from here.
NOT_YET_REGISTERED = {"attention", "block_sweep", "clear", "kernel_resources", "cpu_dispatch", "gpu_check"}


@pytest.fixture(scope="module")
def registry():
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    import _registry

    yield _registry
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:  # the benchmark scripts, imported as top-level modules
        if getattr(sys.modules[name], "__file__", None) and Path(sys.modules[name].__file__).parent == BENCHMARKS:
            del sys.modules[name]


def _registered_names() -> list[str]:
    saved_path = list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _registry

        return list(_registry.BENCHMARKS)
    finally:
        sys.path[:] = saved_path  # _registry puts this checkout first on sys.path: not for the other tests


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_every_script_is_registered(registry):
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and p.name != "run.py"}
    registered = {bench.module or bench.name for bench in registry.BENCHMARKS.values()}
    assert NOT_YET_REGISTERED <= scripts, f"stale names in NOT_YET_REGISTERED: {NOT_YET_REGISTERED - scripts}"
    assert not registered & NOT_YET_REGISTERED, (
        f"registered now, drop from NOT_YET_REGISTERED: {registered & NOT_YET_REGISTERED}"
    )
    assert scripts - NOT_YET_REGISTERED == registered, f"not registered: {scripts - NOT_YET_REGISTERED - registered}"
    for bench in registry.BENCHMARKS.values():
        assert bench.script.is_file() and bench.description and "\n" not in bench.description
        assert bench.out.endswith(".json") and "/" not in bench.out, bench.out


def test_run_list_names_every_benchmark(registry):
    proc = _run("benchmarks/run.py", "--list")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert listed == list(registry.BENCHMARKS)
    unknown = _run("benchmarks/run.py", "no-such-benchmark")
    assert unknown.returncode == 2 and "--list" in unknown.stderr


@pytest.mark.parametrize("name", _registered_names())
def test_output_guard_refuses_an_existing_file_before_any_work(registry, name, tmp_path):
    bench = registry.BENCHMARKS[name]
    module = bench.load()
    script = bench.script.read_text()
    assert f'main("{name}", module=sys.modules[__name__])' in script, "run directly, it must go through the runner"

    def must_not_run(args):
        raise AssertionError(f"{name} started its work")

    module_run = getattr(module, bench.run)
    setattr(module, bench.run, must_not_run)
    try:
        existing = tmp_path / "committed.json"
        existing.write_text('{"committed": true}\n')
        with pytest.raises(SystemExit) as exit_info:
            registry.main(name, ["-o", str(existing)], module=module)
        assert exit_info.value.code == 2
        assert existing.read_text() == '{"committed": true}\n'
        with pytest.raises(AssertionError, match="started its work"):  # --force lets it through
            registry.main(name, ["-o", str(existing), "--force"], module=module)
    finally:
        setattr(module, bench.run, module_run)


def test_a_script_run_directly_keeps_the_policy(tmp_path):
    existing = tmp_path / "astar.json"
    existing.write_text("{}\n")
    proc = _run("benchmarks/astar.py", "--size", "64", "-o", str(existing))
    assert proc.returncode == 2 and "exists" in proc.stderr and "--force" in proc.stderr, proc.stderr
    assert existing.read_text() == "{}\n"


def test_a_benchmark_runs_end_to_end_through_run_py(tmp_path):
    out = tmp_path / "results" / "otsu.json"
    proc = _run(str(BENCHMARKS / "run.py"), "otsu_variants", "--maps", "1", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["maps_per_grid"] == 1 and set(data["grids"]) == {"8x12", "16x16", "32x32", "24x40"}
    assert {"python", "versions", "device"} <= set(data["machine"]) and data["machine"]["device"].startswith("CPU")
    assert sorted(p.name for p in out.parent.iterdir()) == ["otsu.json"]  # written atomically, nothing left over


def test_peak_rss_measures_a_block(registry):
    from _common import PeakRSS, mib

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    with PeakRSS() as mem:
        block = b"\x01" * (64 << 20)  # 64 MiB, every page written
        del block
    assert mem.method.startswith("VmHWM") and mib(mem.call_peak_bytes) >= 48, (mem.method, mem.call_peak_bytes)
    with PeakRSS(reset=False) as growth:
        pass
    assert growth.method.startswith("ru_maxrss") and growth.call_peak_bytes >= 0
