"""Workflow templates: list, describe, run with named inputs, poll the job, download the output."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.app import create_app
from proxy.config import BackendConfig, Config, SchedulerConfig, ServerConfig, WorkflowsConfig
from proxy.services import CONFIG
from proxy.workflows import TemplateError, load_templates, parse_template
from tests.client import ComfyClient, start_proxy
from tests.conftest import TEARDOWN_S, wait_until

TEMPLATES = Path(__file__).parent.parent / "config" / "workflows"


PUBLIC_URL = "https://farm.example/comfy/"


@pytest.fixture(params=[None, PUBLIC_URL], ids=["host-relative", "public-url"])
async def proxy_with_templates(sims, request):  # type: ignore[no-untyped-def]
    sim = await sims("alpha")
    config = Config(backends=(BackendConfig(name="alpha", url=sim.url),), server=ServerConfig(public_url=request.param),
                    scheduler=SchedulerConfig(poll_interval_s=0.2), workflows=WorkflowsConfig(dir=str(TEMPLATES)))
    handle = await start_proxy(create_app(config))
    yield handle
    await asyncio.wait_for(handle.close(), TEARDOWN_S)


async def test_list_describe_run_poll_download(proxy_with_templates) -> None:
    async with ComfyClient(proxy_with_templates.url) as client:
        await client.connect()
        status, listing = await client.get("/proxy/workflows")
        assert status == 200 and {w["name"] for w in listing["workflows"]} == {"portrait", "invert"}
        status, described = await client.get("/proxy/workflows/portrait")
        schema = described["inputs"]
        assert schema["required"] == ["prompt"] and schema["properties"]["seed"] == {
            "type": "integer", "default": 0, "minimum": 0}
        status, run = await client.post("/proxy/workflows/portrait/run",
                                        {"inputs": {"prompt": "a lighthouse", "seed": 42, "steps": 3},
                                         "client_id": client.client_id})
        assert status == 200
        pid = run["prompt_id"]
        await client.wait_done(pid)  # its events reach the socket of the given client_id

        async def completed() -> bool:
            return (await client.get(f"/proxy/jobs/{pid}"))[1]["status"] == "completed"
        await wait_until(completed, what="the job to complete")
        job = (await client.get(f"/proxy/jobs/{pid}"))[1]
        assert job["error"] is None and len(job["outputs"]) == 1
        url = job["outputs"][0]["url"]
        if proxy_with_templates.runner.app[CONFIG].server.public_url:   # absolute, under the ingress's prefix
            assert url.startswith(PUBLIC_URL + "view?")
            url = url.removeprefix(PUBLIC_URL[:-1])   # what the ingress forwards, its prefix stripped
        status, image = await client.get_bytes(url)  # the URL as given, query and all
        assert status == 200 and image.startswith(b"\x89PNG")
        history = (await client.get(f"/history/{pid}"))[1][pid]
        graph = history["prompt"][2]
        assert graph["6"]["inputs"]["text"] == "a lighthouse" and graph["3"]["inputs"]["seed"] == 42


async def test_a_template_run_can_wait_for_its_job(proxy_with_templates) -> None:
    """`wait_s` on a template run: the finished job, as `POST /proxy/run` answers it."""
    async with ComfyClient(proxy_with_templates.url) as client:
        status, job = await client.post("/proxy/workflows/portrait/run",
                                        {"inputs": {"prompt": "a lighthouse", "steps": 3}, "wait_s": 30})
        assert status == 200 and job["status"] == "completed" and job["outputs_count"] == 1
        [image] = [item for ui in job["outputs"].values() for item in ui.get("images", [])]
        assert image["link"].startswith(("http://", "https://"))


@pytest.mark.parametrize(("inputs", "kind", "names"), [
    ({}, "required_input_missing", "prompt"),
    ({"prompt": 7}, "invalid_input_type", "prompt"),
    ({"prompt": "x", "seed": -1}, "value_smaller_than_min", "seed"),
    ({"prompt": "x", "steps": 500}, "value_bigger_than_max", "steps"),
    ({"prompt": "x", "colour": "red"}, "invalid_input", "colour"),
])
async def test_bad_inputs_are_named(proxy_with_templates, inputs, kind, names) -> None:
    async with ComfyClient(proxy_with_templates.url) as client:
        status, body = await client.post("/proxy/workflows/portrait/run", {"inputs": inputs})
        assert status == 400 and body["error"]["type"] == kind and names in body["error"]["details"]
        assert body["node_errors"] == {}


async def test_unknown_template_and_job(proxy_with_templates) -> None:
    async with ComfyClient(proxy_with_templates.url) as client:
        for path in ("/proxy/workflows/nope", "/proxy/jobs/nope"):
            status, body = await client.get(path)
            assert status == 404 and body["error"]["type"] == "not_found"
        status, body = await client.post("/proxy/workflows/nope/run", {"inputs": {}})
        assert status == 404
        status, spec = await client.get("/proxy/openapi.json")
        assert status == 200 and "/proxy/workflows/{name}/run" in spec["paths"]


def test_inputs_discovered_from_titles_and_load_errors_name_the_key(tmp_path: Path) -> None:
    templates = load_templates(TEMPLATES)
    invert = templates["invert"]
    assert invert.inputs["image"].type == "image" and invert.inputs["image"].node == "1"
    with pytest.raises(TemplateError, match=r"t.yaml: inputs.seed.node: no node '99'"):
        parse_template("t.yaml", {"name": "t", "workflow": {"1": {"class_type": "X", "inputs": {}}},
                                  "inputs": {"seed": {"node": "99", "input": "seed", "type": "int"}}})
    (tmp_path / "bad.yaml").write_text("name: x\nworkflow: 3\n")
    with pytest.raises(TemplateError, match="bad.yaml: workflow: must be an API-format graph"):
        load_templates(tmp_path)
