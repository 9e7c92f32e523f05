"""Hostile and broken input: each protection has a test here that fails when the protection is removed.

Already covered elsewhere: forged references (test_resilience), another tenant's outputs and uploads
(test_tenancy, test_uploads), `..` and absolute upload names (test_uploads), 413 on `/prompt`
(test_resilience). Here: traversal through `/view`'s subfolder and type and into another tenant's
folder, client parameters that try to redirect a reference, more 413s, websocket frames over the
limit, a client that never reads its socket, clients that send headers or bodies too slowly, malformed
JSON and wrong types on every POST route, header injection, and clients trying to pick the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadStatusLine

from proxy.api import COMFY_ROUTES, COMFYAPI_ROUTES, PROXY_ROUTES
from proxy.app import create_app
from proxy.cli import server_options
from proxy.config import AuthConfig, BackendConfig, Config, SchedulerConfig, ServerConfig, TenantConfig, WorkflowsConfig
from proxy.logging import BAD_REQUESTS
from proxy.uploads import tenant_dir
from tests.client import ComfyClient, ProxyHandle, txt2img
from tests.conftest import TEARDOWN_S, free_port, wait_until
from tests.test_tenancy import comfy_user_recorder, recording_sim
from tests.test_uploads import png, upload

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
TENANTS = (TenantConfig("alice", api_keys=(ALICE,)), TenantConfig("bob", api_keys=(BOB,)))
WORKFLOWS = Path(__file__).resolve().parents[1] / "config" / "workflows"


def as_(key: str, url: str) -> ComfyClient:
    return ComfyClient(url, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
async def memory_proxy() -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    """Proxies on the in-process store for HTTP-layer protections (no store is involved), with the
    runner the CLI uses (`proxy.cli.server_options`)."""
    handles: list[ProxyHandle] = []

    async def start(backends: list[Any], **server: Any) -> ProxyHandle:
        config = Config(backends=tuple(BackendConfig(name=b.name, url=b.url) for b in backends),
                        server=ServerConfig(**server), scheduler=SchedulerConfig(poll_interval_s=0.2),
                        workflows=WorkflowsConfig(dir=str(WORKFLOWS)))
        runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False,
                               **server_options(config.server))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        handles.append(ProxyHandle(f"http://127.0.0.1:{port}", runner))
        return handles[-1]

    yield start
    for handle in handles:
        await asyncio.wait_for(handle.close(), TEARDOWN_S)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def raw_exchange(url: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (no client library to normalise them) and read until the server closes."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def climb(start: Path, target: Path) -> str:
    """The relative path from one folder to another (`../../t-…/input`)."""
    return os.path.relpath(target, start)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- paths --------------------------------------------------------------------------------------------
async def test_view_cannot_leave_the_callers_folder(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    uploads = proxy.services.uploads
    secret = png(11)
    async with as_(ALICE, proxy.url) as alice, as_(BOB, proxy.url) as bob:
        assert (await upload(alice, secret, name="cat.png"))[0] == 200
        alice_dir = uploads.folder("alice", "input")
        assert (alice_dir / "cat.png").read_bytes() == secret
        for filename in ("../cat.png", "/etc/passwd", "x/../../cat.png", str(alice_dir / "cat.png")):
            assert (await bob.get_bytes("/view", filename=filename, type="input"))[0] == 400, filename
        # Subfolder and type are joined to the caller's folder: neither may climb into Alice's.
        into_alice = climb(uploads.folder("bob", "input"), alice_dir)
        for params in ({"subfolder": into_alice, "type": "input"}, {"subfolder": str(alice_dir), "type": "input"},
                       {"subfolder": "", "type": f"../../{tenant_dir('alice')}/input"}):
            status, body = await bob.get_bytes("/view", filename="cat.png", **params)
            assert status in (403, 404) and body != secret, params
        assert await alice.get_bytes("/view", filename="cat.png", type="input") == (200, secret)
        # A NUL byte: the OS refuses the path; the answer is a 404, not a crash (found by the fuzzer).
        for params in ({"filename": "cat\0.png"}, {"filename": "cat.png", "subfolder": "a\0b"}):
            assert (await alice.get_bytes("/view", type="input", **params))[0] == 404, params
        # A name too long for the file system (ENAMETOOLONG from pathlib): not found, not a 500 (the fuzzer).
        long = "\u1e70\u033a" * 200
        assert (await alice.get_bytes("/view", type="input", filename=long + ".png"))[0] == 404
        assert (await alice.get_bytes(f"/extensions/{long}.js"))[0] == 404


async def test_uploads_cannot_land_outside_the_callers_folder(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    uploads = proxy.services.uploads
    async with as_(ALICE, proxy.url) as alice, as_(BOB, proxy.url) as bob:
        assert (await upload(alice, png(1), name="first.png"))[0] == 200
        alice_dir = uploads.folder("alice", "input")
        into_alice = climb(uploads.folder("bob", "input"), alice_dir)
        for subfolder in (into_alice, str(alice_dir), "/tmp"):
            assert (await upload(bob, png(2), name="planted.png", subfolder=subfolder))[0] == 400, subfolder
        assert (await upload(bob, png(2), name="planted.png", type="../../" + tenant_dir("alice")))[0] == 400
        for filename in (f"{into_alice}/planted.png", str(alice_dir / "planted.png")):
            assert await raw_upload(bob, filename) == 400
        # Names the file system refuses: a 400, not a 500 (found by the fuzzer).
        for subfolder in ("x" * 300, "a\0b", "/".join(["y" * 200] * 30)):
            assert (await upload(bob, png(2), name="fine.png", subfolder=subfolder))[0] == 400, subfolder[:20]
        assert (await upload(bob, png(2), name="n" * 300 + ".png"))[0] == 400
    assert listing(alice_dir) == ["first.png"] and "planted.png" not in listing(Path("/tmp"))


async def raw_upload(client: ComfyClient, filename: str, disposition: str | None = None) -> int:
    """A multipart body written by hand (aiohttp's client would percent-encode a hostile name)."""
    boundary = "b0undary"
    disposition = disposition or f'form-data; name="image"; filename="{filename}"'
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n").encode() \
        + png(5) + f"\r\n--{boundary}--\r\n".encode()
    assert client.session is not None
    async with client.session.post(client.base + "/upload/image", data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"}) as resp:
        await resp.read()
        return resp.status


async def test_a_reference_ignores_the_clients_subfolder_and_type(sims, proxies) -> None:
    proxy = await proxies([await sims("alpha")], tenants=TENANTS)
    async with as_(ALICE, proxy.url) as alice, as_(BOB, proxy.url) as bob:
        await alice.connect()
        pid = await alice.queue_prompt(txt2img(1))
        await alice.wait_done(pid)
        image = (await alice.get(f"/history/{pid}"))[1][pid]["outputs"]["9"]["images"][0]
        status, made = await alice.get_bytes("/view", **image)
        assert status == 200 and made.startswith(b"\x89PNG")
        redirected = {**image, "subfolder": "../../../../etc", "type": "input"}
        assert await alice.get_bytes("/view", **redirected) == (200, made)
        assert (await bob.get_bytes("/view", **image))[0] == 404


# --- sizes ----------------------------------------------------------------------------------------------
async def test_bodies_over_the_limit_are_413_in_comfyui_shape(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha")], max_body_mb=1)
    big = b"x" * (2 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]
    async with ComfyClient(proxy.url) as client:
        assert client.session is not None
        status, body = await upload(client, big, name="big.png")
        assert status == 413 and isinstance(body, dict) and body["error"]["type"] == "payload_too_large"
        async with client.session.post(proxy.url + "/prompt", data=chunks()) as resp:  # chunked: no length
            assert resp.status == 413 and (await resp.json())["error"]["type"] == "payload_too_large"
        status, body = await client.post("/userdata/big.json", raw=big)
        assert status == 413 and body["error"]["type"] == "payload_too_large"


async def test_websocket_frame_over_the_limit_closes_with_1009(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha")])
    async with aiohttp.ClientSession() as session, session.ws_connect(proxy.url + "/ws?clientId=big") as ws:
        first = await ws.receive(timeout=5)
        assert json.loads(first.data)["type"] == "status"
        await ws.send_str("x" * (2 * 1024 * 1024))
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1009


# --- slow clients ---------------------------------------------------------------------------------------
async def _ws_that_never_reads(url: str, client_id: str) -> socket.socket:
    """A websocket handshake on a socket with a tiny receive buffer; after it, nothing is ever read."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, host_port(url))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {url[7:]}\r\n"
                                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), 5)  # one byte at a time: no frame read
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_client_that_never_reads_is_dropped_and_others_keep_flowing(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha", step_ms=1)])
    hub = proxy.services.hub
    hub.max_bytes, hub.close_grace_s = 256 * 1024, 0.5   # small, so the test is quick
    stalled = await _ws_that_never_reads(proxy.url, "stalled")
    peak = 0
    try:
        async def registered() -> bool:
            return any(s.client_id == "stalled" for s in hub.sockets())
        await wait_until(registered, what="the stalled socket to register")
        # The kernel's send buffer would otherwise grow to MiBs before the proxy's own buffers are reached.
        server_side = next(s for s in hub.sockets() if s.client_id == "stalled").transport
        assert server_side is not None
        server_side.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        async with ComfyClient(proxy.url) as reader, ComfyClient(proxy.url, client_id="stalled") as flood:
            await reader.connect()
            for seed in range(4):  # progress and a preview per step, for the client that never reads
                await flood.post("/prompt", {"prompt": txt2img(seed, steps=300), "client_id": "stalled"})
            mine = await reader.queue_prompt(txt2img(99, steps=150))

            async def dropped() -> bool:
                nonlocal peak
                held = [s for s in hub.sockets() if s.client_id == "stalled"]
                peak = max([peak, *(s.queued_bytes for s in held)])
                return not held
            await wait_until(dropped, timeout=20, what="the stalled socket to be dropped")

            async def aborted() -> bool:   # without a byte read by the client
                return bool(server_side.is_closing())
            await wait_until(aborted, timeout=5, what="the stalled connection to be aborted")
            await reader.wait_done(mine, timeout=30)   # the other client's events kept flowing
            assert len(reader.messages_of_type("progress")) >= 150
        assert 0 < peak <= hub.max_bytes
        # Its connection is aborted, not left open behind a close frame it will never read.
        loop = asyncio.get_running_loop()

        async def closed_by_server() -> None:
            while True:
                try:
                    if not await loop.sock_recv(stalled, 65536):
                        return
                except ConnectionResetError:
                    return
        await asyncio.wait_for(closed_by_server(), 10)
    finally:
        stalled.close()


async def test_a_client_trickling_its_headers_is_disconnected(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha")], header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    writer.write(b"GET /proxy/healthz HTTP/1.1\r\nHost: x\r\n")
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def trickle() -> None:
        for i in range(100):
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await asyncio.sleep(0.05)   # the slow sender's pace is what is under test
    sender = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), 4)
    finally:
        sender.cancel()
        writer.close()
    assert answer == b"" and loop.time() - start < 3.0


async def test_a_client_trickling_its_body_gets_408(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha")], body_timeout_s=0.3)
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    writer.write(b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"prompt\": ")

    async def trickle() -> None:
        for _ in range(200):
            writer.write(b" ")
            await asyncio.sleep(0.05)   # the slow sender's pace is what is under test
    sender = asyncio.create_task(trickle())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 4)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 4))
    finally:
        sender.cancel()
        writer.close()
    assert head.startswith(b"HTTP/1.1 408") and body["error"]["type"] == "request_timeout"
    async with ComfyClient(proxy.url) as client:   # a normal body is not affected
        assert (await client.post("/prompt", {"prompt": txt2img(1)}))[0] == 200


# --- malformed JSON and wrong types ---------------------------------------------------------------------
BROKEN = [b"{", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"null", b"123", json.dumps({
    "prompt": 5, "delete": "x", "clear": [1], "prompt_id": {"a": 1}, "unload_models": "yes", "free_memory": {},
    "inputs": [], "client_id": 7, "number": "first", "front": "yes", "extra_data": [],
    "partial_execution_targets": 3}).encode(), json.dumps({"delete": [{"a": 1}, None, 5]}).encode()]
PATH_VALUES = {"name": "invert", "workflow_id": "invert", "file": "a.json", "dest": "b.json", "id": "Comfy.Setting",
               "job_id": "00000000-0000-4000-8000-000000000000", "delivery_id": "msg_0"}


def post_paths() -> list[str]:
    paths = [p for m, p, _ in (*COMFY_ROUTES, *PROXY_ROUTES, *COMFYAPI_ROUTES) if m == "POST"]
    return [p.format(**PATH_VALUES) for p in paths]


def comfy_error(body: Any) -> bool:
    return (isinstance(body, dict) and isinstance(body.get("error"), dict) and "node_errors" in body
            and {"type", "message", "details", "extra_info"} <= set(body["error"]))


async def test_malformed_json_and_wrong_types_on_every_post_route(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha")])
    async with ComfyClient(proxy.url, headers={"Content-Type": "application/json"}) as client:
        for path in post_paths():
            for raw in BROKEN:
                status, body = await client.post(path, raw=raw)
                assert status < 500, (path, raw, status, body)
                if status == 400 and path in ("/prompt", "/proxy/workflows/invert/run"):
                    assert comfy_error(body), (path, raw, body)      # ComfyUI's shape, and the proxy's
                elif status == 400 and "/jobs" in path:
                    assert isinstance(body["error"], str), (path, raw, body)   # the Jobs API's {"error": "…"}
                elif status == 400 and path != "/users":
                    assert isinstance(body, str | None) or comfy_error(body), (path, raw, body)  # bare, as ComfyUI
        status, body = await client.post("/prompt", raw=b"{")
        assert (status, body["error"]["type"]) == (400, "invalid_prompt")
        status, body = await client.post("/prompt", {"prompt": [1]})
        assert status == 400 and body["error"]["type"] == "invalid_prompt"
        status, body = await client.post("/proxy/workflows/invert/run", {"inputs": {"image": 5}})
        assert status == 400 and comfy_error(body) and "image" in body["error"]["message"] + body["error"]["details"]


# --- header injection -----------------------------------------------------------------------------------
async def test_names_cannot_inject_headers_into_view_answers(sims, memory_proxy) -> None:
    proxy = await memory_proxy([await sims("alpha")])
    async with ComfyClient(proxy.url) as client:
        await client.connect()
        pid = await client.queue_prompt(txt2img(3))
        await client.wait_done(pid)
        image = (await client.get(f"/history/{pid}"))[1][pid]["outputs"]["9"]["images"][0]
        ref_part = image["filename"][image["filename"].index("~"):]
        # The shown name before the reference is the client's own text (percent-decoded from the query).
        hostile = {**image, "filename": 'x"\r\nSet-Cookie: stolen=1\r\nX-A: "' + ref_part}
        assert client.session is not None
        async with client.session.get(proxy.url + "/view", params=hostile) as resp:
            assert resp.status == 200 and "Set-Cookie" not in resp.headers and "X-A" not in resp.headers
            assert resp.headers["Content-Disposition"].count('"') == 2
        # An upload's RFC 5987 name may carry CR/LF too: stored as ComfyUI would, served without them.
        status = await raw_upload(client, "", "form-data; name=\"image\"; "
                                              "filename*=utf-8''a%0D%0ASet-Cookie%3A%20b%3D1.png")
        assert status == 200
        async with client.session.get(proxy.url + "/view", params={
                "filename": "a\r\nSet-Cookie: b=1.png", "type": "input"}) as resp:
            assert resp.status == 200 and "Set-Cookie" not in resp.headers
            assert "\r" not in resp.headers["Content-Disposition"]


async def test_a_trusted_comfy_user_header_must_be_a_tenant_name(sims, proxies) -> None:
    record, seen = comfy_user_recorder()
    sim = await recording_sim(record)
    try:
        proxy = await proxies([sim], auth=AuthConfig(trust_comfy_user_header=True))
        body = json.dumps({"prompt": txt2img(1)}).encode()
        for hostile, refused in (("carol\x01", b"400"), ("../carol", b"401"), ("carol bob", b"401"),
                                 ("carol;x=1", b"401"), ("c" * 200, b"401")):
            request = (f"POST /prompt HTTP/1.1\r\nHost: x\r\ncomfy-user: {hostile}\r\nContent-Type: "
                       f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            answer = await raw_exchange(proxy.url, request + body)
            # aiohttp's parser refuses control characters (400); the proxy refuses what no tenant is named (401).
            assert answer.split(b" ", 2)[1] == refused, (hostile, answer)
        async with ComfyClient(proxy.url, headers={"comfy-user": "carol"}) as carol:
            await carol.connect()
            await carol.wait_done(await carol.queue_prompt(txt2img(1)))
        assert seen == ["carol"]
    finally:
        await sim.close()


# --- the upstream is the proxy's choice -----------------------------------------------------------------
async def test_no_client_input_chooses_the_upstream(sims, proxies) -> None:
    decoy_hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        decoy_hits.append(f"{request.method} {request.path_qs}")
        return web.json_response({})
    decoy = web.Application()
    decoy.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(decoy)
    await runner.setup()
    decoy_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", decoy_port).start()
    decoy_url = f"http://127.0.0.1:{decoy_port}"
    try:
        proxy = await proxies([await sims("alpha")])
        async with ComfyClient(proxy.url, headers={"X-Forwarded-Host": f"127.0.0.1:{decoy_port}",
                                                    "Forwarded": f"host=127.0.0.1:{decoy_port}"}) as client:
            await client.connect()
            status, body = await client.post("/prompt", {
                "prompt": txt2img(5), "client_id": client.client_id, "backend": decoy_url, "url": decoy_url,
                "extra_data": {"backend": decoy_url, "url": decoy_url}, "prompt_id": f"@127.0.0.1:{decoy_port}"})
            assert status == 200, body
            pid = body["prompt_id"]
            await client.wait_done(pid)
            image = (await client.get(f"/history/{pid}"))[1][pid]["outputs"]["9"]["images"][0]
            assert (await client.get_bytes("/view", **image, backend=decoy_url, url=decoy_url))[0] == 200
            for path in ("/system_stats", "/models", "/object_info/KSampler", f"/models/@127.0.0.1:{decoy_port}"):
                await client.get(path)
        for request in (f"GET {decoy_url}/system_stats HTTP/1.1\r\nHost: 127.0.0.1:{decoy_port}\r\n",
                        f"GET /system_stats HTTP/1.1\r\nHost: 127.0.0.1:{decoy_port}\r\n",
                        f"GET /api/models HTTP/1.1\r\nHost: {decoy_url}\r\n"):
            answer = await raw_exchange(proxy.url, (request + "Connection: close\r\n\r\n").encode())
            assert answer.startswith(b"HTTP/1.1 "), answer[:100]
        assert (await proxy.services.store.get(pid)).backend == "alpha"
        assert decoy_hits == []
    finally:
        await runner.cleanup()


def test_a_request_the_http_parser_refuses_is_one_warning_not_a_traceback() -> None:
    """aiohttp logs a malformed request after a connection's first as an error with a traceback; the
    proxy's logging makes it one warning line (the fuzzer found such lines in the server log)."""
    try:
        raise BadStatusLine("GARBAGE")
    except BadStatusLine as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                   ("127.0.0.1",), (type(exc), exc, exc.__traceback__))
    assert BAD_REQUESTS.filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "Traceback" not in logging.Formatter().format(record) and "400" in record.getMessage()
