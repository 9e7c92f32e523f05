"""What a prompt needs from a backend: its node classes, and the model files (and other combo values) it
names. Real farms are heterogeneous: a prompt sent to a backend that lacks its checkpoint fails there.

A backend's offer is read from its `/object_info` (protocol §6: combo lists are the backend's files), as a
set of (class, input) → options. Upload widgets (`image_upload` …) are left out: the proxy copies the
tenant's uploads to whichever backend runs the prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.uploads import UPLOAD_FLAGS

Combos = Mapping[tuple[str, str], frozenset[str]]


def _options(spec: Any) -> list[Any] | None:
    """The options of a combo input in either form, or None if the input is not a combo."""
    if not isinstance(spec, list) or not spec:
        return None
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if any(extra.get(flag) for flag in UPLOAD_FLAGS):
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return list(extra.get("options", []))
    return None


def combos_of(object_info: Mapping[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    out: dict[tuple[str, str], frozenset[str]] = {}
    for cls, spec in object_info.items():
        for section in ("required", "optional"):
            for name, conf in ((spec.get("input") or {}).get(section) or {}).items():
                options = _options(conf)
                if options is not None:
                    out[(cls, name)] = frozenset(str(o) for o in options if isinstance(o, str | int | float))
    return out


def combo_values(prompt: Mapping[str, Any], combos: Combos) -> frozenset[tuple[str, str, str]]:
    """(class, input, value) for every literal combo value in the prompt (model files among them)."""
    out: set[tuple[str, str, str]] = set()
    for node in prompt.values():
        if not isinstance(node, dict):
            continue
        cls = str(node.get("class_type"))
        for name, value in (node.get("inputs") or {}).items():
            if isinstance(value, str) and (cls, name) in combos:
                out.add((cls, name, value))
    return frozenset(out)


MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


def model_files(values: frozenset[tuple[str, str, str]]) -> frozenset[str]:
    """The model files among a prompt's combo values: what a backend must load to run it."""
    return frozenset(v for _, _, v in values if v.lower().endswith(MODEL_SUFFIXES))


def offers(combos: Combos, wanted: frozenset[tuple[str, str, str]]) -> bool:
    return all(value in combos.get((cls, name), ()) for cls, name, value in wanted)


@dataclass(frozen=True, eq=False)
class Catalogue:
    """One backend's `/object_info` with what the scheduler reads of it. Backends that answered the same
    bytes share one (`Catalogues`): a farm of hundreds of alike backends holds, merges and scans one
    catalogue, not hundreds."""

    info: dict[str, Any] = field(default_factory=dict)
    node_classes: frozenset[str] = frozenset()
    combos: Combos = field(default_factory=dict)


EMPTY = Catalogue()


class Catalogues:
    """Catalogues by the digest of the answer they were parsed from."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, Catalogue] = {}

    def parse(self, body: bytes) -> Catalogue:
        """The catalogue of an `/object_info` answer, parsed only if no backend gave these bytes before.
        Raises ValueError for a body that is not a JSON object."""
        digest = hashlib.blake2b(body, digest_size=16).digest()
        known = self._by_digest.get(digest)
        if known is not None:
            return known
        info = json.loads(body)
        if not isinstance(info, dict):
            raise ValueError("/object_info did not answer a JSON object")
        made = self._by_digest[digest] = Catalogue(info, frozenset(info), combos_of(info))
        return made

    def keep_only(self, used: Iterable[Catalogue]) -> None:
        """Forget the catalogues no backend holds any more."""
        live = {id(c) for c in used}
        self._by_digest = {d: c for d, c in self._by_digest.items() if id(c) in live}
