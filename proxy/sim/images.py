"""Real PNG files from simulated images, with zlib and struct only (no Pillow).

Pixels are noise seeded by the image's recipe (seed, colour, every step that made it) and the backend's
name, so two simulators given the same prompt write different bytes and a test can tell who made an
image. Rows are slices of a few random rows rotated by random offsets: fast to build, and a 512×512 PNG
still weighs tens of kilobytes.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Mapping

from proxy.sim.values import SimImage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BASE_ROWS = 16
_INVERT = bytes(255 - i for i in range(256))


def seed_of(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:8], "big")


def noise_rgb(width: int, height: int, seed: int) -> bytes:
    """`height` rows of `width` RGB pixels of seeded noise."""
    rng = random.Random(seed)
    stride = width * 3
    base = rng.randbytes(stride * _BASE_ROWS)
    doubled = [base[i * stride:(i + 1) * stride] * 2 for i in range(_BASE_ROWS)]
    rows = []
    for y in range(height):
        offset = rng.randrange(width) * 3
        rows.append(doubled[y % _BASE_ROWS][offset:offset + stride])
    return b"".join(rows)


def render(image: SimImage, backend: str, index: int = 0) -> bytes:
    """RGB pixels of one image of the batch."""
    pixels = noise_rgb(image.width, image.height, seed_of(backend, image.recipe, str(index)))
    return pixels.translate(_INVERT) if image.inverted else pixels


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rgb: bytes, text: Mapping[str, str] | None = None,
               level: int = 4) -> bytes:
    """An 8-bit RGB PNG; `text` becomes tEXt chunks before the image data, where Pillow puts them."""
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    chunks.append(_chunk(b"IDAT", zlib.compress(raw, level, wbits=_window_bits(len(raw)))))
    chunks.append(_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def _window_bits(size: int) -> int:
    """The smallest deflate window that holds `size` bytes (zlib's 9 to 15). zlib sets up and clears its
    whole window for each stream: for a thumbnail the default 32 KiB made compressing cost 50 µs instead
    of 17, the largest part of a small prompt's run in the simulator. The compressed data is the same
    (no match can reach back further than the input anyway); only the header's window size differs,
    which every PNG reader takes as it comes."""
    return max(9, min(15, (size - 1).bit_length()))


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG header, or None for anything else."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
