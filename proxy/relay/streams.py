"""Redis Streams (`redis.events: streams`, the default, `StreamBus`): a replica that reconnects resumes where
it stopped, to the same server after a restart, to a new primary after a failover, to another node of a
Cluster (the stream `{prefix}:events` carries the deployment's hash tag; reads name its node).
- Publisher: one round trip per batch, pipelined: `XADD … MAXLEN ~ STREAM_MAXLEN`, then `SET … GET` of a
  marker key of its own (`{prefix}:events-sent:<origin>`) to the batch's seq. The marker goes after the
  entry, so where it survives (an append-only file, a replica) the entry does; the value it replaces says
  whether Redis still had the previous batch. If not (a restart without persistence, an append-only file
  not yet synced, a failover to a replica that had not received it), the publisher's window goes again:
  every batch acked less than `RESEND_S` before its last good check, previews of the oldest shed beyond
  `WINDOW_BYTES`. They land after the new batch, so a reader that finds a gap in an origin's seq holds
  what follows it for up to `HOLD_S` until the missing batches arrive. A quiet publisher with a window
  checks its marker every `CHECK_EVERY_S`, and at once when its receiver saw Redis fail, so a replica's
  last batch is not left lost because nothing came after it. (A script that checks before it appends
  would need no holding, but copies every payload into Lua and back: three times pub/sub's Redis CPU for
  64 KiB previews.)
- Receiver: `XREAD BLOCK` from the last id it read, starting at the stream's newest entry (not `$`, which
  would skip what is added between two reads). A read that brought only a few entries is followed by a
  1 ms pause (`READ_PAUSE_S`): under a steady stream the next read then takes several batches in one
  round trip instead of one each, which is what keeps the readers' and Redis's CPU per event near pub/sub's
  (`bench overhead`). An event after a quiet spell is not delayed; one in a stream, 1 ms at most. After a
  failure the reader reads again from `REWIND_MS` before its id: a new primary goes on from the ids it
  had replicated, so what it takes after a failover may sit below an id read from the old primary (a new
  primary's clock behind the old one's adds to that). The seq check drops what it had. For a while after
  a failure the first batch heard from a replica waits like one after a gap: this reader may stand before
  batches of it that are on their way again.
- Bounds: by length in every XADD; by age with `XTRIM MINID ~` on Redis's clock (`STREAM_MAX_AGE_S`) every
  `TRIM_EVERY_S` from every replica, which also lets the stream expire when no replica is left. Whole
  stream nodes are trimmed (`~`), so a node's worth more may remain.
- What it can lose: batches a receiver had not read that Redis lost and the window no longer holds (the
  receiver more than `RESEND_S` behind, or previews shed); what a receiver away longer than the stream
  holds missed (a gap in seq is logged); entries a new primary adds below a receiver's id by more than
  `REWIND_MS` of clock skew.
- Ends are confirmed (`Store.ends_announced`) once the XADD that holds them succeeded: a copy Redis loses
  afterwards is written again from the window. The announcer (proxy.relay.announce) is left with the
  ends of a replica that died before publishing them (or whose confirmation was lost): from the bus
  itself a client gets each end once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from proxy.relay.bus import CHECK, HOLD_S, RETRY_S, Outgoing, RedisBus, Settle
from proxy.relay.hub import ClientHub
from proxy.store.connect import redis_client
from proxy.store.redis import Keys

log = structlog.get_logger(__name__)

STREAM_MAXLEN = 2000      # batches the stream keeps, about (XADD MAXLEN ~)
STREAM_MAX_AGE_S = 60.0   # and for how long at most (XTRIM MINID ~, on Redis's clock)
TRIM_EVERY_S = 10.0
RESEND_S = 5.0            # batches acked this long before a good check are kept to write again
WINDOW_BYTES = 32 * 1024 * 1024   # beyond this, the oldest batches kept lose their previews
CHECK_EVERY_S = 1.0       # a quiet publisher with batches kept checks this often that Redis has them
MARKER_TTL_MS = 60_000    # a publisher's marker (see StreamBus._write) outlives its window by far
REWIND_MS = 5000          # after a failure, a receiver reads again from this far before its position
CALL_TIMEOUT_S = 10.0     # a call Redis has not answered by then (beyond a read's block) counts as failed
READ_COUNT = 256
READ_FEW = 8              # a read that brought fewer entries is followed by a pause of READ_PAUSE_S, so
READ_PAUSE_S = 0.001      # a steady stream is read several batches a round trip, not one (at most 1 ms later)
YIELD_BYTES = 256 * 1024  # a reader caught up with a backlog lets client sockets drain after this much
READ_BLOCK_MS = 2000

_TRIM = """
local stream = KEYS[1]
local max_age_ms = tonumber(ARGV[1])
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - max_age_ms
redis.call('XTRIM', stream, 'MINID', '~', string.format('%d-0', oldest))
redis.call('PEXPIRE', stream, 2 * max_age_ms)
"""
_TRIM_SHA = hashlib.sha1(_TRIM.encode()).hexdigest()


def _rewound(position: bytes) -> bytes:
    ms = int(position.partition(b"-")[0])
    return b"%d-0" % max(ms - REWIND_MS, 0)


@dataclass(slots=True)
class _Sent:
    seq: int
    header: bytes
    events: list[Outgoing]
    size: int
    acked_at: float = math.inf

    def message(self) -> bytes:
        return b"".join([self.header, *(framed for framed, _, _ in self.events)])


class _Window:
    """The publisher's recent batches, to write again if Redis loses them: those acked less than
    `RESEND_S` before the last check that found Redis had them all; `STREAM_MAXLEN` at most (the stream
    would trim more as they went in) and `WINDOW_BYTES` (the oldest shed their previews first, so their
    text, and ends, are kept longest)."""

    def __init__(self) -> None:
        self._sent: deque[_Sent] = deque()
        self._with_previews: deque[_Sent] = deque()   # those of `_sent` that still have binary events
        self._bytes = 0
        self.checked_at = 0.0

    def __len__(self) -> int:
        return len(self._sent)

    def add(self, seq: int, header: bytes, batch: list[Outgoing]) -> _Sent:
        sent = _Sent(seq, header, batch, len(header) + sum(len(framed) for framed, _, _ in batch))
        self._sent.append(sent)
        self._bytes += sent.size
        if any(binary for _, _, binary in batch):
            self._with_previews.append(sent)
        return sent

    def all(self) -> list[_Sent]:
        return list(self._sent)

    def checked(self, now: float) -> None:
        """Redis had every batch kept at `now`."""
        self.checked_at = now
        if self._sent and self._sent[-1].acked_at == math.inf:
            self._sent[-1].acked_at = now
        while self._sent and (self._sent[0].acked_at < now - RESEND_S or len(self._sent) > STREAM_MAXLEN):
            self._drop_oldest()
        while self._bytes > WINDOW_BYTES and self._with_previews:
            sent = self._with_previews.popleft()
            sent.events = [event for event in sent.events if not event[2]]
            size = len(sent.header) + sum(len(framed) for framed, _, _ in sent.events)
            self._bytes += size - sent.size
            sent.size = size
        while self._bytes > WINDOW_BYTES and len(self._sent) > 1:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        sent = self._sent.popleft()
        self._bytes -= sent.size
        if self._with_previews and self._with_previews[0] is sent:
            self._with_previews.popleft()


class StreamBus(RedisBus):
    hold_s = HOLD_S

    def __init__(self, *, hub: ClientHub, url: str, keys: Keys, settle: Settle | None = None) -> None:
        super().__init__(hub=hub, settle=settle)
        self.key = keys.events
        self._marker = keys.events_sent(self.origin)
        # No retries inside redis-py: a failure must reach the loops below, which know what to do again. No
        # socket timeout either (it wraps every command in a task of its own): the calls below have theirs.
        self._redis = redis_client(url, decode_responses=False, socket_connect_timeout=5, health_check_interval=15,
                                   retry=Retry(NoBackoff(), 0))
        self._reader = self._reader_client()
        self._window = _Window()
        self._marked: bytes | None = None   # this publisher's marker as it last set it (None: never)
        self._position = b""    # the id of the last entry the receiver read; b"": the newest at its start
        self._rewind = False    # the receiver should read again from REWIND_MS back
        self._wary_until = 0.0  # loop time: until then, `_wary` (set after a failure)

    def _reader_client(self) -> Any:
        """The reader holds a connection of its own (the pool's checkout and release cost as much as a read)."""
        return self._redis if isinstance(self._redis, RedisCluster) else self._redis.client()

    async def _renew_reader(self) -> None:
        """A new reader connection after a failure, taken from the pool, which asks the Sentinels where the
        primary is now. redis-py (8.2) reconnects a connection kept by one client to the address it had:
        after a failover, the old primary, for ever."""
        if self._reader is not self._redis:
            with contextlib.suppress(RedisError, OSError):
                await self._reader.aclose()
            self._reader = self._reader_client()

    def _loops(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        return [(self._send_loop(), "bus-publisher"), (self._receive_loop(), "bus-reader"),
                (self._maintain(), "bus-maintenance")]

    async def _close(self) -> None:
        if self._reader is not self._redis:
            await self._reader.aclose()
        await self._redis.aclose()

    def _check_soon(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(CHECK)

    async def _send_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch[0] is CHECK and all(item is CHECK for item in batch):
                if self._window:
                    await self._commit(None)
                continue
            header = self._header()
            await self._commit(self._window.add(self._seq, header, batch))
            self._confirmations.add([settles for _, settles, _ in batch if settles is not None])

    async def _commit(self, sent: _Sent | None) -> None:
        """Write `sent` (or nothing: a check) and make sure Redis still has what this publisher wrote before
        it; what Redis lost goes again. Tried until Redis answers."""
        while True:
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await (self._check() if sent is None else self._append(sent))
                break
            except (RedisError, OSError) as exc:
                # Local sockets already have these events; other replicas get them once Redis is back.
                log.warning("event_bus_publish_failed", error=repr(exc), events=0 if sent is None else len(sent.events))
                await asyncio.sleep(RETRY_S)
        self._window.checked(asyncio.get_running_loop().time())

    async def _append(self, sent: _Sent) -> None:
        marked = await self._write([sent], sent.seq)
        if marked not in (self._marked, b"%d" % sent.seq) and len(self._window) > 1:
            # Batches written before this one are lost: they go again after it; readers wait for them (_take).
            await self._resend(self._window.all()[:-1], sent.seq)
        self._marked = b"%d" % sent.seq

    async def _check(self) -> None:
        if await self._redis.get(self._marker) != self._marked:
            sent = self._window.all()
            await self._resend(sent, sent[-1].seq)

    async def _resend(self, sent: list[_Sent], marker: int) -> None:
        log.warning("event_bus_resending", batches=len(sent))
        self._rewind = True   # a new server: ids may have gone back (see the module docstring)
        await self._write(sent, marker)
        self._marked = b"%d" % marker

    async def _write(self, sent: list[_Sent], marker: int) -> bytes | None:
        """XADD the batches, then set this publisher's marker to `marker` (a seq) and return what it was.
        The marker goes after the entries, so where it survives (an append-only file, a replica) they do."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch in sent:
                pipe.xadd(self.key, {b"d": batch.message()}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.set(self._marker, marker, px=MARKER_TTL_MS, get=True)
            replies = await pipe.execute()
        return replies[-1]

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._position:
                    newest = await self._redis.xrevrange(self.key, count=1)
                    self._position = bytes(newest[0][0]) if newest else b"0-0"
                self._ready.set()
                if self._rewind:
                    self._position, self._rewind = _rewound(self._position), False
                    self._wary_until = loop.time() + REWIND_MS / 1000
                async with asyncio.timeout(READ_BLOCK_MS / 1000 + CALL_TIMEOUT_S):
                    reply = await self._reader.execute_command(
                        "XREAD", "COUNT", READ_COUNT, "BLOCK", READ_BLOCK_MS, "STREAMS", self.key, self._position,
                        **self._stream_node())
            except (RedisError, OSError) as exc:
                log.warning("event_bus_read_failed", error=repr(exc))
                self._rewind = True
                await self._renew_reader()
                self._check_soon()   # what this replica wrote last may be lost too
                await asyncio.sleep(RETRY_S)
                continue
            self._wary = self._wary_until > loop.time()
            if await self._take_all(reply) < READ_FEW:
                await asyncio.sleep(READ_PAUSE_S)

    def _stream_node(self) -> dict[str, Any]:
        """On a Cluster, XREAD goes to the stream's node by name: redis-py cannot read XREAD's keys from
        their specs and would ask its default node for them (COMMAND GETKEYS) on every read, a round trip
        more, and a read that fails for as long as that node is down."""
        if isinstance(self._redis, RedisCluster):
            return {"target_nodes": self._redis.get_node_from_key(self.key)}
        return {}

    async def _take_all(self, reply: list[Any]) -> int:
        """What one read brought; returns how many entries. A backlog (a reader starved of CPU for a while)
        is delivered with pauses that let the client sockets' writers run, so no client's outbox takes the
        whole of it at once."""
        count = taken = 0
        for _, entries in reply:
            count += len(entries)
            for entry_id, fields in entries:
                raw = fields[b"d"]
                self._take(raw)
                self._position = entry_id
                taken += len(raw)
                if taken > YIELD_BYTES:
                    taken = 0
                    await asyncio.sleep(0)
        return count

    async def _maintain(self) -> None:
        """Now and then: a quiet publisher's window checked, and the stream trimmed by age."""
        loop = asyncio.get_running_loop()
        trimmed_at = loop.time()
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            if self._window and loop.time() - self._window.checked_at >= CHECK_EVERY_S:
                self._check_soon()
            if loop.time() - trimmed_at >= TRIM_EVERY_S:
                trimmed_at = loop.time()
                await self._trim()

    async def _trim(self) -> None:
        args = (1, self.key, int(STREAM_MAX_AGE_S * 1000))
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                try:
                    await self._redis.execute_command("EVALSHA", _TRIM_SHA, *args)
                except NoScriptError:   # a server that has not seen it yet (a restart, a failover)
                    await self._redis.execute_command("EVAL", _TRIM, *args)
        except (RedisError, OSError) as exc:
            log.warning("event_bus_trim_failed", error=repr(exc))


# --- Redis pub/sub ------------------------------------------------------------------------------------
