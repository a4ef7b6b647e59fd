"""The sorted subset from per-partition runs, without a global sort in one process.

Each partition wrote its uids sorted, with a count per 12-bit uid prefix. Uids are hashes, so
prefixes are evenly filled; consecutive prefixes are grouped into *buckets* of about
``bucket_records`` records. A bucket task reads its prefix range from every run (one ranged
read per run: the run is sorted, so the range is contiguous), sorts that slice and writes it as
a subset file. Buckets cover disjoint uid ranges in order, so

* concatenating the buckets' records gives exactly the file one global sort would give — the
  ``.npy`` is a header plus the buckets' bytes streamed in order (no record is parsed);
* a uid's copies never straddle two buckets, so distinct counts add up.

For subsets too large for one file, the buckets themselves are the output: a directory of
sorted ``bucket-NNNNN.npy`` files in uid order plus ``buckets.json``
(:func:`iter_subset_chunks` reads either form in order).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from curate import storage
from curate.errors import CurateError
from curate.run.partition import PREFIX_BITS
from curate.subset import NPY_HEADER_LEN, SUBSET_DTYPE, npy_header, open_subset
from curate.uids import sort_records

BUCKETS_INDEX = "buckets.json"
BUCKETS_FORMAT = "curate-subset-buckets/1"
COPY_CHUNK = 1 << 24  # bytes per read when streaming buckets into one file


def plan_buckets(markers: list[dict], bucket_records: int, min_buckets: int = 1) -> list[tuple[int, int]]:
    """Contiguous prefix ranges ``[p0, p1)`` holding about ``bucket_records`` records each."""
    totals = np.zeros(1 << PREFIX_BITS, dtype=np.int64)
    for m in markers:
        totals += np.asarray(m["prefix_counts"], dtype=np.int64)
    total = int(totals.sum())
    n = max(min_buckets if total else 1, -(-total // max(bucket_records, 1)), 1)
    n = min(n, 1 << PREFIX_BITS)
    target = total / n
    ranges, start = [], 0
    cum = np.cumsum(totals)
    for b in range(1, n):
        # first prefix whose cumulative count reaches b/n of the total
        cut = int(np.searchsorted(cum, b * target, side="left")) + 1
        cut = min(max(cut, start + 1), (1 << PREFIX_BITS) - (n - b))
        ranges.append((start, cut))
        start = cut
    ranges.append((start, 1 << PREFIX_BITS))
    return ranges


def bucket_slices(markers: list[dict], ranges: list[tuple[int, int]]) -> list[list[tuple[str, int, int]]]:
    """For each bucket ``[p0, p1)``: (run path, first byte, end byte) of every run's records in it.

    One pass over the markers (a cumulative count per run), so planning stays linear in
    runs x prefixes however many buckets there are.
    """
    cuts = np.array([p0 for p0, _ in ranges] + [ranges[-1][1]], dtype=np.int64)
    out: list[list[tuple[str, int, int]]] = [[] for _ in ranges]
    for m in markers:
        cum = np.concatenate(([0], np.cumsum(np.asarray(m["prefix_counts"], dtype=np.int64))))
        at = cum[cuts]
        hb = int(m["header_bytes"])
        for b in np.flatnonzero(at[1:] > at[:-1]):
            out[b].append((m["run"], hb + 16 * int(at[b]), hb + 16 * int(at[b + 1])))
    return out


def sort_bucket(slices: list[tuple[str, int, int]], bucket_path: str, marker_path: str,
                storage_options: dict | None = None) -> dict:
    """Read one bucket's slices of every run, sort, write the bucket subset file and marker."""
    if storage.exists(marker_path, storage_options):
        return storage.read_json(marker_path, storage_options)
    parts = [np.frombuffer(storage.read_range(path, a, b, storage_options), dtype=SUBSET_DTYPE)
             for path, a, b in slices]
    rec = np.concatenate(parts) if parts else np.empty(0, SUBSET_DTYPE)
    rec = sort_records(rec)
    hi, lo = rec["f0"], rec["f1"]
    distinct = int(len(hi) and 1 + np.count_nonzero((hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])))
    with storage.open_output(bucket_path, storage_options) as f:
        np.save(f, rec, allow_pickle=False)
    marker = {"bucket": bucket_path, "count": int(len(hi)), "distinct": distinct,
              "header_bytes": NPY_HEADER_LEN,
              "first": f"{int(hi[0]):016x}{int(lo[0]):016x}" if len(hi) else None,
              "last": f"{int(hi[-1]):016x}{int(lo[-1]):016x}" if len(hi) else None}
    storage.write_json(marker_path, marker, storage_options)
    return marker


def concatenate_buckets(buckets: list[dict], out: str, storage_options: dict | None = None) -> int:
    """Write the subset ``.npy`` = header for the total count + every bucket's records in order.

    Byte-identical to ``np.save`` of the globally sorted array; nothing is parsed or sorted here.
    """
    total = sum(int(b["count"]) for b in buckets)
    with storage.open_output(out, storage_options) as f:
        f.write(npy_header(total))
        for b in buckets:
            start, end = int(b["header_bytes"]), int(b["header_bytes"]) + 16 * int(b["count"])
            pos = start
            while pos < end:
                stop = min(pos + COPY_CHUNK, end)
                f.write(storage.read_range(b["bucket"], pos, stop, storage_options))
                pos = stop
    return total


def write_bucket_directory(buckets: list[dict], out_dir: str, storage_options: dict | None = None) -> int:
    """Publish the buckets as a subset directory: ``bucket-NNNNN.npy`` + ``buckets.json``."""
    entries = []
    for i, b in enumerate(buckets):
        name = f"bucket-{i:05d}.npy"
        storage.copy(b["bucket"], storage.join(out_dir, name), storage_options)
        entries.append({"file": name, "count": b["count"], "distinct": b["distinct"],
                        "first": b["first"], "last": b["last"]})
    total = sum(int(b["count"]) for b in buckets)
    # the index is written last: a directory without it is incomplete
    storage.write_json(storage.join(out_dir, BUCKETS_INDEX),
                       {"format": BUCKETS_FORMAT, "dtype": "[('f0', '<u8'), ('f1', '<u8')]",
                        "count": total, "buckets": entries}, storage_options)
    return total


def iter_subset_chunks(path, chunk: int = 1 << 22):
    """Yield a subset's records in uid order, ``chunk`` at a time, from a ``.npy``/raw subset file
    or a local bucket directory (each bucket is checked with :func:`curate.subset.open_subset`)."""
    p = Path(path)
    if p.is_dir():
        index_path = p / BUCKETS_INDEX
        if not index_path.is_file():
            raise CurateError(f"{p}: not a subset directory (no {BUCKETS_INDEX}; the run may be unfinished)")
        index = json.loads(index_path.read_text())
        if index.get("format") != BUCKETS_FORMAT:
            raise CurateError(f"{index_path}: format {index.get('format')!r} is not {BUCKETS_FORMAT}")
        prev_last = None
        for entry in index["buckets"]:
            arr = open_subset(p / entry["file"])
            if len(arr) != entry["count"]:
                raise CurateError(f"{p / entry['file']}: {len(arr)} records, index says {entry['count']}")
            if len(arr) and prev_last is not None and entry["first"] < prev_last:
                raise CurateError(f"{p / entry['file']}: starts below the previous bucket's last uid")
            prev_last = entry["last"] or prev_last
            for s in range(0, len(arr), chunk):
                yield np.asarray(arr[s : s + chunk])
        return
    arr = open_subset(p)
    for s in range(0, len(arr), chunk):
        yield np.asarray(arr[s : s + chunk])


def concat_bucket_directory(directory, out) -> int:
    """One sorted ``.npy`` subset from a bucket directory (streamed, atomic)."""
    directory = Path(directory)
    index_path = directory / BUCKETS_INDEX
    if not index_path.is_file():
        raise CurateError(f"{directory}: not a subset directory (no {BUCKETS_INDEX})")
    index = json.loads(index_path.read_text())
    buckets = []
    for entry in index["buckets"]:
        path = directory / entry["file"]
        arr = open_subset(path)  # dtype, order and header checked before any byte is copied
        buckets.append({"bucket": str(path), "count": len(arr), "header_bytes": arr.offset})
    return concatenate_buckets(buckets, str(out))


def load_subset_any(path) -> np.ndarray:
    """A subset as one record array, from a ``.npy``/raw file (memmap) or a bucket directory
    (concatenated, checked): what a consumer such as the resharder calls to accept both forms."""
    if Path(path).is_dir():
        parts = list(iter_subset_chunks(path))
        return np.concatenate(parts) if parts else np.empty(0, SUBSET_DTYPE)
    return open_subset(path)
