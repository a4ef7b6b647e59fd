"""Build a CommonPool-format pool from a folder of images and a table of metadata.

``build_pool`` reads a CSV, TSV or parquet table that names one local image file and one caption
per row (and, optionally, a time and any other columns), and writes what DataComp's
``download_upstream.py`` leaves behind, so that ``curate catalog init`` and everything after it
work unchanged:

* ``DATA_DIR/shards/{S:08d}.tar`` in img2dataset's layout: per sample ``KEY.jpg`` (or ``.png`` /
  ``.webp``: the image bytes exactly as read; other formats, e.g. GIF or BMP, re-encoded as
  PNG), ``KEY.txt`` (the caption) and ``KEY.json``
  (``uid``, ``caption``, ``url``, ``key``, ``status``, sizes, ``sha256`` and the kept columns);
  ``{S:08d}.parquet`` with one row per sample (``key``, ``uid``, ..., ``source_row``, the
  table row it came from) and ``{S:08d}_stats.json``;
* ``DATA_DIR/metadata/{S:08d}.parquet``: the nine CommonPool columns for the shard's samples, in
  key order, plus the table's other columns and ``time_utc``. Every shard holds exactly
  10,000 samples except the last, so img2dataset's rule (parquet file f, row r -> shard f, key
  ``f * 10**4 + r``) that the catalog relies on holds;
* ``DATA_DIR/failures/{S:08d}.parquet``: the table rows shard S's run left out, and why;
* ``DATA_DIR/pool.json``: the settings and, when finished, the counts.

The uid is a content hash, so the same image and caption give the same uid on any machine::

    uid = sha256( sha256_hex(image file bytes) + "\\n" + caption ).hexdigest()[:32]

(``sha256_hex`` is the 64-character lowercase hex digest of the *source file's* bytes, which is
also the pool's ``sha256`` column; the string is hashed as UTF-8, so in SQL
``sha256(sha256 || chr(10) || text)[1:32] = uid``). A second row with the same image and
caption is a duplicate and is left out.

Source files are only ever read. Missing, unreadable or undecodable images are reported (status
``failed_to_download`` / ``failed_to_resize`` as in img2dataset, ``duplicate``) and left out.
The table is streamed in Arrow batches and images are read by a thread pool; a shard's files are
written under temporary names and its ``_stats.json`` (written last) marks it complete, so a
killed build resumes after the last complete shard.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from curate.atomic import atomic_path, write_json
from curate.catalog.checks import check_can_create, make_dir
from curate.catalog.schema import POOL_COLUMNS, POOL_SCHEMA
from curate.errors import CurateError
from curate.progress import Progress
from curate.shards.tar import TarWriter
from curate.uids import hex_array_to_pairs, hex_to_pair

SAMPLES_PER_SHARD = 10_000
#: img2dataset's key: shard * 10**4 + index (``oom_sample_per_shard`` = 4 digits).
KEY_BASE = 10_000
#: The column ``--time-col`` is parsed into: a naive TIMESTAMP holding UTC wall-clock time.
TIME_COLUMN = "time_utc"
#: Prefix for table columns whose names clash with a pool column.
CLASH_PREFIX = "source_"
UID_DEFINITION = 'sha256(sha256_hex(image_bytes) + "\\n" + caption)[:32], UTF-8'
POOL_FORMAT = "curate-pool-from-table/1"
TIME_FORMATS = ("auto", "unix", "unix_ms", "iso", "year")
#: Image formats stored byte for byte (what open_clip's webdataset loader reads); others are
#: re-encoded as PNG.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
BATCH_ROWS = 2048
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")
#: Where recipes keep the table they derive from a collection's metadata, inside DATA_DIR.
SOURCE_DIR = "source"
#: Where the rows left out of the pool are listed, one parquet per shard that had any.
FAILURES_DIR = "failures"


class PoolBuildError(CurateError):
    """A table or output directory that cannot be turned into a pool as asked."""


def sample_uid(image_sha256: str, caption: str) -> str:
    """The uid of an (image, caption) pair, from the image's SHA-256 hex digest.

    >>> sample_uid(hashlib.sha256(b"").hexdigest(), "")
    '38acb15d02d5ac0f2a2789602e9df950'
    """
    return hashlib.sha256(f"{image_sha256}\n{caption}".encode("utf-8")).hexdigest()[:32]


# --- reading the table -------------------------------------------------------------------------


def _table_kind(path: Path) -> str:
    name = path.name.lower()
    for ext, kind in ((".parquet", "parquet"), (".tsv", "tsv"), (".tab", "tsv"), (".csv", "csv")):
        if name.endswith(ext):
            return kind
    raise PoolBuildError(f"{path}: unknown table type (expected .csv, .tsv or .parquet)")


def table_schema(path: str | os.PathLike) -> pa.Schema:
    """Column names and types of a table; CSV/TSV columns are all strings (ids keep their zeros)."""
    path = Path(path)
    if not path.is_file():
        raise PoolBuildError(f"{path}: table not found")
    kind = _table_kind(path)
    if kind == "parquet":
        try:
            return pq.read_schema(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise PoolBuildError(f"{path}: not a readable parquet file ({e})") from None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), None)
    except UnicodeDecodeError as e:
        raise PoolBuildError(f"{path}: header is not UTF-8 ({e})") from None
    if not header:
        raise PoolBuildError(f"{path}: empty table (no header line)")
    seen = set()
    for name in header:
        if not name or name in seen:
            raise PoolBuildError(f"{path}: header has an empty or repeated column name {name!r}")
        seen.add(name)
    return pa.schema([(name, pa.string()) for name in header])


def iter_table(path: str | os.PathLike, schema: pa.Schema, start_row: int = 0):
    """Yield ``(first_row, RecordBatch)`` from ``start_row`` on (0-based data rows), streaming."""
    path = Path(path)
    kind = _table_kind(path)
    row = 0
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if row + n <= start_row:  # resume: skip whole row groups without reading them
                    row += n
                    continue
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg]):
                    yield from _clip(row, batch, start_row)
                    row += batch.num_rows
            return
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 22, encoding="utf8"),
            parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",",
                                             newlines_in_values=True),
            # every column a string; only an empty field is null ("NA" is a caption, not a null)
            convert_options=pacsv.ConvertOptions(column_types=dict(zip(schema.names, schema.types)),
                                                 strings_can_be_null=True, null_values=[""]),
        )
        for batch in reader:
            for off in range(0, batch.num_rows, BATCH_ROWS):
                part = batch.slice(off, BATCH_ROWS)
                yield from _clip(row, part, start_row)
                row += part.num_rows
    except pa.ArrowInvalid as e:
        where = _ragged_row(path, "\t" if kind == "tsv" else ",", len(schema.names)) if kind != "parquet" else None
        if where is not None:
            raise PoolBuildError(f"{path}: {where}") from None
        raise PoolBuildError(f"{path}: cannot parse the table after data row {row} ({e})") from None


def _ragged_row(path: Path, delimiter: str, n_cols: int) -> str | None:
    """After a CSV parse error: the first data row whose field count is not the header's, as
    "cannot parse the table at row R (line L): ..." (None when every row has M fields)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            next(reader, None)
            for i, fields in enumerate(reader):
                if fields and len(fields) != n_cols:
                    return (f"cannot parse the table at row {i} (line {reader.line_num}): {len(fields)} "
                            f"fields, the header has {n_cols}")
    except (csv.Error, UnicodeDecodeError, OSError):
        return None
    return None


def _clip(row: int, batch: pa.RecordBatch, start_row: int):
    if row + batch.num_rows <= start_row:
        return
    if row < start_row:
        batch = batch.slice(start_row - row)
        row = start_row
    yield row, batch


# --- times ---------------------------------------------------------------------------------------

_EPOCH = _dt.datetime(1970, 1, 1)
_INT_RE = re.compile(r"[+-]?\d+\Z")


def parse_time(value, fmt: str = "auto") -> _dt.datetime:
    """One time value -> naive UTC ``datetime``; raises ``ValueError`` when it is not one.

    ``auto``: numbers (or strings of digits) are Unix seconds, other strings ISO 8601;
    ``unix`` / ``unix_ms``: seconds / milliseconds since 1970-01-01 UTC; ``iso``: ISO 8601
    (no offset = UTC; an offset is converted to UTC); ``year``: a year, meaning 1 January 00:00.
    Parquet timestamps and dates are taken as they are (naive = UTC).
    """
    if value is None:
        raise ValueError("empty")
    if isinstance(value, _dt.datetime):
        return value.astimezone(_dt.timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day)
    if fmt == "year":
        year = int(str(value).strip())
        return _dt.datetime(year, 1, 1)
    if isinstance(value, str):
        s = value.strip()
        if fmt in ("unix", "unix_ms") or (fmt == "auto" and _is_number(s)):
            value = int(s) if _INT_RE.match(s) else float(s)
        else:
            d = _dt.datetime.fromisoformat(s)
            return d.astimezone(_dt.timezone.utc).replace(tzinfo=None) if d.tzinfo else d
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a time")
    if fmt == "iso":
        raise ValueError("a number where an ISO 8601 time was expected")
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    # arithmetic on microseconds since the epoch: fromtimestamp() would use the machine's time
    # zone (TiC's YFCC script does exactly that); whole numbers stay integers (exact)
    scale = 1000 if fmt == "unix_ms" else 1_000_000
    us = value * scale if isinstance(value, int) else int(round(value * scale))
    try:
        return _EPOCH + _dt.timedelta(microseconds=us)
    except OverflowError:
        raise ValueError("outside years 1..9999") from None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# --- reading one image ---------------------------------------------------------------------------


@dataclass
class LoadedImage:
    status: str  # "success" | "failed_to_download" | "failed_to_resize"
    error: str | None = None
    data: bytes = b""  # what goes into the tar
    ext: str = ""
    sha256: str = ""  # of the source file bytes
    width: int = 0
    height: int = 0


def load_image(path: Path) -> LoadedImage:
    """Read and fully decode one image file (never modifies it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadedImage("failed_to_download", "image file not found")
    except OSError as e:
        return LoadedImage("failed_to_download", f"cannot read image file: {e.strerror or e}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if fmt == "JPEG":
                # decode at 1/8 scale in the DCT: the whole stream is still read (a truncated or
                # corrupt file still fails) at a fraction of the cost of a full decode
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            ext = KEPT_FORMATS.get(fmt)
            if ext is None:
                buf = io.BytesIO()
                mode = "RGBA" if ("A" in im.mode or "transparency" in im.info) else "RGB"
                im.convert(mode).save(buf, format="PNG")
                out, ext = buf.getvalue(), "png"
            else:
                out = data
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad image data
        # PIL names the BytesIO object (a memory address): keep messages the same run to run
        msg = _OBJECT_REPR.sub("data", str(e))
        return LoadedImage("failed_to_resize", f"cannot decode image: {type(e).__name__}: {msg}", sha256=sha)
    if w <= 0 or h <= 0:
        return LoadedImage("failed_to_resize", f"image has size {w}x{h}", sha256=sha)
    return LoadedImage("success", None, out, ext, sha, int(w), int(h))


# --- uid set for duplicates ----------------------------------------------------------------------


class UidSet:
    """uids seen so far, for duplicate detection over a whole table in bounded memory.

    Exact membership lives in sorted runs of (hi, lo) uint64 pairs (16 bytes per uid, ~240 MB
    at 15M rows; a Python set of strings would take ~100 bytes per uid). In front of it, a
    2**27-bit map of the uids' top 27 bits (16 MB) answers most lookups of new uids in one bit
    test; only a hit (about n / 2**27 of them, ~11% at 15M) searches the runs.
    """

    BITS = 27

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.bits = bytearray(1 << (self.BITS - 3))

    def add(self, uids: list[str]) -> None:
        if not uids:
            return
        hi, lo = hex_array_to_pairs(pa.array(uids, pa.string()))
        order = np.argsort(hi, kind="stable")
        self.runs.append((hi[order], lo[order]))
        top = (hi >> np.uint64(64 - self.BITS)).astype(np.int64)
        view = np.frombuffer(self.bits, dtype=np.uint8)
        np.bitwise_or.at(view, top >> 3, (1 << (top & 7)).astype(np.uint8))
        if len(self.runs) > 16:
            # timsort (kind="stable") merges the concatenated sorted runs in near-linear time
            hi = np.concatenate([r[0] for r in self.runs])
            lo = np.concatenate([r[1] for r in self.runs])
            order = np.argsort(hi, kind="stable")
            self.runs = [(hi[order], lo[order])]

    def __contains__(self, uid: str) -> bool:
        h, l = hex_to_pair(uid)
        top = h >> (64 - self.BITS)
        if not (self.bits[top >> 3] >> (top & 7)) & 1:
            return False
        h, l = np.uint64(h), np.uint64(l)
        for hi, lo in self.runs:  # sorted by hi; lo is unordered within equal hi (rare)
            a, b = np.searchsorted(hi, h, "left"), np.searchsorted(hi, h, "right")
            if a < b and (lo[a:b] == l).any():
                return True
        return False


# --- writing shards ------------------------------------------------------------------------------


def _jsonable(v):
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


class ShardWriter:
    """One output shard: its tar is written as samples arrive; the rest when it is closed."""

    def __init__(self, data_dir: Path, shard: int, input_start: int, meta_schema: pa.Schema):
        self.data_dir, self.shard, self.input_start = data_dir, shard, input_start
        self.meta_schema = meta_schema
        self.name = f"{shard:08d}"
        self.tar_path = data_dir / "shards" / f"{self.name}.tar"
        # a large buffer: a write that fits is a memcpy under the GIL, while each unbuffered
        # write releases it and waits behind the decoding threads (profiled: ~40 MB/s to /dev/shm)
        self._file = open(_tmp(self.tar_path), "wb", buffering=1 << 24)
        self.tar = TarWriter(self._file)
        self.meta_rows: list[dict] = []
        self.samples: list[dict] = []  # -> shards/S.parquet (img2dataset's per-shard parquet)
        self.failed: list[dict] = []  # -> failures/S.parquet
        self.counts = {"success": 0, "failed_to_download": 0, "failed_to_resize": 0, "duplicate": 0}
        self.t0 = time.time()

    @property
    def successes(self) -> int:
        return len(self.meta_rows)

    def add_success(self, meta: dict, img: LoadedImage, extra_json: dict, source_row: int, path: str) -> None:
        key = f"{self.shard * KEY_BASE + self.successes:012d}"
        js = {"uid": meta["uid"], "caption": meta["text"], "url": meta["url"], "key": key,
              "status": "success", "error_message": None, "width": img.width, "height": img.height,
              "original_width": img.width, "original_height": img.height, "exif": None,
              "sha256": img.sha256, **extra_json}
        self.tar.add(f"{key}.{img.ext}", img.data)
        self.tar.add(f"{key}.txt", meta["text"].encode("utf-8"))
        self.tar.add(f"{key}.json", json.dumps(js, ensure_ascii=False).encode("utf-8"))
        self.meta_rows.append(meta)
        self.samples.append({"key": key, "uid": meta["uid"], "url": meta["url"], "caption": meta["text"],
                              "status": "success", "error_message": None, "source_row": source_row,
                              "path": path, "width": img.width, "height": img.height,
                              "original_width": img.width, "original_height": img.height,
                              "sha256": img.sha256})
        self.counts["success"] += 1

    def add_failure(self, status: str, error: str, source_row: int, path: str | None, url: str | None,
                    caption: str | None, sha256: str | None = None, uid: str | None = None) -> None:
        self.failed.append({"source_row": source_row, "path": path, "url": url, "caption": caption,
                            "status": status, "error_message": error, "sha256": sha256, "uid": uid})
        self.counts[status] += 1

    @property
    def rows(self) -> int:
        """Table rows this shard consumed (samples and failures)."""
        return len(self.samples) + len(self.failed)

    def close(self, input_end: int, final: bool) -> dict:
        """Write the shard's parquets and stats (stats last: the completion marker)."""
        self.tar.close()
        self._file.close()
        os.replace(_tmp(self.tar_path), self.tar_path)
        with atomic_path(self.data_dir / "shards" / f"{self.name}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(self.samples, schema=SAMPLE_SCHEMA), tmp)
        if self.failed:
            with atomic_path(self.data_dir / FAILURES_DIR / f"{self.name}.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(self.failed, schema=FAILURE_SCHEMA), tmp)
        if self.meta_rows:
            table = pa.Table.from_pylist(self.meta_rows, schema=self.meta_schema)
            with atomic_path(self.data_dir / "metadata" / f"{self.name}.parquet") as tmp:
                pq.write_table(table, tmp)
        end = time.time()
        stats = {
            "count": self.rows, "successes": self.successes,
            "failed_to_download": self.counts["failed_to_download"],
            "failed_to_resize": self.counts["failed_to_resize"],
            "duplicate": self.counts["duplicate"],
            "duration": round(end - self.t0, 3), "start_time": self.t0, "end_time": end,
            "status_dict": {k: v for k, v in self.counts.items() if v},
            # curate's resume record: the half-open range of table rows this shard consumed
            "input_start": self.input_start, "input_end": input_end, "final": final,
        }
        write_json(self.data_dir / "shards" / f"{self.name}_stats.json", stats)
        return stats

    def abandon(self) -> None:
        self._file.close()
        _tmp(self.tar_path).unlink(missing_ok=True)


#: img2dataset's per-shard parquet, one row per sample in the tar (key order), plus where it came from.
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()), ("source_row", pa.int64()),
    ("path", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("sha256", pa.string()),
])
#: Table rows left out of the pool. Kept out of the shard parquet: they are not samples (no key,
#: often no uid), and tools that read that parquet as "the shard's rows" must not see them.
FAILURE_SCHEMA = pa.schema([
    ("source_row", pa.int64()), ("path", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error_message", pa.string()), ("sha256", pa.string()), ("uid", pa.string()),
])


# --- the build -----------------------------------------------------------------------------------


@dataclass
class BuildResult:
    out: Path
    rows: int = 0  # table rows read (this run and earlier runs)
    samples: int = 0  # written to the pool
    shards: int = 0
    failed: dict = field(default_factory=dict)  # status -> count
    first_failures: list = field(default_factory=list)  # (source_row, path, status, error)
    resumed_from_row: int = 0
    seconds: float = 0.0
    already_complete: bool = False


def _metadata_schema(extra: list[tuple[str, pa.DataType]], with_time: bool) -> pa.Schema:
    """The pool's nine columns, then the kept table columns, then ``time_utc``."""
    fields = list(POOL_SCHEMA) + [pa.field(name, t) for name, t in extra]
    if with_time:
        fields.append(pa.field(TIME_COLUMN, pa.timestamp("us")))
    return pa.schema(fields)


def plan_columns(schema: pa.Schema, image_col: str, caption_col: str, time_col: str | None,
                 url_col: str | None, keep: list[str] | None, table: Path) -> list[tuple[str, str, pa.DataType]]:
    """(source name, pool name, type) of the table columns kept as extra pool columns."""
    names = schema.names
    for opt, col in (("--image-col", image_col), ("--caption-col", caption_col),
                     ("--time-col", time_col), ("--url-col", url_col)):
        if col is not None and col not in names:
            raise PoolBuildError(f"{table}: {opt} {col!r} is not a column (columns: {', '.join(names)})")
    if keep is not None:
        for col in keep:
            if col not in names:
                raise PoolBuildError(f"{table}: --columns names {col!r}, which is not a column "
                                     f"(columns: {', '.join(names)})")
        chosen = [c for c in names if c in keep]
    else:
        chosen = [c for c in names if c not in (caption_col, url_col)]
    taken = set(POOL_COLUMNS) | {TIME_COLUMN, "file", "row"}
    out = []
    for c in chosen:
        pool_name = c if c not in taken else CLASH_PREFIX + c
        if pool_name in taken or pool_name in {p for _, p, _ in out}:
            raise PoolBuildError(f"{table}: column {c!r} clashes with a pool column even as {pool_name!r}")
        out.append((c, pool_name, schema.field(c).type))
    return out


def _settings(table: Path, image_col, caption_col, time_col, time_format, url_col, image_root, kept) -> dict:
    st = table.stat()
    return {
        "format": POOL_FORMAT,
        "table": str(table), "table_size": st.st_size, "table_mtime_ns": st.st_mtime_ns,
        "image_col": image_col, "caption_col": caption_col, "time_col": time_col,
        "time_format": time_format if time_col else None, "url_col": url_col,
        "image_root": str(image_root), "columns": [[s, p] for s, p, _ in kept],
        "time_column": TIME_COLUMN if time_col else None,
        "uid": UID_DEFINITION, "samples_per_shard": SAMPLES_PER_SHARD,
    }


def _resume_point(data_dir: Path) -> tuple[int, int, list[dict]]:
    """(next shard, next table row, stats of complete shards); removes partial leftovers."""
    shards_dir = data_dir / "shards"
    done: list[dict] = []
    while True:
        p = shards_dir / f"{len(done):08d}_stats.json"
        if not p.is_file():
            break
        try:
            stats = json.loads(p.read_text())
            int(stats["input_end"])
        except (ValueError, KeyError, TypeError):
            raise PoolBuildError(f"{p}: unreadable shard stats; remove the shard's files to rebuild it") from None
        done.append(stats)
    nxt = len(done)
    # outputs of a shard that was being written when the build stopped (ours, never sources)
    for d in (shards_dir, data_dir / "metadata", data_dir / FAILURES_DIR):
        for p in d.glob("*"):
            stem = p.name.lstrip(".").split(".")[0].split("_")[0]
            if stem.isdigit() and int(stem) >= nxt:
                p.unlink()
    return nxt, (done[-1]["input_end"] if done else 0), done


#: Why table rows are left out of a pool (counted per shard in its stats and in pool.json).
LEFT_OUT = ("failed_to_download", "failed_to_resize", "duplicate")


@dataclass
class BuildPlan:
    """What ``build_pool`` was asked to do, checked: the table, its columns and the settings
    recorded in ``pool.json`` (a resumed build must have the same ones)."""

    table: Path  # absolute
    out: Path
    schema: pa.Schema  # the table's
    image_col: str
    caption_col: str
    time_col: str | None
    time_format: str
    url_col: str | None
    image_root: Path
    kept: list[tuple[str, str, pa.DataType]]  # (table column, pool column, type)
    settings: dict

    @property
    def manifest(self) -> Path:
        return self.out / "pool.json"

    def image_path(self, path_text: str | None) -> Path | None:
        """Where a row's image file is: relative paths start at ``image_root``; None if empty."""
        if not path_text:
            return None
        return Path(path_text) if os.path.isabs(path_text) else self.image_root / path_text

    def row_time(self, cols: dict[str, list], i: int, row: int) -> _dt.datetime | None:
        """Row ``i`` of a batch's time, parsed; None without a time column. A value that is not
        a time stops the build (it names the table row)."""
        if self.time_col is None:
            return None
        value = cols[self.time_col][i]
        try:
            return parse_time(value, self.time_format)
        except (ValueError, OverflowError, TypeError) as e:
            raise PoolBuildError(f"{self.table}: row {row}, column {self.time_col!r}: value "
                                 f"{value!r} is not a time ({self.time_format}: {e})") from None


def plan_build(table: str | os.PathLike, out: str | os.PathLike, image_col: str, caption_col: str,
               time_col: str | None = None, time_format: str = "auto", url_col: str | None = None,
               image_root: str | os.PathLike | None = None, columns: list[str] | None = None) -> BuildPlan:
    """Check ``build_pool``'s arguments against the table (nothing is written)."""
    table = Path(table).resolve()
    if time_format not in TIME_FORMATS:
        raise PoolBuildError(f"time format {time_format!r} is not one of {', '.join(TIME_FORMATS)}")
    schema = table_schema(table)
    kept = plan_columns(schema, image_col, caption_col, time_col, url_col, columns, table)
    root = Path(image_root).resolve() if image_root else table.parent
    settings = _settings(table, image_col, caption_col, time_col, time_format, url_col, root, kept)
    return BuildPlan(table, Path(out), schema, image_col, caption_col, time_col, time_format, url_col, root,
                     kept, settings)


def _prepare_out(plan: BuildPlan) -> None:
    """Refuse an ``out`` holding something else (another pool, other files); create its dirs."""
    out, manifest = plan.out, plan.manifest
    if out.exists() and not out.is_dir():
        raise PoolBuildError(f"{out}: exists and is not a directory")
    check_can_create(out, PoolBuildError, "pool directory")
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except ValueError:
            raise PoolBuildError(f"{manifest}: unreadable; remove {out} to rebuild") from None
        if previous.get("settings") != plan.settings:
            diff = sorted(k for k in plan.settings if previous.get("settings", {}).get(k) != plan.settings[k])
            raise PoolBuildError(f"{out}: holds a pool built with other settings or from a changed table "
                                 f"({', '.join(diff)} differ); use another --out or remove it")
    elif out.exists() and any(p.name != SOURCE_DIR for p in out.iterdir()):
        raise PoolBuildError(f"{out}: exists and is not empty (not a pool this command started)")
    make_dir(out / "shards", PoolBuildError, "pool directory")
    make_dir(out / "metadata", PoolBuildError, "pool directory")


#: What a pool build writes (and so may remove again): ``{S:08d}`` files and their temp names.
_BUILD_FILE = re.compile(r"\.?\d{8}(\.tar|\.parquet|_stats\.json)(\.[^/]*)?\.tmp\Z|\d{8}(\.tar|\.parquet|_stats\.json)\Z")


def _remove_build(out: Path, out_existed: bool) -> None:
    """Remove what builds into ``out`` wrote (``pool.json`` and the numbered shard, metadata and
    failure files; nothing else), then the directories left empty; ``out`` itself only if this
    run created it. A build that failed on its input can then be re-run on the corrected table."""
    for sub in ("shards", "metadata", FAILURES_DIR):
        d = out / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and _BUILD_FILE.match(p.name):
                p.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()
    for p in out.glob(".pool.json.*.tmp"):
        p.unlink()
    (out / "pool.json").unlink(missing_ok=True)
    if not out_existed:
        with contextlib.suppress(OSError):
            out.rmdir()


def _result_so_far(out: Path, start_row: int, done: list[dict]) -> BuildResult:
    """The counts of the shards an earlier run completed."""
    result = BuildResult(out=out, resumed_from_row=start_row)
    for st in done:
        for k in LEFT_OUT:
            result.failed[k] = result.failed.get(k, 0) + st.get(k, 0)
        result.samples += st["successes"]
    return result


class ShardSequence:
    """Table rows -> consecutive shards: the open :class:`ShardWriter`, duplicate detection
    (uids of earlier shards in a :class:`UidSet`, of the open shard in a dict) and the counts."""

    def __init__(self, plan: BuildPlan, shard: int, start_row: int, result: BuildResult):
        self.plan, self.result = plan, result
        self.seen = UidSet()
        for i in range(shard):
            p = plan.out / "metadata" / f"{i:08d}.parquet"
            if p.is_file():
                self.seen.add(pq.read_table(p, columns=["uid"]).column("uid").to_pylist())
        self.meta_schema = _metadata_schema([(name, t) for _, name, t in plan.kept], plan.time_col is not None)
        self.pending: dict[str, int] = {}  # uid -> source row, for duplicates inside the open shard
        self.writer = ShardWriter(plan.out, shard, start_row, self.meta_schema)

    def add(self, row: int, img: LoadedImage | None, path_text: str | None, cols: dict[str, list], i: int) -> None:
        """Table row ``row`` (row ``i`` of the batch ``cols``), its image loaded (None: no path)."""
        plan = self.plan
        caption = cols[plan.caption_col][i]
        caption = "" if caption is None else str(caption)
        url = str(cols[plan.url_col][i]) if plan.url_col and cols[plan.url_col][i] is not None else path_text
        when = plan.row_time(cols, i, row)
        if img is None:
            self._leave_out(row, path_text, url, caption, "failed_to_download", "empty image path")
            return
        if img.status != "success":
            self._leave_out(row, path_text, url, caption, img.status, img.error, img.sha256 or None)
            return
        uid = sample_uid(img.sha256, caption)
        if uid in self.pending or uid in self.seen:
            first_row = self.pending.get(uid)
            msg = (f"same image bytes and caption as table row {first_row}" if first_row is not None
                   else "same image bytes and caption as an earlier row (uid already in the pool)")
            self._leave_out(row, path_text, url, caption, "duplicate", msg, img.sha256, uid)
            return
        self.pending[uid] = row
        meta = {"uid": uid, "url": url, "text": caption, "original_width": img.width,
                "original_height": img.height, "clip_b32_similarity_score": None,
                "clip_l14_similarity_score": None, "face_bboxes": None, "sha256": img.sha256}
        extra_json = {}
        for src, name, _ in plan.kept:
            meta[name] = cols[src][i]
            extra_json[name] = _jsonable(cols[src][i])
        if plan.time_col is not None:
            meta[TIME_COLUMN] = when
            extra_json[TIME_COLUMN] = when.isoformat()
        self.writer.add_success(meta, img, extra_json, row, path_text)
        if self.writer.successes == SAMPLES_PER_SHARD:
            self._next_shard(row + 1)

    def _leave_out(self, row: int, path_text, url, caption, status: str, error: str,
                   sha256: str | None = None, uid: str | None = None) -> None:
        self.writer.add_failure(status, error, row, path_text, url, caption, sha256, uid)
        _note(self.result, row, path_text, status, error)

    def _next_shard(self, next_row: int) -> None:
        """Close the full shard and open the next one, starting at table row ``next_row``."""
        self.writer.close(next_row, final=False)
        self.seen.add(list(self.pending))
        self.pending.clear()
        self.result.shards = self.writer.shard + 1
        self.writer = ShardWriter(self.plan.out, self.writer.shard + 1, next_row, self.meta_schema)

    def finish(self, end_row: int) -> None:
        """The table ended at ``end_row``: close the open shard as the last one (or, if the input
        ended exactly at a full shard, mark that one as the last)."""
        writer = self.writer
        if writer.rows or writer.shard == 0:
            writer.close(end_row, final=True)
            self.result.shards = writer.shard + 1
        else:
            writer.abandon()
            last = self.plan.out / "shards" / f"{writer.shard - 1:08d}_stats.json"
            stats = json.loads(last.read_text())
            write_json(last, {**stats, "final": True})
            self.result.shards = writer.shard

    def abandon(self) -> None:
        self.writer.abandon()


def _write_shards(plan: BuildPlan, shard: int, start_row: int, result: BuildResult, workers: int | None,
                  progress: bool) -> None:
    """Stream the table from ``start_row`` into shards ``shard``, ``shard + 1``, ...; images are
    read and decoded by a thread pool, in table order."""
    samples = ShardSequence(plan, shard, start_row, result)
    total = pq.ParquetFile(plan.table).metadata.num_rows if plan.table.suffix.lower() == ".parquet" else None
    bar = Progress(total=total, initial=start_row, unit="row", desc="pool", disable=not progress)
    row = start_row
    try:
        n_workers = workers or min(8, (os.cpu_count() or 1) + 2)
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for first, batch in iter_table(plan.table, plan.schema, start_row):
                cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
                paths = [_as_path_text(p) for p in cols[plan.image_col]]
                loaded = _bounded_map(pool, _load_or_none, [plan.image_path(p) for p in paths],
                                      ahead=4 * n_workers)
                for i, img in enumerate(loaded):
                    samples.add(first + i, img, paths[i], cols, i)
                bar.update(batch.num_rows)
                row = first + batch.num_rows
        samples.finish(row)
    except BaseException:
        samples.abandon()
        raise
    finally:
        bar.close()


def _count_shards(out: Path, result: BuildResult) -> None:
    """Totals over every shard's stats (this run's and earlier runs')."""
    all_stats = [json.loads((out / "shards" / f"{i:08d}_stats.json").read_text()) for i in range(result.shards)]
    result.rows = all_stats[-1]["input_end"]
    result.samples = sum(s["successes"] for s in all_stats)
    result.failed = {k: sum(s.get(k, 0) for s in all_stats) for k in LEFT_OUT}


def build_pool(
    table: str | os.PathLike,
    out: str | os.PathLike,
    image_col: str,
    caption_col: str,
    time_col: str | None = None,
    time_format: str = "auto",
    url_col: str | None = None,
    image_root: str | os.PathLike | None = None,
    columns: list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Turn ``table`` + its image files into a CommonPool-format pool under ``out``.

    Relative image paths are resolved against ``image_root`` (default: the table's directory).
    ``columns`` limits the extra columns kept (default: all but the caption and url columns).
    Re-running with the same arguments resumes an interrupted build.
    """
    t0 = time.perf_counter()
    plan = plan_build(table, out, image_col, caption_col, time_col, time_format, url_col, image_root, columns)
    out_existed = plan.out.exists()
    _prepare_out(plan)
    shard, start_row, done = _resume_point(plan.out)
    result = _result_so_far(plan.out, start_row, done)
    if done and done[-1].get("final"):
        result.rows, result.shards, result.already_complete = done[-1]["input_end"], len(done), True
        result.seconds = time.perf_counter() - t0
        return _check_not_empty(result, plan.table)
    try:
        write_json(plan.manifest, {"settings": plan.settings, "complete": False})
        _write_shards(plan, shard, start_row, result, workers, progress)
        _count_shards(plan.out, result)
        result.seconds = time.perf_counter() - t0
        _check_not_empty(result, plan.table)
        write_json(plan.manifest, {"settings": plan.settings, "complete": True, "rows": result.rows,
                                   "samples": result.samples, "shards": result.shards, "failed": result.failed})
    except CurateError:
        # the table itself stops the build (a bad row, no readable image): it would stop there
        # again, so the partial pool is of no use; remove it so that the corrected table builds
        _remove_build(plan.out, out_existed)
        raise
    return result


def _check_not_empty(result: BuildResult, table: Path) -> BuildResult:
    if result.samples == 0:
        raise PoolBuildError(f"{table}: no image could be read ({result.rows} rows, failures: "
                             f"{result.failed}); see {result.out / FAILURES_DIR}/*.parquet")
    return result


def _load_or_none(path: Path | None) -> LoadedImage | None:
    return load_image(path) if path is not None else None


def _bounded_map(pool: ThreadPoolExecutor, fn, items, ahead: int):
    """``pool.map`` in order, but with at most ``ahead`` images in flight: ``map`` would submit
    the whole batch and hold every file's bytes at once (GBs for full-size photos)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _as_path_text(p) -> str | None:
    return None if p is None else str(p)


def _note(result: BuildResult, row: int, path, status: str, error: str) -> None:
    if len(result.first_failures) < 20:
        result.first_failures.append((row, path, status, error))


def failures(data_dir: str | os.PathLike) -> pa.Table:
    """Every table row left out of the pool (``failures/*.parquet``), in table order."""
    files = sorted((Path(data_dir) / FAILURES_DIR).glob("[0-9]*[0-9].parquet"))
    if not files:
        return FAILURE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=FAILURE_SCHEMA) for f in files])
