"""The README's Python snippets run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_readme_snippet_runs(i):
    exec(compile(SNIPPETS[i], f"README.md snippet {i}", "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    test_cmd = [line.strip() for line in README.splitlines() if "pytest" in line][0]
    assert test_cmd in ci
