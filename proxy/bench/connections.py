"""`bench connections`: idle client websockets held by one proxy process, and what each costs in RSS."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp

from proxy.bench.load import open_many
from proxy.bench.procs import proxy, raise_fd_limit, sim
from proxy.bench.result import BenchResult

BATCH = 250


async def run(quick: bool = False) -> BenchResult:
    target = 2000 if quick else 10000
    limit = raise_fd_limit()
    result = BenchResult("connections", params={"target": target, "fd_limit": limit})
    async with sim("idle", "--no-previews") as backend, proxy([backend.url]) as front:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            # Warm the proxy up (one socket) so the baseline includes what the first socket allocates.
            warm = await s.ws_connect(f"{front.url.replace('http', 'ws', 1)}/ws?clientId=warm")
            await warm.receive()
            await asyncio.sleep(0.5)
            before = front.rss_kib()

            async def open_one() -> aiohttp.ClientWebSocketResponse:
                ws = await s.ws_connect(f"{front.url.replace('http', 'ws', 1)}/ws?clientId={uuid.uuid4().hex}",
                                        autoping=True, heartbeat=None)
                await ws.receive()  # the first `status`: the proxy registered it
                return ws

            sockets = await open_many(open_one, target, aiohttp.ClientWebSocketResponse, result.params, BATCH)
            await asyncio.sleep(1.0)
            after = front.rss_kib()
            async with s.get(front.url + "/metrics") as resp:
                metrics = await resp.text()
            held = next((float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("comfy_proxy_websocket_clients ")), float(len(sockets) + 1))
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
            await warm.close()
    result.add("idle_ws_held", len(sockets), "sockets")
    result.add("proxy_reported_clients", held, "sockets")
    result.add("kib_per_idle_ws", (after - before) / max(len(sockets), 1), "KiB")
    return result
