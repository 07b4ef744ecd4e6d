"""HeadHunter: greedy, cumulative search for the attention heads whose perturbation guidance best serves an objective.

Algorithm 1 of https://arxiv.org/abs/2506.10978::

    S = {}
    for round in 1..R:
        for every candidate head c not in S:
            generate the M prompt-seed pairs with head guidance on S + {c}
            score(c) = mean objective over the M images
        add the top-k candidates to S

Each round also scores the baseline (guidance on ``S`` alone). Under ``accelerate launch`` (or ``torchrun``) every
process scores its own slice of the candidates and the scores are gathered. The state (settings, finished rounds,
scores of the round in progress) is a JSON file written atomically after every candidate, so an interrupted search
resumes where it stopped with the same result. The output folder receives ``heads.txt`` / ``heads.json`` (the heads
so far), ``report.md`` (per round: baseline, best scores, selection) and ``round_NN.png`` contact sheets (one row per
selected head, the baseline first, one column per prompt-seed pair).
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..attn_processors.head_perturbation import HeadSpec, perturbable_layers, resolve_heads
from ..attn_processors.processor import resolve_denoisers
from ..io import atomic_path, save_image
from .guidance import apply_head_perturbation
from .loading import pipeline_defaults
from .objectives import Objective, get_objective


logger = logging.getLogger(__name__)

__all__ = ["search_heads", "SearchResult", "RoundReport", "contact_sheet"]

STATE_VERSION = 1


@dataclasses.dataclass
class RoundReport:
    """One round: the baseline score (guidance on the heads selected before it), every candidate's score, and the
    heads it added."""

    round: int
    baseline: float
    scores: dict[str, float]
    selected: list[str]

    def ranking(self) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda kv: -_finite(kv[1]))


@dataclasses.dataclass
class SearchResult:
    heads: list[str]
    rounds: list[RoundReport]
    state_path: Path | None
    output_dir: Path | None


def _finite(x: float) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


# ------------------------------------------------------------------------------------------------- distribution
class _Processes:
    """The accelerate process group (one process when not launched distributed)."""

    def __init__(self):
        import torch
        from accelerate import PartialState

        # cpu=True where no GPU exists: without it accelerate ignores torchrun's RANK / WORLD_SIZE on a CPU-only
        # machine, and every process ran the whole search alone (and wrote the same outputs at the same time)
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.index = self.state.process_index
        self.count = self.state.num_processes

    @property
    def main(self) -> bool:
        return self.index == 0

    def gather(self, obj: dict) -> list[dict]:
        if self.count == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()


# ------------------------------------------------------------------------------------------------- state
def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def _rank_files(state_path: Path) -> list[str]:
    return sorted(glob.glob(glob.escape(str(state_path)) + ".rank*.json"))


class _State:
    """The JSON state: settings, finished rounds, and the scores of the round in progress."""

    def __init__(self, path: Path | None, settings: dict, processes: _Processes):
        self.path = path
        self.settings = settings
        self.processes = processes
        self.rounds: list[RoundReport] = []
        self.partial: dict[str, Any] = {}
        if path is None:
            return
        if path.exists():
            data = self._read(path)
            self.rounds = [RoundReport(**r) for r in data.get("rounds", [])]
            self.partial = data.get("partial") or {}
        for name in _rank_files(path):  # slices scored by the processes of a distributed run
            part = self._read(Path(name))
            if part.get("round") == len(self.rounds):
                self._merge_partial(part)

    def _read(self, path: Path) -> dict:
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION:
            raise ValueError(
                f"state file {str(path)!r} has version {data.get('version')!r}, expected {STATE_VERSION}."
            )
        old = data.get("settings", {})
        changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if changed:
            raise ValueError(
                f"state file {str(path)!r} was written by a search with other settings ({', '.join(changed)} "
                "differ); use the same settings to resume, or another `state_path`."
            )
        return data

    def _merge_partial(self, part: dict) -> None:
        if self.partial.get("round") != part["round"]:
            self.partial = {"round": part.get("round"), "baseline": None, "scores": {}}
        self.partial.setdefault("scores", {}).update(part.get("scores", {}))
        if part.get("baseline") is not None:
            self.partial["baseline"] = part["baseline"]

    @property
    def selected(self) -> list[str]:
        return [h for r in self.rounds for h in r.selected]

    def round_scores(self, round_index: int) -> tuple[float | None, dict[str, float]]:
        if self.partial.get("round") != round_index:
            self.partial = {"round": round_index, "baseline": None, "scores": {}}
        return self.partial.get("baseline"), self.partial["scores"]

    def save_partial(self) -> None:
        if self.path is None:
            return
        if self.processes.count == 1:
            self.save()
        else:
            part = {"version": STATE_VERSION, "settings": self.settings, **self.partial}
            _write_json(Path(f"{self.path}.rank{self.processes.index}.json"), part)

    def finish_round(self, report: RoundReport) -> None:
        self.rounds.append(report)
        self.partial = {}

    def save(self) -> None:
        if self.path is None or not self.processes.main:
            return
        data = {
            "version": STATE_VERSION,
            "settings": self.settings,
            "selected": self.selected,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "partial": self.partial or None,
        }
        _write_json(self.path, data)

    def clear_rank_files(self) -> None:
        if self.path is not None and self.processes.main:
            for name in _rank_files(self.path):
                os.unlink(name)


# ------------------------------------------------------------------------------------------------- generation
def _pairs(prompts: Sequence[str] | str, seeds: Sequence[int] | int) -> list[tuple[str, int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"`prompts` must be one or more non-empty strings, got {prompts!r}.")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"`seeds` must be one or more non-negative integers, got {seeds!r}.")
    if len(prompts) == 1:
        prompts = prompts * len(seeds)
    elif len(seeds) == 1:
        seeds = seeds * len(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(
            f"`prompts` ({len(prompts)}) and `seeds` ({len(seeds)}) are paired one to one: give as many of each, or "
            "one prompt (used with every seed), or one seed (used with every prompt)."
        )
    return list(zip(prompts, seeds))


class _Generator:
    """Generates the prompt-seed images with head guidance on a given set of heads."""

    def __init__(self, pipe, pairs, num_inference_steps: int, guidance: dict[str, Any], pipeline_kwargs: dict):
        self.pipe = pipe
        self.pairs = pairs
        self.guidance = guidance
        params = inspect.signature(pipe.__call__).parameters
        kwargs = {k: v for k, v in pipeline_defaults(pipe).items() if k in params}
        kwargs.update(pipeline_kwargs)
        kwargs["num_inference_steps"] = num_inference_steps
        self.kwargs = kwargs
        self.calls = 0

    def images(self, heads: list[str]) -> list:
        handle = apply_head_perturbation(self.pipe, heads, **self.guidance) if heads else None
        try:
            out = []
            for prompt, seed in self.pairs:
                generator = torch.Generator("cpu").manual_seed(seed)
                result = self.pipe(prompt=prompt, generator=generator, output_type="pil", **self.kwargs)
                self.calls += 1
                if hasattr(result, "images"):
                    out.append(result.images[0])
                else:  # video pipelines: the middle frame
                    frames = result.frames[0]
                    out.append(frames[len(frames) // 2])
            return out
        finally:
            if handle is not None:
                handle.remove()


def _score(objective: Objective, images: list, prompts: list[str]) -> float:
    scores = [float(s) for s in objective(images, prompts)]
    if len(scores) != len(images):
        raise ValueError(f"the objective returned {len(scores)} scores for {len(images)} images.")
    return float(sum(scores) / len(scores))


# ------------------------------------------------------------------------------------------------- outputs
def contact_sheet(rows: list[tuple[str, list]], thumb: int = 128):
    """A PIL image: one labelled row per ``(label, images)``, images resized to ``thumb`` pixels high."""
    from PIL import Image, ImageDraw

    label_w = 150
    n_cols = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_w + n_cols * (thumb + 4), len(rows) * (thumb + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = r * (thumb + 4)
        for line, text in enumerate(label.split("\n")):
            draw.text((4, y + 4 + 12 * line), text, fill="black")
        for c, im in enumerate(images):
            im = im.convert("RGB")
            w = max(1, round(im.width * thumb / im.height))
            sheet.paste(im.resize((min(w, thumb), thumb)), (label_w + c * (thumb + 4), y))
    return sheet


def _write_outputs(output_dir: Path, state: _State, settings: dict) -> None:
    heads = state.selected
    with atomic_path(output_dir / "heads.txt") as tmp:
        tmp.write_text("".join(f"{h}\n" for h in heads))
    _write_json(output_dir / "heads.json", {"heads": heads, "settings": settings})
    lines = [
        "# HeadHunter search report",
        "",
        f"Objective `{settings['objective']}`, {len(settings['pairs'])} prompt-seed pairs, scale {settings['scale']}, "
        f"softness {settings['softness']}, kind {settings['kind']}, token scope {settings['token_scope']}, "
        f"{settings['num_inference_steps']} steps, top-k {settings['top_k']}.",
        "",
        "| round | baseline | selected (score) | next best |",
        "|---|---|---|---|",
    ]
    for r in state.rounds:
        ranking = r.ranking()
        chosen = ", ".join(f"{h} ({r.scores[h]:.4g})" for h in r.selected)
        rest = ", ".join([f"{h} ({s:.4g})" for h, s in ranking if h not in r.selected][:5])
        lines.append(f"| {r.round + 1} | {r.baseline:.4g} | {chosen} | {rest} |")
    lines += ["", f"Final heads: {', '.join(heads) or '(none)'}", ""]
    with atomic_path(output_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------- search
def _candidate_list(pipe, candidates: HeadSpec | None) -> list[str]:
    models, _ = resolve_denoisers(pipe)
    layers = perturbable_layers(models[0])
    index = {info.name: i for i, info in enumerate(layers)}
    if candidates is None:
        return [f"L{i}H{h}" for i, info in enumerate(layers) for h in range(info.heads)]
    resolved = resolve_heads(models[0], candidates)
    return [f"L{index[name]}H{h}" for name, heads in resolved.items() for h in heads]


def search_heads(
    pipe,
    prompts: Sequence[str] | str,
    seeds: Sequence[int] | int,
    objective: str | Objective,
    rounds: int = 5,
    top_k: int = 3,
    candidates: HeadSpec | None = None,
    scale: float = 3.0,
    softness: float = 1.0,
    num_inference_steps: int = 20,
    *,
    kind: str = "identity",
    token_scope: str = "full",
    pipeline_kwargs: dict[str, Any] | None = None,
    state_path: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> SearchResult:
    """Greedy cumulative HeadHunter search (Algorithm 1 of https://arxiv.org/abs/2506.10978).

    Args:
        pipe: a diffusers pipeline supported by :func:`attnpack.apply_head_perturbation`.
        prompts, seeds: the prompt-seed pairs, paired one to one (one prompt or one seed is broadcast).
        objective: ``objective(images, prompts) -> scores`` (higher is better) or a name understood by
            :func:`attnpack.pipelines.objectives.get_objective` (``"pickscore"``, ``"clip:<path>"``,
            ``"-brightness"``, ...).
        rounds, top_k: ``R`` rounds, each adding its ``k`` best heads.
        candidates: heads to consider (a head spec, e.g. ``"L0,L1,L2"``); default every head of every layer.
        scale, softness: perturbation guidance scale and SoftPAG ``u`` during the search (the paper searches with
            ``u = 1`` and tunes ``u`` afterwards).
        num_inference_steps: denoising steps per image.
        kind, token_scope: the perturbation (see :func:`attnpack.apply_head_perturbation`).
        pipeline_kwargs: further pipeline arguments, e.g. ``{"guidance_scale": 0.0, "height": 1024}``.
        state_path: JSON state file; an existing one is resumed (its settings must match).
        output_dir: folder for ``heads.txt``, ``heads.json``, ``report.md`` and ``round_NN.png`` (main process).
        progress: show a progress bar per round.

    Returns:
        a :class:`SearchResult` with the selected heads (in selection order) and every round's scores.
    """
    from tqdm.auto import tqdm

    for name, value, low in (
        ("rounds", rounds, 1),
        ("top_k", top_k, 1),
        ("num_inference_steps", num_inference_steps, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    pairs = _pairs(prompts, seeds)
    objective_fn = get_objective(objective)
    candidate_heads = _candidate_list(pipe, candidates)
    guidance = dict(scale=scale, softness=softness, kind=kind, token_scope=token_scope)
    # validate the guidance settings once, before any generation
    apply_head_perturbation(pipe, candidate_heads[:1], **guidance).remove()
    pipeline_kwargs = dict(pipeline_kwargs or {})
    settings = {
        "pairs": [list(p) for p in pairs],
        "objective": objective if isinstance(objective, str) else getattr(objective, "__name__", repr(objective)),
        "rounds": rounds,
        "top_k": top_k,
        "candidates": candidate_heads,
        "scale": float(scale),
        "softness": float(softness),
        "kind": kind,
        "token_scope": token_scope,
        "num_inference_steps": num_inference_steps,
        "pipeline_kwargs": json.loads(json.dumps(pipeline_kwargs, default=str)),
    }
    processes = _Processes()
    state = _State(Path(state_path) if state_path is not None else None, settings, processes)
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None and processes.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # every process has read the state (and the slices of a killed distributed run) before any writes a new slice:
    # otherwise a late process read an early one's fresh scores, split the candidates differently and left some
    # unscored (a KeyError on every process, seen on 3 CPU processes)
    processes.barrier()
    generator = _Generator(pipe, pairs, num_inference_steps, guidance, pipeline_kwargs)
    prompt_list = [p for p, _ in pairs]
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**progress_config, "disable": True})
    try:
        for r in range(len(state.rounds), rounds):
            selected = state.selected
            pool = [c for c in candidate_heads if c not in selected]
            if not pool:
                break
            baseline, scores = state.round_scores(r)
            if baseline is None and processes.main:
                state.partial["baseline"] = _score(objective_fn, generator.images(selected), prompt_list)
                state.save_partial()
            todo = [c for c in pool if c not in scores]
            mine = todo[processes.index :: processes.count]
            desc = f"head search round {r + 1}/{rounds}" + (f" [{processes.index}]" if processes.count > 1 else "")
            for cand in tqdm(mine, desc=desc, disable=not progress, position=processes.index):
                scores[cand] = _score(objective_fn, generator.images([*selected, cand]), prompt_list)
                state.save_partial()
            merged: dict[str, Any] = {"scores": {}, "baseline": None}
            for part in processes.gather({"scores": dict(scores), "baseline": state.partial.get("baseline")}):
                merged["scores"].update(part["scores"])
                if part["baseline"] is not None:
                    merged["baseline"] = part["baseline"]
            order = {c: i for i, c in enumerate(pool)}
            ranking = sorted(pool, key=lambda c: (-_finite(merged["scores"][c]), order[c]))
            report = RoundReport(r, merged["baseline"], {c: merged["scores"][c] for c in pool}, ranking[:top_k])
            state.finish_round(report)
            state.save()
            if out_dir is not None and processes.main:
                rows = [(f"baseline\n{report.baseline:.4g}", generator.images(selected))]
                for head in report.selected:
                    rows.append((f"+{head}\n{report.scores[head]:.4g}", generator.images([*selected, head])))
                save_image(contact_sheet(rows), out_dir / f"round_{r:02d}.png", {"round": r + 1, **settings})
                _write_outputs(out_dir, state, settings)
            state.clear_rank_files()  # the main process, before the others may write the next round's files
            processes.barrier()
            logger.info("round %d: selected %s", r + 1, report.selected)
    finally:
        pipe.set_progress_bar_config(**progress_config)
    if out_dir is not None and processes.main:
        _write_outputs(out_dir, state, settings)
    return SearchResult(state.selected, list(state.rounds), state.path, out_dir)
