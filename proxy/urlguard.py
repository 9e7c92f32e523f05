"""Which URLs the proxy itself may call on a client's behalf (webhook receivers), so that a tenant cannot
point it at the farm's own insides: loopback, private networks, link-local addresses and the clouds'
metadata services (169.254.169.254, fd00:ec2::254), or any other address that is not globally routable.

A URL is checked twice: when it is given (`check`: its form, and every address its name resolves to now),
and when it is called, by the connector's resolver (`GuardedResolver`), so the addresses checked are the
ones connected to. DNS can change between the two (a name that resolved to a public address at admission
may point inside the farm an hour later), and a resolver that only checked and then let the connector
resolve again could be answered differently the second time.

aiohttp does not resolve an IP literal (`http://10.0.0.5/`): the resolver never sees it, so `check` runs
at every call as well. Legacy numeric forms (`http://2130706433/`, `http://127.1/`) are refused outright.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from proxy.resolving import dns_resolver

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_S = 5.0
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# hosts made of digits, dots and hex that are not a canonical address: `127.1`, `0x7f.0.0.1`, `2130706433`
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?", re.IGNORECASE)
# IPv6 ranges that carry or reach an IPv4 address (NAT64, 6to4, Teredo, IPv4-compatible and -translated)
# or that are private in all but name (site-local): refused whatever Python's `is_global` says of them,
# since `64:ff9b::a9fe:a9fe` is the metadata service behind a NAT64 gateway.
_TRANSLATED = tuple(ipaddress.IPv6Network(net) for net in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96", "::ffff:0:0:0/96", "fec0::/10"))


class UrlRefused(Exception):
    """A URL the proxy will not call; the message says why, in words a client can act on."""


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """`allow_cidrs` as networks (`10.1.0.0/16`, `::1/128`); ValueError names a bad one."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


class AddressPolicy:
    """Globally routable addresses only, unless `allow_private` or one of `allow` holds the address."""

    def __init__(self, *, allow_private: bool = False, allow: Sequence[Network] = ()) -> None:
        self.allow_private = allow_private
        self.allow = tuple(allow)

    def refusal(self, address: Address) -> str | None:
        """Why the proxy may not connect to `address`; None when it may."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped   # ::ffff:10.0.0.1 is 10.0.0.1
        if self.allow_private or any(address in net for net in self.allow):
            return None
        translated = isinstance(address, ipaddress.IPv6Address) and any(address in net for net in _TRANSLATED)
        if address.is_global and not address.is_multicast and not translated:
            return None
        kind = ("a loopback" if address.is_loopback else "a link-local (or metadata)" if address.is_link_local
                else "an unspecified" if address.is_unspecified
                else "an IPv4-translating or site-local" if translated
                else "a private" if address.is_private else "a non-public")
        return f"{kind} address ({address})"


class NameserverResolver(AbstractResolver):
    """A/AAAA lookups against the given servers (`host` or `host:port`), with dnspython: for farms whose
    receivers are named by a DNS server other than the system's (and for tests, a dnsmasq on a free port)."""

    def __init__(self, nameservers: Sequence[str]) -> None:
        self._resolver = dns_resolver(nameservers)

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        kinds = {socket.AF_INET: ("A",), socket.AF_INET6: ("AAAA",)}.get(family, ("A", "AAAA"))
        out: list[ResolveResult] = []
        failure: str | None = None
        for kind in kinds:
            try:
                answer = await self._resolver.resolve(host, kind, lifetime=RESOLVE_TIMEOUT_S)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:   # one family failing (a server that refuses AAAA)
                failure = str(exc)
                continue
            af = socket.AF_INET if kind == "A" else socket.AF_INET6
            out += [ResolveResult(hostname=host, host=rr.address, port=port, family=af, proto=0,
                                  flags=socket.AI_NUMERICHOST) for rr in answer]
        if not out:
            raise OSError(f"{host}: {failure or 'no such name'}")
        return out

    async def close(self) -> None:
        return None


def base_resolver(nameservers: Sequence[str]) -> AbstractResolver:
    """The configured nameservers' resolver, else the system's (getaddrinfo: /etc/hosts, then DNS)."""
    return NameserverResolver(nameservers) if nameservers else ThreadedResolver()


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` and refuses a name when any of its addresses is refused by `policy` (all of
    them: a connector would try the next address after the first fails)."""

    def __init__(self, inner: AbstractResolver, policy: AddressPolicy) -> None:
        self.inner = inner
        self.policy = policy

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        for result in found:
            why = self.policy.refusal(ipaddress.ip_address(result["host"].split("%")[0]))
            if why is not None:
                raise AddressRefused(f"{host} resolves to {why}")
        return found

    async def close(self) -> None:
        await self.inner.close()


class AddressRefused(OSError):
    """Raised inside the connector (which wraps OSErrors), so a refused address fails the call like an
    unreachable one; `UrlGuard.reason` finds it again in the error aiohttp raises."""


class UrlGuard:
    """`check` for a URL given by a client; `resolver` for the session that calls it."""

    def __init__(self, policy: AddressPolicy, nameservers: Sequence[str] = ()) -> None:
        self.policy = policy
        self.resolver = GuardedResolver(base_resolver(nameservers), policy)

    def check_form(self, url: str) -> URL:
        """The URL's form (no DNS): http(s), a host, at most 2048 characters, no credentials; an IP literal
        must be allowed by the policy."""
        if len(url) > MAX_URL_LENGTH:
            raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            raise UrlRefused("not a URL") from exc
        if parsed.scheme not in ("http", "https"):
            raise UrlRefused(f"only http and https URLs are allowed, not {parsed.scheme or 'a relative URL'}")
        host = parsed.raw_host
        if not host:
            raise UrlRefused("the URL has no host")
        if parsed.raw_user or parsed.raw_password:
            raise UrlRefused("the URL may not carry credentials")
        literal = _literal(host)
        if literal is not None:
            why = self.policy.refusal(literal)
            if why is not None:
                raise UrlRefused(f"the URL points at {why}")
        elif _NUMERIC_HOST.fullmatch(host):
            raise UrlRefused(f"{host} is not a canonical IP address")
        return parsed

    async def check(self, url: str) -> URL:
        """`check_form`, then every address the host resolves to now."""
        parsed = self.check_form(url)
        host = parsed.raw_host or ""
        if _literal(host) is None:
            try:
                await asyncio.wait_for(self.resolver.resolve(host, parsed.port or 0, socket.AF_UNSPEC),
                                       RESOLVE_TIMEOUT_S)
            except AddressRefused as exc:
                raise UrlRefused(str(exc)) from None
            except (OSError, TimeoutError) as exc:
                raise UrlRefused(f"{host} does not resolve: {exc or 'timed out'}") from None
        return parsed

    @staticmethod
    def reason(exc: BaseException) -> str | None:
        """The refusal inside an error a guarded session raised, if that is what it was."""
        seen: Any = exc
        while seen is not None:
            if isinstance(seen, AddressRefused):
                return str(seen)
            seen = seen.__cause__ or seen.__context__
        return None

    async def close(self) -> None:
        await self.resolver.close()


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
