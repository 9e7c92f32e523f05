"""DNS lookups the proxy makes itself (webhook receivers' names, DNS discovery), with dnspython: against
`dns.nameservers` when set (`host` or `host:port`), else the system's configuration (/etc/resolv.conf).
No cache: discovery must see a record change at its next round, and the address guard what is true now."""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.nameserver


def nameserver(spec: str) -> dns.nameserver.Do53Nameserver:
    """`10.0.0.2`, `10.0.0.2:5353`, `::1` or `[::1]:5353`."""
    if spec.startswith("["):
        host, _, port = spec[1:].partition("]:")
    elif spec.count(":") == 1:
        host, _, port = spec.partition(":")
    else:
        host, port = spec, ""
    return dns.nameserver.Do53Nameserver(host.rstrip("]"), int(port) if port else 53)


def dns_resolver(nameservers: Sequence[str]) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver(spec) for spec in nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()
        resolver.use_search_by_default = True   # short names (a Kubernetes Service's) as getaddrinfo takes them
    resolver.cache = None
    return resolver
