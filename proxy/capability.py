"""What a prompt needs from a backend: its node classes, and the model files (and other combo values) it
names. Real farms are heterogeneous: a prompt sent to a backend that lacks its checkpoint fails there.

A backend's offer is read from its `/object_info` (protocol §6: combo lists are the backend's files), as a
set of (class, input) → options. Upload widgets (`image_upload` …) are left out: the proxy copies the
tenant's uploads to whichever backend runs the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
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
