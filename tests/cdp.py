"""A headless Chromium driven over the Chrome DevTools Protocol, for tests that load the web frontend.

Debian's `chromium` is started with a private profile and `--remote-debugging-port=0`; the port it
picked is read from `DevToolsActivePort` in the profile. One websocket to the browser carries every
command; pages are attached with flat sessions, so events and answers are told apart by `sessionId`.
Every network answer a page receives is recorded (`Page.responses`), so a test can assert that no
request failed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests import tools

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-dev-shm-usage", "--window-size=1280,900", "--remote-debugging-port=0",
         "--remote-allow-origins=*")


def chromium_binary() -> str | None:
    return tools.find("chromium", "chromium-browser")


class CdpError(RuntimeError):
    pass


@dataclass
class Response:
    url: str
    status: int
    mime_type: str
    request_id: str


@dataclass
class Page:
    browser: Browser
    session_id: str
    responses: list[Response] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # URLs of requests that got no answer at all
    console_errors: list[str] = field(default_factory=list)
    _urls: dict[str, str] = field(default_factory=dict)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id)

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression (promises awaited), or CdpError with the exception."""
        result = await asyncio.wait_for(self.send("Runtime.evaluate", expression=expression, awaitPromise=True,
                                                  returnByValue=True), timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll an expression until it is truthy (the page has no event a test could await)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    async def body(self, response: Response) -> bytes:
        got = await self.send("Network.getResponseBody", requestId=response.request_id)
        return base64.b64decode(got["body"]) if got.get("base64Encoded") else got["body"].encode()

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            self._urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.responseReceived":
            r = params["response"]
            self.responses.append(Response(r["url"], int(r["status"]), r.get("mimeType", ""), params["requestId"]))
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.failures.append(self._urls.get(params["requestId"], params["requestId"]))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params["exceptionDetails"])[:500])


class Browser:
    def __init__(self, process: asyncio.subprocess.Process, session: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse) -> None:
        self.process = process
        self.session = session
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, binary: str, profile: Path, timeout: float = 30.0) -> Browser:
        process = await asyncio.create_subprocess_exec(
            binary, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"
        deadline = asyncio.get_running_loop().time() + timeout
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if process.returncode is not None or asyncio.get_running_loop().time() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise CdpError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port, path = active.read_text().splitlines()[:2]
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        return cls(process, session, ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(CdpError(json.dumps(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
            elif "sessionId" in data and data["sessionId"] in self._pages:
                self._pages[data["sessionId"]].on_event(data["method"], data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(CdpError("the browser closed its DevTools socket"))

    async def send(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
                   ) -> dict[str, Any]:
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, 30.0)

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Network", "Runtime", "Page"):
            await page.send(f"{domain}.enable")
        return page

    async def close(self) -> None:
        with contextlib.suppress(CdpError, asyncio.TimeoutError, aiohttp.ClientError):
            await asyncio.wait_for(self.send("Browser.close"), 5.0)
        await self.ws.close()
        await self.session.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        try:
            await asyncio.wait_for(self.process.wait(), 10.0)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

