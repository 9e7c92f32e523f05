"""Config loading: the example files are valid, and bad keys are named with their path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.cli import main
from proxy.config import ConfigError, interpolate_env, load_config, parse_config, with_overrides

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
