"""ComfyUI's prompt validation (0.3.75 `execution.py` `validate_prompt` / `validate_inputs`) over
`/object_info` dicts instead of Python node classes.

Working on object_info lets the proxy validate a prompt against the merged object_info of its backends,
and the simulator against its own, with the very error bodies ComfyUI returns
(traces/validation_errors*.json). The code follows ComfyUI's structure on purpose: the odd results
(a KeyError of a missing linked node reported under the *linked* node id, `dependent_outputs` collected
from every failed node seen so far) fall out of the same steps.

Like ComfyUI, validation converts widget values in place: `{"__value__": v}` is unwrapped and INT, FLOAT,
STRING and BOOLEAN inputs are converted, in the caller's prompt dict.

Known departures, each where ComfyUI itself would answer a bare 500 or behave at random:
- a prompt that is not a dict gives `invalid_prompt` (ComfyUI raises; an empty list or string gives
  `prompt_no_outputs` in both), and a node whose `class_type` is not a string is reported as a class
  that does not exist;
- outputs are validated in prompt order (ComfyUI iterates a set, so its order varies per process);
- the `["COMBO", {"options": [...]}]` combo form is checked like the classic one, as ComfyUI does after
  0.3.75 (0.3.75 itself lets any value through for that form).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

CustomCheck = Callable[[str, dict[str, Any]], str | bool]
"""(class_type, the inputs the check takes) -> True, or an error message: ComfyUI's VALIDATE_INPUTS."""

CustomChecks = Mapping[str, tuple[tuple[str, ...], CustomCheck]]

NodeResult = tuple[bool, list[dict[str, Any]], Any]


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any] = field(default_factory=dict)


def validate_prompt(prompt: Any, object_info: Mapping[str, Mapping[str, Any]],
                    partial_execution_targets: list[str] | None = None,
                    custom_checks: CustomChecks | None = None) -> ValidationResult:
    """Validate an API-format prompt; `ok` with the output node ids to run, or ComfyUI's error."""
    if not isinstance(prompt, dict):
        if isinstance(prompt, list | str) and not prompt:  # ComfyUI iterates it and finds no output
            return _refused(_error("prompt_no_outputs", "Prompt has no outputs", ""))
        return _refused(_error("invalid_prompt", "Cannot execute because the prompt is not a dict.",
                               f"Prompt of type {type(prompt).__name__}"))
    outputs, error = _find_outputs(prompt, object_info, partial_execution_targets)
    if error is not None:
        return _refused(error)
    if not outputs:
        return _refused(_error("prompt_no_outputs", "Prompt has no outputs", ""))
    return _Validator(prompt, object_info, custom_checks or {}).run(outputs)


def is_link(value: Any) -> bool:
    """ComfyUI's comfy_execution.graph_utils.is_link: `[node_id: str, output_index: int|float]`."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int | float))


def validate_node_input(received_type: Any, input_type: Any, strict: bool = False) -> bool:
    """ComfyUI's comfy_execution.validation.validate_node_input: comma-separated type sets, `*` by `__ne__`."""
    if not received_type != input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    accepted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in accepted:
        return True  # ComfyUI's AnyType compares equal to every type through its __ne__
    return received.issubset(accepted) if strict else bool(received & accepted)


def _error(kind: str, message: str, details: str, extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info or {}}


def _refused(error: dict[str, Any]) -> ValidationResult:
    return ValidationResult(False, error, [], {})


def _find_outputs(prompt: dict[str, Any], object_info: Mapping[str, Mapping[str, Any]],
                  targets: list[str] | None) -> tuple[list[str], dict[str, Any] | None]:
    outputs: list[str] = []
    for x in prompt:
        node = prompt[x]
        if not isinstance(node, dict) or "class_type" not in node:
            return [], _error("invalid_prompt",
                              "Cannot execute because a node is missing the class_type property.",
                              f"Node ID '#{x}'")
        class_type = node["class_type"]
        info = object_info.get(class_type) if isinstance(class_type, str) else None
        if info is None:
            return [], _error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                              f"Node ID '#{x}'")
        if info.get("output_node") is True and (targets is None or x in targets):
            outputs.append(x)
    return outputs, None


def _exception_reason(kind: str, message: str, ex: BaseException, extra: dict[str, Any]) -> dict[str, Any]:
    return _error(kind, message, str(ex), {**extra, "exception_type": _full_type_name(ex),
                                           "traceback": traceback.format_tb(ex.__traceback__)})


def _full_type_name(ex: BaseException) -> str:
    klass = type(ex)
    return klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"


class _Validator:
    """One validation run: ComfyUI's `validated` memo shared by every output's recursive walk."""

    def __init__(self, prompt: dict[str, Any], object_info: Mapping[str, Mapping[str, Any]],
                 checks: CustomChecks) -> None:
        self.prompt = prompt
        self.object_info = object_info
        self.checks = checks
        self.validated: dict[Any, NodeResult] = {}

    def run(self, outputs: list[str]) -> ValidationResult:
        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for o in outputs:
            valid, reasons = self._validate_output(o)
            if valid is True:
                good.append(o)
                continue
            failed.append((o, reasons))
            self._collect_node_errors(o, node_errors)
        if good:
            return ValidationResult(True, None, good, node_errors)
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return ValidationResult(False, error, [], node_errors)

    def _validate_output(self, o: str) -> tuple[bool, list[dict[str, Any]]]:
        try:
            valid, reasons, _ = self.validate_node(o)
            return valid, reasons
        except Exception as ex:
            reasons = [_exception_reason("exception_during_validation", "Exception when validating node",
                                         ex, {})]
            self.validated[o] = (False, reasons, o)
            return False, reasons

    def _collect_node_errors(self, o: str, node_errors: dict[str, Any]) -> None:
        # ComfyUI quirk: every failed node validated so far gets this output as a dependent.
        for node_id, (valid, reasons, _) in self.validated.items():
            if valid is True or not reasons:
                continue
            if node_id not in node_errors:
                node_errors[node_id] = {"errors": reasons, "dependent_outputs": [],
                                        "class_type": self.prompt[node_id]["class_type"]}
            node_errors[node_id]["dependent_outputs"].append(o)

    def validate_node(self, unique_id: Any) -> NodeResult:
        if unique_id in self.validated:
            return self.validated[unique_id]
        inputs = self.prompt[unique_id]["inputs"]
        class_type = self.prompt[unique_id]["class_type"]
        class_inputs = self.object_info[class_type].get("input", {})
        check_names, check = self.checks.get(class_type, ((), None))
        valid_inputs = set(class_inputs.get("required", {})) | set(class_inputs.get("optional", {}))
        errors: list[dict[str, Any]] = []
        received_types: dict[str, Any] = {}
        valid = True
        for x in sorted(valid_inputs):  # ComfyUI iterates a set; sorted matches the traces
            input_type, category, extra_info = _input_info(class_inputs, x)
            if x not in inputs:
                if category == "required":
                    errors.append(_error("required_input_missing", "Required input is missing", x,
                                         {"input_name": x}))
                continue
            info = [input_type, extra_info]
            if isinstance(inputs[x], list):
                error, linked_ok = self._check_link(x, inputs[x], info, check_names, received_types)
                valid = valid and linked_ok
            else:
                error = _check_value(inputs, x, info, check_names)
            if error is not None:
                errors.append(error)
        if check is not None and check_names:
            errors.extend(self._custom_errors(class_type, inputs, class_inputs, check_names=check_names, check=check,
                                              received_types=received_types))
        result: NodeResult = (True, [], unique_id)
        if errors or valid is not True:
            result = (False, errors, unique_id)
        self.validated[unique_id] = result
        return result

    def _check_link(self, x: str, val: list[Any], info: list[Any], check_names: tuple[str, ...],
                    received_types: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """One linked input: (an error of this node, whether the linked node validated)."""
        if len(val) != 2:
            return _error("bad_linked_input",
                          "Bad linked input, must be a length-2 list of [node_id, slot_index]", x,
                          {"input_name": x, "input_config": info, "received_value": val}), True
        o_id = val[0]
        o_class_type = self.prompt[o_id]["class_type"]  # KeyError of a missing node: ComfyUI's own path
        received_type = tuple(self.object_info[o_class_type]["output"])[val[1]]  # RETURN_TYPES is a tuple
        received_types[x] = received_type
        if "input_types" not in check_names and not validate_node_input(received_type, info[0]):
            details = f"{x}, received_type({received_type}) mismatch input_type({info[0]})"
            return _error("return_type_mismatch", "Return type mismatch between linked nodes", details,
                          {"input_name": x, "input_config": info, "received_type": received_type,
                           "linked_node": val}), True
        try:
            return None, self.validate_node(o_id)[0] is not False
        except Exception as ex:
            reason = _exception_reason("exception_during_inner_validation",
                                       "Exception when validating inner node", ex,
                                       {"input_name": x, "input_config": info, "exception_message": str(ex)})
            reason["extra_info"]["linked_node"] = val
            # ComfyUI stores the failure under the linked node's id, with this node's input.
            self.validated[o_id] = (False, [reason], o_id)
            return None, False

    def _custom_errors(self, class_type: str, inputs: dict[str, Any], class_inputs: Mapping[str, Any], *,
                       check_names: tuple[str, ...], check: CustomCheck,
                       received_types: dict[str, Any]) -> list[dict[str, Any]]:
        """ComfyUI's VALIDATE_INPUTS call: links arrive as None, a missing argument raises TypeError."""
        filtered: dict[str, Any] = {}
        for x, value in inputs.items():
            if x not in check_names:
                continue
            if is_link(value):
                filtered[x] = None
            elif _input_info(class_inputs, x)[1] is not None:
                filtered[x] = value
        if "input_types" in check_names:
            filtered["input_types"] = received_types
        missing = [n for n in check_names if n not in filtered]
        if missing:
            raise TypeError(f"{class_type}.VALIDATE_INPUTS() missing {len(missing)} required positional "
                            f"argument{'s' if len(missing) > 1 else ''}: "
                            + " and ".join(repr(n) for n in missing))
        r = check(class_type, dict(filtered))
        if r is True:
            return []
        details_of = (lambda x: x) if r is False else (lambda x: f"{x} - {r}")
        return [_error("custom_validation_failed", "Custom validation failed for node", details_of(x),
                       {"input_name": x}) for x in filtered]


def _input_info(class_inputs: Mapping[str, Any], name: str) -> tuple[Any, str | None, dict[str, Any]]:
    """ComfyUI's get_input_info over object_info's `input`: (type, category, options)."""
    for category in ("required", "optional", "hidden"):
        spec = class_inputs.get(category) or {}
        if name in spec:
            entry = spec[name]
            if not isinstance(entry, list | tuple):
                return entry, category, {}
            extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            return entry[0], category, extra
    return None, None, {}


def _check_value(inputs: dict[str, Any], x: str, info: list[Any], check_names: tuple[str, ...]
                 ) -> dict[str, Any] | None:
    """A widget value: conversion to the input's type, then min, max and combo membership."""
    input_type, extra_info = info
    val = inputs[x]
    try:
        if isinstance(val, dict) and "__value__" in val:  # list widget values travel wrapped
            val = val["__value__"]
            inputs[x] = val
        val = _convert(input_type, val)
        inputs[x] = val
    except Exception as ex:
        return _error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                      f"{x}, {val}, {ex}", {"input_name": x, "input_config": info, "received_value": val,
                                            "exception_message": str(ex)})
    if x in check_names:
        return None
    if "min" in extra_info and val < extra_info["min"]:
        return _error("value_smaller_than_min", f"Value {val} smaller than min of {extra_info['min']}", x,
                      {"input_name": x, "input_config": info, "received_value": val})
    if "max" in extra_info and val > extra_info["max"]:
        return _error("value_bigger_than_max", f"Value {val} bigger than max of {extra_info['max']}", x,
                      {"input_name": x, "input_config": info, "received_value": val})
    return _check_combo(x, val, info)


def _convert(input_type: Any, val: Any) -> Any:
    if input_type == "INT":
        return int(val)
    if input_type == "FLOAT":
        return float(val)
    if input_type == "STRING":
        return str(val)
    if input_type == "BOOLEAN":
        return bool(val)
    return val


def _check_combo(x: str, val: Any, info: list[Any]) -> dict[str, Any] | None:
    input_type, extra_info = info
    if isinstance(input_type, list):
        options = input_type
    elif input_type == "COMBO":
        options = extra_info.get("options", [])
    else:
        return None
    if val in options:
        return None
    input_config: list[Any] | None = info
    if len(options) > 20:  # ComfyUI leaves out long lists such as scanned model files
        list_info, input_config = f"(list of length {len(options)})", None
    else:
        list_info = str(options)
    return _error("value_not_in_list", "Value not in list", f"{x}: '{val}' not in {list_info}",
                  {"input_name": x, "input_config": input_config, "received_value": val})
