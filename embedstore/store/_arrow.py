"""Arrow <-> numpy / Python conversions for the store's hot paths, built from buffers.

``pa.array(...)``, ``Array.to_numpy()`` and ``pa.table({...})`` check for pandas objects and so
import pandas on their first call when it is installed: ~0.4 s and ~50 MB in every process that
loads or writes (measured here), more than a whole load of 10^5 rows. These helpers build and read
the same arrays through ``from_buffers`` / ``np.frombuffer`` instead, which never do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["from_np", "np_of", "strings", "bools", "table", "sort_indices"]

_NP = {pa.int64(): np.int64, pa.int32(): np.int32, pa.uint32(): np.uint32, pa.int8(): np.int8,
       pa.uint64(): np.uint64,
       pa.uint8(): np.uint8, pa.float64(): np.float64}
_PA = {np.dtype(v): k for k, v in _NP.items()}


def from_np(x: np.ndarray, type: pa.DataType | None = None,
            valid: np.ndarray | None = None) -> pa.Array:
    """A primitive Arrow array over a 1-d numpy array; ``type`` casts (timestamps); ``valid``
    (bool, same length) marks the non-null entries."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return bools(x)
    validity = None
    nulls = 0
    if valid is not None and not np.all(valid):
        validity = pa.py_buffer(np.packbits(np.asarray(valid, bool), bitorder="little"))
        nulls = int(len(x) - np.count_nonzero(valid))
    arr = pa.Array.from_buffers(_PA[x.dtype], len(x), [validity, pa.py_buffer(x)],
                                null_count=nulls)
    return arr if type is None or type == arr.type else arr.cast(type)


def np_of(arr: pa.Array | pa.ChunkedArray, dtype: type | None = None,
          null: float | int | None = None) -> np.ndarray:
    """A numpy copy of a primitive Arrow array (timestamps as int64 microseconds; booleans as
    bool). Nulls become ``null``; with ``null=None`` an array holding nulls is an error."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_timestamp(arr.type):
        arr = arr.cast(pa.int64())
    if pa.types.is_boolean(arr.type):
        return np_of(pc.cast(arr, pa.int8()), null=null).astype(bool)
    if arr.null_count and null is None:
        raise ValueError("np_of: array has nulls")
    np_type = _NP[arr.type]
    out = np.frombuffer(arr.buffers()[1], dtype=np_type, count=len(arr) + arr.offset)[arr.offset :]
    out = out.astype(dtype or np_type, copy=True)
    if arr.null_count:
        out[~np_of(arr.is_valid())] = null
    return out


def bools(mask: np.ndarray) -> pa.Array:
    """A boolean Arrow array (a filter mask) from a numpy bool array."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    bits = np.packbits(mask, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(bits)])


def strings(values: Sequence[str | None]) -> pa.Array:
    """A string Arrow array from Python strings (None = null)."""
    values = values if isinstance(values, list) else list(values)
    n = len(values)
    if None not in values:
        joined = "".join(values)  # TypeError unless all are str
        if joined.isascii():  # one byte per character: lengths without encoding each string
            lengths = np.fromiter(map(len, values), np.int64, n)
            return _string_array(n, lengths, joined.encode("ascii"), None)
        encoded = [v.encode() for v in values]
        return _string_array(n, np.fromiter(map(len, encoded), np.int64, n), b"".join(encoded),
                             None)
    valid = np.fromiter((v is not None for v in values), bool, n)
    encoded = [b"" if v is None else str(v).encode() for v in values]
    return _string_array(n, np.fromiter(map(len, encoded), np.int64, n), b"".join(encoded), valid)


def _string_array(n: int, lengths: np.ndarray, data: bytes, valid: np.ndarray | None) -> pa.Array:
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("strings: more than 2 GiB of text in one array")
    validity = None if valid is None or valid.all() else pa.py_buffer(
        np.packbits(valid, bitorder="little"))
    nulls = 0 if validity is None else int(n - valid.sum())
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(offsets.astype(np.int32)),
                                                  pa.py_buffer(data)], null_count=nulls)


def table(columns: dict[str, pa.Array | pa.ChunkedArray]) -> pa.Table:
    """``pa.table(dict)`` without the pandas check."""
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))


def sort_indices(values: pa.Array) -> np.ndarray:
    """Stable argsort of a string array in byte order. Ids of one fixed length up to 24 bytes
    (the usual case) sort as big-endian 64-bit words with numpy (~3x faster than
    ``pc.sort_indices`` on 10^6 ids here); anything else goes to pyarrow."""
    n = len(values)
    if n and values.null_count == 0 and values.type == pa.string():
        off = np.frombuffer(values.buffers()[1], np.int32, n + 1 + values.offset)[values.offset:]
        width = int(off[1] - off[0])
        if 0 < width <= 24 and int(off[-1] - off[0]) == width * n and (np.diff(off) == width).all():
            data = np.frombuffer(values.buffers()[2], np.uint8, int(off[-1]))[off[0]:]
            words = -(-width // 8)
            keys = np.zeros((n, 8 * words), dtype=np.uint8)
            keys[:, :width] = data.reshape(n, width)
            k = keys.view(">u8")  # (n, words): byte order = numeric order of big-endian words
            return np.lexsort(tuple(k[:, j] for j in range(words - 1, -1, -1)))
    return np_of(pc.sort_indices(values)).astype(np.int64)
