"""Output files of a job with links anyone may fetch until they expire: for `/proxy/jobs`, `/proxy/run`,
template runs and webhook deliveries alike, in a request or outside one (`base` is the proxy's address
as the job's client saw it: `server.public_url` when set, else the request's or the admission's host).
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import aiohttp

from proxy.files import FileStoreUnavailable
from proxy.outputs import client_filename, ref_of
from proxy.services import Services
from proxy.store.base import OutputRef


async def linked(svc: Services, item: Any, base: str) -> tuple[OutputRef, str] | None:
    """Where a file item of history (`{filename, subfolder, type}`) lives and a signed link to it, when it is
    one of the proxy's references and still kept."""
    filename = item.get("filename") if isinstance(item, dict) else None
    ref = ref_of(filename) if isinstance(filename, str) else None
    target = await svc.store.resolve_output(ref) if ref is not None else None
    if ref is None or target is None:
        return None
    return target, await output_link(svc, ref, target, base)


async def output_link(svc: Services, ref: str, target: OutputRef, base: str) -> str:
    """A link to the file anyone may fetch until `outputs.link_ttl_s` has passed: the file store's own
    (an S3 presigned GET) once it is copied there, else the proxy's signed link under `base`."""
    ttl = svc.config.outputs.link_ttl_s
    name = client_filename(target.filename, ref)
    if target.stored and svc.files is not None:
        with contextlib.suppress(FileStoreUnavailable):
            direct = await svc.files.link(target.stored, ttl, name)
            if direct is not None:
                return direct
    return base.rstrip("/") + await svc.links.path(ref, name, target.tenant, ttl)


async def with_links(svc: Services, outputs: dict[str, Any], base: str, *, inline: bool = False) -> dict[str, Any]:
    """History outputs with each file's signed `link` (and with `inline` its bytes as base64 `data`, when no
    larger than `jobs.inline_max_bytes`)."""
    limit = svc.config.jobs.inline_max_bytes
    out: dict[str, Any] = {}
    for node_id, ui in outputs.items():
        node: dict[str, Any] = {}
        for key, items in (ui.items() if isinstance(ui, dict) else ()):
            if not isinstance(items, list):
                node[key] = items
                continue
            node[key] = []
            for item in items:
                found = await linked(svc, item, base)
                if found is None:
                    node[key].append(item)
                    continue
                target, link = found
                entry = {**item, "link": link}
                data = await read_output(svc, target, limit) if inline else None
                if data is not None:
                    entry["data"] = base64.b64encode(data).decode()
                node[key].append(entry)
        out[node_id] = node
    return out


async def read_output(svc: Services, target: OutputRef, limit: int) -> bytes | None:
    """An output's bytes when it is at most `limit` long: from the file store once copied, else from its
    backend; None when it is larger, gone or unreachable."""
    if target.stored and svc.files is not None:
        with contextlib.suppress(FileStoreUnavailable, ValueError):
            data = await svc.files.read(target.stored, limit)
            if data is not None:
                return data
    state = svc.farm.get(target.backend)
    if state is None:
        return None
    params = {"filename": target.filename, "subfolder": target.subfolder, "type": target.type}
    try:
        async with svc.client.session.get(state.url + "/view", params=params, timeout=svc.client.timeout) as resp:
            if resp.status != 200 or (resp.content_length or 0) > limit:
                return None
            data = await resp.content.read(limit + 1)
            return data if len(data) <= limit else None
    except (aiohttp.ClientError, TimeoutError):
        return None
