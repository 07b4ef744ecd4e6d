"""Batch generation: prompt files with per-row overrides, seed ranges, config files and a resumable runner.

The runner behind ``attnpack batch`` (see ``docs/batch.md``):

- prompts come from ``.txt`` (one prompt per line), ``.jsonl`` (one JSON object per line) or ``.csv`` (a header row
  with a ``prompt`` column); rows may override ``seed``/``seeds``, ``steps``, ``guidance``, ``size``, ``height``,
  ``width``, ``frames``, ``negative_prompt``, ``pipeline_kwargs``, the techniques and their options (named as in the
  Python API: ``gna.window_size`` or just ``window_size``);
- each (row, seed) gives one file ``{row:05d}_{seed}.png`` (videos: ``.gif`` / ``.mp4``), written atomically with its
  parameters embedded; ``metadata.jsonl`` holds one record per file on disk, in row order;
- a bad row is reported with its line number and skipped; the batch goes on and reports it at the end;
- under ``accelerate launch`` the jobs are split across processes (accelerate's ``PartialState``), each with its
  progress bar, and the main process merges the metadata at the end.

Resumability: an output file is complete or absent (temporary file + rename). Each process appends the record of a
finished file to its own journal (``.metadata.<rank>.jsonl.part``); the main process folds the journals into
``metadata.jsonl`` (rewritten atomically, one record per file name) at the start and the end of every run, and
recovers the record of a finished file whose journal line was lost from the parameters embedded in the file. So a
killed run leaves no partial image and no duplicate record, and ``skip_existing`` re-runs only what is missing, made
with other settings, or damaged (an existing output must decode completely to be kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_path, check_complete, read_parameters, save_image, save_video
from ._batch_input import (
    PROMPT_SUFFIXES,
    ROW_KEYS,
    BatchConfig,
    BatchRow,
    RowError,
    load_config_file,
    parse_seeds,
    read_rows,
    resolve_config,
)
from .generation import GenerationSettings, run_generation


logger = logging.getLogger(__name__)

__all__ = [
    "BatchConfig",
    "BatchRow",
    "BatchJob",
    "BatchSummary",
    "RowError",
    "parse_seeds",
    "load_config_file",
    "resolve_config",
    "read_rows",
    "plan_jobs",
    "merge_metadata",
    "outdir_lock",
    "run_batch",
    "METADATA_FILE",
    "LOCK_FILE",
    "PROMPT_SUFFIXES",
    "ROW_KEYS",
]

METADATA_FILE = "metadata.jsonl"
LOCK_FILE = ".attnpack-batch.lock"  # held by the batch writing to its folder (outdir_lock)
_OUTPUT_NAME = re.compile(r"^(\d{5,})_(\d+)\.[a-z0-9]+$")
_TEMP_NAME = re.compile(r"^\.(.+)\.[A-Za-z0-9_]+\.tmp$")  # attnpack.io.atomic_path's temporary files
_JOURNAL_GLOB = ".metadata.*.jsonl.part"


# ------------------------------------------------------------------------------------------------- jobs, metadata
@dataclasses.dataclass(frozen=True)
class BatchJob:
    """One output file: a row, one of its seeds, and the file name ``{row:05d}_{seed}.<suffix>``."""

    row: BatchRow
    seed: int
    name: str

    @property
    def settings(self) -> GenerationSettings:
        return dataclasses.replace(self.row.settings, seed=self.seed)


def plan_jobs(rows: Sequence[BatchRow], suffix: str) -> list[BatchJob]:
    """Every (row, seed) of ``rows`` as a job, in row order; ``suffix`` is ``.png``, ``.gif`` or ``.mp4``."""
    return [BatchJob(row, seed, f"{row.index:05d}_{seed}{suffix}") for row in rows for seed in row.seeds]


def _name_key(name: str) -> tuple:
    m = _OUTPUT_NAME.match(name)
    return (0, int(m.group(1)), int(m.group(2)), name) if m else (1, 0, 0, name)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a line cut short by a killed process is skipped."""
    records = []
    if path.is_file():
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                logger.warning("%s:%d: unreadable metadata line skipped", path.name, number)
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records.append(record)
    return records


def _append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a single write, flushed to disk (the journal of one process)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _recover_record(path: Path) -> dict[str, Any] | None:
    """The metadata record of a finished output, from the parameters embedded in it (``None`` if unreadable)."""
    try:
        params = read_parameters(path)
    except Exception:  # not one of our complete files: leave it out of the metadata
        return None
    return {"file": path.name, **params, "seconds": None}


def merge_metadata(outdir: str | os.PathLike, expected: Sequence[str] = (), drop: Sequence[str] = ()) -> int:
    """Rewrite ``outdir/metadata.jsonl`` atomically from itself and the process journals, then remove the journals.

    One record per file name (the latest wins), only for files that exist; files in ``expected`` that exist but
    have no record get one from their embedded parameters; records named in ``drop`` (outputs about to be
    regenerated) are removed. Records are ordered by row, then seed. Returns the number of records.
    """
    outdir = Path(outdir)
    journals = sorted(outdir.glob(_JOURNAL_GLOB))
    records: dict[str, dict[str, Any]] = {}
    for path in (outdir / METADATA_FILE, *journals):
        for record in _read_records(path):
            records[record["file"]] = record
    dropped = set(drop)
    records = {n: r for n, r in records.items() if n not in dropped and (outdir / n).is_file()}
    for name in expected:
        if name not in records and name not in dropped and (outdir / name).is_file():
            record = _recover_record(outdir / name)
            if record is not None:
                records[name] = record
    with atomic_path(outdir / METADATA_FILE) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for name in sorted(records, key=_name_key):
                fh.write(json.dumps(records[name], sort_keys=True, default=str) + "\n")
    for path in journals:
        path.unlink(missing_ok=True)
    return len(records)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _identity(job: BatchJob, model: str) -> dict[str, Any]:
    """What an existing file must have been made with to count as this job's output (explicit settings only)."""
    from ..techniques import technique_parameters

    s = job.settings
    ident = {
        "model": model,
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "seed": s.seed,
        "techniques": technique_parameters(job.row.techniques, None)["techniques"],
        "pipeline_kwargs": s.pipeline_kwargs,
    }
    for key in ("steps", "guidance", "height", "width", "num_frames"):
        if getattr(s, key) is not None:
            ident[key] = getattr(s, key)
    return _jsonable(ident)


def _plan_work(outdir: Path, jobs: Sequence[BatchJob], model: str, skip_existing: bool):
    """Main process, before any output is written: clean up after a killed run, decide what to (re)generate.

    With ``skip_existing`` an existing output is kept only if it was made with this job's settings and decodes
    completely (:func:`~attnpack.io.check_complete`): a file cut short keeps its parameters, which come first.

    Returns ``(names to generate, number skipped, number of damaged outputs found, notes)``.
    """
    names = {job.name for job in jobs} | {METADATA_FILE}
    for path in outdir.iterdir():
        m = _TEMP_NAME.match(path.name)
        if m and m.group(1) in names and path.is_file():
            path.unlink()  # a temporary file of a killed run: never a finished output
    todo: list[str] = []
    notes: list[str] = []
    damaged = 0
    for job in jobs:
        path = outdir / job.name
        if skip_existing and path.is_file():
            try:
                params = read_parameters(path)
            except Exception:
                params = None
            if params is None:
                notes.append(f"{job.name} is damaged (its parameters are unreadable); generating it again")
                damaged += 1
            elif changed := [k for k, v in _identity(job, model).items() if _jsonable(params.get(k)) != v]:
                notes.append(f"{job.name} was made with other settings ({', '.join(changed)}); generating it again")
            else:
                try:
                    check_complete(path)
                    continue
                except ValueError as exc:
                    notes.append(f"{exc}; generating it again")
                    damaged += 1
        todo.append(job.name)
    merge_metadata(outdir, expected=[j.name for j in jobs], drop=todo)
    return todo, len(jobs) - len(todo), damaged, notes


# ------------------------------------------------------------------------------------------------ one batch per folder
@contextlib.contextmanager
def outdir_lock(outdir: str | os.PathLike) -> Iterator[Path | None]:
    """Hold the exclusive lock of a batch output folder for the block: ``outdir/.attnpack-batch.lock``, locked with
    ``fcntl.flock`` and holding ``<pid> <host>``. The kernel releases the lock when its process dies however it dies,
    so a killed batch never blocks the next one; the file is removed when the block ends.

    Raises ``ValueError`` naming the process that holds it (the command line's exit status 2). Two batches writing
    to one folder would delete each other's files in flight. Without ``fcntl`` (not POSIX) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        logger.warning("cannot lock %s on this system: run one batch per output folder at a time", outdir)
        yield None
        return
    path = Path(outdir) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "a process that is starting"
            raise ValueError(
                f"`outdir` {str(outdir)!r} is in use by another attnpack batch ({who}); wait for it to finish, or "
                "give another --outdir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us removes the file as it lets go: the lock must be on the file that is at `path` now
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still locked here, so no other batch holds this file
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- runner
@dataclasses.dataclass
class BatchSummary:
    """What a run did, over all processes. ``ok`` is false when any row or output failed."""

    outputs: int  # outputs the prompt file asks for (good rows x seeds)
    generated: int
    skipped: int
    failures: list[str]
    bad_rows: int
    seconds: float  # wall time of the run
    image_seconds: float  # generation + saving, summed over outputs and processes
    processes: int = 1
    damaged: int = 0  # existing outputs found cut short or unreadable by --skip-existing, and made again

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        per = f", {self.image_seconds / self.generated:.2f} s per image" if self.generated else ""
        procs = f" on {self.processes} processes" if self.processes > 1 else ""
        bad = f"{self.bad_rows} bad row{'' if self.bad_rows == 1 else 's'}"
        damaged = f", {self.damaged} damaged (made again)" if self.damaged else ""
        return (
            f"{self.generated} written, {self.skipped} skipped (already done){damaged}, {len(self.failures)} failed "
            f"({bad}) of {self.outputs + self.bad_rows} outputs{per}; {self.seconds:.1f} s in all{procs}"
        )


def _process_device(device: str | None, state) -> str | None:
    """The device of this process: accelerate's (``cuda:<local rank>``) when several processes share the machine."""
    if state.num_processes == 1:
        return device
    if device in (None, "auto", "cuda"):
        return str(state.device)
    if device != "cpu":
        raise ValueError(
            f"`device`={device!r} would put all {state.num_processes} processes on one device; leave --device unset "
            "(each process then uses its own GPU) or give --device cpu."
        )
    return device


def _agree(error: BaseException | None) -> None:
    """Raise on every process if any process failed (so none waits forever at the next collective step)."""
    from accelerate.utils import gather_object

    messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
    if error is not None:
        raise error
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise RuntimeError(f"another batch process failed: {first}")


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def run_batch(config: BatchConfig, *, pipe=None) -> BatchSummary:
    """Run a batch (see the module docstring); returns the summary of all processes (also printed).

    ``pipe``: an already loaded pipeline to use instead of loading ``config.model`` (single process only).
    Under ``accelerate launch`` every process calls this; jobs are split between them.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    from .loading import is_video_pipeline

    start = time.perf_counter()
    config.validate()
    rows, bad = read_rows(config.prompts, config)
    if config.context_parallel:
        from .parallel import check_ring_techniques

        check_ring_techniques([t for row in rows for t in row.techniques], config.ring_degree, "ring_degree")
    cpu = (config.device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if pipe is not None and state.num_processes > 1:
        raise ValueError("`pipe` can only be given to a single-process run; let each process load `model`.")
    if config.context_parallel and state.num_processes < 2:
        raise ValueError(
            "`ulysses_degree` / `ring_degree` split each output over several processes: launch with "
            "`torchrun --nproc-per-node N -m attnpack batch ...` (this is one process)."
        )
    outdir = Path(config.outdir).expanduser()
    outdir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        for error in bad:
            _say(f"attnpack batch: bad row skipped: {error}")

    with contextlib.ExitStack() as held:
        error: BaseException | None = None
        plan: list[BatchJob] = []
        try:
            if state.is_main_process:  # one batch per folder: the main process holds the folder's lock to the end
                held.enter_context(outdir_lock(outdir))
            # the output suffix depends on the model being an image or a video model; the pipeline class tells, so
            # a big local or Hub model is loaded only by processes that have outputs to make
            if rows:
                video = is_video_pipeline(pipe) if pipe is not None else _is_video_model(config)
                if video is None:
                    pipe = _load(config, state)
                    video = is_video_pipeline(pipe)
                plan = plan_jobs(rows, _suffix(config, video))
        except Exception as exc:  # every process must learn of it, or the others wait forever at the next step
            error = exc
        _agree(error)

        # the main process cleans up after a killed run and decides what to do, before anything is written
        shared: list[Any] = [None]
        if state.is_main_process:
            try:
                model = config.model if pipe is None else getattr(pipe, "_attnpack_model", None) or pipe.name_or_path
                todo, skipped, damaged, notes = _plan_work(outdir, plan, model, config.skip_existing)
                for note in notes:
                    _say(f"attnpack batch: {note}")
                shared = [(todo, skipped, damaged, None)]
            except Exception as exc:
                shared = [([], 0, 0, f"{type(exc).__name__}: {exc}")]
                error = exc
        todo, skipped, damaged, message = broadcast_object_list(shared)[0]
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"the main batch process failed: {message}")

        wanted = set(todo)
        jobs = [job for job in plan if job.name in wanted]
        # context parallelism: every process takes part in every output, the main process writes it
        share = contextlib.nullcontext(jobs) if config.context_parallel else state.split_between_processes(jobs)
        with share as mine:
            try:
                if mine and pipe is None:
                    pipe = _load(config, state)
                if config.context_parallel and mine:
                    _enable_context_parallel(pipe, config, state)
            except Exception as exc:
                error = exc
            _agree(error)
            write = state.is_main_process or not config.context_parallel
            done = _run_jobs(pipe, mine, config, outdir, state.process_index, state.num_processes, write)
        results = gather_object([done])
        if config.context_parallel:
            results = results[:1]  # the others made the same outputs with it
        if state.is_main_process:
            merge_metadata(outdir, expected=[job.name for job in plan])
        summary = BatchSummary(
            outputs=len(plan),
            generated=sum(r[0] for r in results),
            skipped=skipped,
            failures=[str(e) for e in bad] + [m for r in results for m in r[2]],
            bad_rows=len(bad),
            seconds=time.perf_counter() - start,
            image_seconds=sum(r[1] for r in results),
            processes=state.num_processes,
            damaged=damaged,
        )
        if state.is_main_process:
            _say(f"attnpack batch: {summary} -> {outdir}")
            if summary.failures:
                _say("attnpack batch: failures:\n  " + "\n  ".join(summary.failures))
        state.wait_for_everyone()
        return summary


def _enable_context_parallel(pipe, config: BatchConfig, state) -> None:
    from .parallel import enable_context_parallel

    enable_context_parallel(pipe, config.ulysses_degree, config.ring_degree or 1)


def _load(config: BatchConfig, state):
    from .loading import load_pipeline

    return load_pipeline(
        config.model,
        dtype=config.dtype,
        device=_process_device(config.device, state),
        offload=config.offload,
        variant=config.variant,
        revision=config.revision,
    )


def _is_video_model(config: BatchConfig) -> bool | None:
    """Whether ``config.model`` is a video pipeline, from its ``model_index.json`` (local folder or Hub id) without
    loading weights; ``None`` when that cannot tell (built-in models are small: they are simply loaded)."""
    import inspect

    import diffusers

    path = Path(config.model).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        elif "/" in config.model and not path.exists():
            index = diffusers.DiffusionPipeline.load_config(config.model, revision=config.revision)
        else:
            return None
        cls = getattr(diffusers, index["_class_name"])
    except Exception as exc:  # the load that follows reports real problems
        logger.debug("could not read the pipeline class of %r without loading it: %s", config.model, exc)
        return None
    return "num_frames" in inspect.signature(cls.__call__).parameters


def _suffix(config: BatchConfig, video: bool) -> str:
    fmt = config.format or ("gif" if video else "png")
    if (fmt == "png") == video:
        kind, fix = ("a video", "gif or mp4") if video else ("an image", "png")
        raise ValueError(f"`format`={fmt!r} does not suit {kind} model; use {fix}.")
    return "." + fmt


def _run_jobs(
    pipe, jobs: Sequence[BatchJob], config: BatchConfig, outdir: Path, rank: int, processes: int, write: bool = True
):
    """This process's share of the work, with a progress bar. Returns ``(generated, seconds, failure messages)``.
    ``write=False``: a context-parallel helper process, which generates with the others and writes nothing."""
    from tqdm.auto import tqdm

    journal = outdir / f".metadata.{rank}.jsonl.part"
    failures: list[str] = []
    generated, seconds = 0, 0.0
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)  # one bar per process, counting outputs
    bar = tqdm(jobs, desc=f"batch {rank}" if processes > 1 else "batch", position=rank, unit="img")
    from ..techniques import apply_techniques

    techniques = None
    current: str | None = None
    install_error: str | None = None
    try:
        for job in bar:
            key = json.dumps(job.row.techniques, sort_keys=True, default=str)
            if key != current:  # rows with the same techniques share one installation
                if techniques is not None:
                    techniques.remove()
                techniques, current, install_error = None, key, None
                try:
                    techniques = apply_techniques(pipe, job.row.techniques, config.attention_backend)
                except (ValueError, TypeError) as exc:
                    install_error = str(exc)
            try:
                if install_error is not None:
                    raise ValueError(install_error)
                parameters = techniques.parameters()
                if config.context_parallel:
                    parameters = {
                        **parameters,
                        "context_parallel": {"ulysses": config.ulysses_degree, "ring": config.ring_degree or 1},
                    }
                seconds += _generate(pipe, job, config, outdir, journal, rank, parameters, write)
                generated += 1
            except Exception as exc:  # one failed output never stops the batch
                message = f"{job.row.where} ({job.name}): {type(exc).__name__}: {exc}"
                failures.append(message)
                _say(f"attnpack batch: failed: {message}")
                if not isinstance(exc, (ValueError, TypeError)):
                    logger.warning("traceback of %s", job.name, exc_info=True)
    finally:
        bar.close()
        if techniques is not None:
            techniques.remove()
    return generated, seconds, failures


def _generate(
    pipe, job: BatchJob, config: BatchConfig, outdir: Path, journal: Path, rank: int, techniques, write: bool = True
) -> float:
    """Generate and save one output, then journal its record; returns the seconds it took. ``techniques``: the
    installed techniques' :meth:`~attnpack.techniques.TechniquesHandle.parameters`."""
    start = time.perf_counter()
    result = run_generation(pipe, job.settings, extra_parameters={**_extra_parameters(config, job), **techniques})
    if not write:
        return time.perf_counter() - start
    # same settings, same file, whichever process makes it: timing and the device index go to metadata.jsonl only
    parameters = dict(result.parameters)
    pipeline_seconds = parameters.pop("seconds")
    device = parameters.get("device")
    if device is not None:
        parameters["device"] = device.split(":")[0]
    if result.is_video:
        save_video(result.images[0], outdir / job.name, parameters, fps=config.fps)
    else:
        save_image(result.images[0], outdir / job.name, parameters)
    total = time.perf_counter() - start
    record = {**parameters, "device": device, "seconds": round(pipeline_seconds, 3), "process": rank}
    _append_record(journal, {**record, "total_seconds": round(total, 3)})
    return total


def _extra_parameters(config: BatchConfig, job: BatchJob) -> dict[str, Any]:
    """Parameters embedded in each output besides what :func:`run_generation` records."""
    return {
        "file": job.name,
        "row": job.row.index,
        "line": job.row.line,
        "source": Path(config.prompts).name,
        "revision": config.revision,
        "variant": config.variant,
        **({"fps": config.fps} if job.name.endswith((".gif", ".mp4")) else {}),
    }
