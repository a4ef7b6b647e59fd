"""The subset file: DataComp's contract between filtering, resharding and training.

A subset is a 1-D numpy array of dtype ``[('f0','<u8'),('f1','<u8')]`` (the two halves of each
uid, see :mod:`curate.uids`), sorted ascending, duplicates kept: a uid listed k times means k
copies in the resharded data. On disk it is either a ``.npy`` file (format v1.0, exactly what
``np.save`` writes) or DataComp's headerless raw memmap (16 bytes per record).

Reading is safe on files from anywhere: a ``.npy`` header is parsed without unpickling (an
object dtype is refused), and its size must match what the header announces (a truncated file is
named, not half-read). A file without the ``.npy`` magic is read as a raw memmap only when asked
(``raw=True``) or when that is unambiguous: a non-empty size that is a multiple of 16 whose first
4096 bytes are not all printable text (16 random uid bytes are all printable with probability
about 3e-7), so a 0-byte or 32-byte text file is refused instead of read as uids.

Everything here streams in chunks over a read-only memmap, so a subset of any size is checked
or converted with bounded memory. DataComp opens raw subsets with ``mode="r+"``; we never need
write permission on an input.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path
from curate.errors import CurateError
from curate.uids import SUBSET_DTYPE, pairs_to_hex_array, to_records

NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_LEN = 128  # what np.save writes for a 1-d u8,u8 array below 10**40 records
CHUNK = 1 << 22  # records per chunk when streaming (64 MiB)


class BadSubset(CurateError):
    """A subset file that is unreadable, wrongly typed or unsorted."""


def npy_header(count: int) -> bytes:
    """The exact header ``np.save`` writes for a 1-D ``u8,u8`` array of ``count`` records
    (:data:`NPY_HEADER_LEN` bytes): the one place a subset header is made."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE), "fortran_order": False, "shape": (count,)})
    head = buf.getvalue()
    if len(head) != NPY_HEADER_LEN:  # cannot happen below 10**40 records; guards placeholder headers
        raise AssertionError(f"npy header of {len(head)} bytes")
    return head


def read_array_header(f) -> tuple[tuple, bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the .npy stream ``f`` (positioned at its start), for
    format versions 1.0 and 2.0; never unpickles. ``ValueError`` for anything else."""
    version = np.lib.format.read_magic(f)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in reader:
        raise ValueError(f"unsupported .npy version {version}")
    return reader[version](f)


def read_subset_header(f, origin: str) -> int:
    """Read a subset ``.npy`` header from a stream positioned at its start; return the record
    count. :class:`BadSubset` names ``origin`` when it is not a 1-D ``u8,u8`` array."""
    try:
        shape, fortran, dtype = read_array_header(f)
    except Exception as e:  # noqa: BLE001 - any malformed header is the user's file
        raise BadSubset(f"{origin}: not a .npy uid file ({e})") from None
    if dtype != SUBSET_DTYPE or len(shape) != 1 or fortran:
        raise BadSubset(f"{origin}: dtype {dtype.descr} shape {shape} is not a uid file "
                        f"([('f0','<u8'),('f1','<u8')], one-dimensional)")
    return int(shape[0])


def write_subset(path: str | os.PathLike, hi: np.ndarray, lo: np.ndarray) -> Path:
    """Write sorted uid halves as a DataComp subset ``.npy`` (byte-identical to ``np.save``).

    The caller sorts (see :func:`curate.uids.sort_pairs`); this checks it, because an unsorted
    subset silently selects the wrong samples in DataComp's resharder.
    """
    return write_records(path, to_records(hi, lo))


def write_records(path: str | os.PathLike, records: np.ndarray) -> Path:
    """:func:`write_subset` for a ``u8,u8`` record array (e.g. from :func:`curate.uids.sorted_records`)."""
    path = Path(path)
    if records.dtype != SUBSET_DTYPE or records.ndim != 1:
        raise BadSubset(f"{path}: refusing to write dtype {records.dtype}, shape {records.shape}; expected 1-d u8,u8")
    pos = _first_unsorted(records)
    if pos is not None:
        raise BadSubset(f"{path}: refusing to write an unsorted subset (record {pos})")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, records, allow_pickle=False)
    return path


def _looks_like_text(head: bytes) -> bool:
    """True when every byte is printable ASCII or whitespace: a text file, not packed uids
    (16 random bytes are all printable with probability about 3e-7)."""
    return all(32 <= c < 127 or c in (9, 10, 13) for c in head)


def _open_npy(path: Path) -> np.ndarray:
    """A ``.npy`` file as a read-only memmap; its header is parsed without unpickling and its
    size must match what the header says. :class:`BadSubset` names the file otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            shape, fortran, dtype = read_array_header(f)
        except Exception as e:  # noqa: BLE001 - any malformed header is the user's file
            raise BadSubset(f"{path}: unreadable .npy header ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise BadSubset(f"{path}: not a subset file (dtype {dtype.str} holds pickled Python objects; "
                        f"refused, never unpickled)")
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    want = offset + count * dtype.itemsize
    if size < want:
        raise BadSubset(f"{path}: truncated .npy: its header says {count:,} records of {dtype.itemsize} bytes "
                        f"({want:,} bytes) but the file has {size:,} bytes")
    if size > want:
        raise BadSubset(f"{path}: {size - want:,} bytes after the last record its .npy header announces")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def open_subset(path: str | os.PathLike, check_sorted: bool = True, raw: bool | None = None) -> np.ndarray:
    """Open a subset file read-only (memmap) after checking its dtype, shape and order.

    A file starting with the ``.npy`` magic is read as ``.npy`` (never unpickled). Any other file
    is DataComp's headerless raw memmap only when ``raw`` is True, or (``raw=None``, the default)
    when that is unambiguous: a non-empty size that is a multiple of 16 and bytes that are not all
    printable text. ``raw=False`` accepts ``.npy`` only.
    """
    path = Path(path)
    if not path.is_file():
        raise BadSubset(f"{path}: subset file not found")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:6] == NPY_MAGIC:
        arr = _open_npy(path)
        if arr.dtype != SUBSET_DTYPE:
            raise BadSubset(
                f"{path}: dtype {arr.dtype.descr} is not the subset dtype "
                f"[('f0', '<u8'), ('f1', '<u8')]"
            )
        if arr.ndim != 1:
            raise BadSubset(f"{path}: shape {arr.shape} is not one-dimensional")
    else:
        size = path.stat().st_size
        if raw is False:
            raise BadSubset(f"{path}: not a .npy file (no .npy magic)")
        if size % SUBSET_DTYPE.itemsize:
            raise BadSubset(
                f"{path}: neither a .npy file nor a raw u8,u8 memmap "
                f"({size} bytes is not a multiple of 16)"
            )
        if raw is None and size == 0:
            raise BadSubset(f"{path}: empty file (0 bytes): neither a .npy file nor a raw u8,u8 memmap "
                            f"(an empty subset is a .npy with 0 records)")
        if raw is None and _looks_like_text(head):
            raise BadSubset(f"{path}: neither a .npy file nor a raw u8,u8 memmap (its bytes are text; "
                            f"raw subsets are read only when they are not all printable)")
        if size == 0:
            arr = np.empty(0, dtype=SUBSET_DTYPE)
        else:
            arr = np.memmap(path, dtype=SUBSET_DTYPE, mode="r")
    if check_sorted:
        pos = _first_unsorted(arr)
        if pos is not None:
            a, b = arr[pos], arr[pos + 1]
            raise BadSubset(
                f"{path}: not sorted ascending at record {pos + 1} "
                f"({int(a['f0']):016x}{int(a['f1']):016x} > {int(b['f0']):016x}{int(b['f1']):016x}); "
                f"DataComp's resharder would select the wrong samples"
            )
    return arr


def _first_unsorted(arr: np.ndarray) -> int | None:
    """Index i of the first record with arr[i] > arr[i+1], or None; streams in chunks."""
    n = len(arr)
    for start in range(0, max(n - 1, 0), CHUNK):
        stop = min(start + CHUNK + 1, n)
        hi = np.asarray(arr["f0"][start:stop])
        lo = np.asarray(arr["f1"][start:stop])
        bad = (hi[1:] < hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] < lo[:-1]))
        if bad.any():
            return start + int(np.flatnonzero(bad)[0])
    return None


@dataclass
class SubsetInfo:
    path: str
    format: str
    count: int
    distinct: int
    duplicates: int
    max_copies: int
    sorted: bool
    dtype_ok: bool
    dtype: str

    def lines(self) -> list[str]:
        return [
            f"file:        {self.path}",
            f"format:      {self.format}",
            f"dtype:       {self.dtype} ({'ok' if self.dtype_ok else 'NOT the subset dtype'})",
            f"count:       {self.count:,}",
            f"distinct:    {self.distinct:,}",
            f"duplicates:  {self.duplicates:,} extra copies (max {self.max_copies} copies of one uid)",
            f"sorted:      {'yes' if self.sorted else 'NO'}",
        ]


def subset_info(path: str | os.PathLike) -> SubsetInfo:
    """Count, distinct count, duplicates, order and dtype of a subset file (streams)."""
    path = Path(path)
    with open(path, "rb") as f:
        is_npy = f.read(6) == NPY_MAGIC
    if is_npy:
        arr = _open_npy(path)  # header parsed without unpickling; size checked against it
        fmt = "npy"
    else:
        arr = open_subset(path, check_sorted=False)
        fmt = "raw u8,u8 memmap (no header)"
    dtype_ok = arr.dtype == SUBSET_DTYPE and arr.ndim == 1
    if not dtype_ok:
        return SubsetInfo(str(path), fmt, int(arr.size), 0, 0, 0, False, False, str(arr.dtype.descr))
    n = len(arr)
    is_sorted = _first_unsorted(arr) is None
    if not is_sorted:  # duplicates are only adjacent in a sorted file; count them exactly anyway
        uniq, counts = np.unique(np.asarray(arr), return_counts=True)
        return SubsetInfo(str(path), fmt, n, len(uniq), n - len(uniq), int(counts.max(initial=0)),
                          False, True, str(arr.dtype.descr))
    distinct, max_run, carry = (1 if n else 0), (1 if n else 0), 1
    for start in range(0, max(n - 1, 0), CHUNK):
        stop = min(start + CHUNK + 1, n)
        hi = np.asarray(arr["f0"][start:stop])
        lo = np.asarray(arr["f1"][start:stop])
        new = ~((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1]))  # record i+1 starts a new uid
        distinct += int(new.sum())
        # run lengths inside this chunk; the first run continues the previous chunk's last one
        starts = np.concatenate(([0], np.flatnonzero(new) + 1, [len(hi)]))
        runs = np.diff(starts)
        runs[0] += carry - 1
        max_run = max(max_run, int(runs.max()))
        carry = int(runs[-1]) if len(runs) > 1 else int(runs[0])
    return SubsetInfo(str(path), fmt, n, distinct, n - distinct, max_run, is_sorted, True, str(arr.dtype.descr))


def subset_to_arrow(path: str | os.PathLike) -> pa.Table:
    """A subset as an Arrow table with one ``uid`` string column (duplicates kept, file order)."""
    arr = open_subset(path)
    chunks = []
    for start in range(0, len(arr), CHUNK):
        part = np.asarray(arr[start : start + CHUNK])
        chunks.append(pairs_to_hex_array(part["f0"], part["f1"]))
    return pa.table({"uid": pa.chunked_array(chunks, pa.string())})


def subset_to_parquet(path: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write a subset as parquet with a hex ``uid`` column, streaming; returns the row count."""
    arr = open_subset(path)
    schema = pa.schema([("uid", pa.string())])
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema) as w:
            for start in range(0, len(arr), CHUNK):
                part = np.asarray(arr[start : start + CHUNK])
                w.write_table(pa.table({"uid": pairs_to_hex_array(part["f0"], part["f1"])}, schema=schema))
            if len(arr) == 0:
                w.write_table(schema.empty_table())
    return len(arr)
