"""The simulated ComfyUI against the golden traces of a real ComfyUI 0.3.75 (tests/traces/), over real HTTP
and websocket connections on loopback; plus the shared protocol modules (frames, validation)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.comfy import frames
from proxy.comfy.validation import validate_node_input, validate_prompt
from proxy.sim import SimOptions, SimServer, add_sim_arguments, options_from_args, start_sim
from proxy.sim.files import get_save_image_path, note_written
from proxy.sim.templates import serves_by_asset_name

TRACES = Path(__file__).parent / "traces"
TRACE_CLIENT = "trace-3d56921c"
TIMEOUT = 10.0

Message = dict[str, Any] | bytes


def trace(name: str) -> Any:
    return json.loads((TRACES / name).read_text())


def image_chain(color: int = 1234, prefix: str = "ComfyUI", output: str = "SaveImage") -> dict[str, Any]:
    """The traces' prompt: EmptyImage -> ImageInvert -> SaveImage (or PreviewImage)."""
    prompt: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": output, "inputs": {"images": ["2", 0]}},
    }
    if output == "SaveImage":
        prompt["3"]["inputs"] = {"filename_prefix": prefix, "images": ["2", 0]}
    return prompt


def slow_chain(color: int) -> dict[str, Any]:
    """queue_interrupt.json's prompt: EmptyImage -> 4 x ImageBlur -> PreviewImage."""
    prompt: dict[str, Any] = {"1": {"class_type": "EmptyImage",
                                    "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}}
    for i in range(2, 6):
        prompt[str(i)] = {"class_type": "ImageBlur",
                          "inputs": {"image": [str(i - 1), 0], "blur_radius": 31, "sigma": 10.0}}
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
    return prompt


def txt2img(seed: int = 1, steps: int = 3, ckpt: str = "sd_xl_base_1.0.safetensors") -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def normalized(obj: Any, ids: dict[str, str]) -> Any:
    """Prompt ids -> PID<n> (in order of appearance), timestamps -> 0, tracebacks -> []."""
    def pid(value: str) -> str:
        return ids.setdefault(value, f"PID{len(ids)}")

    def walk(o: Any, key: str | None = None) -> Any:
        if isinstance(o, dict):
            return {(pid(k) if key in (None, "body") and _is_uuid(k) else k): walk(v, k) for k, v in o.items()}
        if isinstance(o, list):
            return [] if key == "traceback" else [walk(x) for x in o]
        if key in ("timestamp", "create_time"):
            return 0
        if isinstance(o, str) and (key == "prompt_id" or _is_uuid(o)):
            return pid(o)
        return o
    return walk(obj)


def _is_uuid(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", value))


def as_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=False)  # keeps 1 and 1.0 apart, as on the wire


class Client:
    """One HTTP session against one simulator, with websocket helpers that wait on messages."""

    def __init__(self, session: aiohttp.ClientSession, server: SimServer) -> None:
        self.session = session
        self.server = server
        self.url = server.url

    async def post_prompt(self, prompt: Any, **fields: Any) -> tuple[int, Any]:
        async with self.session.post(self.url + "/prompt", json={"prompt": prompt, **fields}) as r:
            return r.status, await r.json()

    async def get_json(self, path: str, **kwargs: Any) -> Any:
        async with self.session.get(self.url + path, **kwargs) as r:
            assert r.status == 200, (path, r.status)
            return await r.json()

    async def post(self, path: str, body: Any = None) -> int:
        async with self.session.post(self.url + path, json=body) as r:
            await r.read()
            return r.status

    async def ws(self, client_id: str, metadata: bool = False) -> aiohttp.ClientWebSocketResponse:
        ws = await self.session.ws_connect(f"{self.url}/ws?clientId={client_id}")
        first = await receive(ws)
        assert isinstance(first, dict) and first["type"] == "status" and first["data"]["sid"] == client_id
        if metadata:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            answer = await receive(ws)
            assert answer == {"type": "feature_flags",
                              "data": {"supports_preview_metadata": True, "max_upload_size": 104857600}}
        return ws


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = TIMEOUT) -> Message:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    if msg.type == aiohttp.WSMsgType.TEXT:
        return dict(json.loads(msg.data))
    if msg.type == aiohttp.WSMsgType.BINARY:
        return bytes(msg.data)
    raise ConnectionError(f"websocket ended: {msg.type}")


async def collect(ws: aiohttp.ClientWebSocketResponse, last: Callable[[Message], bool],
                  timeout: float = TIMEOUT) -> list[Message]:
    """Every message up to and including the first for which `last` is true."""
    messages: list[Message] = []
    while True:
        messages.append(await receive(ws, timeout))
        if last(messages[-1]):
            return messages


async def collect_all(ws: aiohttp.ClientWebSocketResponse, *wanted: Callable[[Message], bool]) -> list[Message]:
    """Messages until each of `wanted` has matched one, in any order."""
    messages: list[Message] = []
    pending = list(wanted)
    while pending:
        messages.append(await receive(ws))
        pending = [w for w in pending if not w(messages[-1])]
    return messages


def is_type(kind: str, **data: Any) -> Callable[[Message], bool]:
    def check(m: Message) -> bool:
        return isinstance(m, dict) and m["type"] == kind and all(m["data"].get(k) == v for k, v in data.items())
    return check


def finished(prompt_id: str) -> Callable[[Message], bool]:
    return is_type("executing", node=None, prompt_id=prompt_id)


def data(message: Message) -> dict[str, Any]:
    assert isinstance(message, dict), "a binary frame where a text message was expected"
    return dict(message["data"])


def first_of(messages: list[Message], kind: str) -> dict[str, Any]:
    """The data of the first message of that type."""
    return data(next(m for m in messages if is_type(kind)(m)))


def types(messages: list[Message]) -> list[str]:
    return [m["type"] if isinstance(m, dict) else f"binary{frames.event_type(m)}" for m in messages]


@pytest.fixture
async def sim_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[SimServer, aiohttp.ClientSession]] = []

    async def start(**options: Any) -> Client:
        options.setdefault("step_ms", 5)
        options.setdefault("model_load_ms", 20)
        server = await start_sim(SimOptions(port=0, **options))
        session = aiohttp.ClientSession()
        started.append((server, session))
        return Client(session, server)

    yield start
    for server, session in started:
        await session.close()
        await server.close()


@pytest.fixture
async def sim(sim_factory: Callable[..., Any]) -> Client:
    return await sim_factory()  # type: ignore[no-any-return]


# --- runs against the traces -------------------------------------------------------------------------------


async def test_run_normal_matches_trace(sim: Client) -> None:
    expected = trace("run_normal.json")
    ws = await sim.session.ws_connect(f"{sim.url}/ws?clientId={TRACE_CLIENT}")
    first = await receive(ws)
    status, body = await sim.post_prompt(expected["post"]["request"]["json"]["prompt"], client_id=TRACE_CLIENT)
    assert status == 200 and body["number"] == 0 and body["node_errors"] == {}
    messages = [first, *await collect(ws, finished(body["prompt_id"]))]
    ids: dict[str, str] = {}
    assert as_json(normalized(messages, ids)) == as_json(normalized(expected["ws"], {}))

    history = await sim.get_json(f"/history/{body['prompt_id']}")
    assert as_json(normalized(history, ids)) == as_json(normalized(expected["history"]["body"], {}))

    async with sim.session.get(sim.url + "/view", params={"filename": "ComfyUI_00001_.png"}) as r:
        data = await r.read()
        assert r.status == 200 and r.content_type == "image/png"
        assert r.headers["Content-Disposition"] == 'filename="ComfyUI_00001_.png"'
    assert data.startswith(expected["view"]["body"]["_start"].encode("latin-1"))
    stats = await sim.get_json("/sim/stats")
    assert (stats["accepted"], stats["prompts"]) == (1, 1)


async def test_cached_rerun_matches_trace_and_writes_nothing(sim: Client) -> None:
    ws = await sim.ws(TRACE_CLIENT)
    _, first = await sim.post_prompt(image_chain(), client_id=TRACE_CLIENT)
    await collect(ws, finished(first["prompt_id"]))
    status, body = await sim.post_prompt(image_chain(), client_id=TRACE_CLIENT)
    assert status == 200 and body["number"] == 1
    messages = await collect(ws, finished(body["prompt_id"]))
    expected = trace("run_cached.json")
    ids: dict[str, str] = {}
    assert as_json(normalized(messages, ids)) == as_json(normalized(expected["ws"], {}))
    history = await sim.get_json(f"/history/{body['prompt_id']}")
    assert as_json(normalized(history, ids)) == as_json(normalized(expected["history"]["body"], {}))
    async with sim.session.get(sim.url + "/view", params={"filename": "ComfyUI_00002_.png"}) as r:
        assert r.status == 404  # a cached SaveImage writes no new file


async def test_run_error_matches_trace(sim: Client) -> None:
    ws = await sim.ws(TRACE_CLIENT)
    _, first = await sim.post_prompt(image_chain(), client_id=TRACE_CLIENT)
    await collect(ws, finished(first["prompt_id"]))
    _, body = await sim.post_prompt(image_chain(prefix="../../escape"), client_id=TRACE_CLIENT)
    messages = await collect(ws, finished(body["prompt_id"]))
    expected = trace("run_error.json")
    assert types(messages) == [m["type"] for m in expected["ws"]]
    error, want = data(messages[-3]), expected["ws"][-3]["data"]
    assert list(error) == list(want)
    assert error["exception_message"].startswith("**** ERROR: Saving image outside the output folder")
    assert error["exception_message"].endswith("\n")
    assert (error["node_id"], error["node_type"], error["executed"], error["exception_type"]) == ("3", "SaveImage",
                                                                                                 [], "Exception")
    assert list(error["current_inputs"]) == ["filename_prefix", "images", "prompt", "extra_pnginfo"]
    assert error["current_inputs"]["filename_prefix"] == ["../../escape"]
    assert error["current_inputs"]["extra_pnginfo"] == [None]
    assert sorted(error["current_outputs"]) == ["1", "2", "3"]
    assert all(isinstance(line, str) for line in error["traceback"]) and error["traceback"]
    history = (await sim.get_json(f"/history/{body['prompt_id']}"))[body["prompt_id"]]
    want_history = next(iter(expected["history"]["body"].values()))
    assert (history["outputs"], history["meta"]) == ({}, {})
    assert history["status"]["status_str"] == "error" and history["status"]["completed"] is False
    assert [m[0] for m in history["status"]["messages"]] == [m[0] for m in want_history["status"]["messages"]]


async def test_client_prompt_id_is_used(sim: Client) -> None:
    expected = trace("client_prompt_id.json")
    request = expected["post"]["request"]["json"]
    status, body = await sim.post_prompt(request["prompt"], client_id=request["client_id"],
                                         prompt_id=request["prompt_id"])
    assert status == 200 and body == {"prompt_id": expected["sent_prompt_id"], "number": 0, "node_errors": {}}


async def test_queue_interrupt_and_delete_as_in_trace(sim: Client) -> None:
    expected = trace("queue_interrupt.json")
    ws = await sim.ws(TRACE_CLIENT)
    assert await sim.post("/sim/faults", {"slow_factor": 40}) == 200  # ~40 ms a node
    ids = [(await sim.post_prompt(slow_chain(100 + i), client_id=TRACE_CLIENT))[1]["prompt_id"] for i in range(3)]
    await collect_all(ws, is_type("executing", node="1", prompt_id=ids[0]), queue_length(3))

    queue = await sim.get_json("/queue")
    assert [[len(item), item[0], item[1], item[4]] for item in queue["queue_running"]] == [[5, 0, ids[0], ["9"]]]
    assert [item[:2] for item in queue["queue_pending"]] == [[1, ids[1]], [2, ids[2]]]
    assert list(queue["queue_pending"][0][3]) == list(expected["queue"]["body"]["queue_pending"][0][3])

    assert await sim.post("/queue", {"delete": [ids[2]]}) == 200
    assert remaining((await collect(ws, is_type("status")))[-1]) == 2
    assert [item[1] for item in (await sim.get_json("/queue"))["queue_pending"]] == [ids[1]]

    assert await sim.post("/interrupt", {"prompt_id": ids[0]}) == 200
    first = await collect(ws, finished(ids[0]))
    assert types(first)[-3:] == ["execution_interrupted", "status", "executing"]
    interrupted = data(first[-3])
    assert list(interrupted) == ["prompt_id", "node_id", "node_type", "executed", "timestamp"]
    assert interrupted["node_type"] == "ImageBlur" and interrupted["executed"] == ["1", "2", "3", "4"][
        :len(interrupted["executed"])]

    await collect(ws, is_type("executing", node="1", prompt_id=ids[1]))
    assert await sim.post("/interrupt", {"prompt_id": "not-running"}) == 200
    assert await sim.post("/interrupt", {}) == 200
    second = await collect(ws, finished(ids[1]))
    assert types(second)[-3:] == ["execution_interrupted", "status", "executing"]

    history = await sim.get_json(f"/history/{ids[0]}")
    want = expected["history_interrupted"]["body"]
    assert list(history[ids[0]]) == list(next(iter(want.values())))
    assert history[ids[0]]["status"]["status_str"] == "error" and history[ids[0]]["outputs"] == {}
    assert [m[0] for m in history[ids[0]]["status"]["messages"]] == [
        "execution_start", "execution_cached", "execution_interrupted"]
    assert await sim.get_json(f"/history/{ids[2]}") == expected["history_deleted"]["body"] == {}


async def test_deleting_the_last_pending_prompt_sends_two_status_messages(sim: Client) -> None:
    ws = await sim.ws("c")
    await sim.post("/sim/faults", {"slow_factor": 40})
    _, a = await sim.post_prompt(slow_chain(1), client_id="c")
    _, b = await sim.post_prompt(slow_chain(2), client_id="c")
    await collect_all(ws, is_type("executing", node="1", prompt_id=a["prompt_id"]), queue_length(2))
    await sim.post("/queue", {"delete": [b["prompt_id"]]})
    statuses = [m for m in await collect(ws, is_type("status")) if is_type("status")(m)]
    statuses += await collect(ws, is_type("status"))
    assert [remaining(m) for m in statuses] == [1, 1]  # ComfyUI quirk: wipe_queue plus queue_updated
    await sim.post("/interrupt")


def remaining(message: Message) -> int:
    return int(data(message)["status"]["exec_info"]["queue_remaining"])


def queue_length(n: int) -> Callable[[Message], bool]:
    return lambda m: is_type("status")(m) and remaining(m) == n


async def test_reconnect_of_the_running_client_gets_current_node(sim: Client) -> None:
    ws = await sim.ws("owner")
    await sim.post("/sim/faults", {"slow_factor": 60})
    _, body = await sim.post_prompt(slow_chain(5), client_id="owner")
    await collect(ws, is_type("executing", node="2", prompt_id=body["prompt_id"]))
    again = await sim.session.ws_connect(f"{sim.url}/ws?clientId=owner")
    assert data(await receive(again))["sid"] == "owner"
    current = await receive(again)
    assert isinstance(current, dict) and current["type"] == "executing" and list(current["data"]) == ["node"]
    assert current["data"]["node"] in {"2", "3", "4", "5", "9"}
    await sim.post("/interrupt")
    await collect(again, finished(body["prompt_id"]))


# --- validation ----------------------------------------------------------------------------------------------

MORE_REQUESTS = {
    "value_not_in_list": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 8,
                                                     "height": 8, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}}},
    "missing_checkpoint": {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nowhere.safetensors"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}}},
    "load_missing_image": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}},
    "wrong_type": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "wide", "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}},
}


def without_tracebacks(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("TB" if k == "traceback" else without_tracebacks(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [without_tracebacks(x) for x in obj]
    return obj


async def test_validation_error_bodies_equal_the_traces(sim_factory: Callable[..., Any]) -> None:
    sim = await sim_factory(checkpoints=())  # the traced server had no checkpoint files
    cases = [(name, case["request"]["json"], case["status"], case["body"])
             for name, case in trace("validation_errors.json").items() if "request" in case]
    cases += [(name, {"prompt": MORE_REQUESTS[name]}, case["status"], case["body"])
              for name, case in trace("validation_errors_more.json").items()]
    assert len(cases) == 11
    for name, request, status, body in cases:
        async with sim.session.post(sim.url + "/prompt", json=request) as r:
            got = await r.json()
            assert (r.status, without_tracebacks(got)) == (status, without_tracebacks(body)), name
            assert r.content_type == "application/json"
    bad = trace("validation_errors.json")["invalid_json"]
    async with sim.session.post(sim.url + "/prompt", data=b"{not json") as r:
        assert (r.status, await r.text()) == (bad["status"], bad["body"])


def test_validation_reproduces_comfyui_corner_cases() -> None:
    info = {
        "Src": {"input": {"required": {"v": ["INT", {"min": 0, "max": 10}]}}, "output": ["IMAGE,MASK"],
                "output_node": False},
        "Any": {"input": {"required": {"x": ["*"]}}, "output": [], "output_node": True},
        "Out": {"input": {"required": {"image": ["IMAGE"], "mode": ["COMBO", {"options": ["a", "b"]}],
                                       "big": [[f"m{i}" for i in range(25)]]},
                          "optional": {"flag": ["BOOLEAN"]}}, "output": [], "output_node": True},
    }
    prompt: dict[str, Any] = {"1": {"class_type": "Src", "inputs": {"v": {"__value__": "7"}}},
                              "2": {"class_type": "Out", "inputs": {"image": ["1", 0], "mode": "c", "big": "zz"}},
                              "3": {"class_type": "Any", "inputs": {"x": ["1", 0]}}}
    result = validate_prompt(prompt, info)
    assert result.ok and result.outputs == ["3"] and prompt["1"]["inputs"]["v"] == 7  # converted in place
    errors = result.node_errors["2"]["errors"]
    assert [e["type"] for e in errors] == ["value_not_in_list", "value_not_in_list"]
    assert errors[0]["details"] == "big: 'zz' not in (list of length 25)"
    assert errors[0]["extra_info"]["input_config"] is None
    assert errors[1]["details"] == "mode: 'c' not in ['a', 'b']"

    bad = validate_prompt({"1": {"class_type": "Src", "inputs": {"v": 11}},
                           "2": {"class_type": "Out", "inputs": {"image": ["1", 0, 5], "mode": "a", "big": "m1"}}},
                          info, partial_execution_targets=["2"])
    assert bad.error is not None and bad.error["type"] == "prompt_outputs_failed_validation"
    assert bad.node_errors["2"]["errors"][0]["type"] == "bad_linked_input"
    assert validate_prompt({"1": {"class_type": "Out", "inputs": {}}}, info, ["9"]).error == {
        "type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}
    assert (validate_prompt(["x"], info).error or {})["type"] == "invalid_prompt"
    assert (validate_prompt({"1": {"inputs": {}}}, info).error or {})["details"] == "Node ID '#1'"
    mismatch = validate_prompt({"1": {"class_type": "Src", "inputs": {"v": 1}},
                                "2": {"class_type": "Out", "inputs": {"image": ["1", 0], "mode": "a", "big": "m1",
                                                                      "flag": 0}}}, info)
    assert mismatch.ok  # "IMAGE,MASK" overlaps "IMAGE"
    assert validate_node_input("IMAGE,MASK", "MASK") and not validate_node_input("LATENT", "IMAGE")
    assert validate_node_input("LATENT", "*") and not validate_node_input("IMAGE,MASK", "IMAGE", strict=True)

    def check(class_type: str, inputs: dict[str, Any]) -> str | bool:
        return True if inputs["v"] == 1 else f"no {inputs['v']}"
    custom = validate_prompt({"1": {"class_type": "Src", "inputs": {"v": 99}},
                              "2": {"class_type": "Any", "inputs": {"x": ["1", 0]}}}, info,
                             custom_checks={"Src": (("v",), check)})
    assert custom.node_errors["1"]["errors"] == [{"type": "custom_validation_failed",
                                                  "message": "Custom validation failed for node",
                                                  "details": "v - no 99", "extra_info": {"input_name": "v"}}]


# --- files -----------------------------------------------------------------------------------------------------


async def upload(sim: Client, data: bytes, path: str = "/upload/image", filename: str = "trace.png",
                 **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=filename, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    async with sim.session.post(sim.url + path, data=form) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else None)


async def test_uploads_answer_and_rename_as_comfyui(sim: Client) -> None:
    answers = [await upload(sim, b"PNG-A", **step["fields"]) for step in trace("upload.json")]
    assert answers == [(step["status"], step["body"]) for step in trace("upload.json")]
    assert await upload(sim, b"PNG-B") == (200, {"name": "trace (1).png", "subfolder": "", "type": "input"})
    assert await upload(sim, b"PNG-C") == (200, {"name": "trace (2).png", "subfolder": "", "type": "input"})
    assert await upload(sim, b"PNG-B") == (200, {"name": "trace (1).png", "subfolder": "", "type": "input"})
    assert (await upload(sim, b"x", subfolder="../.."))[0] == 400
    async with sim.session.get(sim.url + "/view", params={"filename": "trace (1).png", "type": "input"}) as r:
        assert (r.status, await r.read()) == (200, b"PNG-B")
    info = await sim.get_json("/object_info/LoadImage")
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["trace (1).png", "trace (2).png", "trace.png"]
    # /upload/mask composes real images: tests/test_uploads.py holds the simulator and the proxy to it.


async def test_view_rules(sim: Client) -> None:
    ws = await sim.ws("v")
    _, body = await sim.post_prompt(image_chain(prefix="sub/dir/pre"), client_id="v")
    done = await collect(ws, finished(body["prompt_id"]))
    assert first_of(done, "executed")["output"] == {
        "images": [{"filename": "pre_00001_.png", "subfolder": "sub/dir", "type": "output"}]}
    expected = trace("info_routes.json")
    cases = [({"filename": "pre_00001_.png", "subfolder": "sub/dir"}, 200),
             ({"filename": "pre_00001_.png [output]", "subfolder": "sub/dir", "type": "input"}, 200),
             ({"filename": "nope.png", "type": "output"}, expected["/view?filename=nope.png&type=output"]["status"]),
             ({"filename": "../../etc/passwd", "type": "output"},
              expected["/view?filename=../../etc/passwd&type=output"]["status"]),
             ({"filename": "/etc/passwd"}, 400), ({"filename": "x.png", "subfolder": "../.."}, 403),
             ({"filename": "x.png", "type": "bogus"}, 400), ({}, 404)]
    for params, status in cases:
        for prefix in ("", "/api"):
            async with sim.session.get(sim.url + prefix + "/view", params=params) as r:
                data = await r.read()
                assert r.status == status, params
                if status == 200:
                    assert r.headers["Content-Disposition"] == 'filename="pre_00001_.png"'
                    assert r.content_type == "image/png" and data.startswith(b"\x89PNG")
                else:
                    assert data == b""


async def test_two_sims_write_the_same_name_with_different_bytes(sim_factory: Callable[..., Any]) -> None:
    async def render(name: str) -> bytes:
        sim = await sim_factory(name=name)
        ws = await sim.ws("c")
        _, body = await sim.post_prompt(txt2img(seed=42), client_id="c")
        messages = await collect(ws, finished(body["prompt_id"]))
        output = first_of(messages, "executed")["output"]
        assert output == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
        async with sim.session.get(sim.url + "/view", params={"filename": "ComfyUI_00001_.png"}) as r:
            return await r.read()

    a, b, a_again = await render("gpu-a"), await render("gpu-b"), await render("gpu-a")
    assert a != b and a == a_again
    assert a[16:24] == (512).to_bytes(4, "big") * 2 and len(a) > 10_000
    assert b'tEXtprompt\x00{"4": {"class_type": "CheckpointLoaderSimple"' in a


# --- websocket behaviour -----------------------------------------------------------------------------------------


async def test_previews_are_type_1_or_type_4_after_feature_flags(sim: Client) -> None:
    plain = await sim.ws("plain")
    rich = await sim.ws("rich", metadata=True)
    for seed, client, ws in ((7, "plain", plain), (8, "rich", rich)):
        _, body = await sim.post_prompt(txt2img(seed=seed, steps=2), client_id=client)
        messages = await collect(ws, finished(body["prompt_id"]))
        sampler = [t for t in types(messages) if t in ("progress", "binary1", "binary4")]
        if client == "plain":
            assert sampler == ["progress", "binary1"] * 2
            preview = frames.decode_frame(next(m for m in messages if isinstance(m, bytes)))
            assert isinstance(preview, frames.PreviewFrame) and preview.fmt == frames.FORMAT_JPEG
            assert preview.image.startswith(b"\xff\xd8") and preview.image.endswith(b"\xff\xd9")
        else:
            assert sampler == ["binary4", "progress"] * 2  # the registry sends type 4 before `progress`
            preview = frames.decode_frame(next(m for m in messages if isinstance(m, bytes)))
            assert isinstance(preview, frames.MetadataPreviewFrame)
            assert preview.metadata == {"node_id": "3", "prompt_id": body["prompt_id"], "display_node_id": "3",
                                        "parent_node_id": None, "real_node_id": "3", "image_type": "image/jpeg"}
        progress = [m for m in messages if is_type("progress")(m)]
        assert data(progress[-1]) == {
            "value": 2, "max": 2, "prompt_id": body["prompt_id"], "node": "3"}


async def test_prompt_without_client_id_broadcasts_only_progress(sim: Client) -> None:
    listener = await sim.ws("listener")
    _, body = await sim.post_prompt(txt2img(seed=3, steps=2))
    messages = await collect(listener, lambda m: is_type("status")(m) and remaining(m) == 0)
    assert set(types(messages)) == {"status", "progress_state", "progress", "binary1"}
    assert all(m["data"]["prompt_id"] == body["prompt_id"] for m in messages
               if isinstance(m, dict) and m["type"] != "status")
    history = await sim.get_json(f"/history/{body['prompt_id']}")
    assert history[body["prompt_id"]]["status"]["status_str"] == "success"
    assert history[body["prompt_id"]]["prompt"][3] == {"create_time": history[body["prompt_id"]]["prompt"][3][
        "create_time"]}

    await sim.post("/sim/faults", {"slow_factor": 40})
    _, slow = await sim.post_prompt(slow_chain(9))
    await collect(listener, lambda m: is_type("progress_state")(m) and "2" in data(m)["nodes"])
    await sim.post("/interrupt")
    rest = await collect(listener, is_type("execution_interrupted", prompt_id=slow["prompt_id"]))
    assert "executing" not in types(rest)
    last = await collect(listener, is_type("status"))
    assert types(last) == ["status"]
    await sim.post("/sim/faults", {"slow_factor": 1})
    _, mine = await sim.post_prompt(image_chain(color=10), client_id="listener")
    after = await collect(listener, is_type("execution_start"))
    assert types(after) == ["status", "status", "execution_start"]  # no `executing` null: ComfyUI sends it
    await collect(listener, finished(mine["prompt_id"]))  # only to a prompt's client


async def test_sensitive_extra_data_is_kept_out_and_png_carries_extra_pnginfo(sim: Client) -> None:
    ws = await sim.ws("c")
    extra = {"extra_pnginfo": {"workflow": {"nodes": []}}, "api_key_comfy_org": "secret",
             "auth_token_comfy_org": "t"}
    _, body = await sim.post_prompt(image_chain(color=5), client_id="c", extra_data=extra, number=7.5)
    assert body["number"] == 7.5
    await collect(ws, finished(body["prompt_id"]))
    entry = (await sim.get_json(f"/history/{body['prompt_id']}"))[body["prompt_id"]]
    assert set(entry["prompt"][3]) == {"extra_pnginfo", "client_id", "create_time"}
    async with sim.session.get(sim.url + "/view", params={"filename": "ComfyUI_00001_.png"}) as r:
        assert b'tEXtworkflow\x00{"nodes": []}' in await r.read()
    _, first = await sim.post_prompt(image_chain(color=6))
    _, front = await sim.post_prompt(image_chain(color=7), front=True)
    assert (first["number"], front["number"]) == (0, -1)  # `number` 7.5 did not move the counter


async def test_front_and_history_paging(sim: Client) -> None:
    ws = await sim.ws("c")
    ids = []
    for color in range(4):
        _, body = await sim.post_prompt(image_chain(color=color), client_id="c")
        await collect(ws, finished(body["prompt_id"]))
        ids.append(body["prompt_id"])
    assert list(await sim.get_json("/history")) == ids
    assert list(await sim.get_json("/history?max_items=2")) == ids[2:]
    assert list(await sim.get_json("/history?max_items=1&offset=1")) == ids[1:2]
    assert list(await sim.get_json("/history?offset=3")) == ids[3:]
    assert await sim.post("/history", {"delete": [ids[0]]}) == 200
    assert await sim.get_json(f"/history/{ids[0]}") == {}
    assert await sim.post("/history", {"clear": True}) == 200
    assert await sim.get_json("/history") == {}
    assert await sim.get_json("/prompt") == {"exec_info": {"queue_remaining": 0}}


# --- information routes, origin, users ---------------------------------------------------------------------------


async def test_info_routes_have_the_traced_shapes(sim_factory: Callable[..., Any]) -> None:
    sim = await sim_factory(checkpoints=())
    expected = trace("info_routes.json")
    await upload(sim, b"x")
    for path in ("/object_info/SaveImage", "/object_info/CheckpointLoaderSimple", "/object_info/LoadImage",
                 "/features", "/embeddings", "/models", "/models/checkpoints", "/queue", "/users", "/settings"):
        for prefix in ("", "/api"):
            assert await sim.get_json(prefix + path) == expected[path]["body"], path
    stats, want = await sim.get_json("/system_stats"), expected["/system_stats"]["body"]
    assert list(stats["system"]) == list(want["system"]) and list(stats["devices"][0]) == list(want["devices"][0])
    assert stats["devices"][0]["type"] == "cuda" and "Simulated GPU (sim)" in stats["devices"][0]["name"]
    extensions = await sim.get_json("/extensions")
    assert isinstance(extensions, list)
    info = await sim.get_json("/object_info")
    assert {"KSampler", "VAEDecode", "ImageScale", "ImageBlur", "LoraLoader", "PreviewImage"} <= set(info)
    assert await sim.get_json("/object_info/Nope") == {}
    async with sim.session.get(sim.url + "/models/nope") as r:
        assert r.status == 404
    plain = await sim_factory(without_nodes=("KSampler",), loras=("a.safetensors",))
    assert "KSampler" not in await plain.get_json("/object_info")
    assert await plain.get_json("/models/loras") == ["a.safetensors"]


async def test_origin_check(sim: Client) -> None:
    for case in ("origin_mismatch", "origin_mismatch_post"):
        request = trace("info_routes.json")[case]["request"]
        async with sim.session.request(request["method"], sim.url + request["path"], json=request["json"],
                                       headers=request["headers"]) as r:
            assert (r.status, await r.read()) == (403, b"")
    port = sim.url.rsplit(":", 1)[1]
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Origin": "http://127.0.0.1"},
                    {"Origin": "http://evil.example", "Host": "10.1.2.3:8188"}):
        async with sim.session.get(sim.url + "/system_stats", headers=headers) as r:
            assert r.status == 200, headers
    async with sim.session.get(sim.url + "/system_stats", headers={"Origin": "http://localhost:1"}) as r:
        assert r.status == 403


async def test_templates_are_the_manifest_assets_and_a_missing_package_is_logged(
        sim_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI 0.3.75 with a templates package from 0.3.0 on: a GET (or HEAD) handler for the manifest's asset
    names, a raised 404 for any other (no Cache-Control from the cache middleware, even for an image name);
    without the package, the reason in the console log and no route."""
    sim = await sim_factory()
    async with sim.session.head(sim.url + "/templates/index.json") as r:
        assert (r.status, r.content_type) == (200, "application/json")
    async with sim.session.get(sim.url + "/templates/nope.webp") as r:
        assert (r.status, await r.text(), r.headers.get("Cache-Control")) == (404, "404: Not Found", None)
    stats = await sim.get_json("/system_stats")
    assert stats["system"]["installed_templates_version"] == stats["system"]["required_templates_version"] == "0.7.25"
    monkeypatch.setattr("proxy.sim.templates.comfyui_workflow_templates", None)   # as if it were not installed
    bare = await sim_factory()
    async with bare.session.get(bare.url + "/templates/index.json") as r:
        assert r.status == 404
    assert "pip install comfyui-workflow-templates==0.7.25" in await bare.get_json("/internal/logs")


@pytest.mark.parametrize("installed, by_asset_name", [("0.7.25", True), ("0.3.0", True), ("1.0.0rc1", True),
                                                      ("0.2.9", False), ("junk", False), (None, False)])
def test_templates_packages_from_0_3_0_are_served_by_asset_name(installed: str | None, by_asset_name: bool) -> None:
    """server.py: older (or unreadable, or absent) versions get the one-folder static route."""
    assert serves_by_asset_name(installed) is by_asset_name


async def test_settings_and_userdata_per_user(sim: Client) -> None:
    assert await sim.post("/settings/Comfy.Theme", "dark") == 200
    assert await sim.get_json("/settings/Comfy.Theme") == "dark"
    async with sim.session.post(sim.url + "/users", json={"username": "ann"}) as r:
        ann = await r.json()
    async with sim.session.post(sim.url + "/users", json={"username": "ann"}) as r:
        assert (r.status, await r.json()) == (400, {"error": "Duplicate username."})
    assert await sim.get_json("/settings", headers={"comfy-user": ann}) == {}
    assert await sim.get_json("/settings", headers={"comfy-user": "unknown"}) == {"Comfy.Theme": "dark"}
    async with sim.session.post(sim.url + "/userdata/workflows%2Fa.json", data=b"{}",
                                headers={"comfy-user": ann}) as r:
        assert (r.status, await r.json()) == (200, "workflows/a.json")
    assert await sim.get_json("/userdata?dir=workflows", headers={"comfy-user": ann}) == ["a.json"]
    async with sim.session.get(sim.url + "/userdata?dir=workflows") as r:
        assert r.status == 404  # the default user has no such folder
    async with sim.session.post(sim.url + "/userdata/workflows%2Fa.json/move/workflows%2Fb.json",
                                headers={"comfy-user": ann}) as r:
        assert await r.json() == "workflows/b.json"
    async with sim.session.get(sim.url + "/userdata/workflows%2Fb.json", headers={"comfy-user": ann}) as r:
        assert (r.status, await r.read()) == (200, b"{}")
    listing = await sim.get_json("/v2/userdata", headers={"comfy-user": ann})
    assert [(e["name"], e["type"]) for e in listing] == [("workflows", "directory"), ("b.json", "file")]
    async with sim.session.delete(sim.url + "/api/userdata/workflows%2Fb.json", headers={"comfy-user": ann}) as r:
        assert r.status == 204
    async with sim.session.get(sim.url + "/userdata/..%2F..%2Fx") as r:
        assert r.status == 403


# --- VRAM and faults ---------------------------------------------------------------------------------------------


async def device(sim: Client) -> dict[str, Any]:
    return dict((await sim.get_json("/system_stats"))["devices"][0])


async def test_vram_moves_when_a_checkpoint_loads_and_frees(sim_factory: Callable[..., Any]) -> None:
    sim = await sim_factory(vram_gb=24.0)
    idle = await device(sim)
    assert idle["vram_total"] == 24 * 1024 ** 3 and idle["torch_vram_total"] == 0
    ws = await sim.ws("c")
    _, body = await sim.post_prompt(txt2img(), client_id="c")
    await collect(ws, finished(body["prompt_id"]))
    loaded = await device(sim)
    assert idle["vram_free"] - loaded["vram_free"] > 6 * 1024 ** 3 and loaded["torch_vram_total"] > 0
    assert await sim.post("/free", {"unload_models": True, "free_memory": True}) == 200
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while (await device(sim))["vram_free"] != idle["vram_free"]:
        assert asyncio.get_running_loop().time() < deadline, "VRAM was not released"
        await asyncio.sleep(0.02)
    _, again = await sim.post_prompt(txt2img(), client_id="c")
    messages = await collect(ws, finished(again["prompt_id"]))
    assert first_of(messages, "execution_cached")["nodes"] == []


async def test_faults(sim: Client) -> None:
    assert await sim.get_json("/sim/faults") == {"error_at_node": None, "reject_prompts": False,
                                                 "slow_factor": 1.0, "drop_sockets": False}
    async with sim.session.post(sim.url + "/sim/faults", json={"bogus": 1}) as r:
        assert r.status == 400
    ws = await sim.ws("c")
    assert await sim.post("/sim/faults", {"error_at_node": "KSampler"}) == 200
    _, body = await sim.post_prompt(txt2img(), client_id="c")
    messages = await collect(ws, finished(body["prompt_id"]))
    error = first_of(messages, "execution_error")
    assert (error["node_type"], error["exception_type"]) == ("KSampler", "Exception")
    assert sorted(error["executed"]) == ["4", "5", "6", "7"]

    assert await sim.post("/sim/faults", {"error_at_node": None, "reject_prompts": True}) == 200
    status, refused = await sim.post_prompt(txt2img())
    assert status == 400 and refused["error"]["type"] == "prompt_outputs_failed_validation"
    assert refused["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    status, refused = await sim.post_prompt(image_chain())
    assert status == 400 and list(refused["node_errors"]) == ["3"]

    assert await sim.post("/sim/faults", {"reset": True, "drop_sockets": True}) == 200
    with pytest.raises(ConnectionError):
        await receive(ws)
    assert (await sim.get_json("/sim/faults"))["reject_prompts"] is False
    status, _ = await sim.post_prompt(image_chain())
    assert status == 200

    assert await sim.post("/sim/die") == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        async with sim.session.get(sim.url + "/system_stats") as r:
            await r.read()


# --- frames and options --------------------------------------------------------------------------------------


def test_frames_roundtrip_and_conversion() -> None:
    jpeg = b"\xff\xd8data\xff\xd9"
    preview = frames.encode_preview(jpeg, frames.FORMAT_JPEG)
    assert preview[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01" and frames.event_type(preview) == frames.PREVIEW_IMAGE
    assert frames.decode_frame(preview) == frames.PreviewFrame(frames.FORMAT_JPEG, jpeg)
    meta = frames.preview_metadata("3", "p", frames.FORMAT_PNG)
    with_meta = frames.preview_to_metadata_frame(frames.encode_preview(b"png", frames.FORMAT_PNG), meta)
    decoded = frames.decode_frame(with_meta)
    assert isinstance(decoded, frames.MetadataPreviewFrame) and decoded.image == b"png"
    assert decoded.metadata["image_type"] == "image/png" and decoded.metadata["prompt_id"] == "p"
    assert frames.metadata_frame_to_preview(with_meta) == frames.encode_preview(b"png", frames.FORMAT_PNG)
    assert frames.decode_frame(frames.encode_text("12", "hé")) == frames.TextFrame("12", "hé")
    assert frames.decode_frame(b"\x00\x00\x00\x09xy") == frames.UnknownFrame(9, b"xy")
    for broken in (b"\x00\x00", b"\x00\x00\x00\x04\x00\x00\x00\x09{}", b"\x00\x00\x00\x03\x00\x00\x00\x05ab"):
        with pytest.raises(frames.FrameError):
            frames.decode_frame(broken)
    with pytest.raises(frames.FrameError):
        frames.metadata_frame_to_preview(preview)


def test_options_from_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    options = options_from_args(parser.parse_args(
        ["--name", "gpu-1", "--port", "0", "--checkpoints", "a.safetensors, b.safetensors", "--no-previews",
         "--without-nodes", "KSampler", "--speed", "2", "--vram-gb", "80"]))
    assert options == SimOptions(name="gpu-1", port=0, checkpoints=("a.safetensors", "b.safetensors"),
                                 previews=False, without_nodes=("KSampler",), speed=2.0, vram_gb=80.0)
    assert options_from_args(parser.parse_args([])) == SimOptions()


def test_save_counter_counts_the_simulators_own_files_and_anyone_elses(tmp_path: Path) -> None:
    """folder_paths.get_save_image_path: the next counter is one past the highest of that prefix, whoever
    wrote the file (the simulator keeps the highest per prefix instead of parsing the folder each save)."""
    out = str(tmp_path)
    assert get_save_image_path("ComfyUI", out)[2] == 1
    (tmp_path / "ComfyUI_00001_.png").write_bytes(b"")
    note_written(str(tmp_path / "ComfyUI_00001_.png"))
    assert get_save_image_path("ComfyUI", out)[2] == 2
    (tmp_path / "ComfyUI_00041_.png").write_bytes(b"")   # not ours: the folder changed, it is listed again
    (tmp_path / "Other_00077_.png").write_bytes(b"")
    assert get_save_image_path("ComfyUI", out)[2] == 42
    assert get_save_image_path("Other", out)[2] == 78
    (tmp_path / "ComfyUI_00050_.png").write_bytes(b"")
    note_written(str(tmp_path / "ComfyUI_00050_.png"))
    assert get_save_image_path("ComfyUI", out)[2] == 51
    assert get_save_image_path("Other", out)[2] == 78
    # ComfyUI's quirk: a longer prefix's file counts as 0 for a shorter one ("abcde" is not a number).
    (tmp_path / "X_temp_abcde_00003_.png").write_bytes(b"")
    assert get_save_image_path("X_temp", out)[2] == 1
    assert get_save_image_path("X_temp_abcde", out)[2] == 4


def test_save_counter_lists_the_folder_once_while_only_the_simulator_writes(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda folder: listed.append(folder) or real_listdir(folder))
    for i in range(20):
        folder, stem, counter, _ = get_save_image_path(f"ComfyUI_temp_{i % 4}", str(tmp_path))
        assert counter == i // 4 + 1
        path = os.path.join(folder, f"{stem}_{counter:05}_.png")
        Path(path).write_bytes(b"")
        note_written(path)
    assert len(listed) == 1
