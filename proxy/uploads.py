"""Uploads (`/upload/image`, `/upload/mask`): kept by the proxy per tenant, copied to a backend just
before a prompt that names them is dispatched there.

A file uploaded once through the proxy must work on whichever backend the prompt lands on, and two
tenants that both upload `cat.png` must never get each other's. So files live in the proxy's folder
under a per-tenant directory (ComfyUI's naming rules inside it), and on a backend under a
content-addressed subfolder, `comfy-proxy/<sha256 prefix>/<name>`: the prompt's value is rewritten to
that path just before dispatch, the client's own graph is what history shows.

A copy on a backend is never written over. ComfyUI's `/upload/image` with `overwrite` truncates the file,
then writes it, while a prompt's LoadImage may be reading it on the executor thread: it would read an
empty or partial image (a 512×512 default in the simulator, an error or a wrong image in ComfyUI). So the
copy is sent without `overwrite`: identical bytes keep the existing file untouched (ComfyUI's duplicate
check), and a different file there (a torn write) makes ComfyUI pick `name (1).png`, the name the prompt
then uses. Per backend and file one copy is in flight at a time, and a copy made is remembered, so
prompts dispatched at once or again cost one request.

With several replicas, `uploads.dir` must be a folder they share (a ReadWriteMany volume).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from proxy.comfy.uploads import upload_target
from proxy.paths import is_file

UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "upload")
TYPES = ("input", "temp", "output")
BACKEND_FOLDER = "comfy-proxy"
_ANNOTATION = re.compile(r"^(?P<name>.*) \[(?P<type>input|output|temp)\]$", re.S)


def tenant_dir(tenant: str) -> str:
    # Tenant names may come from a trusted header: never use them as path parts as they are.
    return "t-" + tenant.encode().hex() if tenant else "anonymous"


class UploadStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, tenant: str, type_: str) -> Path:
        return self.root / tenant_dir(tenant) / type_

    def save(self, tenant: str, type_: str, subfolder: str, filename: str, data: bytes, *, overwrite: bool,
             render: Callable[[bytes, str], bytes | None] | None = None) -> dict[str, str] | None:
        """ComfyUI's answer `{name, subfolder, type}`, or None when the path escapes its folder.

        `render` turns the upload into what is written at the chosen path (`/upload/mask` composes it
        onto its original); None from it writes nothing, and the name is answered all the same."""
        if (type_ not in TYPES or not filename or "/" in filename or "\\" in filename or filename in (".", "..")
                or "\0" in filename + subfolder):
            return None
        target = upload_target(str(self.folder(tenant, type_)), subfolder, filename, data, overwrite)
        if target is None:
            return None
        name, path, write = target
        body = data if render is None or not write else render(data, path)
        if write and body is not None:
            tmp = f"{path}.part-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        return {"name": name, "subfolder": subfolder, "type": type_}

    def find(self, tenant: str, type_: str, subfolder: str, filename: str) -> Path | None:
        """The stored file, if it exists inside the tenant's folder (no traversal)."""
        if type_ not in TYPES or not filename or filename.startswith("/") or ".." in filename \
                or "\0" in filename + subfolder:   # the OS refuses such a path (ValueError, not a 404)
            return None
        base = self.folder(tenant, type_).resolve()
        path = (base / subfolder / filename).resolve()
        if not path.is_relative_to(base) or not is_file(path):
            return None
        return path

    def find_annotated(self, tenant: str, value: str) -> Path | None:
        """A loader's value as ComfyUI reads it: `sub/name.png`, optionally with ` [input]` etc."""
        match = _ANNOTATION.match(value)
        name, type_ = (match["name"], match["type"]) if match else (value, "input")
        sub, _, base = name.rpartition("/")
        return self.find(tenant, type_, sub, base)


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


def backend_name(path: Path) -> tuple[str, str]:
    """(subfolder, name) of an upload on a backend: content-addressed, so tenants never collide."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    return f"{BACKEND_FOLDER}/{digest}", path.name


class UploadCopier:
    """Puts a prompt's uploads on its backend and rewrites the prompt to name them there."""

    def __init__(self, store: UploadStore, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        self.store = store
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        # (backend url, subfolder, name) -> the name the backend keeps that file under
        self._present: dict[tuple[str, str, str], str] = {}
        # one copy at a time per key: its lock and how many callers hold or await it
        self._copying: dict[tuple[str, str, str], tuple[asyncio.Lock, int]] = {}
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
                path = self.store.find_annotated(tenant, value) if isinstance(value, str) else None
                if path is None:
                    continue  # a file the backend already has (listed in its object_info)
                subfolder, filename = await asyncio.to_thread(backend_name, path)
                kept = await self._copy(backend_url, path, subfolder, filename)
                inputs[name] = f"{subfolder}/{kept}"
                changed = True
            if changed:
                out[node_id] = {**node, "inputs": inputs}
        return out

    def forget(self, url: str) -> None:
        """A backend failed: it may have lost its files, so copy them again next time."""
        self._present = {key: kept for key, kept in self._present.items() if key[0] != url}

    async def _copy(self, url: str, path: Path, subfolder: str, filename: str) -> str:
        """The name the backend keeps the file under, copied there unless it is known to be there."""
        key = (url, subfolder, filename)
        if (kept := self._present.get(key)) is not None:
            return kept
        lock, users = self._copying.get(key, (asyncio.Lock(), 0))
        self._copying[key] = (lock, users + 1)
        try:
            async with lock:
                kept = self._present.get(key)
                if kept is None:
                    kept = self._present[key] = await self._upload(url, path, subfolder, filename)
                return kept
        finally:   # the lock lives while someone holds or awaits it: one per copy in flight, not per file ever
            lock, users = self._copying[key]
            if users == 1:
                del self._copying[key]
            else:
                self._copying[key] = (lock, users - 1)

    async def _upload(self, url: str, path: Path, subfolder: str, filename: str) -> str:
        form = aiohttp.FormData()
        form.add_field("image", await asyncio.to_thread(path.read_bytes), filename=filename)
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
