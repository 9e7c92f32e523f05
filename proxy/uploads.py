"""Uploads (`/upload/image`, `/upload/mask`): kept by the proxy per tenant in its file store
(`proxy.files`: the outputs' folder or bucket; with `outputs.store: backend`, the `uploads.dir` folder),
copied to a backend just before a prompt that names them is dispatched there.

A file uploaded once through the proxy must work on whichever backend the prompt lands on, and through
whichever replica: so it lives in the file store every replica reaches, under
`.uploads/<tenant>/<type>/<subfolder>/<name>` (ComfyUI's naming rules inside it: an existing name with
other bytes becomes `name (1).png`, the same bytes keep it). Two replicas naming one upload at once take
turns under a lease in the state store. On a backend a copy lives under a content-addressed subfolder,
`comfy-proxy/<sha256 prefix>/<name>`, so two tenants' `cat.png` never collide: the prompt's value is
rewritten to that path just before dispatch, the client's own graph is what history shows.

A copy on a backend is never written over. ComfyUI's `/upload/image` with `overwrite` truncates the file,
then writes it, while a prompt's LoadImage may be reading it on the executor thread: it would read an
empty or partial image (a 512×512 default in the simulator, an error or a wrong image in ComfyUI). So the
copy is sent without `overwrite`: identical bytes keep the existing file untouched (ComfyUI's duplicate
check), and a different file there (a torn write) makes ComfyUI pick `name (1).png`, the name the prompt
then uses. Per backend and file one copy is in flight at a time, and a copy made is remembered, so
prompts dispatched at once or again cost one request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from proxy.files import FileStore
from proxy.files.base import content_type, join_key
from proxy.files.folder import FolderStore
from proxy.locks import KeyedLocks

log = structlog.get_logger(__name__)

UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "upload")
TYPES = ("input", "temp", "output")
BACKEND_FOLDER = "comfy-proxy"
PREFIX = ".uploads"
NAMING_LEASE_MS = 10_000
_ANNOTATION = re.compile(r"^(?P<name>.*) \[(?P<type>input|output|temp)\]$", re.S)


def tenant_dir(tenant: str) -> str:
    # Tenant names may come from a trusted header: never use them as path parts as they are.
    return "t-" + tenant.encode().hex() if tenant else "anonymous"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inside(subfolder: str, filename: str = "") -> str | None:
    """`subfolder/filename` as ComfyUI joins them inside a type folder, or None when it climbs out (or
    holds a NUL, which no file system takes)."""
    if "\0" in subfolder + filename or subfolder.startswith("/") or filename.startswith("/"):
        return None
    joined = posixpath.normpath(posixpath.join(subfolder or ".", filename or "."))
    if joined == ".":
        return ""
    if joined == ".." or joined.startswith("../") or os.path.isabs(joined):
        return None
    return joined


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Naming:
    """Turns between uploads naming the same file: within a replica a lock per name (two pasted
    `image.png`s at once must become `image.png` and `image (1).png`), across replicas a lease in the state
    store, held by this one call (a replica's own leases are re-entrant for it)."""

    def __init__(self, hold: Callable[[str, str, int], Any] | None = None,
                 drop: Callable[[str, str], Any] | None = None, owner: str = "") -> None:
        self._hold, self._drop, self._owner = hold, drop, owner
        self._locks: KeyedLocks[str] = KeyedLocks()

    async def __call__(self, name: str, work: Callable[[], Any]) -> Any:
        async with self._locks.hold(name):
            return await self._leased(name, work)

    async def _leased(self, name: str, work: Callable[[], Any]) -> Any:
        if self._hold is None or self._drop is None:
            return await work()
        owner = f"{self._owner}:{uuid.uuid4().hex}"
        deadline = time.monotonic() + NAMING_LEASE_MS / 1000
        while not await self._hold(name, owner, NAMING_LEASE_MS):
            if time.monotonic() > deadline:
                log.warning("upload_naming_lease_busy", name=name)
                break
            await asyncio.sleep(0.02)
        try:
            return await work()
        finally:
            await self._drop(name, owner)


class UploadStore:
    """A tenant's uploads by ComfyUI's names, in the file store. `root` is this replica's own folder (the
    web frontend's user data lives under it, `proxy.api.users`)."""

    def __init__(self, files: FileStore, root: str | Path, naming: Naming | None = None, prefix: str = "") -> None:
        self.files = files
        self.prefix = join_key(prefix, PREFIX)   # the deployment's own (outputs.s3.prefix), then `.uploads`
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.naming = naming or Naming()

    @classmethod
    def in_folder(cls, root: str | Path) -> UploadStore:
        """Uploads in a folder of their own (`outputs.store: backend`, and tests)."""
        return cls(FolderStore(Path(root) / "files"), root)

    def key(self, tenant: str, type_: str, path: str) -> str:
        return join_key(self.prefix, tenant_dir(tenant), type_, path)

    def folder(self, tenant: str, type_: str) -> Path:
        """Where a tenant's uploads of a type are, when the store is a folder."""
        assert isinstance(self.files, FolderStore)
        return self.files.root / self.prefix / tenant_dir(tenant) / type_

    async def save(self, tenant: str, type_: str, subfolder: str, filename: str, data: bytes, *, overwrite: bool,
                   render: Callable[[bytes, str], bytes | None] | None = None) -> dict[str, str] | None:
        """ComfyUI's answer `{name, subfolder, type}`, or None when the path escapes its folder.

        `render` turns the upload into what is written at the chosen name (`/upload/mask` composes it onto
        its original); None from it writes nothing, and the name is answered all the same. As in ComfyUI,
        the duplicate check compares the *uploaded* bytes with what is there."""
        if (type_ not in TYPES or not filename or "/" in filename or "\\" in filename or filename in (".", "..")
                or _inside(subfolder, filename) is None):
            return None
        folder = _inside(subfolder) or ""
        body = data if render is None else await asyncio.to_thread(render, data, filename)

        async def choose() -> str:
            return await self._choose(self.key(tenant, type_, folder), filename, data, body=body, overwrite=overwrite)
        name = await self.naming(self.key(tenant, type_, posixpath.join(folder, filename)), choose)
        return {"name": name, "subfolder": subfolder, "type": type_}

    async def _choose(self, folder_key: str, filename: str, data: bytes, *, body: bytes | None,
                      overwrite: bool) -> str:
        """ComfyUI's naming: the name, or `name (1).ext`, … up to the first free one or one with equal bytes."""
        stem, ext = os.path.splitext(filename)
        digest = _sha256(data)
        name, i = filename, 1
        while not overwrite:
            there = await self.files.digest(join_key(folder_key, name))
            if there is None:
                break
            if there == digest:
                return name
            name, i = f"{stem} ({i}){ext}", i + 1
        if body is not None:
            await self.files.put(join_key(folder_key, name), _one(body), content_type(name), sha256=_sha256(body))
        return name

    async def find(self, tenant: str, type_: str, subfolder: str, filename: str) -> str | None:
        """The stored file's key, if the tenant has that file (no path leaves the tenant's folder)."""
        found = await self._locate(tenant, type_, subfolder, filename)
        return None if found is None else found[0]

    async def _locate(self, tenant: str, type_: str, subfolder: str, filename: str) -> tuple[str, str] | None:
        """(key, SHA-256) of the tenant's file."""
        if type_ not in TYPES or not filename or filename.startswith("/") or ".." in filename:
            return None
        path = _inside(subfolder, filename)
        if not path:
            return None
        key = self.key(tenant, type_, path)
        digest = await self.files.digest(key)
        return None if digest is None else (key, digest)

    async def locate_annotated(self, tenant: str, value: str) -> tuple[str, str] | None:
        """(key, SHA-256) of the file a loader's value names as ComfyUI reads it: `sub/name.png`, optionally
        with ` [input]` etc."""
        match = _ANNOTATION.match(value)
        name, type_ = (match["name"], match["type"]) if match else (value, "input")
        sub, _, base = name.rpartition("/")
        return await self._locate(tenant, type_, sub, base)

    async def named_in(self, body: Any, tenant: str, object_info: Mapping[str, Any]) -> set[str]:
        """The values of a prompt's upload inputs that name one of the tenant's uploads (validation asks of
        each such value whether it exists; this asks the store once per value, before)."""
        wanted = upload_inputs(object_info)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        values = {node["inputs"][name] for node in (prompt.values() if isinstance(prompt, dict) else ())
                  if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
                  for name in wanted.get(str(node.get("class_type")), ()) if isinstance(node["inputs"].get(name), str)}
        found = await asyncio.gather(*(self.locate_annotated(tenant, value) for value in values))
        return {value for value, key in zip(values, found, strict=True) if key is not None}

    async def read(self, key: str, limit: int = 1 << 30) -> bytes | None:
        return await self.files.read(key, limit)

    async def names(self, tenant: str, type_: str) -> list[str]:
        """The tenant's files at the top of a type folder, newest first (`/internal/files`)."""
        base = self.key(tenant, type_, "") + "/"
        entries = await self.files.listing(base)
        top = [(mtime, key[len(base):]) for key, mtime in entries if "/" not in key[len(base):]]
        return [name for _, name in sorted(top, key=lambda e: -e[0])]


def upload_inputs(object_info: Mapping[str, Any]) -> dict[str, set[str]]:
    """Inputs ComfyUI marks as upload widgets (`image_upload: true`, …), per node class."""
    out: dict[str, set[str]] = {}
    for cls, spec in object_info.items():
        for section in ("required", "optional"):
            for name, conf in ((spec.get("input") or {}).get(section) or {}).items():
                if (isinstance(conf, list) and len(conf) > 1 and isinstance(conf[1], dict)
                        and any(conf[1].get(flag) for flag in UPLOAD_FLAGS)):
                    out.setdefault(cls, set()).add(name)
    return out


class UploadCopier:
    """Puts a prompt's uploads on its backend and rewrites the prompt to name them there."""

    def __init__(self, store: UploadStore, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        self.store = store
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        # (backend url, subfolder, name) -> the name the backend keeps that file under
        self._present: dict[tuple[str, str, str], str] = {}
        self._copying: KeyedLocks[tuple[str, str, str]] = KeyedLocks()   # one copy at a time per key
        # Upload inputs of the last object_info seen (held, so `is` cannot match a new dict at an old address).
        self._wanted: tuple[Mapping[str, Any] | None, dict[str, set[str]]] = (None, {})

    async def prepare(self, prompt: dict[str, Any], tenant: str, backend_url: str,
                      object_info: Mapping[str, Any]) -> dict[str, Any]:
        """The prompt to send: upload values that name the tenant's files point at backend copies."""
        if self._wanted[0] is not object_info:  # the merged object_info is rebuilt only when backends change
            self._wanted = (object_info, upload_inputs(object_info))
        wanted = self._wanted[1]
        out = dict(prompt)
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or node.get("class_type") not in wanted:
                continue
            inputs = dict(node.get("inputs") or {})
            changed = False
            for name in wanted[node["class_type"]]:
                value = inputs.get(name)
                found = await self.store.locate_annotated(tenant, value) if isinstance(value, str) else None
                if found is None:
                    continue  # a file the backend already has (listed in its object_info)
                key, digest = found   # content-addressed on the backend, so tenants never collide
                subfolder, filename = f"{BACKEND_FOLDER}/{digest[:20]}", posixpath.basename(key)
                kept = await self._copy(backend_url, key, subfolder, filename)
                inputs[name] = f"{subfolder}/{kept}"
                changed = True
            if changed:
                out[node_id] = {**node, "inputs": inputs}
        return out

    def forget(self, url: str) -> None:
        """A backend failed: it may have lost its files, so copy them again next time."""
        self._present = {key: kept for key, kept in self._present.items() if key[0] != url}

    async def _copy(self, url: str, source: str, subfolder: str, filename: str) -> str:
        """The name the backend keeps the file under, copied there unless it is known to be there."""
        key = (url, subfolder, filename)
        if (kept := self._present.get(key)) is not None:
            return kept
        async with self._copying.hold(key):
            kept = self._present.get(key)
            if kept is None:
                kept = self._present[key] = await self._upload(url, source, subfolder, filename)
            return kept

    async def _upload(self, url: str, source: str, subfolder: str, filename: str) -> str:
        data = await self.store.read(source)
        if data is None:
            raise FileNotFoundError(source)
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename)
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")   # no `overwrite`: see the module docstring
        async with self.session.post(url + "/upload/image", data=form, timeout=self.timeout) as resp:
            answer = _json_object(await resp.read())
            kept = answer.get("name")   # ComfyUI's {name, subfolder, type}
            if resp.status != 200 or not isinstance(kept, str) or not kept:
                raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status,
                                                  message="upload to backend refused")
            return kept


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}
