"""JSON on the hot paths (every upstream message, every store record): orjson where it gives the same
answer as the standard library, which is several times slower, and the standard library where it does not.

orjson reads an integer beyond 64 bits as a float and refuses to write one, and refuses NaN and
Infinity, which Python's json writes; a graph may carry any of them (a seed is an arbitrary integer
until a backend validates it). Text with a run of 20 digits (2**64 has 20) or that orjson cannot read
goes to `json`, so a value comes back exactly as it went in.
"""

from __future__ import annotations

import json
import json.encoder
import re
from collections.abc import Callable
from typing import Any

import orjson

_LONG_DIGITS = re.compile(r"\d{20}")
_LONG_DIGITS_BYTES = re.compile(rb"\d{20}")


def loads(raw: str | bytes) -> Any:
    long_digits = (_LONG_DIGITS_BYTES if isinstance(raw, bytes) else _LONG_DIGITS).search(raw)  # type: ignore[arg-type]
    if long_digits is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def peek(raw: str | bytes) -> Any:
    """Parse only to read fields (a message's type, prompt_id, node): orjson without the exactness check,
    so an integer past 64 bits may come back as a float. Never serialise what it returns; `loads` that."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def dumps_compact(value: Any) -> str:
    """`json.dumps(value, separators=(",", ":"))`, as orjson writes it when it can."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:   # orjson.JSONEncodeError: an integer beyond 64 bits, a non-str key, ...
        return json.dumps(value, separators=(",", ":"))


def _comfyui_encoder() -> Callable[[Any], str]:
    """`json.dumps` with its defaults, as ComfyUI writes every websocket message (aiohttp's `send_json`),
    made once: each `json.dumps` call builds its C encoder anew, a third of the cost of a small message."""
    make = getattr(json.encoder, "c_make_encoder", None)   # private: absent from the type stubs
    if make is None:   # no C accelerator in this Python
        return json.dumps
    # (markers, default, encode str, indent, key separator, item separator, sort_keys, skipkeys, allow_nan)
    encoder = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ": ", ", ",
                   False, False, True)

    def dumps(value: Any) -> str:
        return "".join(encoder(value, 0))
    return dumps


dumps_comfyui = _comfyui_encoder()
