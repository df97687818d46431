"""CRC-32 of a chunk from the CRC-32s of its rows, without reading the rows again.

zlib's CRC-32 (as ``zlib.crc32`` computes it) composes: for byte strings A and B,
``crc(A + B) == shift(crc(A), len(B)) ^ crc(B)``, where ``shift(c, n)`` multiplies ``c`` by
x^(8n) modulo the CRC polynomial -- a linear map of 32-bit values, applied here as four 256-entry
lookup tables (zlib's ``crc32_combine``). So verify can CRC each chunk whole (fast, and in C
without the GIL) and compare it with the combination of the chunk's per-row commit checksums:
equal means every row matches its checksum (up to the 2^-32 of any CRC); only a chunk that
differs is checked row by row to name the bad rows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["combine_rows", "shift_tables"]

_POLY = 0xEDB88320  # CRC-32, reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (reflected bit order), as zlib's multmodp."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


@lru_cache(maxsize=64)
def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial."""
    p = 1 << 31  # x^0
    sq = 1 << 30  # x^1, squared below to x^2, x^4, ...
    k = n * 8
    while k:
        if k & 1:
            p = _multmodp(sq, p)
        sq = _multmodp(sq, sq)
        k >>= 1
    return p


@lru_cache(maxsize=64)
def shift_tables(n: int) -> np.ndarray:
    """(4, 256) uint32 tables of ``c -> shift(c, n)`` by byte of ``c`` (the map is linear, so
    each entry is the XOR of the images of its set bits: 32 polynomial products per table)."""
    op = _x8n(n)
    basis = np.array([_multmodp(op, 1 << i) for i in range(32)], dtype=np.uint32)  # (32,)
    byte = np.arange(256, dtype=np.uint32)
    t = np.zeros((4, 256), dtype=np.uint32)
    for pos in range(4):
        for bit in range(8):
            t[pos] ^= np.where((byte >> bit) & 1, basis[8 * pos + bit], 0).astype(np.uint32)
    return t


def _shift(c: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF]
            ^ t[3][c >> 24]).astype(np.uint32)


def combine_rows(row_crc: np.ndarray, row_bytes: int) -> np.ndarray:
    """CRC-32 of each block of rows: ``row_crc`` (blocks, k) uint32, k a power of two, each row
    ``row_bytes`` long -> (blocks,) the CRC-32 of the k rows' bytes concatenated."""
    c = np.ascontiguousarray(row_crc, dtype=np.uint32)
    k = c.shape[1]
    if k & (k - 1):
        raise ValueError(f"combine_rows needs a power-of-two block, got {k}")
    width = row_bytes
    while c.shape[1] > 1:  # pairwise: crc(A + B) = shift(crc(A), len(B)) ^ crc(B)
        c = _shift(c[:, 0::2], shift_tables(width)) ^ c[:, 1::2]
        width *= 2
    return c[:, 0]
