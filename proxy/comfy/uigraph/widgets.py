"""A node class as the page makes it from an `/object_info` entry: its inputs in order, and its widgets.

Which inputs are widgets, the hidden widgets that take a place in `widgets_values` (control after
generate, the upload button), a new widget's default, and the values old files kept for `forceInput`.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import zip_longest
from typing import Any

from proxy.comfy.uigraph.jstext import UNDEFINED
from proxy.comfy.uigraph.model import _Slot, _Widget

WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD", "COLOR",
                          "TEXTAREA"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")


def _options(spec: Any) -> dict[str, Any]:
    return dict(spec[1]) if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], Mapping) else {}


def _spec_type(spec: Any) -> Any:
    """getInputSpecType: a list of options or "COMBO" is a combo; otherwise the type string."""
    head = spec[0] if isinstance(spec, list) and spec else None
    return "COMBO" if isinstance(head, list) or head == "COMBO" else head


def _combo_options(spec: Any) -> list[Any]:
    head = spec[0] if isinstance(spec, list) and spec else None
    return list(head) if isinstance(head, list) else list(_options(spec).get("options") or [])


class _NodeDef:
    """One object_info entry as the page turns it into a node class: its inputs in order, its widgets."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.info = info
        self.specs = self._merged_specs()
        self.ordered = self._ordered()

    def _merged_specs(self) -> dict[str, tuple[Any, bool]]:
        """transformNodeDefV1ToV2 after Comfy.UploadImage: required then optional, `upload` appended."""
        inputs = self.info.get("input") or {}
        required = dict(inputs.get("required") or {})
        media = next((name for name, spec in required.items() if _spec_type(spec) == "COMBO"
                      and any(_options(spec).get(o) is True for o in UPLOAD_OPTIONS)), None)
        if media is not None:
            required["upload"] = ["IMAGEUPLOAD", {**_options(required[media]), "imageInputName": media}]
        merged = {name: (spec, False) for name, spec in required.items()}
        merged.update({name: (spec, True) for name, spec in (inputs.get("optional") or {}).items()})
        return merged

    def _ordered(self) -> list[str]:
        """getOrderedInputSpecs: `input_order` first, then whatever it does not name."""
        order = self.info.get("input_order")
        if not order:
            return list(self.specs)
        names = [n for n in order.get("required") or [] if n in self.specs and not self.specs[n][1]]
        names += [n for n in order.get("optional") or [] if n in self.specs and self.specs[n][1]]
        return names + [n for n in self.specs if n not in names]

    def is_widget(self, name: str) -> bool:
        spec = self.specs[name][0]
        kind = _options(spec).get("widgetType") or _spec_type(spec)
        return kind in WIDGET_TYPES and not _options(spec).get("forceInput")

    def slots(self) -> list[_Slot]:
        """Sockets first, then one input per widget (litegraphService #addInputs)."""
        sockets = [_Slot(n, _spec_type(self.specs[n][0])) for n in self.ordered if not self.is_widget(n)]
        return sockets + [_Slot(n, _spec_type(self.specs[n][0]), widget=n) for n in self.ordered if self.is_widget(n)]

    def widgets(self) -> list[_Widget]:
        return [w for name in self.ordered if self.is_widget(name) for w in self._widgets_of(name)]

    def _widgets_of(self, name: str) -> list[_Widget]:
        spec = self.specs[name][0]
        options, kind = _options(spec), _options(spec).get("widgetType") or _spec_type(spec)
        if kind == "IMAGEUPLOAD":
            return [_Widget(name, "image", to_prompt=False)]
        dom = "textarea" if kind == "STRING" and options.get("multiline") else \
            "element" if kind == "MARKDOWN" or (kind == "COMBO" and options.get("multi_select")) else None
        main = _Widget(name, _default(kind, spec), dom=dom,
                       dynamic_prompts=kind == "STRING" and options.get("dynamicPrompts") is True)
        control = options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in SEED_NAMES):
            return [main, _Widget(control if isinstance(control, str) else "control_after_generate", "randomize",
                                  to_prompt=False)]
        if kind == "COMBO" and control:
            return [main, _Widget("control_after_generate", "randomize", to_prompt=False),
                    _Widget("control_filter_list", "", to_prompt=False)]
        return [main]

    def upload_target(self) -> tuple[str, str] | None:
        """The combo an upload button feeds, and the folder its value is annotated with."""
        upload = self.specs.get("upload")
        if upload is None or _spec_type(upload[0]) != "IMAGEUPLOAD":
            return None
        options = _options(upload[0])
        return str(options.get("imageInputName")), str(options.get("image_folder", "input"))

    def migrated(self, values: list[Any], widgets: list[_Widget]) -> list[Any]:
        """migrateWidgetsValues: drop the values pre-1.16 files kept for `forceInput` inputs."""
        names = {w.name for w in widgets}
        originals = [(n, s) for n, (s, _) in self.specs.items() if n in names or _options(s).get("forceInput")]
        count = sum(2 if _options(s).get("control_after_generate") or n in SEED_NAMES else 1 for n, s in originals)
        if count != len(values):
            return values
        return [v for spec, v in zip_longest(originals, values)
                if spec is None or not _options(spec[1]).get("forceInput")]


def _default(kind: Any, spec: Any) -> Any:
    """The value a new widget starts with (the use*Widget constructors)."""
    options = _options(spec)
    default = options.get("default")
    if kind == "COMBO":
        if options.get("multi_select"):
            return []
        choices = _combo_options(spec)
        return default if default else (choices[0] if choices else UNDEFINED)
    if kind in ("INT", "FLOAT"):
        return 0 if default is None else default
    if kind == "BOOLEAN":
        return False if default is None else default
    if kind in ("COLOR", "TEXTAREA"):
        return default or ("#000000" if kind == "COLOR" else "")
    return "" if default is None else default
