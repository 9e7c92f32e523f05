"""DNS discovery (`discovery.dns`): names resolved into backends, every `interval_s`, into the shared
membership (`proxy.membership`) with the source `dns:<name>`.

An A/AAAA name gives one backend per address, at the configured port; an SRV name (`_service._proto.…`)
one per target, at its own port. Backends whose records disappear are marked leaving: drained, and
forgotten once idle, so nothing running there is lost; an address that comes back joins again. A name
that does not exist (NXDOMAIN, no records: a headless Service scaled to zero) means no backends; a lookup
that fails (the DNS server is away) changes nothing. Every replica resolves on its own: what each writes
is the same, so the writes agree.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog

from proxy.config import DnsDiscovery
from proxy.errors import ProxyError
from proxy.store import Store
from proxy.store.base import Member
from proxy.tasks import TaskOwner

log = structlog.get_logger(__name__)

LOOKUP_TIMEOUT_S = 5.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class LookupFailed(Exception):
    """The DNS server did not answer: nothing is concluded from it."""


def backend_name(source: str, host: str, port: int) -> str:
    """`<name>-<address>-<port>`, in the letters a backend name may use."""
    return _UNSAFE.sub("-", f"{source}-{host}-{port}").strip("-")


def host_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DnsDiscoverer:
    def __init__(self, *, sources: tuple[DnsDiscovery, ...], resolver: dns.asyncresolver.Resolver, store: Store,
                 changed: Callable[[], None]) -> None:
        self.sources = sources
        self.resolver = resolver
        self.store = store
        self._changed = changed   # Membership.nudge
        self._tasks = TaskOwner()

    async def start(self) -> None:
        for source in self.sources:
            self._tasks.spawn(self._loop(source), name=f"dns-discovery-{source.name}")

    async def stop(self) -> None:
        await self._tasks.stop()

    async def _loop(self, source: DnsDiscovery) -> None:
        while True:
            try:
                await self.round(source)
            except (LookupFailed, ProxyError) as exc:
                log.warning("dns_discovery_failed", name=source.name, error=str(exc))
            except Exception:   # the loop outlives one bad round
                log.exception("dns_discovery_error", name=source.name)
            await asyncio.sleep(source.interval_s)

    async def lookup(self, source: DnsDiscovery) -> dict[str, str]:
        """The backends the name gives now: name → URL."""
        if source.name.startswith("_"):
            records = await self._records(source.name, "SRV")
            targets = [(str(rr.target).rstrip("."), int(rr.port)) for rr in records]
        else:
            targets = [(str(rr.address), source.port)
                       for kind in ("A", "AAAA") for rr in await self._records(source.name, kind)]
        return {backend_name(source.name, host, port): host_url(host, port) for host, port in targets}

    async def _records(self, name: str, kind: str) -> list[Any]:
        try:
            answer = await self.resolver.resolve(name, kind, lifetime=LOOKUP_TIMEOUT_S)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            if kind == "AAAA":   # a server that refuses AAAA (dnsmasq without upstream): no IPv6 addresses
                return []
            raise LookupFailed(f"{name} {kind}: {exc}") from exc
        return list(answer)

    async def round(self, source: DnsDiscovery) -> bool:
        """One lookup, written into the membership; whether anything changed."""
        found = await self.lookup(source)
        tag = f"dns:{source.name}"
        mine = {name: m for name, m in (await self.store.members()).items() if m.source == tag}
        changed = False
        for name, url in found.items():
            fresh = Member(name=name, url=url, max_inflight=source.max_inflight, labels=tuple(source.labels),
                           source=tag)
            if mine.get(name) != fresh:
                await self.store.member_put(fresh)
                changed = True
                log.info("backend_discovered", backend=name, url=url, name=source.name)
        for name, member in mine.items():
            if name not in found and not member.leaving:
                await self.store.member_put(replace(member, leaving=True))
                changed = True
                log.info("backend_undiscovered", backend=name, name=source.name)
        if changed:
            self._changed()
        return changed
