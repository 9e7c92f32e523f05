"""Backends added, changed and removed at runtime (`proxy.membership`): `POST /proxy/backends`,
`GET/PATCH/DELETE /proxy/backends/{name}`. For admins, and for join tokens (`auth.join_tokens`), which
may do nothing else."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from typing import Any

from aiohttp import web

from proxy.api.admin import require_admin
from proxy.api.context import identity, services
from proxy.config import ConfigError, parse_config
from proxy.errors import BadRequest, Forbidden, NotFound
from proxy.membership import member_of
from proxy.store.base import Member

FIELDS = ("url", "name", "labels", "max_inflight", "weight", "min_vram_free_mb")
MAX_LEASE_S = 3600


def _require_member_rights(request: web.Request) -> None:
    if not identity(request).joiner:
        require_admin(request)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise BadRequest("invalid_backend", "The body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("invalid_backend", "The body must be a JSON object")
    unknown = sorted(set(body) - {*FIELDS, "lease_s"})
    if unknown:
        raise BadRequest("invalid_backend", "Unknown fields", ", ".join(unknown))
    return body


def _lease_until(body: dict[str, Any]) -> float | None:
    lease = body.get("lease_s")
    if lease is None:
        return None
    if isinstance(lease, bool) or not isinstance(lease, int | float) or not 1 <= lease <= MAX_LEASE_S:
        raise BadRequest("invalid_backend", f"lease_s must be 1..{MAX_LEASE_S} seconds", repr(lease))
    return time.time() + float(lease)


def _checked(fields: dict[str, Any], **more: Any) -> Member:
    """The backend as the config file would take it (the same checks and messages), as a member."""
    try:
        [config] = parse_config({"backends": [{k: v for k, v in fields.items() if v is not None}]}).backends
    except ConfigError as exc:
        raise BadRequest("invalid_backend", "Invalid backend", "\n".join(exc.problems)) from None
    except ValueError:   # no backend came out: its url was missing
        raise BadRequest("invalid_backend", "Invalid backend", "url is required") from None
    return member_of(config, **more)


def view(member: Member, request: web.Request) -> dict[str, Any]:
    out = {**asdict(member), "labels": list(member.labels)}
    out.pop("removed")
    state = services(request).farm.get(member.name)
    if state is not None:
        out["state"] = state.describe()
    return out


async def add_backend(request: web.Request) -> web.Response:
    """`POST /proxy/backends`: a new backend, or the same one again (a join agent re-registering)."""
    _require_member_rights(request)
    svc = services(request)
    body = await _body(request)
    member = _checked({k: body.get(k) for k in FIELDS}, source="join" if identity(request).joiner else "api",
                      lease_until=_lease_until(body))
    existing = await svc.membership.current(member.name)
    if existing is not None and existing.url != member.url:
        raise BadRequest("backend_exists", f"A backend named {member.name!r} exists with another URL",
                         existing.url)
    await svc.membership.put(member)
    return web.json_response(view(member, request), status=200 if existing is not None else 201)


async def _named(request: web.Request) -> Member:
    _require_member_rights(request)
    name = request.match_info["name"]
    found = await services(request).membership.current(name)
    if found is None:
        raise NotFound(f"No backend named {name!r}", name)
    if identity(request).joiner and found.source not in ("join",):
        raise Forbidden("A join token manages only the backends it registered", name)
    return found


async def get_backend(request: web.Request) -> web.Response:
    return web.json_response(view(await _named(request), request))


async def patch_backend(request: web.Request) -> web.Response:
    """`PATCH /proxy/backends/{name}`: change its settings, or renew a join agent's lease (`lease_s`)."""
    found = await _named(request)
    body = await _body(request)
    if body.get("name", found.name) != found.name:
        raise BadRequest("invalid_backend", "A backend's name cannot change", str(body["name"]))
    fields = {**{k: getattr(found, k) for k in FIELDS}, "labels": list(found.labels),
              **{k: v for k, v in body.items() if k in FIELDS}}
    lease = _lease_until(body)
    member = _checked(fields, source=found.source, lease_until=lease if lease is not None else found.lease_until,
                      leaving=found.leaving)
    await services(request).membership.put(member)
    return web.json_response(view(member, request))


async def delete_backend(request: web.Request) -> web.Response:
    """`DELETE /proxy/backends/{name}`: drained, then forgotten once idle (202); with `?force=1` out at
    once, its prompts back in the queue to run elsewhere (200)."""
    found = await _named(request)
    force = request.query.get("force", "").lower() in ("1", "true")
    await services(request).membership.leave(found, force=force)
    return web.json_response(view(replace(found, leaving=not force), request), status=200 if force else 202)
