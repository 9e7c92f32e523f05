"""Completion webhooks (proxy.webhooks): signed as Standard Webhooks says, checked against the
`standardwebhooks` package by every receiver here; delivered at least once with one `webhook-id` through
failures, a receiver that is down, and a replica killed mid-delivery; URLs refused at admission and
addresses refused again at delivery; one slow receiver holds up no other; operators list and redeliver."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import AuthConfig, DnsConfig, TenantConfig, TenantWebhook, WebhooksConfig, parse_config
from proxy.config_reader import ConfigError
from tests.client import ComfyClient, run_failing, txt2img
from tests.conftest import free_port, serving, wait_until
from tests.webhooks import HANG, DnsServer, Receiver, new_secret

SECRET = new_secret()


def hooks(secret: str | None = SECRET, **more: Any) -> WebhooksConfig:
    """Fast retries for tests; receivers on loopback allowed unless a test says otherwise."""
    settings: dict[str, Any] = {"secret": secret, "allow_cidrs": ("127.0.0.0/8",), "retry_base_s": 0.05,
                                "retry_cap_s": 0.5, "timeout_s": 2.0}
    return WebhooksConfig(**(settings | more))


def webhook(url: str, *events: str) -> dict[str, Any]:
    return {"extra_data": {"webhook": {"url": url, **({"events": list(events)} if events else {})}}}


async def job_webhook(client: ComfyClient, pid: str) -> dict[str, Any] | None:
    status, job = await client.get(f"/api/jobs/{pid}")
    assert status == 200, job
    return job.get("webhook")


@pytest.fixture
async def receivers():
    started: list[Receiver] = []

    async def start(secret: str = SECRET, **kw: Any) -> Receiver:
        receiver = await Receiver(secret, **kw).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


async def test_a_delivery_is_signed_and_retried_with_one_id_until_taken(sims, proxies, receivers) -> None:
    receiver = await receivers(script=[500, 500, 500])
    proxy = await proxies([await sims("alpha")], webhooks=hooks())
    async with ComfyClient(proxy.url) as client, aiohttp.ClientSession() as plain:
        pid = await client.queue_prompt(txt2img(seed=1), **webhook(receiver.url, "job.completed"))
        got = await receiver.wait_for(4)
        assert [r.answer for r in got] == [500, 500, 500, 200]
        assert len({r.id for r in got}) == 1 and all(r.verified for r in got)   # the reference implementation
        body = got[-1].body
        assert body["type"] == "job.completed" and body["timestamp"].endswith("Z")
        status, job = await client.get(f"/api/jobs/{pid}")
        data = body["data"]
        assert data["id"] == pid and data["status"] == "completed"
        assert {k: v for k, v in data.items() if k != "outputs"} == {
            k: v for k, v in job.items() if k not in ("outputs", "webhook")}   # the job as /api/jobs/{id} has it
        [image] = [item for ui in data["outputs"].values() for item in ui["images"]]
        view = await client.get_bytes("/view", filename=image["filename"], subfolder=image["subfolder"],
                                      type=image["type"])
        async with plain.get(image["link"]) as resp:   # the link works without a key
            assert (resp.status, await resp.read()) == (200, view[1])

        async def delivered() -> bool:
            return await job_webhook(client, pid) == {"status": "delivered", "attempts": 4, "last_error": None,
                                                      "event": "job.completed"}
        await wait_until(delivered, what="the job's webhook state")
        assert len(receiver.got) == 4


async def test_a_receiver_down_for_twenty_seconds_gets_the_delivery_after(sims, proxies, receivers) -> None:
    port = free_port()
    proxy = await proxies([await sims("alpha")], webhooks=hooks(retry_cap_s=2.0, max_attempts=100))
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=2), **webhook(f"http://127.0.0.1:{port}/hook",
                                                                    "job.completed"))
        await client.wait_done(pid)
        ended = time.monotonic()

        async def failing() -> bool:
            state = await job_webhook(client, pid)
            return state is not None and state["attempts"] >= 3 and "onnect" in (state["last_error"] or "")
        await wait_until(failing, what="attempts against a receiver that is down")
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - ended)))   # the outage itself, not a sync
        receiver = await receivers(port=port)
        [got] = await receiver.wait_for(1, timeout=10)
        assert got.verified and got.body["data"]["id"] == pid

        async def delivered() -> bool:
            state = await job_webhook(client, pid)
            return state is not None and state["status"] == "delivered"
        await wait_until(delivered, what="delivered after the outage")
        state = await job_webhook(client, pid)
        assert state is not None and state["attempts"] > 3
        assert len(receiver.got) == 1


def _serve(config: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", "--log-level", "warning", "serve", "--config",
                             str(config), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_a_replica_killed_mid_delivery_leaves_it_to_the_other(sims, proxies, receivers, tmp_path: Path,
                                                                   store_config) -> None:
    if store_config.redis_url is None:
        pytest.skip("replicas share an outbox only through Redis")
    receiver = await receivers(script=[HANG])   # the first attempt never gets an answer
    backend = await sims("alpha")
    port = free_port()
    config = {"backends": [{"name": backend.name, "url": backend.url}],
              "redis": {"url": store_config.redis_url}, "store": {"key_prefix": store_config.key_prefix},
              "scheduler": {"poll_interval_s": 0.2}, "outputs": {"dir": str(tmp_path / "file-store")},
              "webhooks": {"secret": SECRET, "allow_cidrs": ["127.0.0.0/8"], "retry_base_s": 0.05,
                           "retry_cap_s": 0.5, "timeout_s": 2.0}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    first = _serve(tmp_path / "a.yaml", port)
    try:
        await serving(f"http://127.0.0.1:{port}", what="replica A")
        # B starts second: A holds the backend's socket, so A ends the prompt and makes the first attempt
        second = await proxies([backend], webhooks=hooks())
        async with ComfyClient(second.url) as client:
            pid = await client.queue_prompt(txt2img(seed=3), **webhook(receiver.url, "job.completed"))
            [held] = await receiver.wait_for(1)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            got = await receiver.wait_for(2, timeout=30)   # B claims it once A's lease lapses
            assert [r.id for r in got] == [held.id, held.id] and all(r.verified for r in got)
            assert got[1].body["data"]["id"] == pid and got[1].body["data"]["status"] == "completed"

            async def delivered() -> bool:
                state = await job_webhook(client, pid)
                return state is not None and state["status"] == "delivered"
            await wait_until(delivered, what="delivered by replica B")
            assert len(receiver.got) == 2
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


BAD_URLS = {
    "http://127.0.0.1:9/hook": "loopback",
    "http://10.1.2.3/hook": "private",
    "http://169.254.169.254/latest/meta-data/": "link-local",
    "http://[::1]/hook": "loopback",
    "http://[::ffff:10.0.0.1]/hook": "private",
    "http://[64:ff9b::a9fe:a9fe]/": "IPv4-translating",   # the metadata service behind NAT64
    "http://[2002:a9fe:a9fe::]/": "IPv4-translating",     # ... behind 6to4
    "http://0.0.0.0:8188/": "unspecified",
    "http://2130706433/hook": "canonical",
    "file:///etc/passwd": "http and https",
    "ftp://example.com/x": "http and https",
    "https://example.com/" + "a" * 2048: "2048",
    "http://user:pw@example.com/": "credentials",
    "https://no-such-name.invalid/hook": "does not resolve",
}


async def test_webhook_urls_are_checked_at_admission(sims, proxies) -> None:
    backend = await sims("alpha")
    strict = await proxies([backend], webhooks=hooks(allow_cidrs=()))
    async with ComfyClient(strict.url) as client:
        for url, why in BAD_URLS.items():
            status, body = await client.post("/prompt", {"prompt": txt2img(seed=4), **webhook(url)})
            assert status == 400, url
            assert set(body) == {"error", "node_errors"} and body["node_errors"] == {}
            assert body["error"]["type"] == "invalid_prompt" and body["error"]["message"] == "Invalid webhook"
            assert why in body["error"]["details"], (url, body)
        for shape in ({"url": 5}, ["http://x"], {"url": "https://example.com/", "events": ["job.exploded"]},
                      {"url": "https://example.com/", "events": []}):
            status, body = await client.post("/prompt", {"prompt": txt2img(seed=4),
                                                         "extra_data": {"webhook": shape}})
            assert status == 400 and body["error"]["message"] == "Invalid webhook", shape
        status, queue = await client.get("/queue")
        assert queue["queue_running"] == [] and queue["queue_pending"] == []   # nothing was admitted
    allowed = await proxies([backend], webhooks=hooks(allow_cidrs=("127.0.0.1/32",)))
    async with ComfyClient(allowed.url) as client:
        status, _ = await client.post("/prompt", {"prompt": txt2img(seed=5), **webhook("http://127.0.0.1:9/hook")})
        assert status == 200
        status, body = await client.post("/prompt", {"prompt": txt2img(seed=5), **webhook("http://127.0.0.2:9/")})
        assert status == 400 and "loopback" in body["error"]["details"]
    unsigned = await proxies([backend], webhooks=hooks(secret=None, allow_private=True))
    async with ComfyClient(unsigned.url) as client:
        status, body = await client.post("/prompt", {"prompt": txt2img(seed=6), **webhook("http://10.1.2.3/")})
        assert status == 400 and "no signing secret" in body["error"]["details"]


async def test_a_name_that_turns_private_after_admission_is_not_called(sims, proxies, receivers,
                                                                      tmp_path: Path) -> None:
    dns = DnsServer(tmp_path / "dns", free_port()).start()
    try:
        await dns.point("hooks.farm.test", "127.0.0.1")
        port = free_port()
        good = await receivers(port=port)
        inside = await receivers(host="127.0.0.2", port=port)   # the same port on an address not allowed
        backend = await sims("alpha", step_ms=20)
        proxy = await proxies([backend], webhooks=hooks(allow_cidrs=("127.0.0.1/32",), retry_cap_s=0.3,
                                                        max_attempts=100),
                              dns=DnsConfig(nameservers=(dns.nameserver,)))
        async with ComfyClient(proxy.url) as client:
            await client.connect()
            pid = await client.queue_prompt(txt2img(seed=7, steps=20),
                                            **webhook(f"http://hooks.farm.test:{port}/hook", "job.completed"))
            await dns.point("hooks.farm.test", "127.0.0.2")   # after admission, before the end
            await client.wait_done(pid)

            async def refused() -> bool:
                state = await job_webhook(client, pid)
                return state is not None and state["attempts"] >= 2
            await wait_until(refused, what="attempts refused at delivery")
            state = await job_webhook(client, pid)
            assert state is not None and state["status"] == "pending"
            assert "hooks.farm.test resolves to a loopback address (127.0.0.2)" in state["last_error"]
            assert inside.got == [] and good.got == []   # never called
            await dns.point("hooks.farm.test", "127.0.0.1")
            [got] = await good.wait_for(1)
            assert got.verified and got.body["data"]["id"] == pid and inside.got == []
    finally:
        dns.stop()


async def test_gone_stops_and_given_up_deliveries_can_be_delivered_again(sims, proxies, receivers) -> None:
    alice_secret = new_secret()
    tenants = (TenantConfig(name="alice", api_keys=("alice-key",), webhook=TenantWebhook(secret=alice_secret)),
               TenantConfig(name="ops", api_keys=("ops-key",), role="admin"))
    gone = await receivers(alice_secret, script=[410])
    failing = await receivers(alice_secret, script=[500, 503])
    proxy = await proxies([await sims("alpha")], tenants=tenants, auth=AuthConfig(required=True),
                          webhooks=hooks(secret=None, max_attempts=2))
    async with ComfyClient(proxy.url, headers={"X-API-Key": "alice-key"}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": "ops-key"}) as ops:
        stopped = await alice.queue_prompt(txt2img(seed=8), **webhook(gone.url, "job.completed"))
        given_up = await alice.queue_prompt(txt2img(seed=9), **webhook(failing.url, "job.completed"))

        async def settled() -> bool:
            return ((await job_webhook(alice, stopped)) or {}).get("status") == "stopped" and \
                ((await job_webhook(alice, given_up)) or {}).get("status") == "failed"
        await wait_until(settled, what="410 stops, two failures give up")
        assert len(gone.got) == 1 and len(failing.got) == 2
        assert (await job_webhook(alice, given_up)) == {"status": "failed", "attempts": 2, "last_error": "HTTP 503",
                                                        "event": "job.completed"}
        assert (await alice.get("/proxy/webhooks/failed"))[0] == 403
        status, listed = await ops.get("/proxy/webhooks/failed")
        assert status == 200 and [d["prompt_id"] for d in listed["deliveries"]] == [given_up]
        [failed] = listed["deliveries"]
        assert (failed["status"], failed["tenant"], failed["url"]) == ("failed", "alice", failing.url)
        assert (await alice.post(f"/proxy/webhooks/{failed['id']}/redeliver"))[0] == 403
        assert (await ops.post("/proxy/webhooks/msg_nope/redeliver"))[0] == 404
        status, again = await ops.post(f"/proxy/webhooks/{failed['id']}/redeliver")
        assert status == 200 and again["status"] == "pending"
        got = await failing.wait_for(3)
        assert got[2].answer == 200 and got[2].verified and {r.id for r in got} == {failed["id"]}

        async def delivered() -> bool:
            return ((await job_webhook(alice, given_up)) or {}).get("status") == "delivered"
        await wait_until(delivered, what="the redelivery")
        assert (await ops.get("/proxy/webhooks/failed"))[1]["deliveries"] == []


async def test_tenant_webhooks_hear_every_event_signed_with_their_own_secret(sims, proxies, receivers) -> None:
    alice_secret, bob_secret = new_secret(), new_secret()
    alice_hook = await receivers(alice_secret)
    bob_hook = await receivers(bob_secret)
    wrong = await receivers(alice_secret)   # gets bob's deliveries: alice's secret must not verify them
    tenants = (TenantConfig(name="alice", api_keys=("alice-key",),
                            webhook=TenantWebhook(url=alice_hook.url, secret=alice_secret)),
               TenantConfig(name="bob", api_keys=("bob-key",), webhook=TenantWebhook(secret=bob_secret)))
    tenants += (TenantConfig(name="carol", api_keys=("carol-key",)),)   # no secret of her own
    backend = await sims("alpha", step_ms=20)
    proxy = await proxies([backend], tenants=tenants, auth=AuthConfig(required=True), webhooks=hooks())
    async with ComfyClient(proxy.url, headers={"X-API-Key": "alice-key"}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": "bob-key"}) as bob, \
            ComfyClient(proxy.url, headers={"X-API-Key": "carol-key"}) as carol:
        # the farm's secret is not lent to tenants: every receiver of one secret could forge for the others
        status, body = await carol.post("/prompt", {"prompt": txt2img(seed=9), **webhook(bob_hook.url)})
        assert status == 400 and "no signing secret" in body["error"]["details"]
        await alice.connect()
        done = await alice.queue_prompt(txt2img(seed=10))   # no webhook named: alice's default
        await alice.wait_done(done)
        failed = await run_failing(alice, backend.url, txt2img(seed=11))
        slow = [await alice.queue_prompt(txt2img(seed=20 + i, steps=400)) for i in range(3)]
        states: dict[str, str] = {}

        async def one_running() -> bool:   # the backend runs one; one waits there, one in the proxy's queue
            for pid in slow:
                states[pid] = (await alice.get(f"/api/jobs/{pid}"))[1]["status"]
            return "in_progress" in states.values()
        await wait_until(one_running, what="a prompt running")
        [running] = [pid for pid in slow if states[pid] == "in_progress"]
        for pid in [*(p for p in slow if p != running), running]:   # the waiting ones first, then the one running
            assert (await alice.post(f"/api/jobs/{pid}/cancel"))[1] == {"cancelled": True}
        # a prompt_id used again (its first job was withdrawn) is a new job with deliveries of its own
        reused = slow[-1] if slow[-1] != running else slow[0]
        status, _ = await alice.post("/prompt", {"prompt": txt2img(seed=31), "prompt_id": reused,
                                                 "client_id": alice.client_id})
        assert status == 200
        await alice.wait_done(reused)
        await bob.queue_prompt(txt2img(seed=12), **webhook(bob_hook.url, "job.completed"))
        await bob.queue_prompt(txt2img(seed=13), **webhook(wrong.url, "job.completed"))
        # done: started + completed; failed: started + failed; running: started + cancelled; waiting: cancelled;
        # the reused id's second job: started + completed
        got = await alice_hook.wait_for(10, timeout=30)
        assert all(r.verified for r in got)
        events = sorted((r.body["data"]["id"], r.body["type"]) for r in got)
        assert events == sorted([(done, "job.started"), (done, "job.completed"), (failed, "job.started"),
                                 (failed, "job.failed"), (running, "job.started"),
                                 *((pid, "job.cancelled") for pid in slow),
                                 (reused, "job.started"), (reused, "job.completed")])
        cancelled = {r.body["data"]["id"]: r.body["data"] for r in got if r.body["type"] == "job.cancelled"}
        assert all(job["status"] == "cancelled" for job in cancelled.values())
        [bobs] = await bob_hook.wait_for(1)
        assert bobs.verified and bobs.body["type"] == "job.completed"
        [other] = await wrong.wait_for(1)
        assert not other.verified   # signed with bob's secret, not alice's
        assert len({r.id for r in got}) == 10 and len(alice_hook.got) == 10


def test_a_tenants_default_webhook_needs_its_own_secret() -> None:
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.webhook\.secret: required with webhook\.url"):
        parse_config({"tenants": [{"name": "alice", "webhook": {"url": "https://alice.example/hook"}}]})
    with pytest.raises(ConfigError, match=r"webhooks\.secret: must be whsec_"):
        parse_config({"webhooks": {"secret": "plain-text"}})


async def test_one_slow_receiver_holds_up_no_other(sims, proxies, receivers) -> None:
    slow = await receivers(script=[HANG])
    fast = await receivers()
    proxy = await proxies([await sims("alpha")], webhooks=hooks(per_host=1, timeout_s=20.0))
    async with ComfyClient(proxy.url) as client:
        for seed in range(3):
            await client.queue_prompt(txt2img(seed=40 + seed), **webhook(slow.url, "job.completed"))
        await slow.wait_for(1)
        quick = await client.queue_prompt(txt2img(seed=50), **webhook(fast.url, "job.completed"))
        [got] = await fast.wait_for(1)
        assert got.body["data"]["id"] == quick
        assert len(slow.got) == 1   # its host's one slot is taken: the others wait their turn, not a slot
        slow._held.set()   # the receiver answers at last
        await slow.wait_for(3)
