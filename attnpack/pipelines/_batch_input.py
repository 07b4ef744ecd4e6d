"""Inputs of a batch run: config files, seed ranges and prompt files (.txt / .jsonl / .csv) with per-row overrides.

Used by :mod:`attnpack.pipelines.batch` (which re-exports the public names); no model is touched here, so every
process of a multi-process run parses the same rows cheaply and bad rows are found before any work starts.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._utils import check_number, parse_dtype
from ..io import MAX_FPS
from .generation import GenerationSettings


__all__ = [
    "BatchConfig",
    "BatchRow",
    "RowError",
    "parse_seeds",
    "load_config_file",
    "resolve_config",
    "read_rows",
    "PROMPT_SUFFIXES",
    "ROW_KEYS",
]

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
MAX_SEEDS = 1_000_000  # per seed specification; guards against "0-999999999999"
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts up to this

# per-row settings (everything else in a row is a technique option)
ROW_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "seeds",
    "steps",
    "guidance",
    "size",
    "height",
    "width",
    "frames",
    "pipeline_kwargs",
    "technique",
    "techniques",
)


# --------------------------------------------------------------------------------------------- value conversion
def _as_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"`{name}` must be an integer, got {value!r}.")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"`{name}` must be a number, got {value!r}.")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string, got {value!r}.")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"`{name}` must be true or false, got {value!r}.")


def _as_object(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"`{name}` is not valid JSON ({exc.msg}), got {value!r}.") from None
    if not isinstance(value, dict):
        raise ValueError(f'`{name}` must be a JSON object such as {{"max_sequence_length": 256}}, got {value!r}.')
    return dict(value)


def _as_size(value: Any) -> tuple[int, int]:
    """``"768x512"`` (width x height), ``512`` (square) or ``[768, 512]`` -> ``(width, height)``."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return _as_int("size", value[0]), _as_int("size", value[1])
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
        w, h = re.split(r"[xX]", value)
        return int(w), int(h)
    try:
        side = _as_int("size", value)
    except ValueError:
        raise ValueError(f"`size` must look like 768x512 (width x height) or 512, got {value!r}.") from None
    return side, side


def parse_seeds(value: Any, name: str = "seeds") -> tuple[int, ...]:
    """Seeds from ``"0-7"``, ``"0,3,10-12"``, ``5`` or ``[1, 2]``, in order, duplicates removed."""
    bad = ValueError(f"`{name}` must look like 7, 0-7 or 0,3,5-9 (non-negative integers), got {value!r}.")
    ranges: list[tuple[int, int]] = []
    if isinstance(value, str):
        for part in value.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if m is None:
                raise bad
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"`{name}` range {part.strip()!r} runs backwards; write {hi}-{lo}.")
            ranges.append((lo, hi))
    elif isinstance(value, (list, tuple)) and value:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad
            ranges.append((v, v))
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        ranges.append((value, value))
    else:
        raise bad
    if sum(hi - lo + 1 for lo, hi in ranges) > MAX_SEEDS:
        raise ValueError(f"`{name}` {value!r} asks for more than {MAX_SEEDS} seeds.")
    if any(hi > _MAX_SEED for _, hi in ranges):
        raise ValueError(f"`{name}` {value!r}: seeds must be < 2**64.")
    return tuple(dict.fromkeys(s for lo, hi in ranges for s in range(lo, hi + 1)))


# ---------------------------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class BatchConfig:
    """Everything a batch run needs; the command line and config files fill it through :func:`resolve_config`.

    ``techniques`` is ``[(name, options), ...]`` with options already parsed (see :mod:`attnpack.techniques`).
    ``format`` is ``"png"`` for image models and ``"gif"`` (default) or ``"mp4"`` for video models.
    """

    prompts: str
    outdir: str
    model: str
    seeds: tuple[int, ...] = (0,)
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    fps: int = 8
    format: str | None = None
    dtype: str = "auto"
    device: str | None = None
    offload: str | None = None
    variant: str | None = None
    revision: str | None = None
    attention_backend: str | None = None
    techniques: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    pipeline_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip_existing: bool = False
    ulysses_degree: int | None = None  # context parallelism: every output made by all processes together
    ring_degree: int | None = None

    @property
    def context_parallel(self) -> bool:
        return self.ulysses_degree is not None or self.ring_degree is not None

    def validate(self) -> None:
        for name in ("ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, 1, 4096, integer=True)
        if self.format not in (None, "png", "gif", "mp4"):
            raise ValueError(f"`format` must be png, gif or mp4, got {self.format!r}.")
        check_number("fps", self.fps, 1, MAX_FPS, integer=True)
        if Path(self.prompts).suffix.lower() not in PROMPT_SUFFIXES:
            raise ValueError(f"`prompts` must be a {', '.join(PROMPT_SUFFIXES)} file, got {self.prompts!r}.")
        if not Path(self.prompts).is_file():
            raise ValueError(f"`prompts` file {self.prompts!r} does not exist.")
        if Path(self.outdir).exists() and not Path(self.outdir).is_dir():
            raise ValueError(f"`outdir` {self.outdir!r} is a file; give a folder.")
        if self.offload not in (None, "model", "sequential"):
            raise ValueError(f"`offload` must be model or sequential, got {self.offload!r}.")
        parse_dtype(self.dtype)
        if self.attention_backend is not None:
            from ..attn_processors.processor import check_attention_backend

            check_attention_backend(self.attention_backend, "attention_backend")
        self.settings(prompt="check", seed=self.seeds[0]).validate()

    def settings(self, **overrides) -> GenerationSettings:
        """The run-wide generation settings, with ``overrides`` (a row's values) on top."""
        base = dict(
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance=self.guidance,
            height=self.height,
            width=self.width,
            num_frames=self.frames,
            pipeline_kwargs=dict(self.pipeline_kwargs),
        )
        base.update(overrides)
        return GenerationSettings(**base)


# config-file / command-line key -> converter
_CONFIG_KEYS: dict[str, Any] = {
    "prompts": _as_str,
    "outdir": _as_str,
    "model": _as_str,
    "seeds": lambda n, v: parse_seeds(v, n),
    "negative_prompt": _as_str,
    "steps": _as_int,
    "guidance": _as_float,
    "height": _as_int,
    "width": _as_int,
    "frames": _as_int,
    "fps": _as_int,
    "format": _as_str,
    "dtype": _as_str,
    "device": _as_str,
    "offload": _as_str,
    "variant": _as_str,
    "revision": _as_str,
    "attention_backend": _as_str,
    "pipeline_kwargs": _as_object,
    "skip_existing": _as_bool,
    "ulysses_degree": _as_int,
    "ring_degree": _as_int,
}
_TECHNIQUE_KEYS = ("technique", "opt", "techniques")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml`` / ``.yml``) or JSON config file holding the options of ``attnpack batch``.

    Keys are the long option names (``--skip-existing`` -> ``skip_existing`` or ``skip-existing``); relative
    ``prompts`` / ``outdir`` paths are relative to the config file's folder.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"`--config` file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".yaml", ".yml"):
        import yaml  # a dependency of accelerate and huggingface_hub

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"`--config` {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"`--config` {str(path)!r} is not valid JSON: {exc}") from None
    else:
        raise ValueError(f"`--config` must be a .yaml, .yml or .json file, got {str(path)!r}.")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"`--config` {str(path)!r} must hold a mapping of options, e.g. `model: tiny-sd15`.")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _CONFIG_KEYS and name not in _TECHNIQUE_KEYS:
            known = ", ".join(sorted([*_CONFIG_KEYS, *_TECHNIQUE_KEYS]))
            raise ValueError(f"`--config` {str(path)!r}: unknown option {key!r}; known options: {known}.")
        if name in ("prompts", "outdir") and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            value = str(path.parent / value)
        out[name] = value
    return out


def _technique_specs(values: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    from ..techniques import parse_technique_specs

    names = values.get("technique") or []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    elif not isinstance(names, (list, tuple)):
        raise ValueError(f"`technique` must be a name or a list of names, got {names!r}.")
    opts = values.get("opt") or []
    if isinstance(opts, Mapping):
        opts = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in opts.items()]
    elif isinstance(opts, str):
        opts = [opts]
    elif not isinstance(opts, (list, tuple)):
        raise ValueError(f"`opt` must be key=value strings or a mapping, got {opts!r}.")
    techniques = values.get("techniques")
    if techniques is not None and not isinstance(techniques, str):
        techniques = json.dumps(techniques)
    return parse_technique_specs(list(names), list(opts), techniques)


def resolve_config(
    cli: Mapping[str, Any], config_file: str | os.PathLike | None = None, defaults: Mapping[str, Any] | None = None
) -> BatchConfig:
    """Merge command-line values (``None`` = not given) over a config file's, over ``defaults``; the techniques come
    from the command line if it names any (``technique``, ``opt``, ``techniques``), else from the file."""
    from_file = load_config_file(config_file) if config_file else {}
    given = {k: v for k, v in cli.items() if v is not None and v != []}
    values = dict(defaults or {})
    values.update({k: v for k, v in from_file.items() if k not in _TECHNIQUE_KEYS})
    values.update({k: v for k, v in given.items() if k not in _TECHNIQUE_KEYS})
    tech_source = given if any(k in given for k in _TECHNIQUE_KEYS) else from_file
    for key in ("prompts", "outdir", "model"):
        if key not in values:
            raise ValueError(f"`--{key}` is required (on the command line or as `{key}:` in the --config file).")
    kwargs = {k: _CONFIG_KEYS[k](k, v) for k, v in values.items() if k in _CONFIG_KEYS}
    config = BatchConfig(**kwargs, techniques=_technique_specs(tech_source))
    config.validate()
    return config


# ------------------------------------------------------------------------------------------------------ rows
@dataclasses.dataclass(frozen=True)
class BatchRow:
    """One prompt row: ``index`` (0-based, names the outputs), ``where`` (``file:line``) and what to generate."""

    index: int
    where: str
    line: int
    settings: GenerationSettings
    seeds: tuple[int, ...]
    techniques: tuple[tuple[str, dict[str, Any]], ...]


@dataclasses.dataclass(frozen=True)
class RowError:
    """A row that could not be used: where it is and why."""

    index: int
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _not_utf8(value: Any) -> str | None:
    """An error message if a string in ``value`` holds a byte that was not UTF-8 (decoded with surrogateescape)."""
    texts = [value] if isinstance(value, str) else []
    if isinstance(value, dict):
        texts = [t for kv in value.items() for t in kv if isinstance(t, str)]
    for text in texts:
        match = _NOT_UTF8.search(text)
        if match is not None:
            return f"not valid UTF-8 text (byte 0x{ord(match.group()) - 0xDC00:02x}); save the file as UTF-8"
    return None


def _read_entries(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """``[(line, raw row or error message), ...]`` for every non-empty entry of a prompt file."""
    return [(line, _not_utf8(entry) or entry) for line, entry in _read_entries_raw(path)]


def _read_entries_raw(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    suffix = path.suffix.lower()
    entries: list[tuple[int, dict[str, Any] | str]] = []
    # bytes that are not UTF-8 survive as lone surrogates, so a bad line is one bad row, not a failed batch
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="" if suffix == ".csv" else None) as fh:
        if suffix == ".txt":
            for line, text in enumerate(fh, 1):
                text = text.strip()
                if text and not text.startswith("#"):
                    entries.append((line, {"prompt": text}))
        elif suffix == ".jsonl":
            for line, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                try:
                    value = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    entries.append((line, f"malformed JSON: {exc.msg} (column {exc.pos + 1})"))
                    continue
                if isinstance(value, str):
                    value = {"prompt": value}
                if isinstance(value, dict):
                    entries.append((line, value))
                else:
                    entries.append((line, f'must be a JSON object such as {{"prompt": "a cat"}}, got {value!r}'))
        elif suffix == ".csv":
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if "prompt" not in header or "" in header or len(set(header)) != len(header):
                raise ValueError(
                    f"`prompts` CSV {str(path)!r} needs a header row of distinct, non-empty column names including "
                    f"`prompt`, got {header}."
                )
            end = reader.line_num
            while True:
                start = end + 1
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    entries.append((start, f"unreadable CSV ({exc}); the rest of the file was not read"))
                    break
                end = reader.line_num
                cells = [c.strip() for c in record]
                if not any(cells):
                    continue
                if len(cells) != len(header):
                    entries.append((start, f"has {len(cells)} fields but the header has {len(header)}"))
                else:
                    entries.append((start, {k: v for k, v in zip(header, cells) if v != ""}))
        else:
            raise ValueError(f"`prompts` must be a {', '.join(PROMPT_SUFFIXES)} file, got {str(path)!r}.")
    return entries


def _row_techniques(config: BatchConfig, raw: dict[str, Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The row's techniques: the run's, replaced by the row's ``technique`` / ``techniques`` if given, with the row's
    option keys (``name.option`` or a bare option name) on top; validated by the registry."""
    from ..techniques import check_composable, get_technique, parse_options

    base = {name: dict(options) for name, options in config.techniques}
    specs: list[tuple[str, dict[str, Any]]] = [(n, dict(o)) for n, o in config.techniques]
    if "technique" in raw and "techniques" in raw:
        raise ValueError("give either `technique` or `techniques`, not both.")
    if "technique" in raw:
        value = raw.pop("technique")
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"`technique` must be a name, comma-separated names or none, got {value!r}.")
        names = [n for n in names if n and n.lower() != "none"]
        specs = [(n, dict(base.get(n, {}))) for n in names]
    elif "techniques" in raw:
        value = raw.pop("techniques")
        try:
            items = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as exc:
            raise ValueError(f"`techniques` is not valid JSON: {exc}.") from None
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) for i in items
        ):
            raise ValueError(f'`techniques` must be a list of objects with a "name" string, got {value!r}.')
        specs = [(i["name"], {k: v for k, v in i.items() if k != "name"}) for i in items]
    names = [n for n, _ in specs]
    for key in list(raw):
        target, option = key.split(".", 1) if "." in key and key.split(".", 1)[0] in names else (None, key)
        if target is None:
            owners = [n for n in dict.fromkeys(names) if any(o.name == key for o in get_technique(n).options)]
            if len(owners) > 1:
                raise ValueError(f"option {key!r} belongs to {' and '.join(owners)}; write e.g. {owners[0]}.{key}.")
            if not owners:
                options = "; ".join(f"{n}: {', '.join(o.name for o in get_technique(n).options)}" for n in names)
                raise ValueError(
                    f"unknown key {key!r}; row keys are {', '.join(ROW_KEYS)}; technique options: {options or 'none'}."
                )
            target = owners[0]
        value = raw.pop(key)
        for n, options in specs:
            if n == target:
                options[option] = value
    parsed = tuple((n, parse_options(n, options)) for n, options in specs)
    check_composable(parsed)
    return parsed


def _build_row(index: int, where: str, line: int, raw: dict[str, Any], config: BatchConfig) -> BatchRow:
    raw = {str(k).strip(): v for k, v in raw.items() if v is not None}
    if "prompt" not in raw:
        raise ValueError("has no `prompt`.")
    overrides: dict[str, Any] = {"prompt": _as_str("prompt", raw.pop("prompt")).strip()}
    if "seed" in raw and "seeds" in raw:
        raise ValueError("give either `seed` or `seeds`, not both.")
    seeds = config.seeds
    for key in ("seed", "seeds"):
        if key in raw:
            seeds = parse_seeds(raw.pop(key), key)
    if "size" in raw:
        if "height" in raw or "width" in raw:
            raise ValueError("give either `size` or `height`/`width`, not both.")
        overrides["width"], overrides["height"] = _as_size(raw.pop("size"))
    for key, convert, field in (
        ("negative_prompt", _as_str, "negative_prompt"),
        ("steps", _as_int, "steps"),
        ("guidance", _as_float, "guidance"),
        ("height", _as_int, "height"),
        ("width", _as_int, "width"),
        ("frames", _as_int, "num_frames"),
    ):
        if key in raw:
            overrides[field] = convert(key, raw.pop(key))
    if "pipeline_kwargs" in raw:
        overrides["pipeline_kwargs"] = {
            **config.pipeline_kwargs,
            **_as_object("pipeline_kwargs", raw.pop("pipeline_kwargs")),
        }
    techniques = _row_techniques(config, raw)
    settings = config.settings(seed=seeds[0], **overrides)
    settings.validate()
    return BatchRow(index, where, line, settings, seeds, techniques)


def read_rows(path: str | os.PathLike, config: BatchConfig) -> tuple[list[BatchRow], list[RowError]]:
    """Parse a prompt file into rows (run-wide settings from ``config`` under each row's overrides) and the bad rows.

    Every non-empty entry gets the next row index, bad ones included, so fixing a bad row never renames the outputs
    of the rows after it. ``.txt`` lines starting with ``#`` are comments.
    """
    path = Path(path)
    rows: list[BatchRow] = []
    errors: list[RowError] = []
    for index, (line, raw) in enumerate(_read_entries(path)):
        where = f"{path.name}:{line}"
        try:
            if isinstance(raw, str):
                raise ValueError(raw)
            rows.append(_build_row(index, where, line, raw, config))
        except (ValueError, TypeError) as exc:
            errors.append(RowError(index, where, str(exc).rstrip(".") + "."))
    return rows, errors
