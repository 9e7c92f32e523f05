"""ComfyUI's Jobs API over the farm (`/api/jobs`, protocol §17), from the proxy's own records: shapes,
filters, sort, pagination and errors as later ComfyUI gives them, cancelling each kind of job, and
tenants that never see or cancel each other's jobs. Both state stores."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from proxy.config import TenantConfig
from proxy.relay import jobevents
from tests.client import ComfyClient, run_failing, txt2img
from tests.conftest import wait_until

SUMMARY_KEYS = {"id", "status", "priority", "create_time", "outputs_count", "previewable_outputs_count"}
FINISHED_KEYS = SUMMARY_KEYS | {"execution_start_time", "execution_end_time", "preview_output"}
ALICE, BOB = "alice-key", "bob-key"
TENANTS = (TenantConfig("alice", api_keys=(ALICE,)), TenantConfig("bob", api_keys=(BOB,)))


def with_workflow(workflow_id: str) -> dict[str, Any]:
    """The editor's way of naming its workflow: `extra_pnginfo.workflow.id` (ComfyUI's `workflow_id`)."""
    return {"extra_data": {"extra_pnginfo": {"workflow": {"id": workflow_id, "nodes": []}}}}


async def state_of(client: ComfyClient, pid: str) -> str:
    return (await client.get(f"/api/jobs/{pid}"))[1]["status"]


async def test_jobs_list_and_detail_follow_later_comfyui(sims, proxies) -> None:
    backend = await sims("alpha", step_ms=20)
    proxy = await proxies([backend])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        done = await client.queue_prompt(txt2img(seed=1), **with_workflow("wf-1"))
        await client.wait_done(done)
        failed = await run_failing(client, backend.url, txt2img(seed=2))
        slow = [await client.queue_prompt(txt2img(seed=10 + i, steps=400)) for i in range(3)]

        async def one_running() -> bool:
            return await state_of(client, slow[0]) == "in_progress"
        await wait_until(one_running, what="the first slow prompt running")

        status, page = await client.get("/api/jobs")
        assert status == 200 and set(page) == {"jobs", "pagination"}
        jobs = {j["id"]: j for j in page["jobs"]}
        assert page["pagination"] == {"offset": 0, "limit": None, "total": 5, "has_more": False}
        assert [j["id"] for j in page["jobs"]][-2:] == [failed, done]   # newest first
        assert jobs[done]["status"] == "completed" and jobs[failed]["status"] == "failed"
        assert jobs[slow[0]]["status"] == "in_progress" and jobs[slow[2]]["status"] == "pending"
        assert set(jobs[done]) == FINISHED_KEYS | {"workflow_id"} and jobs[done]["workflow_id"] == "wf-1"
        assert jobs[done]["outputs_count"] == 1 == jobs[done]["previewable_outputs_count"]
        preview = jobs[done]["preview_output"]
        assert preview["nodeId"] == "9" and preview["mediaType"] == "images" and preview["type"] == "output"
        assert jobs[done]["execution_end_time"] >= jobs[done]["execution_start_time"] >= jobs[done]["create_time"]
        assert set(jobs[failed]) >= {"execution_error"} and jobs[failed]["execution_error"]["node_type"] == "KSampler"
        assert set(jobs[slow[2]]) == SUMMARY_KEYS   # queued: no times, no outputs, pruned

        detail = (await client.get(f"/api/jobs/{done}"))[1]
        assert {k: v for k, v in detail.items() if k in jobs[done]} == jobs[done]
        history = (await client.get(f"/history/{done}"))[1][done]
        assert detail["outputs"] == history["outputs"] and detail["execution_status"] == history["status"]
        assert detail["workflow"] == {"prompt": history["prompt"][2], "extra_data": history["prompt"][3]}
        assert await client.get("/api/jobs/" + str(uuid.uuid4())) == (404, {"error": "Job not found"})
        assert (await client.get(f"/api/api/jobs/{done}"))[1] == detail   # ComfyUI registers it under /api

        # filters, sort, pagination
        assert [j["id"] for j in (await client.get("/api/jobs", status="completed,failed"))[1]["jobs"]] == [
            failed, done]
        assert [j["id"] for j in (await client.get("/api/jobs", workflow_id="wf-1"))[1]["jobs"]] == [done]
        assert [j["id"] for j in (await client.get("/api/jobs", sort_order="asc"))[1]["jobs"]][:2] == [done, failed]
        by_duration = (await client.get("/api/jobs", sort_by="execution_duration", status="completed,failed"))[1]
        spans = [j["execution_end_time"] - j["execution_start_time"] for j in by_duration["jobs"]]
        assert len(spans) == 2 and spans == sorted(spans, reverse=True)
        window = (await client.get("/api/jobs", limit="2", offset="1"))[1]
        assert window["pagination"] == {"offset": 1, "limit": 2, "total": 5, "has_more": True}
        assert len(window["jobs"]) == 2
        for params in ({"status": "done"}, {"sort_by": "name"}, {"sort_order": "up"}, {"limit": "0"},
                       {"limit": "x"}, {"offset": "-1"}):
            status, body = await client.get("/api/jobs", **params)
            assert status == 400 and isinstance(body["error"], str), params

        # cancelling each kind of job
        assert await client.post(f"/api/jobs/{slow[2]}/cancel") == (200, {"cancelled": True})   # pending
        assert await client.post(f"/api/jobs/{slow[0]}/cancel") == (200, {"cancelled": True})   # running
        assert await client.post(f"/api/jobs/{done}/cancel") == (200, {"cancelled": False})      # finished
        await client.wait_done(slow[0])
        assert await state_of(client, slow[0]) == "cancelled"
        assert (await client.get(f"/api/jobs/{slow[2]}"))[0] == 404   # dequeued: never runs, never in history
        assert await client.post("/api/jobs/cancel", {"job_ids": [slow[1], done]}) == (200, {"cancelled": True})
        for bad in ({}, {"job_ids": []}, {"job_ids": "x"}, {"job_ids": [1]}):
            status, body = await client.post("/api/jobs/cancel", bad)
            assert status == 400 and "error" in body, bad


async def test_tenants_never_see_or_cancel_each_others_jobs(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha", step_ms=20)], tenants=TENANTS)
    async with ComfyClient(proxy.url, headers={"X-API-Key": ALICE}) as alice, \
            ComfyClient(proxy.url, headers={"X-API-Key": BOB}) as bob:
        await alice.connect()
        mine = await alice.queue_prompt(txt2img(seed=1, steps=400))
        assert (await bob.get("/api/jobs"))[1]["jobs"] == []
        assert await bob.get(f"/api/jobs/{mine}") == (404, {"error": "Job not found"})
        assert (await bob.post(f"/api/jobs/{mine}/cancel"))[0] == 404
        assert await bob.post("/api/jobs/cancel", {"job_ids": [mine]}) == (200, {"cancelled": False})
        assert await state_of(alice, mine) in ("pending", "in_progress")
        assert [j["id"] for j in (await alice.get("/api/jobs"))[1]["jobs"]] == [mine]
        assert (await alice.post(f"/api/jobs/{mine}/cancel"))[1] == {"cancelled": True}


# --- server-sent events -----------------------------------------------------------------------------

async def sse(url: str, headers: dict[str, str], *, stop_after: int | None = None) -> list[tuple[str, str, Any]]:
    """(id, event, data) of a job's stream, read by httpx-sse (an independent implementation); with
    `stop_after`, the reader hangs up after that many events."""
    got: list[tuple[str, str, Any]] = []
    async with httpx.AsyncClient(timeout=30) as client, aconnect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            got.append((event.id, event.event, json.loads(event.data)))
            if stop_after is not None and len(got) >= stop_after:
                break
    return got


async def test_a_job_is_followed_over_server_sent_events_and_resumed_without_gaps(sims, proxies, store_kind) -> None:
    backend = await sims("alpha", step_ms=15)
    one = await proxies([backend], tenants=TENANTS)
    other = await proxies([backend], tenants=TENANTS) if store_kind == "redis" else one
    key = {"X-API-Key": ALICE}
    async with ComfyClient(one.url, headers=key) as alice:
        status, body = await alice.post("/prompt", {"prompt": txt2img(seed=1, steps=30)})   # no client_id
        pid = body["prompt_id"]
        first = await sse(f"{one.url}/api/jobs/{pid}/events", key, stop_after=6)
        # hung up mid-run; resumed on the other replica (Redis) from the last id it had
        rest = await sse(f"{other.url}/api/jobs/{pid}/events", {**key, "Last-Event-ID": first[-1][0]})
        whole = await sse(f"{one.url}/api/jobs/{pid}/events", key)   # after the end: the whole job again
    assert first + rest == whole   # every message once, in order, ids and all
    assert [int(i) for i, _, _ in whole] == list(range(1, len(whole) + 1))
    kinds = [kind for _, kind, _ in whole]
    assert kinds[0] == "execution_start" and kinds[-1] == "execution_success"
    assert kinds.count("progress") == 30 and "executed" in kinds
    assert all(data["prompt_id"] == pid for _, _, data in whole)
    executed = next(data for _, kind, data in whole if kind == "executed")
    assert "~" in executed["output"]["images"][0]["filename"]   # the proxy's references, as on the socket
    async with ComfyClient(one.url, headers={"X-API-Key": BOB}) as bob:
        assert await bob.get(f"/api/jobs/{pid}/events") == (404, {"error": "Job not found"})


async def test_the_stream_of_a_job_that_ended_elsewhere_ends_from_history(sims, proxies) -> None:
    """A replica that never saw the job's messages (started after it ended, or its log was dropped) still
    ends the stream, with the terminal message from history."""
    proxy = await proxies([await sims("alpha")])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(seed=2))
        await client.wait_done(pid)
        proxy.services.hub.jobs._logs.clear()   # as if this replica had not been up
        events = await sse(f"{proxy.url}/api/jobs/{pid}/events", {})
    assert [kind for _, kind, _ in events] == ["execution_success"] and events[0][2]["prompt_id"] == pid


def test_job_logs_are_bounded(monkeypatch) -> None:
    """A replica keeps recent jobs' messages only: at most MAX_JOBS logs and MAX_BYTES, ended ones for
    KEEP_ENDED_S; the oldest go first. A payload that is not ComfyUI's JSON is ignored, not fatal."""
    monkeypatch.setattr(jobevents, "MAX_JOBS", 3)
    jobs = jobevents.JobEvents()
    for i in range(5):
        jobs.record("t", "progress", json.dumps({"type": "progress", "data": {"prompt_id": f"p{i}", "value": 1}}))
    jobs.record("t", "progress", "not json")
    assert list(jobs._logs) == ["p2", "p3", "p4"]
    jobs.append("p2", "t", "execution_success", json.dumps({"type": "execution_success", "data": {"prompt_id": "p2"}}))
    assert jobs._logs["p2"].ended_at is not None and [m[0] for m in jobs._logs["p2"].messages] == [1, 2]
    monkeypatch.setattr(jobevents, "KEEP_ENDED_S", -1.0)   # its time is up at the next message
    jobs.record("t", "progress", json.dumps({"type": "progress", "data": {"prompt_id": "p3", "value": 2}}))
    assert list(jobs._logs) == ["p3", "p4"]
    monkeypatch.setattr(jobevents, "MAX_BYTES", 10)
    jobs.append("p5", "t", "progress", json.dumps({"type": "progress", "data": {"prompt_id": "p5", "value": 3}}))
    assert list(jobs._logs) == ["p5"] and jobs._bytes == jobs._logs["p5"].size
