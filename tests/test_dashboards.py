"""The operators' view against a real Prometheus: a `prometheus` process scrapes a real proxy every second
while simulated traffic runs through it, then every query of every panel and variable of every dashboard
in dashboards/ is run through Prometheus's HTTP API and must return data, and the alert rules of
deploy/prometheus/alerts.yml must load and evaluate (a backend killed here must make its alert pending).

A panel naming a metric or label the proxy does not export, a PromQL typo, or an event the dashboards
expect but the proxy never counts fails here instead of showing "No data" to an operator. The traffic
makes every panel's event happen (successes on two backends, a queue, invalid prompts, quota refusals,
an execution error, a backend's refusal, a dead backend and the 502 it causes), so no query is padded
with `or vector(0)`.

Needs Debian's `prometheus` on the PATH (.ci/run installs it): without it these tests fail, they do
not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import Quota, TenantConfig, TenantWebhook, WebhooksConfig
from tests import tools
from tests.client import ComfyClient, txt2img
from tests.conftest import free_port, wait_until
from tests.webhooks import Receiver, new_secret

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

NAMED_METRICS = [
    "comfy_proxy_prompts_total", "comfy_proxy_queue_depth", "comfy_proxy_queue_wait_seconds",
    "comfy_proxy_execution_seconds", "comfy_proxy_backend_up", "comfy_proxy_backend_queue_depth",
    "comfy_proxy_backend_inflight", "comfy_proxy_backend_vram_free_bytes", "comfy_proxy_backend_vram_total_bytes",
    "comfy_proxy_http_request_duration_seconds", "comfy_proxy_websocket_clients",
    "comfy_proxy_ws_messages_relayed_total", "comfy_proxy_quota_rejections_total",
    "comfy_proxy_backend_errors_total", "comfy_proxy_store_operation_seconds",
    "comfy_proxy_output_copied_files_total", "comfy_proxy_output_copied_bytes_total",
    "comfy_proxy_output_copy_seconds", "comfy_proxy_output_copy_failures_total",
    "comfy_proxy_output_copy_retries_total", "comfy_proxy_output_copy_backlog", "comfy_proxy_output_store_up",
    "comfy_proxy_output_files_expired_total", "comfy_proxy_output_stored_bytes",
    "comfy_proxy_webhook_attempts_total", "comfy_proxy_webhook_deliveries_total",
    "comfy_proxy_webhook_delivery_seconds", "comfy_proxy_webhook_outbox", "comfy_proxy_webhook_outbox_oldest_seconds",
    "comfy_proxy_pool_prompts_waiting", "comfy_proxy_pool_prompts_running", "comfy_proxy_pool_slots",
    "comfy_proxy_pool_oldest_wait_seconds",
]

# What Grafana would put in place of its built-in variables for a short, freshly scraped range.
BUILTINS = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}
# Dashboard variables are multi-value with allValue ".*" and used as `label=~"$var"`: "All" is ".*".
ALL = ".*"

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
SECRET = new_secret()
TENANTS = (TenantConfig("alice", api_keys=("alice-key",), quota=Quota(max_queued=1)),
           TenantConfig("bob", api_keys=("bob-key",), webhook=TenantWebhook(secret=SECRET)))
INVALID = {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}


# --- reading the dashboards ------------------------------------------------------------------------------
def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows (collapsed rows keep theirs in `panels`)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every panel target."""
    return [(f"{dashboard['title']} / {panel['title']} / {target['refId']}", target["expr"],
             target.get("legendFormat", "")) for panel in panels(dashboard) for target in panel.get("targets", [])]


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def expand(expr: str, dashboard_vars: set[str]) -> str:
    """Grafana's substitution as a browser would send it with every variable at "All"."""
    def sub(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in dashboard_vars:
            return ALL
        raise AssertionError(f"{expr!r} uses ${name}, which is neither a dashboard variable nor a built-in")
    return _VAR.sub(sub, expr)


def label_values_query(var: dict[str, Any]) -> tuple[str | None, str]:
    """`label_values(selector, label)` or `label_values(label)` → (selector or None, label)."""
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    match = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*", query)
    assert match, f"variable {var['name']}: only label_values(...) queries are supported here, got {query!r}"
    return match.group(1), match.group(2)


# --- the dashboards' shape (no Prometheus needed) ------------------------------------------------------
def test_dashboards_are_well_formed() -> None:
    files = dashboard_files()
    assert {p.name for p in files} >= {"farm-overview.json", "backends-and-tenants.json"}
    uids: set[str] = set()
    total = 0
    for path in files:
        board = load(path)
        assert board["uid"] not in uids, f"{path.name}: uid {board['uid']} used twice"
        uids.add(board["uid"])
        assert board.get("title") and board.get("schemaVersion"), path.name
        names = {v["name"] for v in variables(board)}
        ds = [v for v in variables(board) if v["name"] == "datasource"]
        assert ds and ds[0]["type"] == "datasource" and ds[0]["query"] == "prometheus", \
            f"{path.name}: needs a `datasource` variable of type datasource over prometheus"
        for var in variables(board):
            if var["type"] == "query":
                assert var["datasource"] == DATASOURCE, f"{path.name}: variable {var['name']} datasource"
                assert not var.get("includeAll") or var.get("allValue") == ALL, \
                    f"{path.name}: variable {var['name']}: 'All' must be {ALL!r} for =~ matchers"
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            where = f"{path.name} / {panel['title']}"
            assert panel.get("description"), f"{where}: say what the panel shows"
            assert panel["datasource"] == DATASOURCE, f"{where}: datasource must be ${{datasource}}"
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"][
                "w"] <= 24, f"{where}: gridPos"
            targets = panel.get("targets", [])
            assert targets, f"{where}: no query"
            assert len({t["refId"] for t in targets}) == len(targets), f"{where}: refIds repeat"
            for target in targets:
                assert target["datasource"] == DATASOURCE, f"{where}: target datasource"
                assert "or vector(" not in target["expr"], f"{where}: make the event happen instead"
                expand(target["expr"], names)  # every variable it names exists
        total += len(queries(board))
    assert total >= 10, f"only {total} queries across the dashboards"


def test_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    prov = DASHBOARDS / "provisioning"
    sources = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "comfy-proxy.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --- a real Prometheus over a proxy under load ----------------------------------------------------------
@pytest.fixture
def store_kind() -> str:
    """One store is enough: the dashboards read metrics, not the store."""
    return "memory"


def prometheus_binary() -> str:
    return tools.tool("prometheus")  # the dashboards are tested against a real one


@contextlib.asynccontextmanager
async def prometheus(binary: str, tmp_path: Path, target_url: str) -> AsyncIterator[str]:
    """A Prometheus on a free loopback port scraping `target_url` every second, with the alert rules."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "comfy-proxy",
                            "static_configs": [{"targets": [target_url.removeprefix("http://")]}]}],
    }))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=log, stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/-/ready") as resp:
                        return resp.status == 200
                return False
            await wait_until(ready, timeout=20, what="prometheus to be ready")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def prom_get(session: aiohttp.ClientSession, url: str, path: str, **params: str) -> Any:
    async with session.get(url + path, params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]


async def make_traffic(proxy_url: str, alpha: Any, beta: Any, hook: Receiver) -> None:
    """Every event a panel shows: a queue, successes on both backends, previews, invalid prompts, quota
    refusals, an execution error, a backend's refusal, webhook deliveries (one retried), then a dead
    backend and the 502 it causes."""
    async with (ComfyClient(proxy_url, headers=BOB) as bob, ComfyClient(proxy_url, headers=BOB) as bob2,
                ComfyClient(proxy_url, headers=BOB) as idle, ComfyClient(proxy_url, headers=ALICE) as alice):
        for client in (bob, bob2, idle, alice):
            await client.connect()
        # 16 prompts for 4 slots: the proxy queues the rest, and the sampler sees the queue.
        pids = [await (bob if i % 2 else bob2).queue_prompt(with_preview(txt2img(seed=i, steps=8)))
                for i in range(16)]

        async def queue_sampled() -> bool:
            _, text = await bob.get("/metrics")
            return 'comfy_proxy_queue_depth{tenant="bob"}' in text
        await wait_until(queue_sampled, what="the queue depth gauge for bob")
        for i, pid in enumerate(pids):
            await (bob if i % 2 else bob2).wait_done(pid, timeout=30)

        # A webhook that fails once, then takes it.
        hooked = await bob.queue_prompt(txt2img(seed=50), extra_data={"webhook": {"url": hook.url}})
        await bob.wait_done(hooked)
        await hook.wait_for(3)   # job.started, then job.completed twice (a 500, then 200)

        # Quota: alice may have one prompt in the farm at a time.
        first = await alice.queue_prompt(txt2img(seed=100, steps=8))
        refused = [(await alice.post("/prompt", {"prompt": txt2img(seed=101), "client_id": alice.client_id}))[0]
                   for _ in range(2)]
        assert 429 in refused, refused
        await alice.wait_done(first)

        # Invalid workflows and bodies: 400 at admission.
        assert (await bob.post("/prompt", INVALID))[0] == 400
        assert (await bob.post("/prompt", raw=b"{not json"))[0] == 400

        # An execution error, then a backend that refuses the prompt (400 at dispatch).
        for fault in ({"error_at_node": "SaveImage"}, {"reject_prompts": True}):
            for sim in (alpha, beta):
                assert await bob.post_to(sim.url, "/sim/faults", fault) == 200
            pid = await bob.queue_prompt(txt2img(seed=200))
            await bob.wait_for(lambda f, pid=pid: f.type == "execution_error" and f.text["data"]["prompt_id"] == pid)
            for sim in (alpha, beta):
                assert await bob.post_to(sim.url, "/sim/faults", {"reset": True}) == 200

        # A preview of beta's, then beta dies: its preview answers 502 and its polls fail. (Previews stay on
        # their backend; saved outputs are copied into the file store and outlive it.)
        beta_preview = await _output_of(bob, beta, "temp")
        assert (await bob.get_bytes("/view", **beta_preview))[0] == 200
        await beta.close()
        assert (await bob.get_bytes("/view", **beta_preview))[0] == 502


def with_preview(prompt: dict[str, Any]) -> dict[str, Any]:
    """The graph with a PreviewImage of its decoded image beside the SaveImage: a `temp` file."""
    return {**prompt, "10": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}


async def _output_of(client: ComfyClient, sim: Any, kind: str = "output") -> dict[str, str]:
    """/view parameters of an image that `sim` made: the backend's own history names the prompts it ran
    (the proxy submits under the client's prompt_id), the proxy's history gives the reference."""
    assert client.session is not None
    async with client.session.get(sim.url + "/history") as resp:
        ran = list(await resp.json())
    for pid in ran:
        _, hist = await client.get(f"/history/{pid}")
        images = [img for out in (hist.get(pid) or {}).get("outputs", {}).values() for img in out.get("images", [])
                  if img["type"] == kind]
        if images:
            return {k: images[0][k] for k in ("filename", "subfolder", "type")}
    raise AssertionError(f"no {kind} image of {sim.name}'s in the proxy's history")


async def test_every_panel_query_returns_data(sims: Any, proxies: Any, tmp_path: Path) -> None:
    binary = prometheus_binary()
    alpha = await sims("alpha", step_ms=25)
    beta = await sims("beta", step_ms=25)
    hook = await Receiver(SECRET, script=[200, 500]).start()
    proxy = await proxies([alpha, beta], tenants=TENANTS,
                          webhooks=WebhooksConfig(allow_cidrs=("127.0.0.0/8",), retry_base_s=0.05))
    async with prometheus(binary, tmp_path, proxy.url) as prom, aiohttp.ClientSession() as session:
        try:
            await make_traffic(proxy.url, alpha, beta, hook)
        finally:
            await hook.stop()
        await assert_named_metrics_exported(session, proxy.url)
        await assert_panel_queries_return_data(session, prom)
        await assert_variables_list_the_traffic(session, prom)
        await assert_alert_rules_evaluate(session, prom)


async def assert_named_metrics_exported(session: aiohttp.ClientSession, proxy_url: str) -> None:
    """Every metric the operators' issue names is exported, with samples, after the traffic (shared-state
    gauges such as stored bytes per tenant appear at the sampler's next round, so within a deadline)."""
    missing: list[str] = []

    async def all_sampled() -> bool:
        async with session.get(proxy_url + "/metrics") as resp:
            exported = await resp.text()
        missing[:] = [name for name in NAMED_METRICS
                      if not re.search(rf"^{name}(_bucket|_total)?[{{ ]", exported, re.M)]
        return not missing
    with contextlib.suppress(AssertionError):  # the deadline: what is still missing is reported below
        await wait_until(all_sampled, timeout=10)
    assert not missing, f"metrics without samples after real traffic: {missing}"


async def assert_panel_queries_return_data(session: aiohttp.ClientSession, prom: str) -> None:
    """Every panel query returns data, and its legend names only labels every series carries."""
    pending: dict[str, str] = {}
    legends: dict[str, set[str]] = {}
    for path in dashboard_files():
        board = load(path)
        names = {v["name"] for v in variables(board)}
        for where, expr, legend in queries(board):
            pending[where] = expand(expr, names)
            legends[where] = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    assert len(pending) >= 10
    results, errors = await run_until_data(session, prom, pending)
    assert not errors, "queries Prometheus refused:\n" + "\n".join(f"  {w}: {e}" for w, e in errors.items())
    assert not pending, "queries that returned no data:\n" + "\n".join(
        f"  {where}: {expr}" for where, expr in pending.items())
    # The legend names labels every series of the result carries (a wrong `by (...)` shows here).
    unlabelled = [f"  {where}: legend {sorted(legends[where])}, series labels {sorted(series['metric'])}"
                  for where, result in results.items() for series in result
                  if not legends[where] <= set(series["metric"])]
    assert not unlabelled, "legends naming labels the query does not keep:\n" + "\n".join(unlabelled)


async def run_until_data(session: aiohttp.ClientSession, prom: str, pending: dict[str, str]
                         ) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Runs the `pending` queries until each has data or an error, for up to 30 s: (results, errors).
    A query leaves `pending` when it has either; what is left at the deadline had neither."""
    results: dict[str, list[Any]] = {}
    errors: dict[str, str] = {}

    async def all_have_data() -> bool:
        for where, expr in list(pending.items()):
            async with session.get(prom + "/api/v1/query", params={"query": expr}) as resp:
                body = await resp.json()
            if body["status"] != "success":  # a PromQL error never turns into data: report it now
                errors[where] = f"{expr}: {body.get('error')}"
                del pending[where]
            elif body["data"]["result"]:
                results[where] = body["data"]["result"]
                del pending[where]
        return not pending
    with contextlib.suppress(AssertionError):  # the deadline: what is still pending is reported by the caller
        await wait_until(all_have_data, timeout=30)
    return results, errors


async def assert_variables_list_the_traffic(session: aiohttp.ClientSession, prom: str) -> None:
    """Variables: each lists the values the traffic produced."""
    expected = {"backend": {"alpha", "beta"}, "tenant": {"alice", "bob"}}
    for path in dashboard_files():
        for var in variables(load(path)):
            if var["type"] != "query":
                continue
            selector, label = label_values_query(var)
            params = {"match[]": selector} if selector else {}
            values = set(await prom_get(session, prom, f"/api/v1/label/{label}/values", **params))
            assert expected.get(var["name"], set()) <= values and values, (var["name"], values)


async def assert_alert_rules_evaluate(session: aiohttp.ClientSession, prom: str) -> None:
    """Alert rules: loaded, evaluated without error, and the dead backend's alert is on its way."""
    async def rules_evaluated() -> bool:
        groups = (await prom_get(session, prom, "/api/v1/rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not bad, bad
        return bool(rules) and all(r["health"] == "ok" for r in rules)
    await wait_until(rules_evaluated, timeout=15, what="every alert rule to evaluate")

    async def beta_alert() -> bool:
        alerts = (await prom_get(session, prom, "/api/v1/alerts"))["alerts"]
        return any(a["labels"].get("alertname") == "ComfyProxyBackendDown"
                   and a["labels"].get("backend") == "beta" and a["state"] in ("pending", "firing")
                   for a in alerts)
    await wait_until(beta_alert, timeout=15, what="ComfyProxyBackendDown for beta")
