"""Every code block of README.md and docs/*.md is checked as a reader would use it (issue 21 item 8).

- ``python`` blocks run top to bottom, one namespace per file, in a scratch folder, on the built-in models. A block
  that needs what a CPU test cannot have (Hub weights, a GPU, a running server, minutes of work) says so on the line
  before it: ``<!-- doc-test: skip (reason) -->``. Skipped blocks are still compiled, and every ``attnpack`` name
  they import or use must exist and every keyword they pass to an attnpack callable must be one it takes: renaming an
  argument or a function breaks the docs test, not a reader.
- ``bash`` blocks: every ``attnpack ...`` command line (also behind ``accelerate launch -m`` / ``torchrun -m``) is
  parsed by the real argument parser, and its ``-t`` / ``--opt`` options by the technique registry; every
  ``python path.py`` names a file of the repository. A block marked ``<!-- doc-test: run -->`` is executed with bash.
- Other fences (``text``, ``json``, ``yaml``, ``csv``) are output or file contents, not checked.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
_MARKER = re.compile(r"<!-- doc-test: (skip \((?P<reason>.+)\)|(?P<run>run)) -->\s*$")


def code_blocks(text: str, language: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, marker)`` for every fenced block of ``language``; ``marker`` is the skip reason, ``"run"``, or
    ``None``, read from the line just before the fence."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            found = _MARKER.match(lines[i - 1]) if i else None
            marker = None if found is None else (found.group("reason") or found.group("run"))
            out.append((i + 1, "\n".join(lines[i + 1 : j]), marker))
            i = j
        i += 1
    return out


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    return code_blocks(text, "python")


# ---------------------------------------------------------------------------------------------------------- python


def _resolve(dotted: str):
    """The attnpack object a dotted name refers to, or raise AssertionError naming it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"`{dotted}` does not exist (no `{attr}`)"
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"`{dotted}` does not exist")


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """``attnpack.x.y`` for an expression built from names bound to attnpack objects, else ``None``."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, names)
        return None if base is None else f"{base}.{node.attr}"
    return None


def check_attnpack_names(code: str, where: str) -> int:
    """Compile ``code``, resolve every attnpack name it imports or uses, and check the keywords of calls to attnpack
    callables against their signatures. Returns how many names were checked."""
    tree = ast.parse(compile(code, where, "exec", flags=ast.PyCF_ONLY_AST))
    names: dict[str, str] = {}
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "attnpack":
                    _resolve(alias.name)
                    names[(alias.asname or alias.name).split(".")[0]] = alias.asname and alias.name or "attnpack"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "attnpack":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                try:
                    _resolve(names[alias.asname or alias.name])
                except AssertionError as exc:
                    raise AssertionError(f"{where}: {exc}") from None
    for node in ast.walk(tree):
        dotted = _dotted(node, names) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if dotted is not None:
            try:
                _resolve(dotted)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None
            checked += 1
        if isinstance(node, ast.Call) and (target := _dotted(node.func, names)) is not None:
            obj = _resolve(target)
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError):
                continue
            if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
                continue
            for kw in node.keywords:
                assert kw.arg is None or kw.arg in sig.parameters, (
                    f"{where}: `{target}` takes no argument `{kw.arg}` (it takes {', '.join(sig.parameters)})"
                )
    return checked


def _doc_cases():
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        blocks = [(line, "python", code, m) for line, code, m in python_blocks(text)]
        blocks += [(line, "bash", code, m) for line, code, m in code_blocks(text, "bash") if m == "run"]
        if any(kind == "python" for _, kind, _, _ in blocks):
            yield pytest.param(doc, sorted(blocks), id=doc)


@pytest.mark.parametrize(("doc", "blocks"), list(_doc_cases()))
def test_docs_run_as_written(doc, blocks, tmp_path, monkeypatch):
    """The file's unmarked python blocks and its ``run``-marked bash blocks run in order in one scratch folder (one
    namespace for the python); the skipped python blocks are checked statically."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__doc_test__"}
    for line, kind, code, marker in blocks:
        where = f"{doc}:{line}"
        if kind == "bash":
            run_bash(code, where, tmp_path)
            continue
        check_attnpack_names(code, where)
        if marker is None:
            exec(compile(code, where, "exec"), scope)
        else:
            assert marker != "run" and marker.strip(), f"{where}: a python block runs unless it says why not"
    if doc == "README.md":
        assert scope["image"].size == (64, 64)
        assert (tmp_path / "circle_square.png").is_file() and (tmp_path / "maps.gif").is_file()


def run_bash(code: str, where: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{where} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


# pages whose every python example needs what one test process cannot have, and where they are run instead
NOTHING_RUNS_HERE = {"docs/multi-gpu.md": "several processes: tests/test_context_parallel.py runs the same calls"}


def test_most_python_blocks_run():
    """Skipping is the exception: each skip gives a reason, and every page with examples runs at least one."""
    runs = {doc: [m is None for *_, m in python_blocks((ROOT / doc).read_text())] for doc in DOCS}
    none_run = {d for d, flags in runs.items() if flags and not any(flags)}
    assert none_run == set(NOTHING_RUNS_HERE), none_run
    assert sum(sum(flags) for flags in runs.values()) >= 12


def test_a_renamed_argument_breaks_the_docs_check():
    """The static check can fail: a keyword the function does not take, and a name that does not exist."""
    with pytest.raises(AssertionError, match="takes no argument `window`"):
        check_attnpack_names("import attnpack\nattnpack.apply_gna(None, window=3)", "x")
    with pytest.raises(AssertionError, match="does not exist"):
        check_attnpack_names("from attnpack import apply_nothing", "x")
    assert check_attnpack_names("import attnpack as ap\nap.apply_gna(None, window_size=3)", "x") >= 1


# ------------------------------------------------------------------------------------------------------------ bash


def command_lines(code: str) -> list[str]:
    """Logical lines (``\\`` continuations joined, comments and heredoc bodies dropped)."""
    out, pending, heredoc = [], "", None
    for raw in code.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if (m := re.search(r"<<-?'?(\w+)'?", line)) is not None:
            heredoc = m.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def attnpack_argv(command: str) -> list[str] | None:
    """The arguments after ``attnpack`` in one simple command: ``attnpack ...``, ``... -m attnpack ...`` (accelerate,
    torchrun, python) or ``... --no_python attnpack ...``; ``None`` for other commands."""
    words = shlex.split(command, comments=True)
    for i, word in enumerate(words):
        if word == "attnpack" and (i == 0 or words[i - 1] in ("-m", "--no_python")):
            return words[i + 1 :]
    return None


def _bash_cases():
    for doc in DOCS:
        for line, code, marker in code_blocks((ROOT / doc).read_text(), "bash"):
            yield pytest.param(doc, line, code, marker, id=f"{doc}:{line}")


@pytest.mark.parametrize(("doc", "line", "code", "marker"), list(_bash_cases()))
def test_bash_commands_parse(doc, line, code, marker):
    from attnpack.cli import build_parser
    from attnpack.techniques import parse_technique_specs

    parser = build_parser()
    for cmd in command_lines(code):
        if cmd.endswith("..."):  # an elided command ("torchrun ... -m attnpack search-heads ...")
            continue
        for part in re.split(r"&&|\|\||;|\|", cmd):
            argv = attnpack_argv(part)
            if argv is not None:
                try:
                    args = parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{doc}:{line}: `attnpack {' '.join(argv)}` does not parse")
                if getattr(args, "technique", None) and not getattr(args, "config", None):
                    parse_technique_specs(args.technique, args.opt, getattr(args, "techniques", None))
            for script in re.findall(r"\bpython (?:-m pytest )?((?:benchmarks|tests|docs)/\S+\.py)", part):
                assert (ROOT / script).is_file(), f"{doc}:{line}: {script} does not exist"


def test_the_bash_check_can_fail():
    from attnpack.cli import build_parser

    assert attnpack_argv("accelerate launch --multi_gpu -m attnpack batch --config x.yaml") == [
        "batch", "--config", "x.yaml"
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(attnpack_argv("attnpack generate --no-such-flag 1"))
    lines = command_lines("a \\\n  b  # c\ncat > f <<'EOF'\nbody\nEOF\n# only a comment")
    assert [" ".join(line.split()) for line in lines] == ["a b # c", "cat > f <<'EOF'"]
