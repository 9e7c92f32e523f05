"""The file store's contract, and what every kind shares: keys and the headers `/view` answers with."""

from __future__ import annotations

import hashlib
import mimetypes
import re
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from proxy.errors import ProxyError

CHUNK = 256 * 1024
# ComfyUI's /view sends these as a download, so no page or script runs from an output (protocol §5).
FORCE_DOWNLOAD = frozenset({"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"})
_SAFE_PART = re.compile(r"[A-Za-z0-9_.@=+~-]{1,120}")
_LONG_PART = 120   # a longer segment is kept as its hash: every file system takes it, and names stay unique


class FileStoreUnavailable(ProxyError):
    """The store could not be reached or refused the operation (S3 down, disk full): try again later."""

    status = 503
    type = "file_store_unavailable"


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int


def content_type(name: str) -> str:
    """The type ComfyUI's `/view` gives a file of this name."""
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return "application/octet-stream" if kind in FORCE_DOWNLOAD else kind


def key_part(value: str) -> str:
    """One path segment of a key from a name a client may have chosen (tenant, prompt id): kept readable
    when it is plain, else hex, so no value can add a segment or climb out (`..`, `/`)."""
    if _SAFE_PART.fullmatch(value) and value.strip(".") and not value.startswith("."):
        return value
    if not value:
        return "_"
    encoded = "x-" + value.encode().hex()
    return encoded if len(encoded) <= _LONG_PART else "h-" + hashlib.sha256(value.encode()).hexdigest()


def disposition(name: str) -> str:
    """ComfyUI's `filename="F"`, with F unable to end the header or the quoted string: a client-chosen
    name may hold CR/LF or quotes (a percent-encoded /view filename, an upload's `filename*`)."""
    safe = "".join(ch for ch in name if ch >= " " and ch != "\x7f").replace("\\", "_").replace('"', "_")
    return f'filename="{safe}"'


def join_key(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


class FileStore(Protocol):
    """Files by key (`a/b/c.png`). Every method may raise `FileStoreUnavailable`."""

    kind: str

    async def start(self) -> None:
        """Connect, and check the folder or bucket can be used (raises when it cannot)."""
        ...

    async def close(self) -> None: ...

    async def put(self, key: str, chunks: AsyncIterable[bytes], content_type: str, *,
                  sha256: str | None = None) -> StoredFile:
        """Store a stream under `key`, holding at most one part in memory; readers see the whole file or
        none of it. `sha256`, when the caller knows it, is kept for `digest`."""
        ...

    async def digest(self, key: str) -> str | None:
        """The file's SHA-256 (hex), None when there is no such file (uploads' duplicate check)."""
        ...

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        """(key, modification time) of every file under `prefix`."""
        ...

    async def serve(self, request: web.Request, key: str, headers: Mapping[str, str]) -> web.StreamResponse | None:
        """The file as an HTTP answer with `headers` added, honouring Range (206, 416) and validators (ETag,
        If-None-Match → 304, If-Match → 412); None when there is no such file."""
        ...

    async def read(self, key: str, limit: int) -> bytes | None:
        """The whole file when it is at most `limit` bytes (None when absent; ValueError when larger)."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove files (absent ones are fine)."""
        ...

    async def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix`, sorted (operators and tests: what the store really holds)."""
        ...

    async def link(self, key: str, ttl_s: int, filename: str) -> str | None:
        """A URL anyone may fetch the file from until it expires, served by the store itself (S3's
        presigned GET); None when the store cannot make one (the proxy signs its own)."""
        ...

    async def check(self) -> None:
        """Raise `FileStoreUnavailable` unless the store answers now (readiness)."""
        ...
