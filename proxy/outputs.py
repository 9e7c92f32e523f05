"""File references handed to clients: collision-proof across backends and bound to their tenant.

Every backend numbers its outputs from `ComfyUI_00001_.png` (protocol §5), so the proxy rewrites each
file reference it passes on (in `executed` events and history) to carry a reference id in the *file
name*: `ComfyUI_00001_.png` → `ComfyUI_00001_~k3x…q.png`. The name, not the subfolder, carries it
because common client snippets call `/view?filename=F&type=output` with the file name alone. The id
is recorded in the store (id → backend, real name, subfolder, type, tenant, prompt) and resolved on
`/view`; an id that was never issued, or was issued to another tenant, resolves to nothing (404).
Ids are derived (a hash of what they point at), so the same file always gets the same id.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import replace
from typing import Any

from proxy.store.base import OutputRef

_REF_LEN = 20
_REF_RE = re.compile(rf"(?P<stem>.*)~(?P<ref>[a-z2-7]{{{_REF_LEN}}})(?P<ext>\.[^.~]*)?", re.S)
# ComfyUI lets a name carry its folder: "name.png [output]" (protocol §5).
_ANNOTATION_RE = re.compile(r"^(?P<name>.*) \[(?P<type>output|input|temp)\]$", re.S)


def make_ref(out: OutputRef) -> str:
    key = "\0".join((out.tenant, out.backend, out.prompt_id, out.type, out.subfolder, out.filename))
    digest = hashlib.sha256(key.encode()).digest()
    return base64.b32encode(digest).decode().lower()[:_REF_LEN]


def client_filename(filename: str, ref: str) -> str:
    stem, ext = os.path.splitext(filename)
    return f"{stem}~{ref}{ext}"


def split_annotation(filename: str) -> tuple[str, str | None]:
    match = _ANNOTATION_RE.fullmatch(filename)
    return (match["name"], match["type"]) if match else (filename, None)


def ref_of(filename: str) -> str | None:
    """The reference id carried by a client-facing file name, if it has one."""
    name, _ = split_annotation(filename)
    match = _REF_RE.fullmatch(name)
    return match["ref"] if match else None


def rewrite_ui_output(output: Any, *, backend: str, tenant: str, prompt_id: str
                      ) -> tuple[Any, dict[str, OutputRef]]:
    """Rewrite every `{filename, subfolder, type}` in a node's ui output; unknown keys are kept as they are."""
    refs: dict[str, OutputRef] = {}
    if not isinstance(output, dict):
        return output, refs
    out: dict[str, Any] = {}
    for key, value in output.items():
        if isinstance(value, list):
            out[key] = [_rewrite_item(item, backend, tenant, prompt_id, refs) for item in value]
        else:
            out[key] = value
    return out, refs


def _rewrite_item(item: Any, backend: str, tenant: str, prompt_id: str, refs: dict[str, OutputRef]) -> Any:
    if not (isinstance(item, dict) and isinstance(item.get("filename"), str)):
        return item
    ref_target = OutputRef(backend=backend, filename=item["filename"], subfolder=str(item.get("subfolder") or ""),
                           type=str(item.get("type") or "output"), tenant=tenant, prompt_id=prompt_id)
    ref = make_ref(ref_target)
    refs[ref] = ref_target
    return {**item, "filename": client_filename(item["filename"], ref)}


def rewrite_outputs(outputs: Any, *, backend: str, tenant: str, prompt_id: str
                    ) -> tuple[Any, dict[str, OutputRef]]:
    """The same for a history entry's `outputs` ({node_id: ui_output})."""
    refs: dict[str, OutputRef] = {}
    if not isinstance(outputs, dict):
        return outputs, refs
    out: dict[str, Any] = {}
    for node_id, ui in outputs.items():
        out[node_id], found = rewrite_ui_output(ui, backend=backend, tenant=tenant, prompt_id=prompt_id)
        refs.update(found)
    return out, refs


def marked_to_keep(refs: dict[str, OutputRef]) -> dict[str, OutputRef]:
    """The references whose files are copied into the file store: outputs (type `output`); previews (type
    `temp`) stay on their backend, as ComfyUI throws them away too."""
    return {ref: replace(out, keep=True) if out.type == "output" else out for ref, out in refs.items()}
