"""The OpenAPI document covers every route, and schemathesis fuzzes a live proxy from it.

The farm is real and runs as the operator runs it: two `comfy-proxy sim` processes and one
`comfy-proxy serve --config` process (in-process store, `auth.required`, a user key and an admin key),
so a crash is a dead process, not a swallowed exception. Every operation of the document (ComfyUI's
routes at their plain path — the `/api` twins run the same handlers — and the proxy's own) gets
schema-conforming and schema-violating requests; no answer may be a 5xx, and the proxy must still be
alive and logging no unhandled error at the end. Sized for CI: a few dozen examples per operation.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from proxy import api
from proxy.api import COMFY_ROUTES, PROXY_ROUTES
from proxy.api.openapi import OPENAPI
from tests.conftest import free_port

USER_KEY, ADMIN_KEY = "fuzz-user-key-0123456789", "fuzz-admin-key-0123456789"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))


def _openapi_path(aiohttp_path: str) -> str:
    """`/experiment/models/preview/{path:.+}` → `/experiment/models/preview/{path}`."""
    return re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", aiohttp_path)


def test_every_route_is_in_the_openapi_document() -> None:
    paths = OPENAPI["paths"]
    missing = [f"{method} {prefix}{path}" for method, path, _ in COMFY_ROUTES for prefix in ("", "/api")
               if method.lower() not in paths.get(_openapi_path(prefix + path), {})]
    missing += [f"{method} {path}" for method, path, _ in (*getattr(api, "STATIC_ROUTES", ()), *PROXY_ROUTES,
                                                           *api.COMFYAPI_ROUTES)
                if method.lower() not in paths.get(_openapi_path(path), {})]
    assert not missing, f"routes missing from proxy/api/openapi.py: {missing}"
    error = OPENAPI["paths"]["/prompt"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}
    assert set(OPENAPI["components"]["schemas"]["Error"]["properties"]["error"]["required"]) == {
        "type", "message", "details", "extra_info"}


# --- the live farm --------------------------------------------------------------------------------------
def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


class Farm:
    def __init__(self, url: str, proxy: subprocess.Popen[bytes], log: Path, sims: list[subprocess.Popen[bytes]]):
        self.url, self.proxy, self.log, self.sims = url, proxy, log, sims
        self.statuses: dict[str, Counter[int]] = {}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    tmp = tmp_path_factory.mktemp("fuzz")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backends = []
        for name in ("fuzz-a", "fuzz-b"):
            port = free_port()
            proc = _spawn(["sim", "--port", str(port), "--name", name, "--step-ms", "2",
                           "--base-dir", str(tmp / name)], tmp / f"{name}.log")
            procs.append(proc)
            backends.append({"name": name, "url": f"http://127.0.0.1:{port}"})
        for proc, backend in zip(procs, backends, strict=True):
            _wait_http(backend["url"] + "/system_stats", proc)
        port = free_port()
        config = {
            "server": {"port": port, "max_body_mb": 2}, "backends": backends,
            "uploads": {"dir": str(tmp / "uploads")}, "auth": {"required": True},
            "workflows": {"dir": str(Path(__file__).parent.parent / "config" / "workflows")},
            "tenants": [{"name": "fuzzer", "api_keys": [USER_KEY], "quota": {"max_queued": 5}},
                        {"name": "root", "api_keys": [ADMIN_KEY], "role": "admin"}],
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        log = tmp / "proxy.log"
        proxy = _spawn(["--log-level", "warning", "serve", "--config", str(tmp / "config.yaml")], log)
        procs.append(proxy)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/proxy/readyz", proxy)
        yield Farm(url, proxy, log, procs[:2])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_live_document_is_this_one(farm: Farm) -> None:
    answer = requests.get(farm.url + "/proxy/openapi.json", headers={"X-API-Key": USER_KEY}, timeout=5)
    assert answer.status_code == 200 and answer.json() == json.loads(json.dumps(OPENAPI))


# The `/api` twins are the same handlers under another prefix: fuzzing them again doubles the time only.
schema = schemathesis.openapi.from_dict(OPENAPI).exclude(path_regex=r"^/api/")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_5xx_for_any_request(case: schemathesis.Case, farm: Farm) -> None:
    # Most cases as a plain tenant; admin routes also as the admin, so their handlers run past the 403.
    key = ADMIN_KEY if case.path.startswith("/proxy/") else USER_KEY
    response = case.call_and_validate(base_url=farm.url, headers={"Authorization": f"Bearer {key}"},
                                      checks=[not_a_server_error], timeout=30)
    farm.statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1


def test_nothing_crashed(farm: Farm) -> None:
    """After the fuzzing (tests run in file order): every process is alive and nothing was unhandled."""
    assert farm.proxy.poll() is None and all(sim.poll() is None for sim in farm.sims)
    assert requests.get(farm.url + "/proxy/healthz", timeout=5).status_code == 200
    logged = farm.log.read_text(errors="replace")
    assert "unhandled_error" not in logged and "Traceback" not in logged, logged[-4000:]
    # The key got the requests past authentication: every operation's handler answered something else.
    assert farm.statuses and all(set(seen) - {401} for seen in farm.statuses.values()), farm.statuses
