"""ComfyUI's classic output cache (comfy_execution/caching.py): outputs keyed by node signature.

A signature is the node's class, its IS_CHANGED value and its inputs, with links replaced by the
signatures of the ancestors (in a fixed order), so a node is cached when it and everything upstream is
unchanged, whatever its id. Only entries used by the current prompt survive a new prompt ("dump data
ASAP"), which is why a rerun of the previous prompt is all cached and an older one is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.comfy.validation import is_link


@dataclass(frozen=True)
class CacheEntry:
    ui: dict[str, Any] | None
    outputs: list[list[Any]]


class _Unhashable:
    """An input value the cache cannot key on: never equal to anything, so never cached."""


_SCALARS = frozenset((int, float, str, bool, bytes, type(None)))


def to_hashable(obj: Any) -> Any:
    """ComfyUI's `to_hashable` keys a mapping by a frozenset of its sorted items and a sequence by a
    frozenset of (index, item) pairs. Tuples give the same equalities (a mapping tagged so it never equals
    a list) for a third of the cost; the simulator computes every node's signature on every prompt. The
    exact types JSON decodes to are tested first: `isinstance` against the ABCs is slow."""
    kind = type(obj)
    if kind in _SCALARS or isinstance(obj, int | float | str | bytes):
        return obj
    if kind is dict or isinstance(obj, Mapping):
        return (dict, tuple([(to_hashable(k), to_hashable(v)) for k, v in sorted(obj.items())]))
    if kind is list or kind is tuple or isinstance(obj, Sequence):
        return tuple([to_hashable(i) for i in obj])
    return _Unhashable()


class OutputCache:
    """Outputs by signature; `set_prompt` computes the keys of a new prompt and drops unused entries."""

    def __init__(self) -> None:
        self._entries: dict[Any, CacheEntry] = {}
        self._keys: dict[str, Any] = {}

    def set_prompt(self, prompt: dict[str, Any], is_changed: Callable[[str], Any],
                   keeps_node_id: Callable[[str], bool]) -> None:
        signer = _Signer(prompt, is_changed, keeps_node_id)
        self._keys = {node_id: signer.signature(node_id) for node_id in prompt}
        used = set(self._keys.values())
        self._entries = {k: v for k, v in self._entries.items() if k in used}

    def get(self, node_id: str) -> CacheEntry | None:
        key = self._keys.get(node_id)
        return None if key is None else self._entries.get(key)

    def put(self, node_id: str, entry: CacheEntry) -> None:
        self._entries[self._keys[node_id]] = entry

    def all_node_ids(self) -> set[str]:
        return set(self._keys)

    def reset(self) -> None:
        self._entries.clear()
        self._keys.clear()


class _Signer:
    def __init__(self, prompt: dict[str, Any], is_changed: Callable[[str], Any],
                 keeps_node_id: Callable[[str], bool]) -> None:
        self.prompt = prompt
        self.is_changed = is_changed
        self.keeps_node_id = keeps_node_id

    def signature(self, node_id: str) -> Any:
        ancestors: list[str] = []
        order: dict[str, int] = {}
        self._ancestry(node_id, ancestors, order)
        parts = [self._immediate(node_id, order)] + [self._immediate(a, order) for a in ancestors]
        return to_hashable(parts)

    def _immediate(self, node_id: str, order: dict[str, int]) -> list[Any]:
        if node_id not in self.prompt:
            return [float("NaN")]  # a missing node can't be cached
        node = self.prompt[node_id]
        signature: list[Any] = [node["class_type"], self.is_changed(node_id)]
        if self.keeps_node_id(node["class_type"]):
            signature.append(node_id)
        inputs = node["inputs"]
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor_id, socket = inputs[key]
                signature.append((key, ("ANCESTOR", order[ancestor_id], socket)))
            else:
                signature.append((key, inputs[key]))
        return signature

    def _ancestry(self, node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
        if node_id not in self.prompt:
            return
        inputs = self.prompt[node_id]["inputs"]
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor_id = inputs[key][0]
                if ancestor_id not in order:
                    ancestors.append(ancestor_id)
                    order[ancestor_id] = len(ancestors) - 1
                    self._ancestry(ancestor_id, ancestors, order)
