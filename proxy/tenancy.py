"""Who a request acts for: a tenant named by its API key (or, behind a trusted ingress, by ComfyUI's
`comfy-user` header), with its role, pools and quota.

Keys arrive as `Authorization: Bearer KEY`, `X-API-Key: KEY`, or `?token=KEY` (for browser websockets,
which cannot set headers). They are compared as SHA-256 digests with `hmac.compare_digest` against every
configured key, so the time taken does not depend on how much of a key matched; keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from aiohttp import web

from proxy.config import AuthConfig, Quota, TenantConfig
from proxy.errors import Unauthorized

ANONYMOUS = ""
TENANT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")   # as config.py accepts tenant names


@dataclass(frozen=True)
class Identity:
    tenant: str
    admin: bool = False
    quota: Quota = Quota()
    pools: tuple[str, ...] = ()
    weight: float = 1.0
    joiner: bool = False   # a join token: backends' membership only (proxy.api.members)

    def owns(self, tenant: str) -> bool:
        """May this identity see and manage a prompt or file of `tenant`? Admins manage everything."""
        return self.admin or tenant == self.tenant


ANONYMOUS_IDENTITY = Identity(ANONYMOUS)
JOIN_IDENTITY = Identity(ANONYMOUS, joiner=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _stored_digest(key: str) -> bytes:
    return bytes.fromhex(key[7:]) if key.startswith("sha256:") else _digest(key)


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    key = request.headers.get("X-API-Key")
    if key:
        return key
    if request.path in ("/ws", "/api/ws", "/ws/register"):   # browsers cannot set a websocket's headers
        return request.query.get("token") or None
    return None


class TenantDirectory:
    def __init__(self, auth: AuthConfig, tenants: tuple[TenantConfig, ...]) -> None:
        self.auth = auth
        self._tenants = {t.name: t for t in tenants}
        self._keys = [(_stored_digest(key), t) for t in tenants for key in t.api_keys]
        self._join = [_stored_digest(token) for token in auth.join_tokens]

    @property
    def enabled(self) -> bool:
        return (bool(self._tenants) or self.auth.required or self.auth.trust_comfy_user_header
                or bool(self.auth.join_tokens))

    def _by_key(self, key: str) -> TenantConfig | None:
        digest = _digest(key)
        found = None
        for stored, tenant in self._keys:  # every key is compared: no early exit on a match
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    def _is_join_token(self, key: str) -> bool:
        digest = _digest(key)
        return any([hmac.compare_digest(stored, digest) for stored in self._join])   # every one compared

    @staticmethod
    def _identity(t: TenantConfig) -> Identity:
        return Identity(t.name, t.admin, t.quota, t.pools, t.weight)

    def identify(self, request: web.Request) -> Identity:
        """The request's identity, or 401 `unauthorized` when a key is required and missing or wrong."""
        key = presented_key(request)
        if key is not None and self._join and self._is_join_token(key):
            return JOIN_IDENTITY
        if key is not None:
            tenant = self._by_key(key)
            if tenant is None:
                raise Unauthorized("Invalid API key", "the key matches no tenant")
            return self._identity(tenant)
        if self.auth.trust_comfy_user_header:
            name = request.headers.get("comfy-user")
            if name and not TENANT_NAME.fullmatch(name):
                # It is forwarded to backends and names folders: only what a configured tenant may be called.
                raise Unauthorized("Invalid comfy-user header", "a tenant name is letters, digits, '.', '_', "
                                   "'@' or '-'")
            if name:
                known = self._tenants.get(name)
                return self._identity(known) if known else Identity(name)
        if self.auth.required:
            raise Unauthorized("An API key is required",
                               "send Authorization: Bearer KEY, X-API-Key: KEY, or ?token=KEY on /ws")
        return Identity(ANONYMOUS)

    def get(self, name: str) -> Identity:
        known = self._tenants.get(name)
        return self._identity(known) if known else Identity(name)
