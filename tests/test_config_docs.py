"""The README's configuration reference is held to the config code: a row for every key, the true defaults.

Keys and defaults come from the dataclasses in `proxy.config` (`config_keys()`), so a new field, or a
changed default, fails here until the table says so.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

import pytest

from proxy.config import config_keys

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = README.parent / "config" / "example.yaml"
KEYS = config_keys()


def reference_rows(readme: str) -> dict[str, str]:
    """The table under "## Configuration reference": each key path with its default cell.

    A row may name several keys (`server.host` / `server.port`) with as many defaults (`127.0.0.1` / `8188`).
    """
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("key", "---"):
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        defaults = cells[1].split(" / ") if len(keys) > 1 else [cells[1]]
        assert len(defaults) == len(keys), f"{line}: {len(keys)} keys but {len(defaults)} defaults"
        for key, default in zip(keys, defaults, strict=True):
            assert key not in rows, f"{key}: two rows"
            rows[key] = default
    return rows


def default_problem(f: Field[Any], cell: str) -> str | None:
    """Why `cell` misstates the field's default, or None. A value is written in backticks, exactly; a key
    without a default is `required`; a default computed at load is in the words of its `derived` metadata;
    None (the key unset) is plain words such as `none` or `unlimited`."""
    code = re.fullmatch(r"`([^`]*)`", cell)
    derived = f.metadata.get("derived")
    if derived is not None:
        return None if cell == derived else f"should read {derived!r} (the field's `derived` metadata)"
    if f.default is MISSING and f.default_factory is MISSING:
        return None if cell == "required" else "should read 'required'"
    if f.default is None:
        return None if cell and code is None and cell != "required" else "should be words such as 'none'"
    if code is None:
        return f"should be the default in backticks: `{written(f.default)}`"
    return None if same_value(code.group(1), f.default) else f"should be `{written(f.default)}`"


def same_value(text: str, default: Any) -> bool:
    if isinstance(default, bool):   # before int: a bool is an int
        return text == written(default)
    if isinstance(default, float):
        return re.fullmatch(r"-?\d+(\.\d+)?", text) is not None and float(text) == default
    if isinstance(default, tuple):
        return text == written(default)
    return text == str(default)


def written(default: Any) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return "[" + ", ".join(default) + "]"
    return str(default)


def test_every_key_has_a_row_in_the_readme() -> None:
    missing = sorted(set(KEYS) - set(reference_rows(README.read_text())))
    assert not missing, f"add rows to the README's configuration reference for {missing}"


def test_every_row_of_the_readme_is_a_key() -> None:
    stale = sorted(set(reference_rows(README.read_text())) - set(KEYS))
    assert not stale, f"the README's configuration reference names keys the config does not have: {stale}"


@pytest.mark.parametrize("key", sorted(KEYS))
def test_the_readme_gives_each_keys_default(key: str) -> None:
    cell = reference_rows(README.read_text()).get(key)
    if cell is None:
        pytest.skip("no row (test_every_key_has_a_row_in_the_readme fails)")
    problem = default_problem(KEYS[key], cell)
    assert problem is None, f"README, {key}: default {cell!r} {problem}"


def test_the_example_config_shows_every_key_set_or_in_a_comment() -> None:
    text = EXAMPLE.read_text()
    missing = sorted(key for key in KEYS if not re.search(rf"\b{key.rsplit('.', 1)[-1]}:", text))
    assert not missing, f"config/example.yaml does not show {missing}"


def test_the_key_list_names_sections_and_lists_as_the_yaml_does() -> None:
    assert {"server.port", "backends[].max_inflight", "health.open_s", "redis.url",
            "tenants[].quota.per_day"} <= set(KEYS)
    assert "store.redis_url" not in KEYS


def test_the_checker_refuses_a_wrong_or_loosely_written_default() -> None:
    port, url, required, pools = (KEYS[k] for k in ("server.port", "backends[].url", "auth.required",
                                                    "tenants[].pools"))
    open_s, token = KEYS["health.open_s"], KEYS["auth.metrics_token"]
    assert default_problem(port, "`8188`") is None
    assert default_problem(port, "`8189`") and default_problem(port, "8188") and default_problem(port, "`8188.0`")
    assert default_problem(open_s, "`1`") is None and default_problem(open_s, "`1.5`")
    assert default_problem(url, "required") is None and default_problem(url, "none")
    assert default_problem(required, "true when tenants are configured") is None
    assert default_problem(required, "`false`")
    assert default_problem(pools, "`[]`") is None and default_problem(pools, "none")
    assert default_problem(token, "none") is None and default_problem(token, "`x`")
