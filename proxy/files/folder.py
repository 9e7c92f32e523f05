"""`outputs.store: dir`: files in a folder (a local disk, or a volume every replica mounts).

Writes go to a temporary name in the same folder and are renamed into place, so a reader never sees half
a file. Serving is aiohttp's file response: Range, ETag and the conditional headers as RFC 9110 says,
and the kernel's sendfile for the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

from aiohttp import web

from proxy.files.base import FileStoreUnavailable, StoredFile
from proxy.paths import is_file, unusable_name

P = ParamSpec("P")
T = TypeVar("T")


class FolderStore:
    kind = "dir"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    async def start(self) -> None:
        await _blocking(self.root.mkdir, parents=True, exist_ok=True)
        await self.check()

    async def close(self) -> None:
        return None

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"key escapes the folder: {key!r}")
        return path

    async def put(self, key: str, chunks: AsyncIterable[bytes], content_type: str, *,
                  sha256: str | None = None) -> StoredFile:
        path = self.path(key)
        # a short temporary name: any name the folder takes must also be writable under it
        tmp = path.with_name(f".part-{uuid.uuid4().hex}")
        await _blocking(path.parent.mkdir, parents=True, exist_ok=True)
        f: BinaryIO = await _blocking(open, tmp, "wb")
        size = 0
        try:
            async for chunk in chunks:
                await _blocking(f.write, chunk)
                size += len(chunk)
            await _blocking(f.close)
            await _blocking(os.replace, tmp, path)
        finally:
            with contextlib.suppress(OSError):   # a full disk fails the close's flush again
                f.close()
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return StoredFile(key, size)

    async def serve(self, request: web.Request, key: str, headers: Mapping[str, str]) -> web.StreamResponse | None:
        path = self.path(key)
        if not await asyncio.to_thread(is_file, path):
            return None
        return web.FileResponse(path, headers=dict(headers))

    async def read(self, key: str, limit: int) -> bytes | None:
        path = self.path(key)
        try:
            size = (await _blocking(path.stat)).st_size
        except FileNotFoundError:
            return None
        if size > limit:
            raise ValueError(f"{key}: {size} bytes is over {limit}")
        return await _blocking(path.read_bytes)

    async def delete(self, keys: Sequence[str]) -> None:
        def remove() -> None:
            for key in keys:
                path = self.path(key)
                path.unlink(missing_ok=True)
                _prune(path.parent, self.root)
        await _blocking(remove)

    async def keys(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in await self.listing(prefix))

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        def walk() -> list[tuple[str, float]]:
            base = self.path(prefix) if prefix.strip("/") else self.root
            if not base.is_dir():
                return []
            return [(str(p.relative_to(self.root)), p.stat().st_mtime) for p in base.rglob("*")
                    if p.is_file() and not p.name.startswith(".")]
        return await _blocking(walk)

    async def digest(self, key: str) -> str | None:
        def hashed() -> str | None:
            path = self.path(key)
            if not is_file(path):
                return None
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        try:
            return await _blocking(hashed)
        except FileNotFoundError:
            return None

    async def link(self, key: str, ttl_s: int, filename: str) -> str | None:
        return None

    async def check(self) -> None:
        def probe() -> None:
            if not os.access(self.root, os.W_OK):
                raise OSError(f"{self.root} is not writable")
            if shutil.disk_usage(self.root).free < 16 * 1024 * 1024:
                raise OSError(f"{self.root}: the disk is full")
        await _blocking(probe)



async def _blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """A blocking file call on a worker thread; an OSError other than a missing file (disk full, no
    permission, a volume gone) is the store being unavailable."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if unusable_name(exc):   # a name no file system takes: the caller's bad input
            raise ValueError(str(exc)) from exc
        raise FileStoreUnavailable(str(exc)) from exc


def _prune(folder: Path, root: Path) -> None:
    """Remove folders left empty by a delete, up to the root (a prompt's folder goes with its last file)."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
