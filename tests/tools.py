"""The programs the tests start (redis-server, nginx, Chromium, …), looked up by name.

Every name must be in the table of tests/run.sh, which installs them: the table is read from there, so the
script and the tests keep one list (tests/test_tools.py checks that every lookup in the tests is in it).
A program that is missing fails the test with the line that installs it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

RUN_SH = Path(__file__).resolve().parent / "run.sh"
# Debian keeps nginx in sbin, off a user's PATH; tests/run.sh looks there too.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Row:
    """One line of the table: programs any one of which will do, and the Debian package with them."""

    names: tuple[str, ...]
    package: str


@cache
def table() -> tuple[Row, ...]:
    """The `TOOLS="…"` table of tests/run.sh."""
    block = re.search(r'^TOOLS="\n(.*?)^"', RUN_SH.read_text(), re.MULTILINE | re.DOTALL)
    assert block, f"{RUN_SH} has no TOOLS table"
    rows = []
    for line in block.group(1).splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            names, package = fields
            rows.append(Row(tuple(names.split("|")), package))
    return tuple(rows)


def package(name: str) -> str:
    """The Debian package that installs `name`; a name outside the table is a mistake in the test."""
    for row in table():
        if name in row.names:
            return row.package
    raise LookupError(f"{name} is not in the TOOLS table of tests/run.sh: add it there with its Debian package")


def find(*names: str) -> str | None:
    """The path of the first of `names` installed, or None: for a test that may go without it."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN])
    for name in names:
        package(name)
        path = shutil.which(name, path=search)
        if path:
            return path
    return None


def tool(*names: str) -> str:
    """The path of the first of `names` installed; the test fails with the install line when none is."""
    path = find(*names)
    if path is None:
        wanted = " or ".join(names)
        pytest.fail(f"{wanted} is not installed: apt-get install -y --no-install-recommends {package(names[0])}"
                    "  (tests/run.sh installs it)")
    return path


def needs(*names: str) -> Callable[[F], F]:
    """Decorate a test that starts one of `names`: without it, the test fails with the install line (a skip
    would hide a machine that lacks what CI has)."""
    def decorate(test: F) -> F:
        if inspect.iscoroutinefunction(test):
            @functools.wraps(test)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                tool(*names)
                return await test(*args, **kwargs)
            return run_async   # type: ignore[return-value]

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            tool(*names)
            return test(*args, **kwargs)
        return run   # type: ignore[return-value]
    return decorate
