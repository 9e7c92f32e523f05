"""JavaScript's own answers, where the prompt must match the page's to the character.

The frontend runs in a browser: `undefined`, `String(value)`, `Number.prototype.toString`, JSON.parse's
rounding and an object's key order all show in the prompt it queues. Here too are the two text
rewrites the page applies to widget values, `processDynamicPrompt` and `formatDate`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n\r\u2028\u2029]*", re.DOTALL)
_DATE_PARTS = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


class _Undefined(Enum):
    """JavaScript's `undefined`: a widget with no value, left out of the prompt as JSON.stringify does."""
    TOKEN = 0

    def __bool__(self) -> bool:
        return False


UNDEFINED = _Undefined.TOKEN


def _js_parsed(value: Any) -> Any:
    """A number as JSON.parse gives it: integers past 2**53 are rounded to a double."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return int(float(value))
    return value


def _js_keys(mapping: Mapping[str, Any]) -> list[str]:
    """A JavaScript object's key order: array indexes ascending, then the other keys as inserted."""
    indexes = [k for k in mapping if k.isdigit() and str(int(k)) == k and int(k) < 2**32 - 1]
    return sorted(indexes, key=int) + [k for k in mapping if k not in set(indexes)]


def _js_string(value: Any) -> str:
    """`String(value)` as JavaScript writes it."""
    if value is UNDEFINED:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, list):
        return ",".join("" if v is None or v is UNDEFINED else _js_string(v) for v in value)
    if isinstance(value, Mapping):
        return "[object Object]"
    return str(value)


def _js_number(value: float) -> str:
    """Number.prototype.toString: shortest digits, exponent only below 1e-6 or from 1e21."""
    if math.isnan(value) or math.isinf(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    text, point = "".join(map(str, digits)), len(digits) + int(exponent)
    if len(text) <= point <= 21:
        body = text + "0" * (point - len(text))
    elif 0 < point <= 21:
        body = f"{text[:point]}.{text[point:]}"
    elif -6 < point <= 0:
        body = "0." + "0" * -point + text
    else:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        body = f"{mantissa}e{'+' if point - 1 >= 0 else '-'}{abs(point - 1)}"
    return ("-" if sign else "") + body


def dynamic_prompt(text: str, rng: random.Random) -> str:
    """processDynamicPrompt: comments out, `{a|b|c}` → one of them at random (the choice is processed
    again), escapes kept but for `\\{`, `\\}` and `\\|`, which lose their backslash."""
    out, chars = [], iter(_COMMENTS.sub("", text))
    for char in chars:
        if char == "\\":
            out.append(char + next(chars, "undefined"))
        elif char == "{":
            options = _choice_block(chars)
            out.append(dynamic_prompt(options[int(rng.random() * len(options))], rng))
        else:
            out.append(char)
    return re.sub(r"\\([{}|])", r"\1", "".join(out))


def _choice_block(chars: Iterator[str]) -> list[str]:
    options, choice, depth = [], "", 0
    for char in chars:
        if char == "\\":
            choice += char + next(chars, "undefined")
            continue
        if char == "}" and not depth:
            break
        if char == "|" and not depth:
            options.append(choice)
            choice = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        choice += char
    return [*options, choice]


def format_date(text: str, now: datetime) -> str:
    """formatDate of the frontend: yyyy, yy, M/MM, d/dd, h/hh, m/mm, s/ss in the page's local time."""
    parts = {"d": now.day, "M": now.month, "h": now.hour, "m": now.minute, "s": now.second}

    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "yy":
            return str(now.year)[2:]
        if token == "yyyy":
            return str(now.year)
        return str(parts[token[0]]).zfill(len(token)) if token[0] in parts else token
    return _DATE_PARTS.sub(one, text)
