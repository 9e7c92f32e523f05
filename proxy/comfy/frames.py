"""Binary websocket frames of ComfyUI (comfyui-protocol.md §8; ComfyUI 0.3.75 `protocol.py`, `server.py`).

Every frame starts with a 4-byte big-endian event type:
- 1 PREVIEW_IMAGE: 4-byte image format (1 JPEG, 2 PNG), then the image. No prompt_id.
- 3 TEXT: 4-byte length of a node id, the node id, then UTF-8 text.
- 4 PREVIEW_IMAGE_WITH_METADATA: 4-byte metadata length, JSON metadata (`node_id`, `prompt_id`,
  `display_node_id`, `parent_node_id`, `real_node_id`, `image_type`), then the image.
The proxy converts between 1 and 4 for clients with and without `supports_preview_metadata`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2  # ComfyUI-internal: never on the wire
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

FORMAT_JPEG = 1
FORMAT_PNG = 2
MIME_BY_FORMAT = {FORMAT_JPEG: "image/jpeg", FORMAT_PNG: "image/png"}

_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")


class FrameError(ValueError):
    """A binary frame too short or malformed to decode."""


@dataclass(frozen=True)
class PreviewFrame:
    fmt: int
    image: bytes


@dataclass(frozen=True)
class MetadataPreviewFrame:
    metadata: dict[str, Any]
    image: bytes


@dataclass(frozen=True)
class TextFrame:
    node_id: str
    text: str


@dataclass(frozen=True)
class UnknownFrame:
    event_type: int
    payload: bytes


Frame = PreviewFrame | MetadataPreviewFrame | TextFrame | UnknownFrame


def event_type(frame: bytes) -> int:
    """The event type alone: cheap enough for the per-frame hot path."""
    if len(frame) < 4:
        raise FrameError(f"binary frame of {len(frame)} bytes has no event type")
    return int(_U32.unpack_from(frame)[0])


def encode_preview(image: bytes, fmt: int) -> bytes:
    return _U32_PAIR.pack(PREVIEW_IMAGE, fmt) + image


def preview_metadata(node_id: str, prompt_id: str, fmt: int, *, display_node_id: str | None = None,
                     parent_node_id: str | None = None, real_node_id: str | None = None) -> dict[str, Any]:
    """Metadata with ComfyUI's keys in ComfyUI's order (comfy_execution/progress.py)."""
    return {
        "node_id": node_id,
        "prompt_id": prompt_id,
        "display_node_id": node_id if display_node_id is None else display_node_id,
        "parent_node_id": parent_node_id,
        "real_node_id": node_id if real_node_id is None else real_node_id,
        "image_type": MIME_BY_FORMAT.get(fmt, "image/jpeg"),
    }


def encode_preview_with_metadata(image: bytes, metadata: Mapping[str, Any]) -> bytes:
    """Type 4 frame; `metadata` is written as given (ComfyUI always includes `image_type`)."""
    meta = json.dumps(dict(metadata)).encode("utf-8")
    return _U32_PAIR.pack(PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image


def encode_text(node_id: str, text: str | bytes) -> bytes:
    node = node_id.encode("utf-8")
    body = text.encode("utf-8") if isinstance(text, str) else text
    return _U32_PAIR.pack(TEXT, len(node)) + node + body


def decode_frame(frame: bytes) -> Frame:
    kind = event_type(frame)
    if kind == PREVIEW_IMAGE:
        return PreviewFrame(_u32_at(frame, 4), bytes(frame[8:]))
    if kind == PREVIEW_IMAGE_WITH_METADATA:
        size = _u32_at(frame, 4)
        raw = frame[8:8 + size]
        if len(raw) != size:
            raise FrameError("metadata frame shorter than its metadata length")
        try:
            metadata = json.loads(raw)
        except ValueError as exc:
            raise FrameError(f"metadata is not JSON: {exc}") from exc
        if not isinstance(metadata, dict):
            raise FrameError("metadata is not a JSON object")
        return MetadataPreviewFrame(metadata, bytes(frame[8 + size:]))
    if kind == TEXT:
        size = _u32_at(frame, 4)
        node = frame[8:8 + size]
        if len(node) != size:
            raise FrameError("text frame shorter than its node id length")
        return TextFrame(node.decode("utf-8", "replace"), frame[8 + size:].decode("utf-8", "replace"))
    return UnknownFrame(kind, bytes(frame[4:]))


def preview_to_metadata_frame(frame: bytes, metadata: Mapping[str, Any]) -> bytes:
    """Type 1 → type 4; `image_type` is set from the frame's format, as ComfyUI does."""
    decoded = decode_frame(frame)
    if not isinstance(decoded, PreviewFrame):
        raise FrameError(f"not a PREVIEW_IMAGE frame (type {event_type(frame)})")
    meta = {k: v for k, v in metadata.items() if k != "image_type"}
    meta["image_type"] = MIME_BY_FORMAT.get(decoded.fmt, "image/jpeg")
    return encode_preview_with_metadata(decoded.image, meta)


def metadata_frame_to_preview(frame: bytes) -> bytes:
    """Type 4 → type 1 for clients that did not announce `supports_preview_metadata`."""
    decoded = decode_frame(frame)
    if not isinstance(decoded, MetadataPreviewFrame):
        raise FrameError(f"not a PREVIEW_IMAGE_WITH_METADATA frame (type {event_type(frame)})")
    fmt = FORMAT_PNG if decoded.metadata.get("image_type") == "image/png" else FORMAT_JPEG
    return encode_preview(decoded.image, fmt)


def _u32_at(frame: bytes, offset: int) -> int:
    if len(frame) < offset + 4:
        raise FrameError(f"binary frame of {len(frame)} bytes is truncated")
    return int(_U32.unpack_from(frame, offset)[0])
