"""Config loading: the example files are valid, and bad keys are named with their path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.cli import main
from proxy.config import (
    Config,
    ConfigError,
    Quota,
    config_keys,
    load_config,
    parse_config,
    with_overrides,
)
from proxy.config_reader import interpolate_env

CONFIG_DIR = Path(__file__).parent.parent / "config"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    config = load_config(path, env={})
    assert config.backends


def test_env_interpolation() -> None:
    assert interpolate_env("a: ${X}", {"X": "1"}) == "a: 1"
    assert interpolate_env("a: ${X:-d}", {}) == "a: d"
    with pytest.raises(ConfigError, match=r"\$\{X\}"):
        interpolate_env("a: ${X}", {})


def test_problems_name_the_key_path() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"backends": [{"url": "http://a:1"}, {"url": "ftp://x"}, {"name": "n"}],
                      "scheduler": {"policy": "fastest"}, "bogus": 1, "server": {"port": "x"}})
    problems = exc.value.problems
    assert "backends[1].url: not an http(s) URL" in problems
    assert "backends[2].url: required" in problems
    assert any(p.startswith("scheduler.policy: must be one of") for p in problems)
    assert "bogus: unknown key" in problems
    assert "server.port: must be int, got str" in problems


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"backends": ["http://127.0.0.1:9000"], "server": {"port": 1}}))
    config = with_overrides(load_config(f), port=2, backends=["http://127.0.0.1:9001"], redis_url="redis://x:1")
    assert config.server.port == 2 and config.backends[0].url == "http://127.0.0.1:9001"
    assert config.store.redis_url == "redis://x:1"


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(CONFIG_DIR / "example.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - url: nope\n")
    assert main(["check-config", str(bad)]) == 1
    assert "backends[0].url: not an http(s) URL" in capsys.readouterr().err


def test_an_empty_file_gives_the_dataclass_defaults() -> None:
    assert parse_config(None) == parse_config({}) == Config()


def raw_with(path: str, value: Any) -> dict[str, Any]:
    """A config setting one key (`backends[].max_inflight`), inside a minimal valid list item, and the
    path a message gives that key (`backends[0].max_inflight`)."""
    *parents, leaf = path.split(".")
    node: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        if parent.endswith("[]"):
            item = {"backends": {"url": "http://a:1"}, "tenants": {"name": "t"},
                    "dns": {"name": "gpus.test"}}[parent[:-2]] | node
            node = {parent[:-2]: [item]}
        else:
            node = {parent: node}
    return node


SCALAR_KEYS = sorted(key for key, f in config_keys().items() if not str(f.type).startswith("tuple"))
WRONG = st.sampled_from(["x", True, 3, 1.5, [1], {"a": 1}])


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(SCALAR_KEYS), value=WRONG)
def test_a_value_of_the_wrong_type_is_named_with_its_path(key: str, value: Any) -> None:
    kind = str(config_keys()[key].type).split(" | ")[0]
    accepted: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str}
    assume(not isinstance(value, accepted[kind]) or (kind in ("int", "float") and isinstance(value, bool)))
    with pytest.raises(ConfigError) as exc:
        parse_config(raw_with(key, value))
    where = key.replace("[]", "[0]")
    assert exc.value.problems == [f"{where}: must be {kind}, got {type(value).__name__}"]


@pytest.mark.parametrize(("raw", "problem"), [
    ({"server": {"port": 70000}}, "server.port: not a port"),
    ({"server": {"public_url": "comfy.example.com"}}, "server.public_url: not an http(s) URL"),
    ({"server": []}, "server: must be a mapping"),
    ({"redis": {"url": "http://r:1"}},
     "redis.url: not a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"),
    ({"store": {"redis_url": "redis://r:1"}}, "store.redis_url: unknown key"),
    ({"store": {"key_prefix": "a b"}}, "store.key_prefix: use letters, digits, '.:_-'"),
    ({"scheduler": {"retry_max_attempts": 11}}, "scheduler.retry_max_attempts: must be 0..10"),
    ({"health": {"ejection_s": 400}}, "health.ejection_max_s: must be >= health.ejection_s"),
    ({"backends": {"url": "http://a:1"}}, "backends: must be a list"),
    ({"backends": [{"url": "http://a:1", "max_inflight": 0}]}, "backends[0].max_inflight: must be 1..1024"),
    ({"backends": [{"url": "http://a:1", "labels": "sdxl"}]}, "backends[0].labels: must be a list of strings"),
    ({"backends": [{"url": None}]}, "backends[0].url: required"),
    ({"backends": [{"url": "http://a:1", "name": "a b"}]}, "backends[0].name: use letters, digits, '.', '_' or '-'"),
    ({"backends": ["http://a:1", "http://a:1/"]}, "backends[1].name: duplicate backend name 'a-1'"),
    ({"tenants": [{"api_keys": ["k"]}]}, "tenants[0].name: required"),
    ({"tenants": [{"name": "t", "api_keys": [""]}]}, "tenants[0].api_keys: must be a list of non-empty strings"),
    ({"tenants": [{"name": "t", "api_keys": ["sha256:ab"]}]},
     "tenants[0].api_keys[0]: sha256: must be followed by 64 lowercase hex digits"),
    ({"tenants": [{"name": "t", "api_keys": ["k"]}, {"name": "u", "api_keys": ["k"]}]},
     "tenants[1].api_keys[0]: key used by another tenant"),
    ({"tenants": [{"name": "t"}, {"name": "t"}]}, "tenants[1].name: duplicate tenant 't'"),
    ({"tenants": [{"name": "t", "role": "root"}]}, "tenants[0].role: must be user or admin"),
    ({"tenants": [{"name": "t", "quota": {"per_day": 0}}]}, "tenants[0].quota.per_day: must be > 0"),
    ({"tenants": [{"name": "t", "quota": {"hourly": 1}}]}, "tenants[0].quota.hourly: unknown key"),
    ({"tenants": [{"name": "t", "pools": [1]}]}, "tenants[0].pools: must be a list of backend labels"),
    ({"tenants": [{"api_keys": []}, {"name": "t", "pools": ["flux"]}], "backends": ["http://a:1"]},
     "tenants[1].pools: no backend has the label 'flux'"),
    ({"auth": {"required": True}}, "auth.required: no tenants are configured, so nobody could get in"),
    ({"workflows": {"dir": "/nonexistent/templates"}}, "workflows.dir: [Errno 2] No such file or directory: "
                                                       "'/nonexistent/templates'"),
])
def test_each_bad_value_is_named_with_its_path_and_why(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert problem in exc.value.problems


def test_auth_is_required_by_default_once_tenants_exist() -> None:
    assert parse_config({"tenants": [{"name": "t", "api_keys": ["k"]}]}).auth.required
    assert not parse_config({"tenants": [{"name": "t"}], "auth": {"required": False}}).auth.required
    assert not parse_config({}).auth.required


def test_redis_url_and_nested_sections_land_in_their_dataclasses() -> None:
    config = parse_config({"redis": {"url": "unix:///run/redis.sock"}, "server": {"header_timeout_s": 5},
                           "backends": [{"url": "http://gpu:8188/", "labels": ["sdxl"]}],
                           "tenants": [{"name": "t", "quota": {"per_minute": 6}, "pools": ["sdxl"], "weight": 2}]})
    assert config.store.redis_url == "unix:///run/redis.sock"
    assert config.server.header_timeout_s == 5.0 and isinstance(config.server.header_timeout_s, float)
    assert config.backends[0].name == "gpu-8188" and config.backends[0].url == "http://gpu:8188"
    assert config.tenants[0].quota == Quota(per_minute=6) and config.tenants[0].weight == 2.0
