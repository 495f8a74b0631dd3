"""The README's test command is the one CI runs, so the two cannot drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command():
    commands = _commands()
    assert len(commands) >= 2
    assert "pytest" in commands[1]
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_runs_on_the_sample_studies():
    first = _commands()[0]
    assert "constraints.txt" in first and "sample_studies" in first and "longitudinal " in first
