"""The resharder: webdataset training shards holding exactly the samples of a subset file.

Output contract (DataComp's ``resharder.py``, reference spec section 3): ``{:08d}.tar`` shards of
at most ``shard_size`` samples whose members are every member of the input sample renamed
``{uid}-{j}.{ext}``, one copy per occurrence of the uid in the subset (j = 0..k-1);
``{:08d}_stats.json`` with ``successes``; ``sample_ids.npy`` (the subset file's bytes);
``meta.json`` (``output_count``, ``output_shard_count``, ``output_shard_format``, and what was
skipped and why); and ``sizes.json`` (``{"00000000.tar": n}``) so open_clip needs no
``--train-num-samples``.

How it differs from DataComp's (deliberately):

* It plans before it reads. The shard index (:mod:`curate.shards.index`) is joined with the subset in
  DuckDB, so input shards with no selected sample are never opened and, inside a shard, only the
  byte ranges of selected samples are read (adjacent ranges are coalesced).
* Numbering is deterministic: the selected samples are ordered by (input shard, position in the
  tar), copies adjacent, and cut into output shards of ``shard_size`` samples (or 3e9 bytes);
  output shard N is therefore a fixed slice of that order and is one unit of work. Workers write
  whole output shards, each under a temporary name renamed on completion, its ``_stats.json``
  last, so a killed run resumes by skipping completed shards and the result is byte-identical.
* Tar headers are written by us: USTAR, integer mtime 0, no PAX headers, fixed owner, so the
  same inputs give the same bytes.
* Several outputs can be planned at once (``reshard_many``): one index pass routes every sample
  to each output whose subset contains it; each selected byte is read once per output using it.
* Input shards without ``_stats.json`` are read (DataComp silently skips them); a uid present in
  the input twice is copied from its first occurrence only (DataComp would write both under the
  same keys); a truncated tar loses only its incomplete last sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from curate.atomic import atomic_path, write_json
from curate.errors import CurateError
from curate.shards.index import BLOCK, ShardError, index_for, split_key, walk_tar
from curate.subset import open_subset
from curate.uids import hex_array_to_pairs, pairs_to_hex_array

OUTPUT_SHARD_FORMAT = "{:08d}.tar"
OUTPUT_STATS_FORMAT = "{:08d}_stats.json"
MAX_SHARD_BYTES = 3_000_000_000  # DataComp's hard-coded cap per output tar
MARKER = ".curate_reshard.json"  # records the job in an output dir, so a rerun can resume it
COALESCE_GAP = 16 * 1024  # read through gaps smaller than this; larger gaps cost more to copy than a new read
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ReshardError(CurateError):
    """A reshard request that cannot be carried out as given."""


# ----------------------------------------------------------------------------------- outputs

@dataclass
class Output:
    """One output of a reshard: a directory, the subset that selects its samples, optional classes."""

    out_dir: Path
    subset_file: Path
    cls: dict | str | os.PathLike | None = None


@dataclass
class ReshardResult:
    output_dir: str
    subset_file: str
    subset_count: int = 0
    subset_entries_present: int = 0
    output_count: int = 0
    output_shard_count: int = 0
    absent_uids: int = 0  # subset entries whose uid is in no input sample
    no_json_entries: int = 0  # subset entries whose only input sample has no json member
    input_duplicates: int = 0  # selected uids found in more than one input sample (first used)
    shards_written: int = 0
    shards_resumed: int = 0  # complete output shards found from an earlier run, not rewritten
    blurred: int = 0
    input_shards_read: int = 0
    input_shards_total: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    truncated_inputs: list = field(default_factory=list)
    inputs_without_stats: list = field(default_factory=list)
    elapsed: float = 0.0

    def summary(self) -> list[str]:
        lines = [
            f"{self.output_dir}: {self.output_count:,} samples in {self.output_shard_count} shards "
            f"({self.shards_written} written, {self.shards_resumed} already complete) from "
            f"{self.subset_count:,} subset entries",
            f"  read {self.input_shards_read} of {self.input_shards_total} input shards, "
            f"{self.bytes_read:,} of {self.bytes_total:,} bytes "
            f"({100.0 * self.bytes_read / self.bytes_total if self.bytes_total else 0:.1f}%)",
        ]
        skipped = [
            (self.absent_uids, "subset entries whose uid is not in the input"),
            (self.no_json_entries, "subset entries whose input sample has no json (DataComp drops them too)"),
            (self.input_duplicates, "selected uids present in several input samples (first one copied)"),
        ]
        for n, why in skipped:
            if n:
                lines.append(f"  skipped {n:,} {why}")
        if self.blurred:
            lines.append(f"  blurred faces in {self.blurred:,} images (re-encoded as webp)")
        if self.truncated_inputs:
            lines.append(f"  {len(self.truncated_inputs)} truncated input tars (last sample dropped): "
                         f"{', '.join(self.truncated_inputs[:3])}")
        if self.inputs_without_stats:
            lines.append(f"  {len(self.inputs_without_stats)} input tars without _stats.json were read "
                         f"anyway (DataComp skips them): {', '.join(self.inputs_without_stats[:3])}")
        return lines


# ------------------------------------------------------------------------------------ cls maps

def load_cls_map(src) -> dict[str, int]:
    """uid -> class id from TiC's pickle (restricted unpickler), a parquet or a JSON file.

    A dict is accepted as is. Parquet needs columns ``uid`` and ``cls`` (or ``class_id``).
    """
    if src is None:
        return None
    if isinstance(src, dict):
        m = src
        origin = "cls map"
    else:
        path = Path(src)
        origin = str(path)
        if not path.is_file():
            raise ReshardError(f"{path}: cls file not found")
        head = path.read_bytes()[:4]
        if head == b"PAR1":
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            col = "cls" if "cls" in t.column_names else "class_id" if "class_id" in t.column_names else None
            if "uid" not in t.column_names or col is None:
                raise ReshardError(f"{path}: a parquet cls file needs columns uid and cls (or class_id); "
                                   f"found {', '.join(t.column_names)}")
            m = dict(zip(t.column("uid").to_pylist(), t.column(col).to_pylist()))
        elif head[:1] == b"\x80":  # pickle protocol 2+ (what TiC ships)
            from curate.safepickle import safe_load

            m = safe_load(path)
        else:
            try:
                m = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ReshardError(f"{path}: neither a pickle, a parquet nor a JSON object of uid -> class id "
                                   f"({e})") from None
    if not isinstance(m, dict):
        raise ReshardError(f"{origin}: expected a mapping uid -> class id, got a {type(m).__name__}")
    out = {}
    for k, v in m.items():
        if not isinstance(k, str) or len(k) != 32:
            raise ReshardError(f"{origin}: key {k!r} is not a 32-character uid")
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise ReshardError(f"{origin}: class id {v!r} of uid {k} is not an integer") from None
        if iv != v:
            raise ReshardError(f"{origin}: class id {v!r} of uid {k} is not an integer")
        out[k.lower()] = iv
    return out


# ------------------------------------------------------------------------------------ the plan

@dataclass
class _Plan:
    """Selected samples of one output in output order, one row per copy."""

    shard: np.ndarray  # int32 plan shard id
    offset: np.ndarray  # int64 byte offset of the sample in its tar
    length: np.ndarray  # int64
    hi: np.ndarray
    lo: np.ndarray
    j: np.ndarray  # copy number
    cls: np.ndarray | None
    bounds: list  # output shard i = rows bounds[i]:bounds[i+1]
    counts: dict


def _subset_table(path: Path) -> tuple[pa.Table, int]:
    arr = open_subset(path)
    n = len(arr)
    return pa.table({"hi": pa.array(np.asarray(arr["f0"]), pa.uint64()),
                     "lo": pa.array(np.asarray(arr["f1"]), pa.uint64())}), n


def _plan_output(con, out: Output, cls_map, shard_size: int, max_bytes: int) -> _Plan:
    sub, n = _subset_table(out.subset_file)
    con.register("_subset", sub)
    try:
        # one row per distinct selected uid, taken from its first input sample with a json
        # (DataComp's membership test needs the json's uid); k = copies wanted
        rows = con.execute("""
            WITH s AS (SELECT hi, lo, count(*)::BIGINT AS k FROM _subset GROUP BY hi, lo),
            m AS (
                SELECT i.shard_id, i."offset", i.length, s.hi, s.lo, s.k,
                       count(*) OVER (PARTITION BY s.hi, s.lo) AS n_in_input
                FROM s JOIN plan_index i ON i.uid_hi = s.hi AND i.uid_lo = s.lo AND i.has_json
                QUALIFY row_number() OVER (PARTITION BY s.hi, s.lo ORDER BY i.shard_id, i."offset") = 1
            )
            SELECT * FROM m ORDER BY shard_id, "offset"
        """).to_arrow_table()
        no_json = con.execute("""
            SELECT coalesce(sum(k), 0) FROM (SELECT hi, lo, count(*) AS k FROM _subset GROUP BY hi, lo) s
            WHERE EXISTS (SELECT 1 FROM plan_index i WHERE i.uid_hi = s.hi AND i.uid_lo = s.lo AND NOT i.has_json)
              AND NOT EXISTS (SELECT 1 FROM plan_index i WHERE i.uid_hi = s.hi AND i.uid_lo = s.lo AND i.has_json)
        """).fetchone()[0]
    finally:
        con.unregister("_subset")
    k = np.asarray(rows.column("k"), np.int64)
    present = int(k.sum())
    counts = {
        "subset_count": n,
        "subset_entries_present": present,
        "no_json_entries": int(no_json),
        "absent_uids": n - present - int(no_json),
        "input_duplicates": int((np.asarray(rows.column("n_in_input")) > 1).sum()),
    }
    rep = lambda name, dt: np.repeat(np.asarray(rows.column(name), dt), k)  # noqa: E731
    shard, offset, length = rep("shard_id", np.int32), rep("offset", np.int64), rep("length", np.int64)
    hi, lo = rep("hi", np.uint64), rep("lo", np.uint64)
    # copy number within each uid's run: position minus the run's start
    starts = np.repeat(np.cumsum(k) - k, k)
    j = np.arange(present, dtype=np.int64) - starts
    cls = None
    if cls_map is not None:
        cls = np.empty(len(rows), np.int64)
        uids = pairs_to_hex_array(np.asarray(rows.column("hi"), np.uint64), np.asarray(rows.column("lo"), np.uint64))
        missing = []
        for i, u in enumerate(uids.to_pylist()):
            v = cls_map.get(u)
            if v is None:
                missing.append(u)
            else:
                cls[i] = v
        if missing:
            raise ReshardError(
                f"{out.subset_file}: {len(missing):,} selected uids have no class in the cls file "
                f"(first: {missing[0]}); nothing was written")
        cls = np.repeat(cls, k)
    bounds = _cut(length, shard_size, max_bytes)
    return _Plan(shard, offset, length, hi, lo, j, cls, bounds, counts)


def present_count(inputs, subset_file, catalog=None) -> dict:
    """How many entries of a subset an input holds (the counts a reshard of it reports)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    con = duckdb.connect()
    try:
        index_for(con, [Path(i) for i in inputs], catalog=catalog)
        return _plan_output(con, Output(Path("-"), Path(subset_file)), None, 1 << 62, MAX_SHARD_BYTES).counts
    finally:
        con.close()


def _cut(length: np.ndarray, shard_size: int, max_bytes: int) -> list[int]:
    """Output shard boundaries: at most ``shard_size`` samples and about ``max_bytes`` each."""
    n = len(length)
    csum = np.concatenate(([0], np.cumsum(length)))
    bounds, a = [0], 0
    while a < n:
        b = min(a + shard_size, n)
        by_bytes = int(np.searchsorted(csum, csum[a] + max_bytes, "right")) - 1
        b = max(a + 1, min(b, by_bytes))
        bounds.append(b)
        a = b
    return bounds


# --------------------------------------------------------------------------------- tar writing

def _template() -> tuple[bytes, int]:
    h = bytearray(BLOCK)
    h[100:108] = b"0000444\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime 0: integer, so no PAX header; fixed, so same bytes
    h[148:156] = b"        "  # checksum counts as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"  # devmajor/devminor stay NUL for regular files, as tarfile writes them
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _template()


_HEAD_MID = _TEMPLATE[100:124]  # mode, uid, gid
_HEAD_MTIME = _TEMPLATE[136:148]
_HEAD_TAIL = _TEMPLATE[156:]  # type flag, magic, version, empty owner names
_NULS = [bytes(i) for i in range(101)]


def tar_header(name: bytes, size: int) -> bytes:
    """A USTAR header for a regular file, deterministic (mtime 0, mode 0444, owner 0)."""
    if len(name) > 100:
        raise ReshardError(f"member name {name[:60]!r}... is longer than 100 bytes")
    sz = b"%011o\0" % size
    chk = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(sz))
    return b"".join((name, _NULS[100 - len(name)], _HEAD_MID, sz, _HEAD_MTIME, chk, _HEAD_TAIL))


def _finish(total: int) -> bytes:
    """End-of-archive blocks, padded to tarfile's 10240-byte record like Python's tarfile does."""
    end = total + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % 10240))


def _make_readable(path) -> None:
    # temporary files are created 0600; published outputs get the usual umask-based mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json_readable(dest: Path, obj) -> None:
    write_json(dest, obj)
    _make_readable(dest)


# ------------------------------------------------------------------------------------- blurring

def blur_faces(img_bytes: bytes, bboxes, quality: int = 100, where: str = "") -> bytes:
    """Blur face boxes (fractions of width/height) and re-encode as webp, like DataComp.

    The algorithm is img2dataset's ``BoundingBoxBlurrer``: each box grows by 10% of its longer
    side, the union mask and the image are Gaussian-blurred with sigma = 0.1 * the longest box
    side (odd kernel 2*ceil(sigma)+1, at least 3), and the result is ``img*(1-m) + blurred*m``.
    We call cv2 directly (img2dataset goes through albumentations, which wraps the same
    ``cv2.GaussianBlur``) and encode webp at quality 100 like DataComp's resharder.
    """
    import cv2

    img = cv2.imdecode(np.frombuffer(img_bytes, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ReshardError(f"{where}: cannot decode the image to blur it")
    height, width = img.shape[:2]
    f = img.astype(np.float32) / 255.0
    mask = np.zeros_like(f)
    max_diag = 0
    for box in bboxes:
        b = [int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)]
        diag = max(b[2] - b[0], b[3] - b[1])
        max_diag = max(max_diag, diag)
        b = [int(b[0] - 0.1 * diag), int(b[1] - 0.1 * diag), int(b[2] + 0.1 * diag), int(b[3] + 0.1 * diag)]
        b = [int(np.clip(b[0], 0, width - 1)), int(np.clip(b[1], 0, height - 1)),
             int(np.clip(b[2], 0, width - 1)), int(np.clip(b[3], 0, height - 1))]
        mask[b[1] : b[3], b[0] : b[2], ...] = 1
    if bboxes:
        sigma = 0.1 * max_diag
        ks = max(3, int(2 * np.ceil(sigma) + 1))
        ks += ks % 2 == 0
        blurred = cv2.GaussianBlur(f, (ks, ks), 0)
        m = cv2.GaussianBlur(mask, (ks, ks), 0)
        img = ((f * (1 - m) + blurred * m) * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".webp", img, [int(cv2.IMWRITE_WEBP_QUALITY), quality])
    if not ok:
        raise ReshardError(f"{where}: webp encoding failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------------- the worker

@dataclass
class _Task:
    out_dir: str
    index: int  # output shard number
    paths: list  # plan shard id -> tar path (only the ones this task needs, as a dict)
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    j: np.ndarray
    cls: np.ndarray | None
    boxes: dict | None  # (hi, lo) -> face boxes from the catalog, when blurring from the pool
    apply_blur: bool
    inject_blur: bool


def _ranges(offsets: list, lengths: list) -> list[tuple[int, int, int, int]]:
    """Coalesce sorted sample ranges: (read start, read end, first row, last row + 1)."""
    out, i, n = [], 0, len(offsets)
    while i < n:
        a, e, s = offsets[i], offsets[i] + lengths[i], i
        i += 1
        while i < n and offsets[i] <= e + COALESCE_GAP:
            e = max(e, offsets[i] + lengths[i])
            i += 1
        out.append((a, e, s, i))
    return out


def _sample_members(data: bytes, base: int, off: int, length: int, path: str):
    """(ext, data) for each member of the sample at ``off`` inside ``data`` (which starts at ``base``).

    Plain USTAR members (what img2dataset and we write) are parsed inline; anything else (PAX or
    GNU long-name headers) goes through the general :func:`curate.shards.index.walk_tar`.
    """
    out = []
    buf = memoryview(data)
    p, end = off - base, off - base + length
    while p < end:
        if data[p + 156] not in (48, 0) or data[p + 345] != 0 or data[p + 124] & 0x80:
            return _sample_members_general(buf, base, off, length, f"{path} at byte {off}")
        nul = data.find(b"\0", p + 124, p + 136)
        size = int(data[p + 124 : nul if nul >= 0 else p + 136].strip() or b"0", 8)
        nul = data.find(b"\0", p, p + 100)
        name_end = nul if nul >= 0 else p + 100
        leaf = data.rfind(b"/", p, name_end) + 1 or p
        dot = data.find(b".", leaf, name_end)
        start = p + BLOCK
        if dot > leaf and data[leaf : leaf + 2] != b"__":
            out.append((data[dot + 1 : name_end].decode("utf-8", "replace"), buf[start : start + size]))
        p = start + size + (-size % BLOCK)
    return out


def _sample_members_general(buf: memoryview, base: int, off: int, length: int, where: str):
    def read(o, n):
        return buf[o - base : o - base + n]

    out = []
    for e in walk_tar(read, off, off + length, where, check=False):
        _, ext = split_key(e.name)
        if ext is not None:
            out.append((ext, buf[e.data - base : e.data - base + e.size]))
    return out


class _TarOut:
    """Appends tar members to a file with few system calls (``writev`` of header/data/padding)."""

    def __init__(self, fd: int):
        self.fd, self.iov, self.pending, self.total = fd, [], 0, 0

    def add(self, name: bytes, body) -> None:
        n = len(body)
        self.iov += (tar_header(name, n), body, _PADS[-n % BLOCK])
        self.pending += BLOCK + n + (-n % BLOCK)
        if len(self.iov) >= 900 or self.pending >= 1 << 22:
            self.flush()

    def flush(self) -> None:
        if self.iov:
            done = os.writev(self.fd, self.iov)
            if done != self.pending:  # a short write: finish the rest plainly
                rest = b"".join(bytes(b) for b in self.iov)[done:]
                while rest:
                    rest = rest[os.write(self.fd, rest):]
            self.total += self.pending
            self.iov, self.pending = [], 0

    def close(self) -> None:
        self.flush()
        end = _finish(self.total)
        while end:
            end = end[os.write(self.fd, end):]


_PADS = [bytes(i) for i in range(BLOCK)]


def _write_task(t: _Task) -> tuple[int, int, int]:
    """Write one output shard; returns (samples, bytes read, images blurred)."""
    out_dir = Path(t.out_dir)
    tar_path = out_dir / OUTPUT_SHARD_FORMAT.format(t.index)
    stats_path = out_dir / OUTPUT_STATS_FORMAT.format(t.index)
    # plain Python lists: indexing numpy arrays per sample costs more than the copy itself
    keys = [f"{u}-{j}".encode() for u, j in zip(pairs_to_hex_array(t.hi, t.lo).to_pylist(), t.j.tolist())]
    offsets, lengths, shards = t.offset.tolist(), t.length.tolist(), t.shard.tolist()
    cls = None if t.cls is None else [str(c).encode() for c in t.cls.tolist()]
    transform = t.apply_blur or t.inject_blur
    n_read = n_blur = 0
    with atomic_path(tar_path) as tmp, open(tmp, "wb", buffering=0) as f:
        tar = _TarOut(f.fileno())
        # rows are in (shard, offset) order: handle each input shard's run of rows together
        a, n = 0, len(shards)
        while a < n:
            b = a
            while b < n and shards[b] == shards[a]:
                b += 1
            path = t.paths[shards[a]]
            with open(path, "rb") as src:
                fd = src.fileno()
                for ra, re_, s, e in _ranges(offsets[a:b], lengths[a:b]):
                    data = os.pread(fd, re_ - ra, ra)
                    n_read += len(data)
                    if len(data) != re_ - ra:
                        raise ShardError(f"{path}: shorter than the shard index says (reindex it)")
                    prev = None
                    for r in range(a + s, a + e):
                        off = offsets[r]
                        if off != prev:  # copies of one sample are adjacent: parse it once
                            members = _sample_members(data, ra, off, lengths[r], path)
                            if transform:
                                members, blurred = _transform(members, t, (int(t.hi[r]), int(t.lo[r])),
                                                              f"{path} at byte {off}")
                                n_blur += blurred
                            if cls is not None:
                                members = [m for m in members if m[0] != "cls"]
                            members = [(b"." + ext.encode(), body) for ext, body in members]
                            prev = off
                        key = keys[r]
                        for ext, body in members:
                            tar.add(key + ext, body)
                        if cls is not None:
                            tar.add(key + b".cls", cls[r])
            a = b
        tar.close()
        _make_readable(tmp)
    _write_json_readable(stats_path, {"successes": n})
    return n, n_read, n_blur


def _transform(members, t: _Task, hi_lo, where):
    """Face blurring and blur metadata for one sample (no-op unless asked for)."""
    if not (t.apply_blur or t.inject_blur):
        return members, 0
    js = next((bytes(b) for ext, b in members if ext == "json"), None)
    meta = json.loads(js) if js is not None else {}
    if t.boxes is not None:
        boxes = t.boxes.get(hi_lo, [])
    else:
        boxes = meta.get("face_bboxes") or []
    out, blurred = [], 0
    for ext, body in members:
        if t.apply_blur and boxes and ext in IMAGE_EXTS:
            try:
                body = blur_faces(bytes(body), boxes, where=where)
            except ReshardError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt input image
                raise ReshardError(f"{where}: cannot blur the {ext} image ({e})") from None
            ext = "webp"
            blurred += 1
        elif ext == "json" and t.inject_blur:
            body = json.dumps({**meta, "face_bboxes": boxes}).encode()
        out.append((ext, body))
    return out, blurred


# ----------------------------------------------------------------------------- output directory

def _fingerprint(inputs, out: Output, shard_size, cls_map, apply_blur, inject_blur, input_files,
                 max_bytes) -> dict:
    st = Path(out.subset_file).stat()
    h = hashlib.sha256()
    with open(out.subset_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    cls_digest = None
    if cls_map is not None:
        cls_digest = hashlib.sha256(json.dumps(sorted(cls_map.items())).encode()).hexdigest()
    return {
        "inputs": [str(Path(i).resolve()) for i in inputs],
        "subset_sha256": h.hexdigest(),
        "subset_bytes": st.st_size,
        "shard_size": shard_size,
        "max_shard_bytes": max_bytes,
        # the input tars as planned (name, size, mtime): a rerun after they changed must not
        # mix shards of two different plans
        "inputs_sha256": hashlib.sha256(json.dumps(input_files).encode()).hexdigest(),
        "cls_sha256": cls_digest,
        "apply_blur": apply_blur,
        "inject_blur_metadata": inject_blur,
    }


def _prepare_dir(out_dir: Path, fp: dict, overwrite: bool) -> bool:
    """Check the output dir; returns True when resuming an earlier run of the same job."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out_dir.iterdir()]
    if not entries:
        return False
    marker = out_dir / MARKER
    if not overwrite and marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = None
        if old == fp:
            for p in entries:  # temporaries of a killed run
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink()
            return True
        raise ReshardError(
            f"{out_dir}: holds the output of a different reshard job (other inputs, subset or "
            f"options); use --overwrite to replace it")
    if not overwrite:
        raise ReshardError(f"{out_dir}: not empty ({len(entries)} entries, e.g. {entries[0].name}); "
                           f"use --overwrite to replace its contents")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return False


def _shard_done(out_dir: Path, i: int, expected: int) -> bool:
    stats = out_dir / OUTPUT_STATS_FORMAT.format(i)
    if not (stats.is_file() and (out_dir / OUTPUT_SHARD_FORMAT.format(i)).is_file()):
        return False
    try:
        return json.loads(stats.read_text()).get("successes") == expected
    except ValueError:
        return False


def _pool_boxes(catalog, hi: np.ndarray, lo: np.ndarray) -> dict:
    """face_bboxes from the catalog's pool view for the given uids."""
    from curate.catalog.connection import connect

    con = connect(catalog, read_only=True)
    try:
        con.register("_sel", pa.table({"uid": pairs_to_hex_array(hi, lo)}))
        # only uids with faces are kept: the others need no entry (no boxes = nothing to blur)
        t = con.execute("SELECT p.uid, p.face_bboxes FROM pool p SEMI JOIN _sel s ON p.uid = s.uid "
                        "WHERE len(p.face_bboxes) > 0").to_arrow_table()
    finally:
        con.close()
    h, l_ = hex_array_to_pairs(t.column("uid"))
    return {(int(a), int(b)): v or [] for a, b, v in zip(h, l_, t.column("face_bboxes").to_pylist())}


# ---------------------------------------------------------------------------------- entry points

def reshard_many(inputs, outputs, *, shard_size: int = 10000, workers: int | None = None,
                 apply_blur: bool = False, inject_blur_metadata: bool = False, overwrite: bool = False,
                 catalog=None, blur_from_catalog: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                 progress: bool = False, engine: str = "local", ray_address: str | None = None
                 ) -> list[ReshardResult]:
    """Reshard input shard dirs into several outputs in one planning pass.

    ``outputs`` is a list of ``Output`` or ``(out_dir, subset_file, cls)`` tuples, where ``cls``
    is None, a dict uid -> class id or a cls file path. Every sample is routed to each output
    whose subset lists it (e.g. all TiC years at once). The catalog's shard index is used for
    inputs it covers; other input dirs are indexed on the fly (tar headers only).
    ``blur_from_catalog`` takes face boxes from the catalog's pool (else from each sample's json).
    ``engine="ray"`` writes the output shards as Ray tasks (one per output shard, retried if a
    worker dies); the bytes are the same as with the local engine.

    >>> reshard_many("pool/shards", [("out/2016", "train/2016.npy", None),
    ...                              ("out/2017", "train/2017.npy", None)])  # doctest: +SKIP
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(i) for i in inputs]
    if shard_size < 1:
        raise ReshardError(f"--shard-size {shard_size}: must be at least 1")
    outs = [o if isinstance(o, Output) else Output(Path(o[0]), Path(o[1]), o[2] if len(o) > 2 else None)
            for o in outputs]
    dirs = [Path(o.out_dir).resolve() for o in outs]
    if len(set(dirs)) != len(dirs):
        raise ReshardError("two outputs share one output directory")
    for i in inputs:
        if Path(i).resolve() in dirs:
            raise ReshardError(f"{i}: an output directory cannot also be an input")
    workers = max(1, workers or os.cpu_count() or 1)
    if blur_from_catalog and catalog is None:
        raise ReshardError("face boxes from the pool need --catalog")
    # validate everything the user gave before touching any output directory
    cls_maps = [load_cls_map(o.cls) for o in outs]
    for o in outs:
        open_subset(o.subset_file)
    con = duckdb.connect()
    info = index_for(con, inputs, catalog=catalog, workers=workers, progress=progress)
    files = con.execute("SELECT shard_id, root, name, size, truncated, has_stats FROM plan_files ORDER BY shard_id").fetchall()
    input_files = con.execute("SELECT root, name, size, mtime_ns FROM plan_files ORDER BY shard_id").fetchall()
    paths = {sid: str(Path(root) / name) for sid, root, name, *_ in files}
    sizes = {sid: size for sid, _, _, size, *_ in files}
    plans = [_plan_output(con, o, m, shard_size, max_shard_bytes) for o, m in zip(outs, cls_maps)]
    con.close()

    results, tasks = [], []
    for o, m, plan, d in zip(outs, cls_maps, plans, dirs):
        fp = _fingerprint(inputs, o, shard_size, m, apply_blur, inject_blur_metadata, input_files, max_shard_bytes)
        resumed = _prepare_dir(d, fp, overwrite)
        if not resumed:
            _write_json_readable(d / MARKER, fp)
        res = ReshardResult(str(d), str(o.subset_file), **plan.counts)
        res.output_count = int(len(plan.shard))
        res.output_shard_count = len(plan.bounds) - 1
        used = np.unique(plan.shard)
        res.input_shards_read = int(len(used))
        res.input_shards_total = len(files)
        res.bytes_total = int(sum(sizes.values()))
        res.truncated_inputs = [n for _, _, n, _, tr, _ in files if tr]
        res.inputs_without_stats = [n for _, _, n, _, _, hs in files if not hs]
        boxes = None
        if (apply_blur or inject_blur_metadata) and blur_from_catalog and len(plan.hi):
            boxes = _pool_boxes(catalog, plan.hi, plan.lo)
        for i in range(res.output_shard_count):
            a, b = plan.bounds[i], plan.bounds[i + 1]
            if resumed and _shard_done(d, i, b - a):
                res.shards_resumed += 1
                continue
            sl = slice(a, b)
            need = {int(s): paths[int(s)] for s in np.unique(plan.shard[sl])}
            task_boxes = None
            if boxes is not None:  # only this shard's entries travel to its worker
                task_boxes = {k: boxes[k] for k in zip(plan.hi[sl].tolist(), plan.lo[sl].tolist()) if k in boxes}
            tasks.append((len(results), b - a, _Task(
                str(d), i, need, plan.shard[sl], plan.offset[sl], plan.length[sl], plan.hi[sl],
                plan.lo[sl], plan.j[sl], None if plan.cls is None else plan.cls[sl], task_boxes,
                apply_blur, inject_blur_metadata)))
        results.append(res)

    bar = tqdm(total=sum(n for _, n, _ in tasks), desc="reshard", unit="sample", disable=not progress,
               smoothing=0.05)
    if engine == "ray":
        from curate.engine.ray import connect_ray, ray_imap

        connect_ray(ray_address)
        for (ri, _, _), (n, nread, nblur) in zip(tasks, ray_imap(_write_task, [(t,) for _, _, t in tasks])):
            _account(results[ri], n, nread, nblur)
            bar.update(n)
    elif workers > 1 and len(tasks) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for (ri, _, _), (n, nread, nblur) in zip(tasks, pool.imap(_write_task, [t for _, _, t in tasks])):
                _account(results[ri], n, nread, nblur)
                bar.update(n)
    else:
        for ri, _, t in tasks:
            n, nread, nblur = _write_task(t)
            _account(results[ri], n, nread, nblur)
            bar.update(n)
    bar.close()

    for o, plan, d, res in zip(outs, plans, dirs, results):
        with atomic_path(d / "sample_ids.npy") as tmp:
            shutil.copyfile(o.subset_file, tmp)
            _make_readable(tmp)
        _write_json_readable(d / "sizes.json", {OUTPUT_SHARD_FORMAT.format(i): plan.bounds[i + 1] - plan.bounds[i]
                                      for i in range(len(plan.bounds) - 1)})
        res.elapsed = time.perf_counter() - t0
        meta = {
            "output_count": res.output_count,
            "output_shard_count": res.output_shard_count,
            "output_shard_format": OUTPUT_SHARD_FORMAT,
            "output_shard_stats_format": OUTPUT_STATS_FORMAT,
            "shard_size": shard_size,
            "input_dirs": [str(Path(i).resolve()) for i in inputs],
            "subset_file": str(Path(o.subset_file).resolve()),
            "subset_count": res.subset_count,
            "subset_entries_present": res.subset_entries_present,
            "skipped": {"absent_uids": res.absent_uids, "no_json_entries": res.no_json_entries,
                        "input_duplicates": res.input_duplicates},
            "truncated_inputs": res.truncated_inputs,
            "inputs_without_stats": res.inputs_without_stats,
            "cls": o.cls is not None,
            "apply_blur": apply_blur,
            "inject_blur_metadata": inject_blur_metadata,
            "index": info,
        }
        # meta.json last: its presence marks a complete output
        _write_json_readable(d / "meta.json", meta)
    return results


def _account(res: ReshardResult, n: int, nread: int, nblur: int) -> None:
    res.shards_written += 1
    res.bytes_read += nread
    res.blurred += nblur


def reshard(input_dirs, output_dir, subset_file, *, cls=None, **kw) -> ReshardResult:
    """Reshard one subset: ``reshard("pool/shards", "out", "subset.npy")``; see ``reshard_many``."""
    return reshard_many(input_dirs, [Output(Path(output_dir), Path(subset_file), cls)], **kw)[0]


__all__ = ["Output", "ReshardResult", "reshard", "reshard_many", "load_cls_map", "blur_faces", "tar_header"]
