"""Repository hygiene: the README's two commands and CI running the second one (the code blocks: test_docs.py)."""

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
