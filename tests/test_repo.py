"""Repository hygiene: the README's two commands, CI running the second one, and README examples that run."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _readme():
    return (ROOT / "README.md").read_text()


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    text = _readme()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert text.index("```bash") < 20  # the very first thing after the title
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci and "CI=true" in ci
    assert "sed -n 2p" in ci  # CI extracts the README's second command, so the two cannot drift apart
    assert block[1].startswith("pip install") and "pytest" in block[1]


_SKIP = re.compile(r"<!-- doc-test: skip \((.+)\) -->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for every ```python block; a block is skipped only when the line before
    it says ``<!-- doc-test: skip (reason) -->`` (Hub weights, a GPU, minutes of work)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            marker = _SKIP.match(lines[start - 1]) if start else None
            out.append((start + 1, "\n".join(lines[start + 1 : j]), marker.group(1) if marker else None))
            i = j
        i += 1
    return out


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Issue 21 (docs run as written): every Python block of the README runs, top to bottom in one namespace as a
    reader would paste them, on the built-in models; the ones that need Hub weights or a GPU say so and why."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(_readme())
    assert any(reason is None for _, _, reason in blocks) and all(
        reason is None or reason.strip() for *_, reason in blocks
    )
    scope: dict = {}
    ran = 0
    for line, code, reason in blocks:
        if reason is not None:
            continue
        exec(compile(code, f"README.md:{line}", "exec"), scope)
        ran += 1
    assert scope["image"].size == (64, 64) and ran >= 3
    assert (tmp_path / "circle_square.png").is_file() and (tmp_path / "maps.gif").is_file()
