"""The README's test command is exactly what .ci/run runs, inside a virtual environment of its own."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_ci_runs_the_readme_test_command_in_a_fresh_virtual_environment():
    install_and_generate, test_command = _readme_commands()[:2]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1] == test_command
    venv_line = next(i for i, line in enumerate(ci) if "-m venv" in line)
    activate_line = next(i for i, line in enumerate(ci) if "/bin/activate" in line)
    assert venv_line < activate_line < len(ci) - 1
    assert "mktemp" in "".join(ci[:venv_line])
    # The first command makes its own environment before installing anything.
    assert install_and_generate.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
