"""tests/run.sh and the tests keep one list of the programs the tests start: every lookup in the tests (and
in the proxy's own helpers they run) names a program of the script's table, every row of the table is a
Debian package that a test needs, and the script stops with the packages named where it cannot install
them, before it touches anything."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tools

ROOT = tools.RUN_SH.parents[1]
LOOKUPS = {"tests.tools.tool", "tests.tools.find", "tests.tools.needs", "tests.tools.package", "shutil.which"}


@dataclass(frozen=True)
class Lookup:
    where: str                     # path:line
    call: str                      # the qualified name called
    names: tuple[str, ...] | None  # None: not all of them literals


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name → the qualified name it stands for, from the module's imports."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _literal_names(args: list[ast.expr]) -> tuple[str, ...] | None:
    names: list[str] = []
    for arg in args:
        value = arg.value if isinstance(arg, ast.Starred) else arg
        items = value.elts if isinstance(value, ast.Tuple | ast.List | ast.Set) else [value]
        for item in items:
            if not (isinstance(item, ast.Constant) and isinstance(item.value, str)):
                return None
            names.append(item.value)
    return tuple(names)


def lookups(path: Path) -> Iterator[Lookup]:
    tree = ast.parse(path.read_text(), str(path))
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (dotted := _dotted(node.func)) is None:
            continue
        head, _, rest = dotted.partition(".")
        call = ".".join(filter(None, [aliases.get(head, head), rest]))
        if call in LOOKUPS:
            args = node.args[:1] if call == "shutil.which" else node.args
            yield Lookup(f"{path.relative_to(ROOT)}:{node.lineno}", call, _literal_names(args))


def all_lookups() -> list[Lookup]:
    files = [p for p in sorted((ROOT / "tests").rglob("*.py")) if p != tools.RUN_SH.with_name("tools.py")]
    files += sorted((ROOT / "proxy").rglob("*.py"))  # e.g. proxy.bench.procs starts a redis-server for tests
    return [lookup for path in files for lookup in lookups(path)]


def table_names() -> set[str]:
    return {name for row in tools.table() for name in row.names}


def test_the_tests_look_programs_up_only_through_tests_tools() -> None:
    direct = [lk.where for lk in all_lookups() if lk.call == "shutil.which" and lk.where.startswith("tests/")]
    assert not direct, f"use tests.tools.tool/find (names from tests/run.sh's table), not shutil.which: {direct}"


def test_every_program_a_test_looks_up_is_in_the_install_table() -> None:
    found = all_lookups()
    assert any(lk.names and "redis-server" in lk.names for lk in found), "the scan found no lookups at all"
    opaque = [lk.where for lk in found if lk.names is None]
    assert not opaque, f"name the programs as string literals, so that this test can check them: {opaque}"
    unknown = {f"{lk.where}: {name}" for lk in found for name in lk.names or () if name not in table_names()}
    assert not unknown, f"add these to the TOOLS table of tests/run.sh with their Debian packages: {sorted(unknown)}"


def test_every_row_of_the_install_table_is_needed_by_a_test() -> None:
    looked_up = {name for lk in all_lookups() for name in lk.names or ()}
    unused = [row.names for row in tools.table() if not looked_up & set(row.names)]
    assert not unused, f"no test looks these up; drop them from tests/run.sh: {unused}"


@pytest.mark.parametrize("package", sorted({row.package for row in tools.table()}))
def test_every_package_of_the_table_is_one_apt_knows(package: str) -> None:
    try:
        shown = subprocess.run(["apt-cache", "show", package], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no apt-cache on this system: the package names cannot be checked here")
    assert shown.returncode == 0 and f"Package: {package}\n" in shown.stdout, shown.stderr


def test_run_sh_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(tools.RUN_SH)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# --- the script where it cannot install: it names the packages and stops, before the venv ----------------
def standard(name: str) -> str:
    """A standard utility, from the system's default PATH (the one POSIX's confstr gives)."""
    for folder in os.confstr("CS_PATH").split(":"):
        if (Path(folder) / name).exists():
            return str(Path(folder) / name)
    raise FileNotFoundError(name)


def fake(folder: Path, name: str, body: str) -> None:
    script = folder / name
    script.write_text(f"#!{standard('bash')}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def run_alone(tmp_path: Path, *, uid: int, fakes: tuple[str, ...]) -> tuple[subprocess.CompletedProcess[str], str]:
    """tests/run.sh copied into an empty repo, on a PATH of its own: every program of the table there (as
    stubs; nginx taken as missing), the utilities it needs, and the `fakes` (apt-get, apt-cache, sudo),
    which only log their calls. Returns the run and the log."""
    repo, folder, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "run.sh").write_text(tools.RUN_SH.read_text())
    folder.mkdir()
    for name in ("bash", "dirname", "env"):
        (folder / name).symlink_to(standard(name))
    (folder / "python3").symlink_to(sys.executable)
    fake(folder, "id", f'[[ "$1" == -u ]] && echo {uid}')
    for name in table_names():
        fake(folder, name, "exit 1")
    for name in fakes:
        action = 'exec "$@"' if name == "sudo" else "exit 0"
        fake(folder, name, f'echo "{name} $*" >> {log}; {action}')
    env = {"PATH": str(folder), "HOME": str(tmp_path), "COMFY_TEST_ASSUME_MISSING": "nginx"}
    done = subprocess.run([str(folder / "bash"), "tests/run.sh"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert not (repo / ".venv").exists(), "the script went on to make a venv"
    return done, log.read_text() if log.exists() else ""


def test_without_apt_get_the_script_names_the_packages_and_stops(tmp_path: Path) -> None:
    done, calls = run_alone(tmp_path, uid=0, fakes=())
    assert done.returncode != 0
    assert "no apt-get here: install these Debian packages" in done.stderr, done.stderr
    assert done.stderr.rstrip().endswith("then run again: nginx"), done.stderr


def test_not_root_without_sudo_the_script_names_the_packages_and_stops(tmp_path: Path) -> None:
    done, calls = run_alone(tmp_path, uid=1000, fakes=("apt-get", "apt-cache"))
    assert done.returncode != 0
    assert "not root and no sudo: as root, run: apt-get install -y --no-install-recommends nginx" in done.stderr
    assert calls == "", "it ran apt-get without the rights to"


def test_not_root_the_script_installs_with_sudo_and_checks_the_result(tmp_path: Path) -> None:
    done, calls = run_alone(tmp_path, uid=1000, fakes=("apt-get", "apt-cache", "sudo"))
    assert calls.splitlines() == [
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq",
        "apt-get update -qq",
        "apt-cache show nginx",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx",
        "apt-get install -y -qq --no-install-recommends nginx",
    ]
    # The stub installed nothing, so nginx is still missing: the script says so and stops.
    assert done.returncode != 0
    assert "still missing after apt-get install: nginx" in done.stderr, done.stderr
