"""Image inputs given as a URL (the ComfyAPI-compatible API: a run's image may be an uploaded file's name, an
http(s) URL or a `data:` URL), turned into an upload before admission, so that from there on the prompt names
a file like any other and the upload copier (`proxy.uploads.UploadCopier`) carries it to whichever backend
runs it.

A URL is fetched by the proxy on a client's behalf, so it goes through the webhooks' `UrlGuard`: the form of
every hop's URL is checked before it is called (aiohttp never resolves an IP literal, so the connector's
resolver would not see `http://10.0.0.1/`), and every address a name resolves to is checked by the guarded
resolver as it is connected to. Redirects are followed here, one hop at a time, for the same reason: aiohttp's
own following would call a Location no check has seen.

What comes back must be an image by its bytes (a small table of magic numbers: what LoadImage's Pillow
opens), whatever its Content-Type says, and no larger than `FetchLimits.max_bytes`, counted as it arrives.
It is kept as the tenant's `input` upload named after its SHA-256, so the same image fetched twice, or sent
once as a URL and once as a `data:` URL, is one file (the store answers the existing name for equal bytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from yarl import URL

from proxy.errors import BadRequest
from proxy.uploads import UploadStore
from proxy.urlguard import UrlGuard, UrlRefused

USER_AGENT = "comfy-farm-proxy-imagefetch"
CHUNK = 64 * 1024
NAME_PREFIX = "url-"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What a server says when it does not say: the bytes decide (aiohttp reads a missing type as octet-stream).
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_SCHEME = re.compile(r"(https?://|data:)", re.IGNORECASE)
# (extension, ((offset, bytes), ...)): the formats LoadImage's Pillow opens, by their magic numbers.
_MAGIC: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("png", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("jpg", ((0, b"\xff\xd8\xff"),)),
    ("gif", ((0, b"GIF87a"),)),
    ("gif", ((0, b"GIF89a"),)),
    ("webp", ((0, b"RIFF"), (8, b"WEBP"))),
    ("bmp", ((0, b"BM"), (6, b"\0\0\0\0"))),   # the reserved words are zero: "BM" alone starts too much text
    ("tiff", ((0, b"II*\0"),)),
    ("tiff", ((0, b"MM\0*"),)),
)
KINDS = "PNG, JPEG, WebP, GIF, BMP or TIFF"


@dataclass(frozen=True)
class FetchLimits:
    """How much a client's image URL may cost the proxy: bytes held in memory, time, hops."""

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 30.0   # the whole fetch: every hop and the body
    max_redirects: int = 3


def is_url(value: str) -> bool:
    """Whether an image input is a URL to fetch (http, https or data, any case) rather than a file's name."""
    return _SCHEME.match(value) is not None


def sniff_image(data: bytes) -> str | None:
    """The file extension of the image format `data` starts with, or None when it is none of them."""
    for ext, marks in _MAGIC:
        if all(data[at:at + len(mark)] == mark for at, mark in marks):
            return ext
    return None


def _refused(details: str) -> BadRequest:
    return BadRequest("invalid_prompt", "Invalid image input", details)


def _too_large(limit: int, said: str = "") -> BadRequest:
    return _refused(f"the image is larger than {limit} bytes{said}")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; anything else (not base64, not an image type,
    malformed, over `max_bytes`) is refused."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise _refused("a data: URL needs a comma before its data (data:image/png;base64,...)")
    mime, *params = (part.strip().lower() for part in header.split(";"))
    if not mime.startswith("image/"):
        raise _refused(f"a data: URL of {mime or 'text/plain'} is not an image")
    if "base64" not in params:
        raise _refused("a data: URL image must be base64 (data:image/png;base64,...)")
    payload = "".join(unquote(payload).split())   # '%' and spaces are not base64: undoing them loses nothing
    if len(payload) > -(-max_bytes // 3) * 4:
        raise _too_large(max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refused("the data: URL's base64 is malformed") from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, reading no more than one byte past `limit` (a chunked body says its size only at the end)."""
    body = bytearray()
    while chunk := await stream.read(min(CHUNK, limit + 1 - len(body))):
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


class ImageFetcher:
    """Fetches (or decodes) image URLs into a tenant's uploads; `start` before the first `fetch`."""

    def __init__(self, guard: UrlGuard, uploads: UploadStore, limits: FetchLimits = FetchLimits()) -> None:
        self.guard = guard
        self.uploads = uploads
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # The guard's resolver checks every address connected to; no DNS cache, so each new connection asks.
        # No cookies (one client's fetch must not carry another's), no decompression (a gzip bomb stays
        # compressed, and compressed bytes are not an image).
        connector = aiohttp.TCPConnector(resolver=self.guard.resolver, use_dns_cache=False)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.limits.timeout_s),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"})

    async def close(self) -> None:
        """Closes the session; the guard (and its resolver) belongs to whoever made it."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, tenant: str, url: str) -> str:
        """The LoadImage value naming the image at `url` as the tenant's upload (`url-<sha256[:16]>.<ext>`, at
        the top of the tenant's input folder), fetched or decoded and stored once per distinct image; a URL
        that cannot give an image is a BadRequest in ComfyUI's shape, its reason in `details`."""
        if url[:5].lower() == "data:":
            data = decode_data_url(url, self.limits.max_bytes)
        else:
            data = await self._download(url)
        ext = sniff_image(data)
        if ext is None:
            raise _refused(f"the content at the image url is not an image ({KINDS})")
        name = f"{NAME_PREFIX}{hashlib.sha256(data).hexdigest()[:16]}.{ext}"
        saved = await self.uploads.save(tenant, "input", "", name, data, overwrite=False)
        assert saved is not None   # a plain file name at the top of the folder never escapes it
        # Equal bytes keep the name; other bytes already under it (a client's own upload) get `name (1).ext`.
        return saved["name"]

    async def _download(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                return await self._follow(url)
        except TimeoutError:   # before ClientError: aiohttp's own timeouts are both
            raise _refused(f"image url timed out: no image within {self.limits.timeout_s:g} s") from None
        except UrlRefused as exc:
            raise _refused(f"image url refused: {exc}") from None
        except aiohttp.ClientError as exc:
            why = UrlGuard.reason(exc)
            if why is not None:
                raise _refused(f"image url refused: {why}") from None
            raise _refused(f"image url could not be fetched: {str(exc) or repr(exc)}") from None

    async def _follow(self, url: str) -> bytes:
        """The body at the end of at most `max_redirects` redirects, each hop's URL checked before it is called."""
        assert self._session is not None, "ImageFetcher.start was not called"
        current = self.guard.check_form(url)
        for _ in range(self.limits.max_redirects + 1):
            async with self._session.get(current, allow_redirects=False) as resp:
                location = resp.headers.get("Location")
                if resp.status in REDIRECTS and location:
                    current = self._redirected(current, location)
                    continue
                return await self._body(resp)
        raise _refused(f"image url refused: more than {self.limits.max_redirects} redirects")

    def _redirected(self, current: URL, location: str) -> URL:
        """The next hop: `location` resolved against the current URL (it may be relative), then checked."""
        try:
            target = current.join(URL(location))
        except (ValueError, TypeError):
            raise UrlRefused(f"a redirect's Location is not a URL: {location[:200]}") from None
        try:
            return self.guard.check_form(str(target))
        except UrlRefused as exc:
            raise UrlRefused(f"redirected to {str(target)[:200]}: {exc}") from None

    async def _body(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.status != 200:
            raise _refused(f"the image url answered HTTP {resp.status}")
        declared = resp.content_type.lower()
        if not declared.startswith("image/") and declared not in GENERIC_TYPES:
            raise _refused(f"the image url answered {declared}, not an image ({KINDS})")
        if resp.content_length is not None and resp.content_length > self.limits.max_bytes:
            raise _too_large(self.limits.max_bytes, f" (Content-Length: {resp.content_length})")
        return await _read_capped(resp.content, self.limits.max_bytes)
