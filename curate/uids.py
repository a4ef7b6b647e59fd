"""The uid codec: the one place that turns DataComp's 32-hex-char uids into the two unsigned
64-bit halves a subset file stores, and back.

DataComp stores uid ``u`` as ``(int(u[:16], 16), int(u[16:32], 16))`` in a ``u8,u8`` record, so
the numeric order of the pair is the order of the lowercase hex string. Conversions here are
vectorised over Arrow string arrays (no Python loop per row) and strict: anything that is not
exactly 32 hex digits raises :class:`BadUid` naming the offending value and its position.
"""

from __future__ import annotations

import binascii

import numpy as np
import pyarrow as pa

from curate.errors import CurateError

#: The exact dtype of a DataComp subset file (``np.dtype("u8,u8")`` on a little-endian machine).
SUBSET_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


class BadUid(CurateError):
    """A value that is not a 32-character hexadecimal uid."""

    def __init__(self, value, position: int):
        self.value = value
        self.position = position
        super().__init__(f"uid {value!r} is not 32 hexadecimal characters")


def hex_to_pair(uid: str) -> tuple[int, int]:
    """``'00ff…'`` -> ``(hi, lo)``, exactly like DataComp's ``int(uid[:16],16), int(uid[16:32],16)``.

    >>> hex_to_pair("0000000000000001ffffffffffffffff")
    (1, 18446744073709551615)
    """
    if isinstance(uid, str):  # one uid: no Arrow array (a per-row lookup costs ~1 us, not ~35)
        try:
            raw = binascii.unhexlify(uid) if len(uid) == 32 else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 16:
            raise BadUid(uid, 0)
        return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")
    hi, lo = hex_array_to_pairs(pa.array([uid], pa.string()))
    return int(hi[0]), int(lo[0])


def pair_to_hex(hi: int, lo: int) -> str:
    """``(hi, lo)`` -> 32 lowercase hex characters.

    >>> pair_to_hex(1, 2)
    '00000000000000010000000000000002'
    """
    return f"{hi:016x}{lo:016x}"


def _fixed_width_bytes(arr: pa.Array) -> np.ndarray:
    """The characters of a string array whose values are all 32 bytes, as an ``(n, 32)`` uint8 view."""
    if arr.type == pa.large_string():
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    else:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    lengths = np.diff(offsets)
    if len(arr) and (lengths != 32).any():
        pos = int(np.flatnonzero(lengths != 32)[0])
        raise BadUid(arr[pos].as_py(), pos)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.empty(0, np.uint8)
    start = int(offsets[0]) if len(offsets) else 0
    return data[start : start + 32 * len(arr)].reshape(len(arr), 32)


def hex_array_to_pairs(arr) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised uid parsing: a (chunked) Arrow string array -> ``(hi, lo)`` uint64 arrays.

    Raises :class:`BadUid` for a null, a value of the wrong length or a non-hex character.
    """
    halves = _hex_halves(arr)
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)


def hex_array_to_records(arr) -> np.ndarray:
    """:func:`hex_array_to_pairs` straight into one ``u8,u8`` record array (not sorted)."""
    return _hex_halves(arr).astype(np.uint64).view(SUBSET_DTYPE).reshape(-1)


def _hex_halves(arr) -> np.ndarray:
    """The uids of a (chunked) Arrow string array as an ``(n, 2)`` big-endian ``>u8`` array."""
    if isinstance(arr, pa.ChunkedArray):
        parts, base = [], 0
        for chunk in arr.chunks:
            try:
                parts.append(_hex_halves(chunk))
            except BadUid as e:
                raise BadUid(e.value, base + e.position) from None
            base += len(chunk)
        return np.concatenate(parts) if parts else np.empty((0, 2), dtype=">u8")
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    if arr.null_count:
        pos = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
        raise BadUid(None, pos)
    chars = _fixed_width_bytes(arr)
    try:
        raw = binascii.unhexlify(chars)  # C-speed, straight from the Arrow buffer, strict
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16 * len(arr):
        nib = _HEX_LUT[chars]
        pos = int(np.flatnonzero((nib == 255).any(axis=1))[0])
        raise BadUid(arr[pos].as_py(), pos)
    return np.frombuffer(raw, dtype=">u8").reshape(len(arr), 2)


def pairs_to_hex_array(hi: np.ndarray, lo: np.ndarray) -> pa.Array:
    """Vectorised inverse of :func:`hex_array_to_pairs`: lowercase 32-char uids as an Arrow array."""
    n = len(hi)
    be = np.empty((n, 2), dtype=">u8")
    be[:, 0] = hi
    be[:, 1] = lo
    by = be.view(np.uint8).reshape(n, 16)
    chars = np.empty((n, 32), dtype=np.uint8)
    chars[:, 0::2] = _HEX_DIGITS[by >> 4]
    chars[:, 1::2] = _HEX_DIGITS[by & 15]
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())])


def to_records(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Two uint64 arrays -> one ``u8,u8`` structured array (not sorted)."""
    out = np.empty(len(hi), dtype=SUBSET_DTYPE)
    out["f0"] = hi
    out["f1"] = lo
    return out


def sorted_records(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Sort uid pairs ascending by (hi, lo), keeping duplicates, into one ``u8,u8`` array."""
    return sort_records(to_records(np.asarray(hi, dtype=np.uint64), np.asarray(lo, dtype=np.uint64)))


def sort_records(records: np.ndarray) -> np.ndarray:
    """A sorted copy of a ``u8,u8`` record array: ascending by (f0, f1), duplicates kept.

    numpy sorts a plain ``uint64`` array several times faster than it argsorts one or sorts
    records, so the permutation rides inside the sort key: the top bits of ``f0`` with the row
    index in the low ``b = bit_length(n - 1)`` bits. One ``np.sort`` of that key orders the rows by
    the top ``64 - b`` bits of ``f0``; rows that share those bits (rare for random uids, certain
    for duplicates) come out in index order and are then re-sorted by the full ``(f0, f1)``
    among themselves, in place, which is exact because such runs are contiguous.
    """
    n = len(records)
    bits = max(1, (n - 1).bit_length())
    if n < 2 or bits > 48:  # beyond 2**48 rows the key keeps too few bits of f0 to help
        return records[np.lexsort((records["f1"], records["f0"]))] if n > 1 else records.copy()
    low = np.uint64((1 << bits) - 1)
    key = records["f0"] & ~low
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    # rows whose keys share the top bits (key[i] ^ key[i+1] <= low), in cache-sized steps
    same = np.empty(n - 1, dtype=bool)
    for a in range(0, n - 1, 1 << 16):
        b = min(a + (1 << 16), n - 1)
        np.less_equal(key[a + 1 : b + 1] ^ key[a:b], low, out=same[a:b])
    key &= low  # now the row order, reused in place as indices (n < 2**48 fits an intp)
    out = records.take(key.view(np.intp))
    del key
    if same.any():
        f0, f1 = out["f0"], out["f1"]
        # duplicates (upsampling) tie too but are already in order: re-sort only if needed
        if (same & ((f0[1:] < f0[:-1]) | ((f0[1:] == f0[:-1]) & (f1[1:] < f1[:-1])))).any():
            tied = np.zeros(n, dtype=bool)
            tied[1:] |= same
            tied[:-1] |= same
            pos = np.flatnonzero(tied)
            sub = out[pos]
            out[pos] = sub[np.lexsort((sub["f1"], sub["f0"]))]
    return out


def sort_pairs(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort uid pairs ascending by (hi, lo), keeping duplicates (see :func:`sorted_records`)."""
    rec = sorted_records(hi, lo)
    return rec["f0"], rec["f1"]


__all__ = [
    "SUBSET_DTYPE",
    "BadUid",
    "hex_to_pair",
    "pair_to_hex",
    "hex_array_to_pairs",
    "pairs_to_hex_array",
    "to_records",
    "sort_pairs",
    "sorted_records",
    "sort_records",
    "hex_array_to_records",
]
