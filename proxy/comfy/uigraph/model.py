"""The UI graph in memory: what the loader builds from the saved file and the compiler reads.

Links, input slots, widgets (with the page's way of reading a widget's value back), nodes and graphs,
and `UiGraphError`, which every stage raises. The stages import it; it imports only `jstext`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.comfy.uigraph.jstext import _js_string


class UiGraphError(ValueError):
    """A UI workflow that cannot become a prompt; `node_id` names the node where there is one."""

    def __init__(self, message: str, node_id: str | None = None) -> None:
        super().__init__(f"node {node_id}: {message}" if node_id is not None else message)
        self.node_id = node_id


@dataclass(frozen=True)
class _Link:
    id: Any
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any


@dataclass(frozen=True)
class _Slot:
    name: str
    type: Any
    link: Any = None
    widget: str | None = None


@dataclass
class _Widget:
    name: str
    value: Any
    to_prompt: bool = True            # widget.options.serialize !== false
    dynamic_prompts: bool = False
    dom: str | None = None            # "textarea" or another DOM widget, whose value lives in the page's element
    upload_folder: str | None = None  # the combo an upload button feeds: its value getter annotates
    initial: str = ""
    shared: _Widget | None = None     # a subgraph node's copy of a DOM widget shares the element's value

    def read(self) -> Any:
        """`widget.value` as the page reads it back."""
        if self.shared is not None:
            return self.shared.read()
        if self.dom == "textarea":  # a <textarea>'s value: a string, with \r\n and \r made \n
            text = "" if self.value is None else _js_string(self.value)
            return text.replace("\r\n", "\n").replace("\r", "\n")
        if self.upload_folder is None:
            return self.value
        if not self.value:  # useImageUploadWidget wraps the upload combo's value
            return self.initial
        value = self.value[0] if isinstance(self.value, list) else self.value
        suffix = "" if self.upload_folder == "input" or re.search(r"\[(input|output|temp)\]", str(value), re.I) \
            else f" [{self.upload_folder}]"
        return f"{value}{suffix}"

    def write(self, value: Any) -> None:
        if self.shared is not None:
            self.shared.write(value)
        else:
            self.value = value

    def promoted(self, name: str) -> _Widget:
        """SubgraphNode's copy of this widget under the subgraph input's name (createCopyForNode)."""
        if self.dom is not None:
            return _Widget(name, None, shared=self)
        return replace(self, name=name, upload_folder=None, value=self.read())


@dataclass
class _Node:
    id: Any
    type: str
    mode: int
    title: str
    inputs: list[_Slot]
    outputs: list[tuple[Any, list[Any]]]  # (type, link ids)
    widgets: list[_Widget]
    properties: dict[str, Any]
    virtual: bool = False
    subgraph: _Graph | None = None
    values: list[Any] = field(default_factory=list)  # a PrimitiveNode's widgets_values

    def widget(self, name: str | None) -> _Widget | None:
        return next((w for w in self.widgets if w.name == name), None) if name is not None else None


@dataclass
class _Graph:
    id: str | None
    name: str
    nodes: dict[str, _Node]
    links: dict[Any, _Link]
    inputs: list[tuple[str, list[Any]]] = field(default_factory=list)   # a subgraph's (name, link ids)
    outputs: list[list[Any]] = field(default_factory=list)              # a subgraph's output link ids
