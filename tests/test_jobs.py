"""ComfyUI's Jobs API over the farm (`/api/jobs`, protocol §17), from the proxy's own records: shapes,
filters, sort, pagination and errors as later ComfyUI gives them, cancelling each kind of job, and
tenants that never see or cancel each other's jobs. Both state stores."""

from __future__ import annotations

import uuid
from typing import Any

from proxy.config import TenantConfig
from tests.client import ComfyClient, txt2img
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
        await client.post_to(backend.url, "/sim/faults", {"error_at_node": "KSampler"})
        failed = await client.queue_prompt(txt2img(seed=2))
        await client.wait_done(failed)
        await client.post_to(backend.url, "/sim/faults", {"error_at_node": None})
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
