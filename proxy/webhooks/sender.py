"""The delivery worker: every replica runs one over the shared outbox (`Store.webhooks_*`).

A delivery is claimed with a lease longer than one attempt, so a replica killed mid-delivery leaves it to
whichever replica claims it next; the receiver then sees the same `webhook-id` twice at most, which
Standard Webhooks receivers deduplicate. 2xx ends a delivery, 410 Gone stops it, and anything else (another
status, a timeout, a refused connection, a name that now resolves inside the farm) is tried again after
`webhooks.retry_base_s` doubled per attempt, capped at `webhooks.retry_cap_s`, with jitter, until
`webhooks.max_attempts`. Redirects are not followed (a receiver's 3xx is a failed attempt): a redirect
could lead anywhere, past the checks its URL passed.

A receiver's host takes at most `webhooks.per_host` deliveries at once from each replica; a delivery for a
busy host goes back to the outbox for a moment instead of taking one of the `webhooks.concurrency` slots
from the others, so one slow receiver holds up nobody else's.

Every report carries the claim it was made under (`Delivery.claimed_until`): a replica that stalled past
its claim, while another claimed the delivery, records nothing.

The body is made at each attempt by `payload` (`proxy.api.webhooks.payload`: the job as it is then).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import structlog
from yarl import URL

from proxy import jsoncodec
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.store import Store
from proxy.store.base import DELIVERED, FAILED, STOPPED, Delivery, backoff
from proxy.tasks import TaskOwner
from proxy.urlguard import UrlGuard, UrlRefused
from proxy.webhooks import signing

log = structlog.get_logger(__name__)

POLL_S = 1.0             # deliveries queued by other replicas are found at least this often
HOST_BUSY_S = 0.25       # a delivery whose host is at its cap comes back this much later (more behind others)
HOST_BUSY_MAX_S = 10.0
LEASE_MARGIN_S = 30.0    # a claim outlives one attempt's timeout by this much (by the timeout itself, if shorter)
WATCH_S = 5.0            # the outbox gauges
ERROR_CHARS = 300        # of a receiver's error kept on the delivery
USER_AGENT = "comfy-farm-proxy-webhooks"


def host_of(url: str) -> str:
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.raw_host}:{parsed.port}"


class WebhookSender:
    def __init__(self, *, store: Store, config: Config, guard: UrlGuard, metrics: Metrics,
                 payload: Callable[[Delivery], Awaitable[dict[str, Any]]]) -> None:
        self.store = store
        self.config = config
        self.guard = guard
        self.metrics = metrics
        self.payload = payload   # the body's JSON (proxy.api.webhooks.payload)
        self.settings = config.webhooks
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._sending: set[str] = set()
        self._per_host: dict[str, int] = {}
        self._tasks = TaskOwner()
        self._deliveries = TaskOwner()

    def nudge(self) -> None:
        """Deliveries were queued: look now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        # The guard's resolver checks every address connected to; no DNS cache, so each new connection asks.
        connector = aiohttp.TCPConnector(resolver=self.guard.resolver, use_dns_cache=False, limit=0)
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              auto_decompress=False, headers={"User-Agent": USER_AGENT})
        self._tasks.spawn(self._loop(), name="webhook-outbox")
        self._tasks.spawn(self._watch_loop(), name="webhook-outbox-watch")

    async def stop(self) -> None:
        """Deliveries cut short come back to the outbox when their lease lapses."""
        await self._tasks.stop()
        await self._deliveries.stop()
        if self._session is not None:
            await self._session.close()   # closes the connector, and with it the guard's resolver

    # --- the outbox ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                more = await self._round()
            except Exception:   # the loop must outlive any one round: a delivery left claimed comes back
                log.exception("webhook_round_failed")
                more = False
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _round(self) -> bool:
        """Claim what is due and start it; whether more may be due at once."""
        free = self.settings.concurrency - len(self._sending)
        if free <= 0:
            return False
        lease = self.settings.timeout_s + min(LEASE_MARGIN_S, self.settings.timeout_s)
        try:
            claimed = await self.store.webhooks_due(time.time(), lease, free)
        except ProxyError as exc:
            log.warning("webhooks_unread", error=exc.details)
            return False
        deferred: list[tuple[Delivery, float]] = []
        waiting: dict[str, int] = {}   # per busy host, deliveries put back this round
        started = 0
        for delivery in claimed:
            host = host_of(delivery.url)
            if delivery.id in self._sending:
                continue
            if self._per_host.get(host, 0) >= self.settings.per_host:
                # back later, the more the longer: a backlog for one slow host is not claimed and put back
                # several times a second
                waiting[host] = waiting.get(host, 0) + 1
                wait = HOST_BUSY_S * (1 + waiting[host] // self.settings.per_host)
                deferred.append((delivery, time.time() + min(wait, HOST_BUSY_MAX_S)))
                continue
            self._start(delivery, host)
            started += 1
        if deferred:
            with contextlib.suppress(ProxyError):   # else their claims lapse and they come back all the same
                await self.store.webhook_defer(deferred)
        return started > 0 and len(claimed) == free

    def _start(self, delivery: Delivery, host: str) -> None:
        self._sending.add(delivery.id)
        self._per_host[host] = self._per_host.get(host, 0) + 1
        self._deliveries.spawn(self._deliver(delivery, host), name="webhook-delivery")

    async def _deliver(self, delivery: Delivery, host: str) -> None:
        try:
            result, error = await self._attempt(delivery)
            await self._record(delivery, result, error)
        except ProxyError as exc:   # the state store: the claim lapses and the delivery comes back
            log.warning("webhook_unrecorded", id=delivery.id, error=exc.details)
        except Exception:   # anything else would end the task unseen and leave the delivery claimed
            log.exception("webhook_error", id=delivery.id)
        finally:
            self._sending.discard(delivery.id)
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]
            self._wake.set()

    async def _attempt(self, delivery: Delivery) -> tuple[str, str]:
        """(result, error): result is `delivered`, `gone` (410), `rejected` (another status), `timeout`,
        `refused` (the URL or an address it resolves to is not allowed), `unsigned` or `error`."""
        secret = self.config.webhook_secret(delivery.tenant)
        if secret is None:
            return "unsigned", "no signing secret is configured for this tenant (tenants[].webhook.secret)"
        try:
            self.guard.check_form(delivery.url)
        except UrlRefused as exc:
            return "refused", str(exc)
        try:
            body = jsoncodec.dumps_compact(await self.payload(delivery)).encode()
        except ProxyError:
            raise   # the state store: try again when the claim lapses, not counted against the receiver
        except Exception as exc:   # counted as an attempt, so a delivery that cannot be made is given up
            log.exception("webhook_payload_failed", id=delivery.id)
            return "error", f"the body could not be made: {exc!r}"[:ERROR_CHARS]
        headers = {"Content-Type": "application/json",
                   **signing.headers(secret, delivery.id, int(time.time()), body)}
        assert self._session is not None
        try:
            async with self._session.post(delivery.url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)) as resp:
                await resp.content.read(ERROR_CHARS)
                status = resp.status
        except TimeoutError:
            return "timeout", f"no answer within {self.settings.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            refused = UrlGuard.reason(exc)
            return ("refused", refused) if refused else ("error", (str(exc) or repr(exc))[:ERROR_CHARS])
        if 200 <= status < 300:
            return "delivered", ""
        return ("gone" if status == 410 else "rejected"), f"HTTP {status}"

    async def _record(self, delivery: Delivery, result: str, error: str) -> None:
        now = time.time()
        attempts = delivery.attempts + 1
        self.metrics.webhook_attempts.labels(result).inc()
        done = replace(delivery, attempts=attempts, last_error=error, last_attempt_at=now)
        due: float | None = None
        if result == "delivered":
            done = replace(done, status=DELIVERED, delivered_at=now)
            self.metrics.webhook_latency.observe(max(now - delivery.created_at, 0.0))
        elif result == "gone":
            done = replace(done, status=STOPPED)
        elif result == "unsigned" or attempts >= self.settings.max_attempts:
            done = replace(done, status=FAILED)
            log.error("webhook_given_up", id=delivery.id, url=delivery.url, attempts=attempts, error=error)
        else:
            due = now + backoff(attempts, self.settings.retry_base_s, self.settings.retry_cap_s)
            log.warning("webhook_failed", id=delivery.id, attempts=attempts, result=result, error=error)
        if await self.store.webhook_attempted(done, due) and due is None:
            self.metrics.webhook_deliveries.labels(done.status).inc()

    # --- gauges --------------------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            with contextlib.suppress(ProxyError):
                depth, oldest = await self.store.webhook_outbox()
                self.metrics.webhook_outbox.set(depth)
                self.metrics.webhook_outbox_age.set(0 if oldest is None else max(time.time() - oldest, 0.0))
            await asyncio.sleep(WATCH_S)
