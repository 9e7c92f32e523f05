"""A tiny baseline JPEG encoder for preview frames (ComfyUI sends JPEG previews; there is no Pillow here).

It encodes images made of flat 8×8 blocks, which need only the DC coefficient of each block: the result
is a real JPEG any decoder shows, a mosaic like a latent preview, in a few dozen lines.
"""

from __future__ import annotations

import struct

# Annex K.3 standard luminance DC table; the AC table holds one code, end-of-block.
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
_DC_VALUES = tuple(range(12))
_AC_BITS = (1,) + (0,) * 15
_AC_VALUES = (0,)


def _codes(bits: tuple[int, ...], values: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes: symbol -> (code, length)."""
    table, code, k = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            table[values[k]] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    return table


_DC = _codes(_DC_BITS, _DC_VALUES)
_EOB = _codes(_AC_BITS, _AC_VALUES)[0]


class _BitWriter:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def write(self, code: int, length: int) -> None:
        self.acc = (self.acc << length) | (code & ((1 << length) - 1))
        self.n += length
        while self.n >= 8:
            self.n -= 8
            byte = (self.acc >> self.n) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)  # byte stuffing
        self.acc &= (1 << self.n) - 1

    def flush(self) -> bytes:
        if self.n:
            self.write((1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _headers(width: int, height: int) -> bytes:
    jfif = _segment(0xFFE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    dqt = _segment(0xFFDB, b"\x00" + b"\x01" * 64)  # all-ones table: DC values stay exact
    sof = _segment(0xFFC0, struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00")
    dht = _segment(0xFFC4, b"\x00" + bytes(_DC_BITS) + bytes(_DC_VALUES)
                   + b"\x10" + bytes(_AC_BITS) + bytes(_AC_VALUES))
    sos = _segment(0xFFDA, b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00")
    return b"\xff\xd8" + jfif + dqt + sof + dht + sos


def _ycbcr(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (0.299 * r + 0.587 * g + 0.114 * b,
            -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
            0.5 * r - 0.418688 * g - 0.081312 * b + 128)


def encode_block_jpeg(blocks_x: int, blocks_y: int, colours: list[tuple[int, int, int]], pad_to: int = 0) -> bytes:
    """A (blocks_x*8)×(blocks_y*8) JPEG whose 8×8 blocks have the given RGB colours, row by row; with
    `pad_to`, comment segments make it about that many bytes, the size of a real TAESD preview."""
    writer = _BitWriter()
    previous = [0, 0, 0]
    for r, g, b in colours:
        for component, value in enumerate(_ycbcr(r, g, b)):
            dc = max(-1024, min(1016, round(8 * (value - 128))))
            diff = dc - previous[component]
            previous[component] = dc
            size = abs(diff).bit_length()
            writer.write(*_DC[size])
            if size:
                writer.write(diff if diff > 0 else diff + (1 << size) - 1, size)
            writer.write(*_EOB)
    image = _headers(blocks_x * 8, blocks_y * 8) + writer.flush() + b"\xff\xd9"
    return image[:2] + _comments(pad_to - len(image)) + image[2:]


def _comments(size: int) -> bytes:
    """COM segments (marker, 2-byte length, text) of `size` bytes in all; decoders skip them."""
    out = bytearray()
    while size >= 4:
        body = min(size - 4, 65533)
        out += b"\xff\xfe" + (body + 2).to_bytes(2, "big") + b" " * body
        size -= body + 4
    return bytes(out)
