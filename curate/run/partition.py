"""One partition = one pool parquet file, rebuilt on a worker with the catalog's own view SQL.

A worker does not open the catalog file (it may live on another machine). The driver ships a
:class:`PoolContext`: the catalog's small tables (``curate_meta``, ``pool_files``,
``curate_views``) with absolute paths or URLs, and the filter's variables with their DuckDB
types. The worker creates them in an in-memory DuckDB, runs ``sql/catalog/*.sql`` with the pool
file list cut down to its one file — the very SQL ``curate catalog init`` runs, so ``pool``
has the same columns, ``file`` and ``row`` — and re-creates the producers' parquet views.
Remote paths are read through fsspec (:mod:`curate.storage`).

A filter partition writes its selected uids as a sorted subset file (``part-NNNNN.npy``) and
then a small JSON marker with its count and a histogram of uid prefixes; the marker is the
"done" flag a restarted run looks for.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from curate import storage
from curate.catalog.connection import catalog_meta, create_views, parquet_view_sql, sandbox, sql_identifier, sql_literal
from curate.errors import CurateError
from curate.run.query import denied_path, filter_error, locate_bad_uid, one_line, substitute_subsets
from curate.run.ray_threshold import partition_histogram, score_batches
from curate.subset import NPY_HEADER_LEN
from curate.uids import SUBSET_DTYPE, BadUid, hex_array_to_records, sort_records

#: uid prefix bits used to cut the sorted output into buckets (4,096 prefixes)
PREFIX_BITS = 12
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TYPE = re.compile(r"[A-Za-z0-9_(), \[\]]+\Z")


@dataclass
class PoolContext:
    meta: list[tuple[str, str | None]]
    files: list[tuple]  # pool_files rows, paths absolute or URLs
    extra_columns: list[str]
    views: list[tuple[str, str, list[str], str | None]]  # curate_views rows, paths absolute
    variables: list[tuple[str, str, object]] = field(default_factory=list)  # name, DuckDB type, value
    storage_options: dict | None = None
    threads: int = 1
    partitioned_views: list[str] = field(default_factory=list)  # views with a `file` column
    cwd: str = field(default_factory=os.getcwd)  # the driver's: relative read_subset() paths

    def file_row(self, file_id: int) -> tuple:
        for row in self.files:
            if row[0] == file_id:
                return row
        raise CurateError(f"pool file id {file_id} is not in the catalog")


def _absolute(stored: str | None, base: Path | None) -> str | None:
    if stored is None or base is None or storage.is_url(stored) or Path(stored).is_absolute():
        return stored
    return str(base / stored)


def pool_context(con, catalog, storage_options: dict | None = None, threads: int = 1) -> PoolContext:
    """What a worker needs, read from an open catalog connection on the driver."""
    meta = catalog_meta(con)
    base = Path(catalog).resolve().parent if meta.get("paths") == "relative" else None
    files = [
        (fid, name, _absolute(path, base), n, start, _absolute(npz, base), shard)
        for fid, name, path, n, start, npz, shard in con.execute(
            "SELECT file_id, file, path, num_rows, row_start, npz, first_shard FROM pool_files ORDER BY file_id"
        ).fetchall()
    ]
    extra = [v for k, v in sorted(meta.items()) if k.startswith("extra_column:")]
    views = [(name, select_sql, [_absolute(p, base) for p in paths], options)
             for name, select_sql, paths, options in con.execute("SELECT * FROM curate_views").fetchall()]
    return PoolContext(sorted(meta.items()), files, extra, views, [], storage_options, threads)


def file_keyed_views(con, names) -> list[str]:
    """The views among ``names`` that have a ``file`` column (the pool file stem, by convention):
    a partition sees only its own file's rows of them."""
    out = []
    for name in names:
        try:
            cols = [r[0] for r in con.execute(f"DESCRIBE {sql_identifier(name)}").fetchall()]
        except duckdb.Error:
            continue  # a view that cannot bind fails the query itself, with DuckDB's message
        if "file" in cols:
            out.append(name)
    return out


def check_variable(name: str, typ: str) -> None:
    """A variable a worker can re-create with ``SET VARIABLE name = CAST(? AS typ)``, or a CurateError."""
    if not _IDENT.match(name) or not _TYPE.match(typ):
        raise CurateError(f"variable {name!r} of type {typ}: cannot be passed to the ray engine's workers")


def capture_variables(con) -> list[tuple[str, str, object]]:
    """The connection's variables with their DuckDB types, so a worker gets identical values."""
    out = []
    for name, typ in con.execute("SELECT name, type FROM duckdb_variables() ORDER BY name").fetchall():
        check_variable(name, typ)
        value = con.execute("SELECT getvariable(?)", [name]).fetchone()[0]
        out.append((name, typ, value))
    return out


def open_partition(ctx: PoolContext, file_id: int) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB whose ``pool`` is the one pool file ``file_id``."""
    row = ctx.file_row(file_id)
    con = duckdb.connect()
    con.execute(f"SET threads = {int(ctx.threads)}")
    storage.register_filesystems(con, [row[2], *(p for v in ctx.views for p in v[2])], ctx.storage_options)
    con.execute("CREATE TABLE curate_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("CREATE TABLE pool_files (file_id INTEGER PRIMARY KEY, file VARCHAR UNIQUE, path VARCHAR,"
                " num_rows BIGINT, row_start BIGINT, npz VARCHAR, first_shard INTEGER)")
    con.execute("CREATE TABLE curate_views (name VARCHAR PRIMARY KEY, select_sql VARCHAR, paths VARCHAR[],"
                " options VARCHAR)")
    if ctx.meta:
        con.executemany("INSERT INTO curate_meta VALUES (?, ?)", ctx.meta)
    con.executemany("INSERT INTO pool_files VALUES (?, ?, ?, ?, ?, ?, ?)", ctx.files)
    if ctx.views:
        con.executemany("INSERT INTO curate_views VALUES (?, ?, ?, ?)", ctx.views)
    values = {
        "pool_files": "[" + sql_literal(row[2]) + "]",
        "extra_columns": "".join(f"{sql_identifier(c)}, " for c in ctx.extra_columns),
    }
    try:
        create_views(con, values, temp=False)
        for name, select_sql, paths, options in ctx.views:
            if name in ctx.partitioned_views:
                # this partition's rows only; the stem is catalog data, quoted like DDL paths
                hidden = f"__curate_all_{name}"
                con.execute(parquet_view_sql(hidden, select_sql, paths, options, temp=False))
                con.execute(f"CREATE VIEW {sql_identifier(name)} AS SELECT * FROM {sql_identifier(hidden)} "
                            f"WHERE file = {sql_literal(row[1])}")
            else:
                con.execute(parquet_view_sql(name, select_sql, paths, options, temp=False))
    except duckdb.Error as e:
        raise CurateError(f"{row[2]}: cannot open pool file ({one_line(e)})") from None
    for name, typ, value in ctx.variables:
        # name and type were checked against identifier/type patterns; the value is bound
        con.execute(f"SET VARIABLE {name} = CAST(? AS {typ})", [value])
    # the filter reads this pool file and the feature views' files, nothing else (docs/safety.md)
    sandbox(con, [row[2], *(p for v in ctx.views for p in v[2])])
    return con


def threshold_pass(ctx: PoolContext, file_id: int, score_sql: str, level: int, prefix: int | None):
    """One radix-select pass of :mod:`curate.run.ray_threshold` over one pool file."""
    con = open_partition(ctx, file_id)
    try:
        return partition_histogram(score_batches(con, score_sql), level, prefix)
    except duckdb.Error as e:
        raise CurateError(f"{ctx.file_row(file_id)[2]}: fraction_threshold({score_sql}, ...): {one_line(e)}") from None
    finally:
        con.close()


def filter_partition(ctx: PoolContext, file_id: int, query: str, params: dict, filter_name: str,
                     run_path: str, marker_path: str, crash_once: str | None = None) -> dict:
    """Run the (row-local) filter query on one pool file; write its sorted run and marker."""
    if storage.exists(marker_path, ctx.storage_options):
        return storage.read_json(marker_path, ctx.storage_options)
    if crash_once and not os.path.exists(crash_once):
        # fault-injection for tests: kill this worker process once, as a machine loss would
        Path(crash_once).write_text(str(os.getpid()))
        os._exit(1)
    t0 = time.perf_counter()
    row = ctx.file_row(file_id)
    con = open_partition(ctx, file_id)
    try:
        # read_subset('rel/path.npy') means relative to where the user ran curate
        with contextlib.chdir(ctx.cwd) if os.path.isdir(ctx.cwd) else contextlib.nullcontext():
            q = substitute_subsets(query, con, params, {})
        parts = []
        try:
            for batch in con.execute(q).fetch_record_batch(1 << 20):
                try:
                    parts.append(hex_array_to_records(batch.column(0)))
                except BadUid as e:
                    raise locate_bad_uid(con, e, Path(filter_name)) from None
        except duckdb.Error as e:
            if denied_path(e) is not None:
                raise filter_error(filter_name, e) from None
            raise CurateError(f"{filter_name}: on pool file {row[2]}: {one_line(e)}") from None
    finally:
        con.close()
    rec = sort_records(np.concatenate(parts) if parts else np.empty(0, SUBSET_DTYPE))
    with storage.open_output(run_path, ctx.storage_options) as f:
        np.save(f, rec, allow_pickle=False)
    hi = rec["f0"]
    prefixes = np.bincount((hi >> np.uint64(64 - PREFIX_BITS)).astype(np.int64), minlength=1 << PREFIX_BITS)
    marker = {
        "file_id": file_id,
        "file": row[1],
        "run": run_path,
        "count": int(len(hi)),
        "header_bytes": NPY_HEADER_LEN,  # np.save's header of a subset (curate.subset.npy_header)
        "prefix_counts": prefixes.tolist(),
        "seconds": round(time.perf_counter() - t0, 4),  # inside the task: scaling benches use it
    }
    storage.write_json(marker_path, marker, ctx.storage_options)
    return marker
