"""The generic half of config loading: a reader that walks a frozen dataclass's fields to read one YAML
section, collecting every problem with its key path, and `${ENV}` interpolation. `proxy.config` holds the
schema (the dataclasses, with each key's check in its field metadata) and reads section by section."""

from __future__ import annotations

import os
import re
import types
from dataclasses import MISSING, Field, fields, is_dataclass
from functools import cache
from typing import Any, TypeVar, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration that cannot run; `problems` holds one message per bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(text: str, env: dict[str, str] | None = None) -> str:
    """Replace `${NAME}` and `${NAME:-default}`; an unset name without default is an error."""
    env = dict(os.environ) if env is None else env
    missing: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    out = _ENV_RE.sub(sub, text)
    if missing:
        raise ConfigError([f"${{{name}}}: environment variable is not set" for name in missing])
    return out


def interpolate_tree(node: Any, env: dict[str, str] | None) -> Any:
    """`${ENV}` in string values only (not in comments or keys), after YAML parsing, so a secret with
    YAML-special characters cannot change the document's structure."""
    if isinstance(node, str):
        return interpolate_env(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


_T = TypeVar("_T")


class Absent:
    """A key not given, or given a bad value (its problem noted): the dataclass default stands."""


ABSENT = Absent()


@cache
def kinds(cls: type) -> dict[str, Any]:
    """What each field of `cls` reads from YAML: int, float, bool, str, tuple (of strings) or a dataclass."""
    out: dict[str, Any] = {}
    for name, hint in get_type_hints(cls).items():
        if isinstance(hint, types.UnionType):   # `X | None`: None is the default, never a YAML value
            hint = next(arg for arg in get_args(hint) if arg is not type(None))
        out[name] = get_origin(hint) or hint
    return out


def item_kind(cls: type, name: str) -> type | None:
    """The dataclass of a `tuple[Section, ...]` field (a list of sections), else None."""
    args = get_args(get_type_hints(cls)[name])
    return args[0] if args and is_dataclass(args[0]) else None   # type: ignore[return-value]


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING and "derived" not in f.metadata


class Reader:
    """Walks the raw YAML mapping, collecting every problem with its key path instead of stopping at one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def note(self, where: str, problem: str) -> Absent:
        self.problems.append(f"{where}: {problem}")
        return ABSENT

    def section(self, raw: Any, path: str, known: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.note(path, "must be a mapping")
            return {}
        for key in raw:
            if key not in known:
                self.note(f"{path}.{key}" if path else str(key), "unknown key")
        return raw

    def items(self, raw: Any, path: str) -> list[Any]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.note(path, "must be a list")
            return []
        return raw

    def read(self, cls: type[_T], raw: Any, path: str, **defaults: Any) -> _T:
        """`cls` from its YAML section: a key missing or bad keeps `defaults` or else the field's default."""
        return cls(**{**defaults, **self.values(cls, raw, path)})

    def values(self, cls: type, raw: Any, path: str) -> dict[str, Any]:
        """The good values of `cls`'s keys in this section, by field name; every problem is noted."""
        here = {f.name: f for f in fields(cls) if "yaml" not in f.metadata}   # the rest live elsewhere in the file
        section = self.section(raw, path, set(here))
        out: dict[str, Any] = {}
        for name, f in here.items():
            value = self.field(cls, f, section.get(name), f"{path}.{name}")
            if value is not ABSENT:
                out[name] = value
        return out

    def field(self, cls: type, f: Field[Any], raw: Any, where: str) -> Any:
        """One key's value, checked as field `f` of `cls` says, or `ABSENT`."""
        if raw is None:
            return self.note(where, "required") if _required(f) else ABSENT
        kind = kinds(cls)[f.name]
        if is_dataclass(kind):
            return self.read(kind, raw, where)   # type: ignore[arg-type]
        if kind is tuple:
            item = item_kind(cls, f.name)
            if item is not None:
                return self.sections(item, raw, where)
            return self.strings(f, raw, where)
        return self.scalar(kind, f, raw, where)

    def sections(self, cls: type, raw: Any, where: str) -> tuple[Any, ...]:
        """A list of `cls` sections; one missing a required key is noted and left out."""
        out = []
        for i, entry in enumerate(self.items(raw, where)):
            values = self.values(cls, entry, f"{where}[{i}]")
            if all(f.name in values for f in fields(cls) if _required(f)):
                out.append(cls(**values))
        return tuple(out)

    def scalar(self, kind: type, f: Field[Any], raw: Any, where: str) -> Any:
        value = float(raw) if kind is float and isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return self.note(where, f"must be {kind.__name__}, got {type(value).__name__}")
        check = f.metadata.get("check")
        problem = check(value) if check else None
        return self.note(where, problem) if problem else value

    def strings(self, f: Field[Any], raw: Any, where: str) -> tuple[str, ...] | Absent:
        if not raw:
            return ()
        ok, why = f.metadata.get("items", (None, "must be a list of strings"))
        if not isinstance(raw, list) or not all(isinstance(s, str) and (ok is None or ok(s)) for s in raw):
            return self.note(where, why)
        return tuple(raw)
