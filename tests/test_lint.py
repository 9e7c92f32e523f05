"""Lint is part of the tests: ruff, at the version the test extras pin, with the rules in pyproject.toml
(pyflakes, pycodestyle, isort, bugbear, pyupgrade, async traps, a complexity ceiling and a ceiling on
positional parameters), and mypy over the package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", name, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return tool("ruff", *args)


def test_ruff_is_the_pinned_version() -> None:
    pinned = re.search(r'"ruff==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml's test extras pin ruff"
    assert ruff("--version").stdout.split() == ["ruff", pinned.group(1)]


def test_ruff_check_passes() -> None:
    result = ruff("check", "--no-cache", "proxy", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes() -> None:
    result = tool("mypy", "proxy")
    assert result.returncode == 0, result.stdout + result.stderr
