"""Per-pool-file caption tables built in parts, for the rows asked for (``text_features``,
``text_lang_cld3``).

A caption table keeps ONE output per pool file, ``FEATURES_DIR/{view}/{file}.parquet``, with one
row per pool row in pool order (``uid, file, row`` + the table's columns). Its columns come in
*parts* (:class:`Part`), computed separately, each with its own settings identity and cost rank:
``text_features`` has ``counts`` (n_words, n_chars, n_tokens_fasttext), ``entity``
(in21k_entity) and ``lang`` (lang_fasttext); ``text_lang_cld3`` has ``cld3`` (lang_cld3). A
value that has not been computed is NULL (every computed value is non-NULL), so a query sees
NULL, never a wrong value, for a row not computed yet.

Each output's parquet metadata (the table's ``meta_key``) records::

    {"file", "source": identity of the pool file, "settings": what the computed parts depend
     on (+ "schema"), "rows": pool rows,
     "parts": {part: {"settings": <comparable settings> | null, "rows": <rows computed>}}}

An output without ``"parts"`` (written before parts existed) counts as every part complete with
the settings it records. Staleness: another source identity, row count, schema version or
column layout makes the whole output absent; a part recorded with other settings than the
wanted ones is uncomputed (and NULLed the next time that file is written); other parts stay.

:func:`build_parts` computes some parts for some rows: one task per pool file with work, through
:func:`curate.engine.map_tasks` (in this process for small work, else spawned local workers or
Ray); a task reads the pool file's captions for those rows only (row group by row group),
computes, merges into the existing output (or a skeleton) and writes it atomically with its
metadata, so a ``kill -9`` leaves each file old or new, and the metadata count of a part always
equals its non-NULL values. :func:`ensure_skeleton` gives every pool file an output (all
features NULL) so the view exists; :func:`part_status` reads only metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import storage
from curate.atomic import atomic_path
from curate.catalog.connection import (CatalogError, connect, default_catalog, features_dir, register_parquet_view,
                                       resolve_path)
from curate.engine import LOCAL, Engine, WarmPool, map_tasks, warm_workers
from curate.errors import CurateError

BATCH_ROWS = 1 << 16
AUTO_PARALLEL_ROWS = 100_000  # below this many captions to compute, a local engine without a worker count runs in-process


class TextFeaturesError(CurateError):
    """A pool file whose captions cannot be processed."""


@dataclass(frozen=True)
class Part:
    """Columns of a caption table computed together, with their own settings; ``cost`` ranks
    parts from cheap to expensive (they are computed in that order)."""

    name: str
    columns: tuple[str, ...]
    cost: int
    threads: bool = False  # its work is Arrow kernels that release the GIL: threads, not processes


@dataclass(frozen=True, eq=False)
class CaptionTable:
    """What differs between the per-pool-file caption tables.

    ``compute(parts, texts, settings) -> {column: array}`` computes the columns of ``parts`` (a
    tuple of part names) for a string array without NULLs; it is a module-level function (sent
    to worker processes and Ray tasks) that loads its models once per process.
    ``settings(out_dir, files, **options)`` is the full identity of what the table depends on
    (may hold local model paths); ``comparable(settings)`` drops what does not change the
    values; ``part_settings(comparable, part)`` is one part's share of it;
    ``load(settings, parts)`` loads the models of ``parts`` in this process (a bad model fails
    before any output is written); ``after_build(out_dir, settings)``, if given, runs after values
    were computed (text_features: remember where a non-bundled model lives on this machine).
    """

    view: str
    meta_key: bytes
    schema: pa.Schema
    schema_version: int
    parts: dict
    compute: Callable
    settings: Callable
    comparable: Callable
    part_settings: Callable
    load: Callable
    after_build: Callable | None = None

    def ordered(self, parts) -> list[str]:
        """``parts`` (names) checked and sorted by cost."""
        unknown = [p for p in parts if p not in self.parts]
        if unknown:
            raise CurateError(f"{self.view}: no part {unknown[0]!r} (parts: {', '.join(self.parts)})")
        return sorted(set(parts), key=lambda p: (self.parts[p].cost, p))

    def part_of(self, column: str) -> str | None:
        column = column.lower()
        return next((p.name for p in self.parts.values() if column in p.columns), None)


@dataclass
class PoolFileRef:
    file: str
    path: Path | str  # a local path, or the URL of a pool file in object storage
    num_rows: int


@dataclass
class BuildResult:
    computed: list[str] = field(default_factory=list)  # files where some part was computed
    skipped: list[str] = field(default_factory=list)  # files with nothing to do
    skeletons: list[str] = field(default_factory=list)  # files given an all-NULL output only
    rows_computed: int = 0  # pool rows for which some part was computed
    rows_total: int = 0
    part_rows: dict = field(default_factory=dict)  # part -> rows computed
    out_dir: Path | None = None
    settings: dict | None = None
    elapsed: float = 0.0


# ---------------------------------------------------------------------------------------------
# identities and metadata


def source_identity(path, storage_options: dict | None = None) -> dict:
    """Size and footer hash of a parquet file (a local path or a URL such as ``s3://...``):
    changes when its content does, survives copies (a pool on S3 and its local copy agree)."""
    size = storage.url_size(path, storage_options)
    tail = storage.read_range(path, max(0, size - 8), size, storage_options)
    footer_len = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
    footer = storage.read_range(path, max(0, size - 8 - footer_len), size, storage_options)
    return {"bytes": size, "footer_sha256": hashlib.sha256(footer).hexdigest()}


def read_output_meta(path: Path, key: bytes) -> dict | None:
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[key])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def recorded_parts(table: CaptionTable, meta: dict) -> dict[str, tuple[dict | None, int]]:
    """``part -> (recorded settings, rows computed)`` of an output's metadata; an output written
    before parts existed counts as every part complete with the settings it records."""
    s = table.comparable(meta["settings"])
    if "parts" in meta:
        # the top-level "settings" (what the computed parts depend on, for people and older
        # readers) must agree with each computed part's own record, or the part counts as stale
        got = meta["parts"] or {}
        out = {}
        for p in table.parts:
            entry = got.get(p) or {}
            own, k = entry.get("settings"), int(entry.get("rows") or 0)
            top = table.part_settings(s, p)
            out[p] = (own if own == top else {"recorded": own, "settings": top}, k)
        return out
    return {p: (table.part_settings(s, p), int(meta["rows"])) for p in table.parts}


@dataclass
class OutputState:
    current: bool  # exists, for this source, row count, schema version and column layout
    parts: dict  # part -> (recorded settings, rows computed), when current


def output_state(table: CaptionTable, out: Path, num_rows: int, source: dict) -> OutputState:
    try:
        schema = pq.read_schema(out)
        meta = json.loads((schema.metadata or {})[table.meta_key])
        ok = (meta.get("source") == source and meta.get("rows") == num_rows
              and (meta.get("settings") or {}).get("schema") == table.schema_version
              and schema.remove_metadata().equals(table.schema))
        return OutputState(True, recorded_parts(table, meta)) if ok else OutputState(False, {})
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return OutputState(False, {})


# ---------------------------------------------------------------------------------------------
# captions


def check_text(texts: pa.Array, src, rows: np.ndarray) -> None:
    """NULL or invalid UTF-8 captions fail with the pool row number (``rows[i]`` of ``texts[i]``)."""
    if texts.null_count:
        row = int(rows[int(np.flatnonzero(~texts.is_valid().to_numpy(zero_copy_only=False))[0])])
        raise TextFeaturesError(f"{src}: row {row}: column text is NULL (DataComp's baselines need a "
                                f"caption string for every sample; drop or fill the row)")
    try:
        texts.validate(full=True)
    except pa.ArrowInvalid:
        for i in range(len(texts)):
            try:
                texts[i].as_py()
            except UnicodeDecodeError as e:
                bad = texts.view(pa.binary())[i].as_py()
                raise TextFeaturesError(f"{src}: row {int(rows[i])}: column text is not valid UTF-8 "
                                        f"({e.reason} at byte {e.start}: {bad[:40]!r})") from None
        raise TextFeaturesError(f"{src}: rows {int(rows[0])}-{int(rows[-1])}: column text is not valid UTF-8") from None


_SAMPLE = 2048


def per_distinct(labels: Callable[[pa.Array], pa.Array], texts: pa.Array) -> pa.Array:
    """``labels(texts)``, each distinct caption computed once (alt-text repeats a lot: "",
    "image", product names); language labels are a pure function of the text."""
    n = len(texts)
    if n > 4 * _SAMPLE:
        # a strided sample says cheaply when captions hardly repeat (real pools: every caption
        # distinct); hashing them all to find out costs ~10% of fastText's own time there
        sample = texts.take(pa.array(np.linspace(0, n - 1, _SAMPLE, dtype=np.int64)))
        if len(pc.unique(sample)) > 0.95 * _SAMPLE:
            return labels(texts)
    distinct = pc.unique(texts)
    if len(distinct) > 0.9 * n:
        return labels(texts)
    return labels(distinct).take(pc.index_in(texts, value_set=distinct))


# ---------------------------------------------------------------------------------------------
# one pool file (a task)


def _as_string(a: pa.Array) -> pa.Array:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    return a if pa.types.is_string(a.type) else a.cast(pa.string())


def _groups(part_rows: dict[str, np.ndarray]) -> list[tuple[np.ndarray, list[str]]]:
    """Parts that need the same rows are computed together (one split of the captions)."""
    groups: list[tuple[np.ndarray, list[str]]] = []
    for p, rows in part_rows.items():
        for g_rows, g_parts in groups:
            if len(g_rows) == len(rows) and np.array_equal(g_rows, rows):
                g_parts.append(p)
                break
        else:
            groups.append((rows, [p]))
    return groups


def _compute_values(pf: pq.ParquetFile, src, table_cols: dict, compute: Callable, settings: dict,
                    part_rows: dict[str, np.ndarray], progress) -> dict[str, dict[str, pa.Array]]:
    """``part -> {column: values for part_rows[part]}``, reading the captions of the rows needed,
    row group by row group (row groups without any are not read)."""
    groups = _groups(part_rows)
    union = groups[0][0] if len(groups) == 1 else np.unique(np.concatenate(list(part_rows.values())))
    chunks: dict[str, dict[str, list]] = {p: {c: [] for c in table_cols[p]} for p in part_rows}
    row0 = 0
    for rg in range(pf.num_row_groups):
        n_rg = pf.metadata.row_group(rg).num_rows
        lo, hi = np.searchsorted(union, [row0, row0 + n_rg])
        if lo == hi:
            row0 += n_rg
            continue
        b0 = row0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=["text"]):
            m = batch.num_rows
            s_lo, s_hi = np.searchsorted(union, [b0, b0 + m])
            if s_lo < s_hi:
                sel = union[s_lo:s_hi]
                texts = _as_string(batch.column(0))
                if len(sel) < m:
                    texts = texts.take(pa.array(sel - b0))
                check_text(texts, src, sel)
                for g_rows, g_parts in groups:
                    g_lo, g_hi = np.searchsorted(g_rows, [b0, b0 + m])
                    if g_lo == g_hi:
                        continue
                    rows = g_rows[g_lo:g_hi]
                    t = texts if len(rows) == len(sel) else texts.take(pa.array(np.searchsorted(sel, rows)))
                    cols = compute(tuple(g_parts), t, settings)
                    for p in g_parts:
                        for c in table_cols[p]:
                            chunks[p][c].append(cols[c])
                    if progress is not None:
                        progress(len(rows) * len(g_parts))
            b0 += m
        row0 += n_rg
    return {p: {c: pa.concat_arrays(v) if v else pa.array([], pa.null()) for c, v in cols.items()}
            for p, cols in chunks.items()}


def _put(col: pa.Array, pos: np.ndarray, new: pa.Array) -> pa.Array:
    """``col`` with ``new[i]`` at position ``pos[i]``."""
    m = len(col)
    if len(pos) == m:
        return new.cast(col.type)
    idx = np.arange(m, dtype=np.int64)
    idx[pos] = m + np.arange(len(pos), dtype=np.int64)
    return pa.concat_arrays([col, new.cast(col.type)]).take(pa.array(idx))


def build_file(compute: Callable, job: dict, progress=None) -> tuple[str, dict[str, int], int]:
    """One pool file: compute ``job["part_rows"]`` (part -> sorted row numbers, None: every row),
    merge them into the existing output (``job["base"]``) or a new all-NULL one, and write it
    atomically; returns ``(file, {part: rows computed}, rows computed)``. A task of
    :func:`curate.engine.map_tasks`: ``compute`` is a :attr:`CaptionTable.compute`."""
    src = job["src"]
    src = src if storage.is_url(src) else Path(src)
    opts = job.get("storage_options")
    with storage.open_input(src, opts) if storage.is_url(src) else contextlib.nullcontext(src) as source:
        return _build_file(source, src, compute, job, progress)


def _build_file(source, src, compute: Callable, job: dict, progress) -> tuple[str, dict[str, int], int]:
    schema: pa.Schema = job["schema"]
    n, out = job["num_rows"], Path(job["out"])
    part_rows = {p: (np.arange(n, dtype=np.int64) if r is None else r) for p, r in job["part_rows"].items()}
    part_rows = {p: r for p, r in part_rows.items() if len(r)}
    try:
        pf = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as e:
        raise TextFeaturesError(f"{src}: not a readable parquet file ({e})") from None
    with pf:
        names = pf.schema_arrow.names
        for col in (["uid"] if not job["base"] else []) + (["text"] if part_rows else []):
            if col not in names:
                raise TextFeaturesError(f"{src}: missing column '{col}'")
        values = (_compute_values(pf, src, job["columns"], compute, job["settings"], part_rows, progress)
                  if part_rows else {})
        counts = {p: job["keep"][p] + (len(part_rows[p]) if p in part_rows else 0) for p in job["columns"]}
        meta = _output_meta(job, counts)
        out_schema = schema.with_metadata({job["meta_key"]: json.dumps(meta).encode()})
        nonnull = dict.fromkeys(job["columns"], 0)
        with atomic_path(out, suffix=".parquet") as tmp:
            with pq.ParquetWriter(tmp, out_schema, compression="zstd", column_encoding={"row": "DELTA_BINARY_PACKED"},
                                  use_dictionary=[c for c in schema.names if c not in _NO_DICTIONARY]) as writer:
                for r0, cols in _base_batches(job, pf, schema):
                    m = len(cols["uid"])
                    for p, pcols in job["columns"].items():
                        if p in values:
                            rows = part_rows[p]
                            lo, hi = np.searchsorted(rows, [r0, r0 + m])
                            if lo < hi:
                                for c in pcols:
                                    cols[c] = _put(cols[c], rows[lo:hi] - r0, values[p][c].slice(lo, hi - lo))
                        nonnull[p] += m - cols[pcols[0]].null_count
                    writer.write_table(pa.table(cols, schema=out_schema))
            if nonnull != counts:  # metadata and values must agree; nothing is renamed otherwise
                raise CurateError(f"{out}: internal error: rows computed per part {nonnull} != recorded {counts}")
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; feature tables are shared data like the pool
    union = np.unique(np.concatenate(list(part_rows.values()))) if len(part_rows) > 1 else \
        next(iter(part_rows.values()), np.empty(0, np.int64))
    return job["file"], {p: len(r) for p, r in part_rows.items()}, len(union)


#: uid (distinct strings) and row (0..n-1) gain nothing from a dictionary (the writer would build
#: one and give it up); row is delta-coded to almost nothing
_NO_DICTIONARY = ("uid", "row")


def _output_meta(job: dict, counts: dict[str, int]) -> dict:
    settings = {"schema": job["schema_version"]}
    for p in job["columns"]:
        if counts[p]:
            settings.update(job["want"][p])
    return {"file": job["file"], "source": job["source"], "settings": settings, "rows": job["num_rows"],
            "parts": {p: {"settings": job["want"][p] if counts[p] else None, "rows": counts[p]} for p in job["columns"]}}


def _base_batches(job: dict, pf: pq.ParquetFile, schema: pa.Schema):
    """``(first row, {column: array})`` batches of the output to merge into: the existing one
    (stale parts NULLed), or ``uid, file, row`` of the pool file with every feature NULL."""
    feature_cols = [c for cols in job["columns"].values() for c in cols]
    reset = {c for p in job["reset"] for c in job["columns"][p]}
    r0 = 0
    if job["base"]:
        with pq.ParquetFile(job["out"]) as base:
            for batch in base.iter_batches(batch_size=BATCH_ROWS, columns=schema.names):
                m = batch.num_rows
                cols = {name: batch.column(i) for i, name in enumerate(schema.names)}
                for c in reset:
                    cols[c] = pa.nulls(m, schema.field(c).type)
                yield r0, cols
                r0 += m
        return
    file = pa.scalar(job["file"], pa.string())
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["uid"]):
        m = batch.num_rows
        cols = {"uid": _as_string(batch.column(0)), "file": pa.repeat(file, m),
                "row": pa.array(np.arange(r0, r0 + m, dtype=np.int64))}
        for c in feature_cols:
            cols[c] = pa.nulls(m, schema.field(c).type)
        yield r0, cols
        r0 += m


# ---------------------------------------------------------------------------------------------
# planning (the driver)


def _pool(catalog: Path, view: str) -> tuple[list[PoolFileRef], Path, bool]:
    con = connect(catalog)
    try:
        rows = con.execute("SELECT file, path, num_rows FROM pool_files ORDER BY file_id").fetchall()
        # a pool in object storage keeps its URLs (resolve_path would make s3:/bucket/... of them)
        files = [PoolFileRef(f, p if storage.is_url(p) else resolve_path(con, p, catalog), n) for f, p, n in rows]
        out_dir = features_dir(con, catalog) / view
        registered = con.execute("SELECT count(*) FROM curate_views WHERE name = ?", [view]).fetchone()[0] > 0
    finally:
        con.close()
    return files, out_dir, registered


def _check_exists(f: PoolFileRef, storage_options) -> None:
    if not (storage.exists(f.path, storage_options) if storage.is_url(f.path) else Path(f.path).is_file()):
        raise CatalogError(f"{f.path}: pool file listed in the catalog is missing")


def _rows_of(rows: dict | None, f: PoolFileRef) -> np.ndarray | None:
    """The rows asked for in pool file ``f`` (None: all), sorted, unique, in range."""
    if rows is None:
        return None
    r = rows.get(f.file)
    if r is None:
        return np.empty(0, np.int64)
    r = np.asarray(r, dtype=np.int64)
    if len(r) > 1 and not np.all(r[1:] > r[:-1]):
        r = np.unique(r)
    if len(r) and (r[0] < 0 or r[-1] >= f.num_rows):
        bad = int(r[0] if r[0] < 0 else r[-1])
        raise CurateError(f"pool file {f.file}: row {bad} out of range (0-{f.num_rows - 1})")
    return r


def _computed_mask(out: Path, column: str) -> np.ndarray:
    col = pq.read_table(out, columns=[column]).column(0)
    return np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)


@dataclass
class _Plan:
    files: list[PoolFileRef]
    out_dir: Path
    registered: bool
    settings: dict
    want: dict  # part -> comparable settings wanted
    jobs: list[dict]
    storage_options: dict | None

    def outputs(self) -> list[Path]:
        return [self.out_dir / f"{f.file}.parquet" for f in self.files]


def _plan(table: CaptionTable, catalog: Path, parts: list[str], rows: dict | None, force: bool = False,
          skeleton_only: bool = False, **options) -> _Plan:
    files, out_dir, registered = _pool(catalog, table.view)
    opts = storage.storage_options_from_env() if any(storage.is_url(f.path) for f in files) else None
    if rows is not None:
        unknown = sorted(set(rows) - {f.file for f in files})
        if unknown:
            raise CurateError(f"{table.view}: {unknown[0]!r} is not a pool file of {catalog}")
    settings, want = {}, {}
    if not skeleton_only:
        # with force, the outputs there are replaced: what they were built with does not matter
        settings = table.settings(out_dir, [] if force else files, **options)
        comparable = table.comparable(settings)
        want = {p: table.part_settings(comparable, p) for p in table.parts}
    columns = {p: list(part.columns) for p, part in table.parts.items()}
    jobs = []
    for f in files:
        _check_exists(f, opts)
        out = out_dir / f"{f.file}.parquet"
        source = source_identity(f.path, opts)
        st = OutputState(False, {}) if force else output_state(table, out, f.num_rows, source)
        if skeleton_only:
            if not st.current:
                jobs.append(_job(table, f, out, source, opts, {}, {}, dict.fromkeys(table.parts, 0), [], False, columns))
            continue
        recorded = st.parts if st.current else {p: (None, 0) for p in table.parts}
        keep, reset = {}, []
        for p, (s, k) in recorded.items():
            if k and s != want[p]:
                reset.append(p)
                k = 0
            keep[p] = k
        asked = _rows_of(rows, f)
        part_rows = {}
        for p in parts:
            k = keep[p]
            if k >= f.num_rows:
                continue
            if asked is None and k == 0:
                part_rows[p] = None  # every row (the task makes the range)
                continue
            need = np.arange(f.num_rows, dtype=np.int64) if asked is None else asked
            if k and len(need):
                need = need[~_computed_mask(out, table.parts[p].columns[0])[need]]
            if len(need):
                part_rows[p] = need
        if st.current and not part_rows:
            continue
        jobs.append(_job(table, f, out, source, opts, settings, want, keep, reset, st.current, columns, part_rows))
    return _Plan(files, out_dir, registered, settings, want, jobs, opts)


def _job(table, f, out, source, opts, settings, want, keep, reset, base, columns, part_rows=None) -> dict:
    return {"src": str(f.path), "file": f.file, "out": str(out), "num_rows": f.num_rows, "source": source,
            "storage_options": opts, "settings": settings, "want": want, "keep": keep, "reset": reset,
            "base": base, "columns": columns, "part_rows": part_rows or {}, "schema": table.schema,
            "schema_version": table.schema_version, "meta_key": table.meta_key}


def _job_size(job: dict) -> int:
    return sum(job["num_rows"] if r is None else len(r) for r in job["part_rows"].values())


def task_engine(captions: int, engine: Engine | None = None) -> Engine:
    """The engine that computes ``captions`` captions: ``engine`` as given, except that a local
    one without a worker count runs small work (fewer than :data:`AUTO_PARALLEL_ROWS`) in this
    process and larger work in one worker process per core."""
    engine = engine or LOCAL
    if engine.distributed or engine.workers is not None:
        return engine
    if warm_workers() is not None:  # started already (see warm_pool): use them, however little the work
        return engine.with_workers(warm_workers())
    # starting a worker (interpreter + models) costs seconds: not worth it for small work
    return engine.with_workers(1 if captions < AUTO_PARALLEL_ROWS else (os.cpu_count() or 1))


def warm_pool(table: CaptionTable, catalog, parts: list[str], captions: int, engine: Engine | None = None,
              **options):
    """A context in which the local worker processes that will compute ``parts`` (at most
    ``captions`` captions) are already starting and loading their models
    (:class:`~curate.engine.WarmPool`), while the caller does other work (restricting rows,
    computing cheap parts in threads); a null context where those parts would not run in local
    worker processes (Arrow parts in threads, Ray, one core, small work)."""
    engine = engine or LOCAL
    heavy = [p for p in table.ordered(parts) if not table.parts[p].threads]
    workers = task_engine(captions, engine).workers or 1
    if not heavy or engine.distributed or workers <= 1:
        return contextlib.nullcontext()
    files, out_dir, _ = _pool(Path(catalog) if catalog else default_catalog(), table.view)
    workers = min(workers, len(files))  # one task per pool file (one file: computed in this process)
    if workers <= 1:
        return contextlib.nullcontext()
    return WarmPool(workers, table.load, (table.settings(out_dir, files, **options), heavy))


# ---------------------------------------------------------------------------------------------
# the API


@contextlib.contextmanager
def build_lock(catalog: Path, view: str, progress: bool = False):
    """One build of ``view``'s outputs at a time (an exclusive ``flock`` on
    ``FEATURES_DIR/.{view}.build.lock``, released however the holder ends, ``kill -9`` included).

    A build reads an output, merges the values it computed and renames the result into place;
    two runs doing that to the same file at once could each drop the other's values (two
    ``curate run`` of filters that need different rows of one table). Under the lock each build
    plans from, and merges into, what the previous one left."""
    import fcntl  # lazy: POSIX only, like the rest of the process handling

    root = _pool(catalog, view)[1].parent  # the features dir: nothing inside the table's own dir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{view}.build.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"{view}: waiting for another build of this table to finish", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_skeleton(table: CaptionTable, catalog, progress: bool = False) -> None:
    """Give every pool file lacking a current output one with ``uid, file, row`` and every
    feature NULL (reads only the pool's uid column; atomic), and register the view if needed.
    Opens the catalog read-write: call it with no connection open."""
    catalog = Path(catalog) if catalog else default_catalog()
    with build_lock(catalog, table.view, progress):
        p = _plan(table, catalog, [], None, skeleton_only=True)
        for _ in map_tasks(build_file, [(table.compute, job) for job in p.jobs], LOCAL,
                           desc=f"{table.view} (skeleton)", progress=progress, unit="file"):
            pass
        if p.jobs or not p.registered:
            register_parquet_view(catalog, table.view, p.outputs())


def _statuses(table: CaptionTable, catalog, parts: list[str], **options) -> tuple[bool, dict, set, int]:
    """``(view registered, {part: {file: (rows computed, pool rows)}}, parts holding stale values,
    number of current outputs)``:
    a part is stale when some output holds values of it that are no longer right (the output's
    source changed, or the part was computed with other settings) -- present, not NULL."""
    catalog = Path(catalog) if catalog else default_catalog()
    files, out_dir, registered = _pool(catalog, table.view)
    opts = storage.storage_options_from_env() if any(storage.is_url(f.path) for f in files) else None
    comparable = table.comparable(table.settings(out_dir, files, **options))
    want = {p: table.part_settings(comparable, p) for p in parts}
    status: dict[str, dict[str, tuple[int, int]]] = {p: {} for p in parts}
    stale: set[str] = set()
    current = 0
    for f in files:
        _check_exists(f, opts)
        out = out_dir / f"{f.file}.parquet"
        st = output_state(table, out, f.num_rows, source_identity(f.path, opts))
        current += bool(st.current)
        for p in parts:
            s, k = st.parts.get(p, (None, 0))
            ok = st.current and k and s == want[p]
            status[p][f.file] = (k if ok else 0, f.num_rows)
            if not ok and (k if st.current else out.exists()):
                stale.add(p)
    return registered, status, stale, current


def part_status(table: CaptionTable, catalog, part: str, **options) -> dict[str, tuple[int, int]]:
    """``file -> (rows computed, pool rows)`` of ``part`` with the settings ``options`` ask for,
    from parquet metadata only (a stale output or part counts 0)."""
    table.ordered([part])
    return _statuses(table, catalog, [part], **options)[1][part]


@dataclass
class Coverage:
    status: dict  # file -> (rows computed, pool rows)
    stale: bool  # some output holds values of the part that are no longer right (see _statuses)
    registered: bool = True  # the view is registered in the catalog
    outputs: int = 0  # pool files with a current output (of any part)

    @property
    def complete(self) -> bool:
        return all(done >= n for done, n in self.status.values())


def part_coverage(table: CaptionTable, catalog, parts: list[str], **options) -> dict[str, Coverage]:
    """:class:`Coverage` of each of ``parts``, from parquet metadata only (one pass over the pool
    files for all of them). Where no part is stale, a NULL value means "not computed" exactly."""
    table.ordered(parts)
    registered, status, stale, outputs = _statuses(table, catalog, parts, **options)
    return {p: Coverage(status[p], p in stale, registered, outputs) for p in parts}


def missing_rows(table: CaptionTable, catalog, parts: list[str], rows: dict[str, np.ndarray] | None = None,
                 **options) -> int:
    """How many (part, row) values :func:`build_parts` with these arguments would compute (rows
    never computed, or computed with other settings); writes nothing."""
    catalog = Path(catalog) if catalog else default_catalog()
    p = _plan(table, catalog, table.ordered(parts), rows, **options)
    return sum(_job_size(job) for job in p.jobs)


def build_parts(table: CaptionTable, catalog, parts: list[str], rows: dict[str, np.ndarray] | None = None,
                engine: Engine | None = None, progress: bool = True, force: bool = False,
                **options) -> BuildResult:
    """Compute ``parts`` (in cost order) for ``rows`` (pool file -> sorted unique int64 row
    numbers; None: every row of every file), skipping rows already computed with the wanted
    settings; every pool file gets an output and the view is registered.

    One task per pool file with work, run where ``engine`` says (None: :func:`task_engine`);
    ``force`` recomputes everything asked for from scratch (existing outputs are replaced).
    Call with no connection to ``catalog`` open (registering the view writes to it).
    """
    t0 = time.perf_counter()
    catalog = Path(catalog) if catalog else default_catalog()
    parts = table.ordered(parts)
    with build_lock(catalog, table.view, progress):
        return _build_parts(table, catalog, parts, rows, engine, progress, force, t0, **options)


def _build_parts(table: CaptionTable, catalog: Path, parts: list[str], rows, engine, progress: bool,
                 force: bool, t0: float, **options) -> BuildResult:
    p = _plan(table, catalog, parts, rows, force, **options)
    res = BuildResult(out_dir=p.out_dir, settings=p.settings, rows_total=sum(f.num_rows for f in p.files),
                      part_rows=dict.fromkeys(parts, 0))
    todo = {job["file"] for job in p.jobs}
    res.skipped = [f.file for f in p.files if f.file not in todo]
    light = [job for job in p.jobs if not job["part_rows"]]
    heavy = [job for job in p.jobs if job["part_rows"]]
    for job in light:  # an all-NULL output (stale parts NULLed): no captions, no models
        build_file(table.compute, job)
        res.skeletons.append(job["file"])
    if heavy:
        sizes = [_job_size(job) for job in heavy]
        threaded = all(table.parts[q].threads for q in parts) and (engine is None or not engine.distributed)
        # cheap parts (Arrow kernels) in threads of this process: no worker start-up, no models
        engine = (engine or LOCAL).with_workers(os.cpu_count() or 1) if threaded else task_engine(sum(sizes), engine)
        if engine.distributed or engine.workers <= 1 or len(heavy) == 1:
            # a bad model fails here, before any output or task (worker processes of a local
            # pool load their own models, so this process does not pay for a copy)
            table.load(p.settings, parts)
        for file, done, n in map_tasks(build_file, [(table.compute, job) for job in heavy], engine,
                                       desc=f"{table.view} ({'+'.join(parts)})", progress=progress,
                                       unit="caption", sizes=sizes, units=True,
                                       start="thread" if threaded else "spawn"):
            res.computed.append(file)
            res.rows_computed += n
            for part, k in done.items():
                res.part_rows[part] += k
        if table.after_build is not None:
            table.after_build(p.out_dir, p.settings)
    if p.jobs or not p.registered:
        register_parquet_view(catalog, table.view, p.outputs())
    res.elapsed = time.perf_counter() - t0
    return res


def build_table(table: CaptionTable, catalog=None, progress: bool = True, force: bool = False,
                engine: Engine | None = None, **options) -> BuildResult:
    """Every part of ``table`` for every row of every pool file (what is missing or stale, or
    everything with ``force``); registers the view."""
    return build_parts(table, catalog, list(table.parts), None, engine=engine, progress=progress, force=force,
                       **options)


class CaptionTableProducer:
    """A :class:`CaptionTable` for :mod:`curate.features.registry` (built by ``curate run`` when
    missing/stale: every part, every row)."""

    def __init__(self, table: CaptionTable, build: Callable, describe: Callable):
        self.table, self.view = table, table.view
        self._build, self._describe = build, describe

    def is_current(self, catalog, params=None) -> bool:
        """Every part computed for every row with the wanted settings, and the view registered."""
        try:
            registered, status, _, _ = _statuses(self.table, catalog, list(self.table.parts))
        except CurateError:
            return False
        return registered and all(k == n for st in status.values() for k, n in st.values())

    def build(self, catalog, params=None, progress: bool = True) -> None:
        res = self._build(catalog, progress=progress)
        if progress:
            print(f"{self.view}: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions), "
                  f"{len(res.skipped)} up to date, in {res.elapsed:.1f}s", file=sys.stderr, flush=True)

    def describe(self, catalog, params=None) -> dict:
        """What produced the table (for run manifests): per part its settings and rows computed
        of the pool's; the models and word lists; the files."""
        catalog = Path(catalog) if catalog else default_catalog()
        files, out_dir, _ = _pool(catalog, self.view)
        metas = [(f, read_output_meta(out_dir / f"{f.file}.parquet", self.table.meta_key)) for f in files]
        metas = [(f, m) for f, m in metas if m]
        if not metas:
            return {"dir": str(out_dir), "files": 0}
        parts: dict[str, dict] = {}
        merged: dict = {}
        for p in self.table.parts:
            seen = []
            rows = 0
            for f, m in metas:
                s, k = recorded_parts(self.table, m)[p]
                if k:
                    rows += k
                    if s not in seen:
                        seen.append(s)
            parts[p] = {"settings": seen[0] if seen else None, "rows": rows,
                        "of": sum(f.num_rows for f in files), "mixed_settings": len(seen) > 1}
            merged.update(seen[0] if seen else {})
        return {"dir": str(out_dir), "files": len(metas), "rows": sum(m["rows"] for _, m in metas),
                **self._describe(merged), "parts": parts,
                "mixed_settings": any(v["mixed_settings"] for v in parts.values())}
