"""Repository hygiene: the README's two commands, CI running the second one, and README examples that run."""

import re
from pathlib import Path

import torch


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


def test_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", _readme(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].size == (64, 64)
    assert torch.is_tensor(torch.zeros(1))
