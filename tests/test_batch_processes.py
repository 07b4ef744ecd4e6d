"""`attnpack batch` as users run it: killed mid-way and resumed, and split over two processes by accelerate."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from attnpack import read_parameters
from attnpack.cli import main
from attnpack.pipelines.batch import LOCK_FILE, METADATA_FILE


ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    # one thread per process: tiny models gain nothing from more, and a busy 2-core machine slows OpenMP down badly
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / METADATA_FILE).read_text().splitlines()]


def test_killed_run_resumes_with_skip_existing(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a red cat number {i}\n" for i in range(12)))
    out = tmp_path / "out"
    args = ["batch", "-m", "tiny-sd15", "--prompts", str(prompts), "--outdir", str(out), "--seeds", "0-1"]
    args += ["--steps", "2"]
    expected = [f"{row:05d}_{seed}.png" for row in range(12) for seed in (0, 1)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "attnpack", *args], stdout=log, stderr=log, env=_env())
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if len(list(out.glob("*.png"))) >= 2:
                    break
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finished = sorted(p.name for p in out.glob("*.png"))
    assert 2 <= len(finished) < len(expected), f"not interrupted mid-way: {len(finished)} files"
    for name in finished:  # every file there is complete and carries its parameters
        with Image.open(out / name) as im:
            im.load()
        assert read_parameters(out / name)["file"] == name
    (out / f".{expected[-1]}.k7x2q9ab.tmp").write_bytes(b"\x89PNG half")  # what a kill during a write leaves
    stamps = {name: (out / name).stat().st_mtime_ns for name in finished}

    resumed = subprocess.run(
        [sys.executable, "-m", "attnpack", *args, "--skip-existing"], capture_output=True, text=True, env=_env()
    )
    assert resumed.returncode == 0, resumed.stderr
    err = resumed.stderr
    done = len(expected) - len(finished)
    assert f"{done} written, {len(finished)} skipped (already done), 0 failed (0 bad rows) of 24 outputs" in err
    assert sorted(os.listdir(out)) == sorted([*expected, METADATA_FILE])  # no temporary or journal files
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == stamps  # nothing made twice
    meta = _records(out)
    assert [r["file"] for r in meta] == expected  # one record per file, in row and seed order
    for record in meta:
        assert record["prompt"] == f"a red cat number {record['row']}" and record["line"] == record["row"] + 1


HOLD_LOCK = """
import sys
from attnpack.pipelines.batch import outdir_lock

with outdir_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test kills this process
"""


def test_one_batch_per_output_folder(tmp_path, capsys):
    """A second batch on a folder in use stops at once with exit status 2 naming the first one's process, and touches
    nothing (before, it deleted the first batch's file in flight), also as two accelerate processes; once that process
    is killed, its lock is gone."""
    out = tmp_path / "out"
    out.mkdir()
    in_flight = out / ".00000_0.png.k7x2q9ab.tmp"  # what the running batch is writing
    in_flight.write_bytes(b"\x89PNG half")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        args = ["batch", "-m", "tiny-sd15", "--prompts", str(prompts), "--outdir", str(out), "--steps", "2"]
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attnpack batch:")]
        assert err == [
            f"attnpack batch: error: `outdir` {str(out)!r} is in use by another attnpack batch (process {holder.pid} "
            f"on {socket.gethostname()}); wait for it to finish, or give another --outdir."
        ]
        assert sorted(os.listdir(out)) == sorted([in_flight.name, LOCK_FILE])  # nothing deleted, nothing written
        # under accelerate only the main process takes the lock; the other learns of its error instead of waiting
        two = subprocess.run(
            _launch_two_processes(["-m", "attnpack", *args], _free_port()),
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert two.returncode != 0 and err[0] in two.stderr
        assert "another batch process failed: ValueError: `outdir`" in two.stderr
        assert sorted(os.listdir(out)) == sorted([in_flight.name, LOCK_FILE])
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        holder.wait()
    assert (out / LOCK_FILE).read_text().split() == [str(holder.pid), socket.gethostname()]
    assert main(args) == 0  # the kernel released the dead process's lock
    assert sorted(os.listdir(out)) == ["00000_0.png", METADATA_FILE]  # the killed run's temporary file is cleaned up


def _launch_two_processes(args: list[str], port: int, processes: int = 2) -> list[str]:
    """`accelerate launch` with two (or ``processes``) processes on this CPU-only machine.

    `accelerate launch --cpu --num_processes 2` starts a single process (several CPU processes need MPI there), so the
    test uses the torchrun path (`--multi_gpu`), which gives each process RANK/WORLD_SIZE; with no GPU accelerate's
    PartialState then runs the gloo backend on CPU.
    """
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, "--main_process_port", str(port), *args]


@pytest.mark.parametrize("processes", [2, 3])
def test_two_processes_make_the_same_files_as_one(tmp_path, processes):
    """Byte-identical PNGs and the same metadata (timing aside) from `accelerate launch` with 2 or 3 processes as from
    one (3 processes: 7 outputs do not split evenly).

    Both runs use one CPU thread per process (see `_env`): on CPU, the number of threads can change the last bits of
    float results (and so, rarely, a pixel value by 1); accelerate gives each process cores / processes threads
    otherwise.
    """
    prompts = tmp_path / "p.jsonl"
    rows = ['{"prompt": "a red cat"}', '{"prompt": "a blue dog", "seeds": "4-6"}', '{"prompt": "the sea", "steps": 3}']
    prompts.write_text("\n".join(rows) + "\n")
    common = ["-m", "tiny-sd15", "--prompts", str(prompts), "--seeds", "0-1", "--steps", "2", "-t", "dense"]
    env = _env()
    one = subprocess.run(
        [sys.executable, "-m", "attnpack", "batch", *common, "--outdir", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        _launch_two_processes(
            ["-m", "attnpack", "batch", *common, "--outdir", str(tmp_path / "two")], _free_port(), processes
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    assert f"on {processes} processes" in two.stderr
    assert all(f"batch {i}" in two.stderr for i in range(processes))
    assert two.stderr.count("attnpack batch: 7 written") == 1  # one summary, from the main process

    names = sorted(os.listdir(tmp_path / "one"))
    assert len(names) == 8 and sorted(os.listdir(tmp_path / "two")) == names
    for name in names:
        if name != METADATA_FILE:
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("seconds", "total_seconds", "process")} for r in records]

    single, split = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert strip(single) == strip(split)
    assert [r["file"] for r in split] == [n for n in names if n != METADATA_FILE]
    assert {r["process"] for r in split} == set(range(processes))  # every process did part of the work


@pytest.mark.slow
def test_console_script_under_accelerate(tmp_path):
    """`accelerate launch ... --no_python attnpack batch ...`: the installed `attnpack` command (a stand-in here)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "attnpack"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom attnpack.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\nthe sea\n")
    args = ["--no_python", "attnpack", "batch", "-m", "tiny-sd15", "--prompts", str(prompts), "--steps", "2"]
    env = _env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    two = subprocess.run(
        _launch_two_processes([*args, "--outdir", str(tmp_path / "out")], _free_port()),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    assert "on 2 processes" in two.stderr
    assert [r["file"] for r in _records(tmp_path / "out")] == ["00000_0.png", "00001_0.png", "00002_0.png"]
