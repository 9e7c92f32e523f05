"""What the webhook and discovery tests stand on: a receiver that verifies every delivery with the
`standardwebhooks` package (the reference implementation, not the proxy's signing code) and answers as a
test scripts it, and a real DNS server (Debian's dnsmasq on a free loopback port) serving names the test
rewrites."""

from __future__ import annotations

import asyncio
import base64
import getpass
import json
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests import tools

HANG = -1   # an answer that never comes (the connection is held until the receiver closes)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Received:
    id: str
    timestamp: str
    verified: bool
    body: dict[str, Any]
    answer: int


async def serve(app: web.Application, host: str, port: int = 0) -> tuple[web.AppRunner, int]:
    """A test's own HTTP server on `host` (port 0: a free one): its runner and the port it got."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]   # type: ignore[union-attr]


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1 (or `host`): each request is verified, recorded, and answered with the
    next status of `script` (200 once it runs out; `HANG` holds the request open)."""

    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    script: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _held: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner, self.port = await serve(app, self.host, self.port)
        return self

    async def stop(self) -> None:
        self._held.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            Webhook(self.secret).verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        answer = self.script.pop(0) if self.script else 200
        async with self._changed:
            self.got.append(Received(headers.get("webhook-id", ""), headers.get("webhook-timestamp", ""), verified,
                                     json.loads(raw), answer))
            self._changed.notify_all()
        if answer == HANG:
            await self._held.wait()
        return web.Response(status=200 if answer == HANG else answer)

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Once `count` requests have come in."""
        async def enough() -> list[Received]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.got) >= count)
                return list(self.got)
        return await asyncio.wait_for(enough(), timeout)


class DnsServer:
    """dnsmasq answering from a hosts folder only (nothing upstream), for names under `.test`:
    `point(name, *addresses)` rewrites it and returns once the server answers with them."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.hosts = folder / "hosts"
        self.proc: subprocess.Popen[bytes] | None = None
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
        self._resolver.cache = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text("")
        self.proc = subprocess.Popen(
            [tools.tool("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}", "--pid-file=",
             f"--user={getpass.getuser()}", f"--hostsdir={self.folder}", "--local-ttl=0", "--no-negcache",
             "--local=/test/"],   # answers for *.test itself: a name not in the hosts folder does not exist
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    async def answer(self, name: str) -> list[str]:
        try:
            found = await self._resolver.resolve(name, "A", lifetime=1)
        except dns.exception.DNSException:
            return []
        return sorted(rr.address for rr in found)

    async def point(self, name: str, *addresses: str, timeout: float = 10.0) -> None:
        """`name` resolves to exactly these addresses (none: it does not exist) once this returns."""
        self.hosts.write_text("".join(f"{address} {name}\n" for address in addresses))
        deadline = asyncio.get_running_loop().time() + timeout
        while await self.answer(name) != sorted(addresses):
            assert asyncio.get_running_loop().time() < deadline, f"dnsmasq never answered {name} -> {addresses}"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
