"""The README's test command is what CI runs, and it installs every extra that can install here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _extras(command: str) -> set[str]:
    (group,) = re.findall(r"-e '\.\[([a-z,]+)\]'", command)
    return set(group.split(","))


def test_ci_runs_the_readme_test_command_with_every_installable_extra():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (readme_cmd,) = [line for line in readme.splitlines() if "python -m pytest" in line and line.startswith("python3 -m venv")]
    assert readme_cmd in ci
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    # gpu: TensorRT's builder does not install from PyPI here; train: the same packages as export
    assert _extras(readme_cmd) == declared - {"gpu", "train"}


def test_ci_installs_the_browser_and_driver_the_report_test_uses():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "command -v chromium >/dev/null || {" in ci and "apt-get install -y -qq chromium" in ci
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(d.startswith("playwright") for d in test_extra)
    assert "apt-get install -y chromium" in (ROOT / "README.md").read_text()
