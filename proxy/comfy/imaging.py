"""ComfyUI's image handling around uploads and `/view` (server.py `upload_mask`, `view_image`), with
Pillow, shared by the simulator and the proxy.

`/upload/mask` does not store the uploaded file: it copies the upload's alpha channel onto the
`original_ref` image (keeping that image's PNG text chunks, where the workflow lives) and saves the result
under the upload's name. `/view` can re-encode (`preview=webp;90`) or split channels (`channel=rgb|a`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def apply_mask_alpha(original: bytes, mask: bytes, filename: str) -> bytes:
    """The original as RGBA with the mask's alpha, encoded for `filename`'s extension (PNG, level 4).

    A mask whose size differs from the original's raises ValueError, as in ComfyUI (a bare 500 there)."""
    with Image.open(io.BytesIO(original)) as source:
        metadata = PngInfo()
        for key, value in getattr(source, "text", {}).items():
            metadata.add_text(key, value)
        composed = source.convert("RGBA")
    with Image.open(io.BytesIO(mask)) as mask_image:
        composed.putalpha(mask_image.convert("RGBA").getchannel("A"))
    out = io.BytesIO()
    fmt = Image.registered_extensions().get(os.path.splitext(filename)[1].lower(), "PNG")
    composed.save(out, format=fmt, compress_level=4, pnginfo=metadata)
    return out.getvalue()


def view_variant(data: bytes, query: Mapping[str, str]) -> tuple[bytes, str] | None:
    """What `/view` sends for `preview=` or `channel=` (body, content type); None: the file itself."""
    channel = query.get("channel", "")
    if "preview" in query:
        parts = query["preview"].split(";")
        fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
        quality = int(parts[-1]) if parts[-1].isdigit() else 90
        with Image.open(io.BytesIO(data)) as img:
            shown = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img
            out = io.BytesIO()
            shown.save(out, format=fmt, quality=quality)
        return out.getvalue(), f"image/{fmt}"
    if channel == "rgb":
        with Image.open(io.BytesIO(data)) as img:
            rgb = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
            out = io.BytesIO()
            rgb.save(out, format="PNG")
        return out.getvalue(), "image/png"
    if channel == "a":
        with Image.open(io.BytesIO(data)) as img:
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            shown = Image.new("RGBA", img.size)
            shown.putalpha(alpha)
            out = io.BytesIO()
            shown.save(out, format="PNG")
        return out.getvalue(), "image/png"
    return None
