"""Client websockets held by this replica, and delivery to them with ComfyUI's clientId semantics.

ComfyUI keeps one socket per clientId (a new socket with the same id takes the registry slot), sends a
prompt's execution messages to the socket whose id is the prompt's `client_id`, and — for prompts
without one — broadcasts `progress`, `progress_state`, previews and `execution_interrupted`.
Sockets are keyed by (tenant, clientId), so two tenants that pick the same
clientId never see each other's events.

Each socket has a bounded outbox drained by its own writer task: one slow client never stalls the
upstream reader or other clients. A client that falls `max_frames` frames or `max_bytes` bytes behind
is dropped: its outbox is emptied, it is sent a close (1008, "client too slow"), and its connection is
aborted if that close is not through within `CLOSE_GRACE_S` (a client that never reads never reads the
close either; aiohttp's writer waits on the transport once 64 KiB are buffered, so without the abort the
connection would stay open). Memory per socket is thus bounded by the outbox limits plus the
transport's buffer. A dropped client reconnects and gets the current state (status, executing node) as
ComfyUI gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import structlog
from aiohttp import web

from proxy.comfy import frames
from proxy.metrics import Metrics
from proxy.relay.jobevents import JobEvents

log = structlog.get_logger(__name__)

OUTBOX_LIMIT = 4096                 # frames queued for one client at most
OUTBOX_MAX_BYTES = 8 * 1024 * 1024  # bytes queued for one client at most (previews are the big frames)
CLOSE_GRACE_S = 5.0                 # a dropped client's close must be through by then, or it is aborted
# A prompt without client_id: ComfyUI 0.3.75 sends these to every socket and the rest (executing, executed,
# execution_start/success/error, and executing null at the end) to nobody — main.py and execution.py
# check `client_id is not None` before those. (PRODUCT.md's "Traps" lists executing null as broadcast;
# a live 0.3.75 does not send it.)
BROADCAST_WITHOUT_CLIENT = frozenset({"progress", "progress_state", "execution_interrupted", "preview", "binary",
                                      "status"})   # the proxy's own queue status (router.QueueStatus)


LOGS = "logs"                             # a backend's console lines (proxy.api.logs)
RETRY = "proxy_retry"                     # a prompt that was running runs again (proxy.relay.router)
# A queued prompt was deleted before it ran. ComfyUI tells its client nothing; a results socket (ComfyAPI's)
# gets its result all the same, so a client waiting on it is never left waiting.
WITHDRAWN = "proxy_withdrawn"
LOGS_SUBSCRIPTION = "logs_subscription"   # payload "1"/"0": that socket wants LOGS, or no longer


@dataclass(frozen=True)
class ClientEvent:
    """One frame for a client: `client_id` None means the prompt had none (broadcast rules apply)."""

    tenant: str
    client_id: str | None
    payload: str | bytes
    kind: str                                  # message type, or "preview"/"binary" for binary frames
    _: KW_ONLY
    preview_meta: dict[str, Any] | None = None  # for type-1 previews: node and prompt, to make type 4
    settles: str | None = None                 # the prompt whose end this announces (Store.ends_announced)
    end_of: str | None = None   # the prompt this ends (terminal message, `executing` null) or runs again (proxy_retry)


@dataclass(frozen=True)
class RunEnded:
    """Put in a results socket's outbox after a run's `executing` null: its result goes out there, in order."""

    prompt_id: str
    withdrawn: bool = False   # deleted from the queue before it ran: there is no record left to read


Outgoing = str | bytes | RunEnded | None   # None: close (the client is too slow)


@dataclass(eq=False)  # identity semantics: sockets live in sets
class ClientSocket:
    ws: web.WebSocketResponse
    tenant: str
    client_id: str
    _: KW_ONLY
    wants_metadata: bool = False
    # A ComfyAPI socket (proxy.api.comfyapi): only its own runs' messages (no previews, no tenant-wide
    # broadcasts), and a `RunEnded` after each run's end.
    results: bool = False
    transport: asyncio.Transport | None = None   # the connection, to abort a client that stopped reading
    outbox: asyncio.Queue[Outgoing] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0
    dropped: bool = False

    def offer(self, frame: str | bytes, max_frames: int = OUTBOX_LIMIT, max_bytes: int = OUTBOX_MAX_BYTES) -> bool:
        """Queue a frame unless the client is that far behind already (then the caller drops it)."""
        if self.dropped or self.outbox.qsize() >= max_frames or self.queued_bytes + len(frame) > max_bytes:
            return False
        self.outbox.put_nowait(frame)
        self.queued_bytes += len(frame)
        return True

    def taken(self, frame: str | bytes) -> None:
        """The writer took a frame off the outbox."""
        self.queued_bytes -= len(frame)

    def drop(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Too slow: forget what is queued, close with 1008, abort if that close is not through in time."""
        if self.dropped:
            return
        self.dropped = True
        while not self.outbox.empty():
            self.outbox.get_nowait()
        self.queued_bytes = 0
        self.outbox.put_nowait(None)  # tells the writer to close
        asyncio.get_running_loop().call_later(grace_s, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


ENDS_KEPT = 4096   # prompts whose end a hub remembers telling (the least recently ended go first): a second
#                    telling comes seconds after the first, a long Redis outage minutes after


class EndsTold:
    """Which end messages of which prompts a hub has delivered, so each reaches a client once. An end can
    reach a hub twice: the replica that stored it and the announcer that found it unconfirmed (a bus
    confirmation lost to a Redis failure) both tell it, or a store that lost an acknowledged write (a
    failover) lets the end be stored and told again. A `proxy_retry` forgets the prompt's: it will end again."""

    def __init__(self, kept: int = ENDS_KEPT) -> None:
        self.kept = kept
        self._told: OrderedDict[tuple[str, str | None, str], set[str]] = OrderedDict()

    def first(self, event: ClientEvent) -> bool:
        """Whether `event` (one with `end_of`) is to be delivered."""
        assert event.end_of is not None
        key = (event.tenant, event.client_id, event.end_of)
        if event.kind == RETRY:
            self._told.pop(key, None)
            return True
        kinds = self._told.get(key)
        if kinds is None:
            kinds = self._told[key] = set()
            if len(self._told) > self.kept:
                self._told.popitem(last=False)
        elif event.kind in kinds:
            return False
        kinds.add(event.kind)
        return True


class ClientHub:
    """Registry of this replica's client sockets and the delivery rules."""

    def __init__(self, metrics: Metrics | None = None, max_frames: int = OUTBOX_LIMIT,
                 max_bytes: int = OUTBOX_MAX_BYTES, close_grace_s: float = CLOSE_GRACE_S) -> None:
        self._metrics = metrics
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.close_grace_s = close_grace_s
        self._by_tenant: dict[str, dict[str, ClientSocket]] = {}   # tenant → clientId → its current socket
        self._all: set[ClientSocket] = set()  # includes sockets whose id was taken by a newer socket
        self.log_subscribers: set[tuple[str, str]] = set()   # (tenant, clientId) sockets that want LOGS
        self._ends = EndsTold()
        self._end_watchers: dict[str, set[asyncio.Future[None]]] = {}   # prompt_id → waiting run-and-waits
        self.jobs = JobEvents()   # each job's messages, for server-sent events

    @staticmethod
    def new_client_id() -> str:
        return uuid.uuid4().hex

    def register(self, sock: ClientSocket) -> None:
        self._by_tenant.setdefault(sock.tenant, {})[sock.client_id] = sock
        self._all.add(sock)

    def unregister(self, sock: ClientSocket) -> bool:
        """True if `sock` still held its clientId (a newer socket may have taken it over)."""
        self._all.discard(sock)
        if self._socket(sock.tenant, sock.client_id) is not sock:
            return False
        same_tenant = self._by_tenant[sock.tenant]
        del same_tenant[sock.client_id]
        if not same_tenant:
            del self._by_tenant[sock.tenant]
        return True

    def _socket(self, tenant: str, client_id: str) -> ClientSocket | None:
        return self._by_tenant.get(tenant, {}).get(client_id)

    def count(self) -> int:
        return len(self._all)

    def sockets(self) -> list[ClientSocket]:
        return list(self._all)

    def watch_end(self, prompt_id: str) -> asyncio.Future[None]:
        """Resolved when a prompt's end crosses this replica (its `executing` null, published with
        `settles` whether or not the prompt has a client): run-and-wait without polling (`proxy.api.run`)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._end_watchers.setdefault(prompt_id, set()).add(fut)
        return fut

    def unwatch_end(self, prompt_id: str, fut: asyncio.Future[None]) -> None:
        watchers = self._end_watchers.get(prompt_id)
        if watchers is not None:
            watchers.discard(fut)
            if not watchers:
                del self._end_watchers[prompt_id]

    def _ended(self, prompt_id: str) -> None:
        for fut in self._end_watchers.get(prompt_id, ()):
            if not fut.done():
                fut.set_result(None)

    def deliver(self, event: ClientEvent) -> None:
        if event.settles is not None:
            self._ended(event.settles)
        self.jobs.record(event.tenant, event.kind, event.payload)
        if event.end_of is not None and not self._ends.first(event):
            return
        if event.kind in (LOGS_SUBSCRIPTION, LOGS):
            self._deliver_logs(event)
            return
        if event.client_id is not None:
            sock = self._socket(event.tenant, event.client_id)
            if sock is not None:
                self._send(sock, event)
            return
        if event.kind in BROADCAST_WITHOUT_CLIENT:
            for sock in list(self._by_tenant.get(event.tenant, {}).values()):
                self._send(sock, event)

    def _deliver_logs(self, event: ClientEvent) -> None:
        if event.kind == LOGS_SUBSCRIPTION:
            if event.client_id is not None:
                key = (event.tenant, event.client_id)
                (self.log_subscribers.add if event.payload == "1" else self.log_subscribers.discard)(key)
            return
        # Subscribers on every replica are listed (subscriptions travel the bus); the replica holding a
        # socket announces its end (api.ws), as ComfyUI drops subscribers whose socket is gone.
        for key in list(self.log_subscribers):
            sock = self._socket(*key)
            if sock is not None:
                self._send(sock, event)

    def _send(self, sock: ClientSocket, event: ClientEvent) -> None:
        if event.kind == WITHDRAWN:
            if sock.results and isinstance(event.payload, str):
                sock.outbox.put_nowait(RunEnded(event.payload, withdrawn=True))
            return
        if sock.results and (event.client_id is None or isinstance(event.payload, bytes)):
            return
        payload = event.payload
        if event.preview_meta is not None and sock.wants_metadata:
            # Protocol §8: sockets that announced supports_preview_metadata get type-4 frames instead.
            payload = frames.preview_to_metadata_frame(payload, event.preview_meta)  # type: ignore[arg-type]
        if sock.offer(payload, self.max_frames, self.max_bytes):
            if self._metrics is not None:
                self._metrics.relayed(event.kind)
            if sock.results and event.end_of is not None and event.kind == "executing":
                sock.outbox.put_nowait(RunEnded(event.end_of))
        else:
            log.warning("client_too_slow", client_id=sock.client_id, tenant=sock.tenant,
                        queued_frames=sock.outbox.qsize(), queued_bytes=sock.queued_bytes)
            self.unregister(sock)
            sock.drop(self.close_grace_s)

    async def close_all(self, code: int = 1001, message: bytes = b"server shutdown") -> None:
        """Close every socket at once; one whose client does not take the close in time is aborted, so a
        client that stopped reading cannot hold a graceful shutdown open."""
        async def close(sock: ClientSocket) -> None:
            try:
                async with asyncio.timeout(self.close_grace_s):
                    await sock.ws.close(code=code, message=message)
            except (TimeoutError, ConnectionError):
                sock.abort()
        socks = list(self._all)
        for sock in socks:
            self.unregister(sock)
        await asyncio.gather(*(close(sock) for sock in socks))


async def write_loop(sock: ClientSocket) -> None:
    """Drain a socket's outbox in order; `None` in the outbox closes it (client too slow)."""
    while True:
        frame = await sock.outbox.get()
        if frame is None:
            with contextlib.suppress(ConnectionError):
                await sock.ws.close(code=1008, message=b"client too slow")
            return
        if isinstance(frame, RunEnded):
            continue
        sock.taken(frame)
        if isinstance(frame, bytes):
            await sock.ws.send_bytes(frame)
        else:
            await sock.ws.send_str(frame)
