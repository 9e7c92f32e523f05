"""The hot-path JSON helpers give exactly what the standard library gives, where it matters."""

from __future__ import annotations

import json

from proxy import jsoncodec

BIG = 2**64 + 1   # past what orjson reads as an integer


def test_loads_and_dumps_keep_integers_past_64_bits_and_nan() -> None:
    text = json.dumps({"seed": BIG, "neg": -BIG, "x": float("nan"), "name": "é"})
    value = jsoncodec.loads(text)
    assert value["seed"] == BIG and value["neg"] == -BIG and value["x"] != value["x"]
    assert jsoncodec.loads(text.encode())["seed"] == BIG
    assert json.loads(jsoncodec.dumps_compact({"seed": BIG}))["seed"] == BIG
    assert jsoncodec.dumps_compact({"a": [1, 2.5, None]}) == json.dumps({"a": [1, 2.5, None]}, separators=(",", ":"))


def test_peek_reads_fields_and_may_lose_big_integers() -> None:
    text = json.dumps({"type": "executed", "data": {"prompt_id": "p", "seed": BIG}})
    peeked = jsoncodec.peek(text)
    assert peeked["type"] == "executed" and peeked["data"]["prompt_id"] == "p"
    assert jsoncodec.loads(text)["data"]["seed"] == BIG   # what is written out again is parsed exactly


def test_comfyui_messages_are_written_byte_for_byte_as_json_dumps_writes_them() -> None:
    values = [{"type": "executed", "data": {"output": {"images": [{"filename": "é\"\n.png"}]}, "seed": BIG}},
              {"a": [1, 2.5, -0.0, 1e300, None, True, float("inf"), float("nan")]}, {1: "int key", None: 2, 2.5: 3}]
    for value in values:
        assert jsoncodec.dumps_comfyui(value) == json.dumps(value)
    try:
        jsoncodec.dumps_comfyui({"a": object()})
    except TypeError as exc:
        assert "not JSON serializable" in str(exc)
    else:
        raise AssertionError("an object json cannot write must be refused")
