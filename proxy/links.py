"""Signed links to outputs: a URL anyone may fetch without an API key until it expires.

`/proxy/files/{ref}/{name}?tenant=T&expires=E&signature=S`, S being HMAC-SHA256 over the reference, the
name, the tenant and the expiry. A link names one file of one tenant: changing any part of it (another
reference, another tenant, a later expiry) breaks the signature, and the reference must still belong to
that tenant when the link is used. The key is `outputs.link_secret`, or one made once and kept in the
state store, so every replica honours every other's links. With `outputs.store: s3` a copied file's link
is S3's own presigned GET instead (the bytes never pass the proxy); the proxy's link serves files not yet
copied, and every file of the `dir` and `backend` kinds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlencode

LINK_ROUTE = "/proxy/files"
_EXPIRES = re.compile(r"[0-9]{1,12}")   # ASCII digits only: `isdigit` takes "²", and int() a 5000-digit number
SHARED_SECRET_NAME = "links"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class LinkSigner:
    """Signs and checks links. The key is given, or fetched once from the state store on first use (so a
    replica that starts while the store is away still starts)."""

    def __init__(self, secret: str | None, fetch: Callable[[], Awaitable[str]] | None = None) -> None:
        self._key = secret.encode() if secret else None
        self._fetch = fetch

    async def _secret(self) -> bytes:
        if self._key is None:
            if self._fetch is None:
                raise RuntimeError("no link secret and no way to fetch one")
            self._key = (await self._fetch()).encode()
        return self._key

    async def signature(self, ref: str, name: str, tenant: str, expires: int) -> str:
        message = "\n".join((ref, name, tenant, str(expires))).encode()
        digest = hmac.new(await self._secret(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    async def path(self, ref: str, name: str, tenant: str, ttl_s: int, *, now: float | None = None) -> str:
        """The link, from the proxy's root (prefix it with the public URL)."""
        expires = int((time.time() if now is None else now) + ttl_s)
        query = urlencode({"tenant": tenant, "expires": expires,
                           "signature": await self.signature(ref, name, tenant, expires)})
        return f"{LINK_ROUTE}/{ref}/{quote(name, safe='')}?{query}"

    async def valid(self, ref: str, name: str, tenant: str, expires: str, signature: str, *,
                    now: float | None = None) -> bool:
        """The signature matches and the link has not expired."""
        if not _EXPIRES.fullmatch(expires) or int(expires) <= (time.time() if now is None else now):
            return False
        return hmac.compare_digest((await self.signature(ref, name, tenant, int(expires))).encode(),
                                   signature.encode("utf-8", "surrogateescape"))
