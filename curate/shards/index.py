"""The shard index: where each sample of a webdataset pool sits.

A *shard* is a webdataset tar (img2dataset's ``{:08d}.tar`` with ``KEY.jpg/.txt/.json``, or one
of our reshard outputs with ``{uid}-{j}.*``). A *sample* is a run of consecutive members that
share a key (webdataset's grouping rule: key = basename up to its first dot); tars are read by
:mod:`curate.shards.tar`. The *shard index* records, for every sample, the tar it is in, its
byte range (first header to the end of its last member's padded data), whether it has a
``json`` member, and its uid as two uint64 halves. The uid is the ``uid`` field of the
sample's ``json``, as DataComp's resharder reads it; a sample without a json takes it from
img2dataset's per-shard parquet (``key -> uid``) when there is one. Building the index reads
tar *headers* and the small json members, once; it is stored in the catalog (tables
``shard_files`` and ``shard_index``) so that resharding can plan from it and read only the
byte ranges of selected samples (:func:`index_for` makes a reshard's planning tables from it,
scanning the tars the catalog does not cover).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.catalog.connection import connect, recorded_shards_dir, sql_literal
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.shards.tar import ShardError, ShardScan, scan_tar
from curate.uids import hex_array_to_pairs, hex_to_pair

INDEX_SCHEMA = pa.schema([
    ("shard_id", pa.int32()),
    ("key", pa.string()),
    ("uid_hi", pa.uint64()),
    ("uid_lo", pa.uint64()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
    ("has_json", pa.bool_()),
])
FILES_SCHEMA = pa.schema([
    ("shard_id", pa.int32()),
    ("root", pa.string()),
    ("name", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("samples", pa.int64()),
    ("truncated", pa.bool_()),  # cut inside a member or before its end blocks; its last sample is left out
    ("has_stats", pa.bool_()),
    ("no_uid", pa.int64()),  # samples whose uid could not be read (no json, no parquet row)
])


# ---------------------------------------------------------------------------------- scanning

def _uid_pairs(values: list) -> list[tuple[int, int] | None]:
    """The (hi, lo) of each value that is a uid (32 hex characters), None for any other value."""
    cand = [u if isinstance(u, str) and len(u) == 32 else None for u in values]
    strs = [u for u in cand if u is not None]
    try:
        hi, lo = hex_array_to_pairs(pa.array(strs, pa.string()))
    except CurateError:  # some value is not a uid: parse one by one, keeping the good ones
        pairs = []
        for u in strs:
            try:
                pairs.append(hex_to_pair(u))
            except CurateError:
                pairs.append(None)
    else:
        pairs = list(zip(hi.tolist(), lo.tolist()))
    it = iter(pairs)
    return [None if u is None else next(it) for u in cand]


def _uids_from_parquet(pq_path: Path, keys: list[str]):
    """img2dataset's per-shard parquet maps key -> uid; None if it has no such columns."""
    try:
        t = pq.read_table(pq_path, columns=["key", "uid"])
    except Exception:  # noqa: BLE001 - no parquet, or one without key/uid: fall back to the json
        return None
    m = dict(zip(t.column("key").to_pylist(), t.column("uid").to_pylist()))
    return _uid_pairs([m.get(os.path.basename(k)) for k in keys])


def scan_shard(path: str | os.PathLike) -> tuple[ShardScan, list]:
    """Scan a tar and find each sample's uid.

    The sample's json is authoritative (DataComp's resharder reads ``json["uid"]``); for samples
    without a json, img2dataset's per-shard parquet (``key -> uid``) still tells which uid the
    sample was, so a subset entry for it is reported as "no json" rather than "absent".
    """
    scan = scan_tar(path)
    path = Path(path)
    found = []  # the json's uid field of each sample (None: no json, not JSON, no uid)
    with open(path, "rb") as f:
        for at in scan.json_at:
            if at is None:
                found.append(None)
                continue
            try:
                d = json.loads(os.pread(f.fileno(), at[1], at[0]))
            except (ValueError, UnicodeDecodeError):
                found.append(None)
                continue
            found.append(d.get("uid") if isinstance(d, dict) else None)
    uids = _uid_pairs(found)
    if not all(scan.has_json) and path.with_suffix(".parquet").is_file():
        from_parquet = _uids_from_parquet(path.with_suffix(".parquet"), scan.keys)
        if from_parquet is not None:
            uids = [u if has else p for u, has, p in zip(uids, scan.has_json, from_parquet)]
    return scan, uids


def list_tars(root: Path, required: bool = True) -> list[Path]:
    """The ``*.tar`` files of a shard directory, by name; none at all is an error unless allowed."""
    if not root.is_dir():
        raise ShardError(f"{root}: shard directory not found")
    tars = sorted(p for p in root.iterdir() if p.name.endswith(".tar") and not p.name.startswith("."))
    if required and not tars:
        raise ShardError(f"{root}: no .tar shards in this directory")
    return tars


def scan_to_tables(scans, first_id: int, root: Path) -> tuple[pa.Table, pa.Table]:
    """Index rows for a list of (ShardScan, uids) (shard ids from ``first_id`` in list order)."""
    files, parts = [], []
    for i, (scan, uids) in enumerate(scans):
        sid = first_id + i
        n = len(scan.keys)
        ok = [u is not None for u in uids]
        hi = pa.array([u[0] if u else None for u in uids], pa.uint64())
        lo = pa.array([u[1] if u else None for u in uids], pa.uint64())
        parts.append(pa.table({
            "shard_id": pa.array(np.full(n, sid, np.int32)),
            "key": pa.array(scan.keys, pa.string()),
            "uid_hi": hi, "uid_lo": lo,
            "offset": pa.array(scan.offsets, pa.int64()),
            "length": pa.array(scan.lengths, pa.int64()),
            "has_json": pa.array(scan.has_json, pa.bool_()),
        }, schema=INDEX_SCHEMA))
        stats = scan.path.with_name(scan.path.name[: -len(".tar")] + "_stats.json")
        files.append({"shard_id": sid, "root": str(root), "name": scan.path.name, "size": scan.size,
                      "mtime_ns": scan.mtime_ns, "samples": n, "truncated": scan.truncated,
                      "has_stats": stats.is_file(), "no_uid": n - sum(ok)})
    index = pa.concat_tables(parts) if parts else INDEX_SCHEMA.empty_table()
    return pa.Table.from_pylist(files, schema=FILES_SCHEMA), index


def scan_paths(paths: list[Path], workers: int = 1, progress: bool = False):
    """Scan tars (in ``workers`` local processes when more than one), keeping the input order."""
    return list(map_tasks(scan_shard, [(p,) for p in paths], Engine(workers=max(1, workers)),
                          desc="index shards", unit="tar", progress=progress, start="fork"))


def build_index(root: str | os.PathLike, workers: int = 1, progress: bool = False,
                first_id: int = 0) -> tuple[pa.Table, pa.Table]:
    """Index every ``*.tar`` of a shard directory: ``(shard_files, shard_index)`` Arrow tables."""
    root = Path(root).resolve()
    tars = list_tars(root)
    return scan_to_tables(scan_paths(tars, workers, progress), first_id, root)


# ------------------------------------------------------------------------------ catalog tables

_DDL = (
    "CREATE TABLE IF NOT EXISTS shard_files (shard_id INTEGER PRIMARY KEY, root VARCHAR, name VARCHAR,"
    " size BIGINT, mtime_ns BIGINT, samples BIGINT, truncated BOOLEAN, has_stats BOOLEAN, no_uid BIGINT);"
    "CREATE TABLE IF NOT EXISTS shard_index (shard_id INTEGER, key VARCHAR, uid_hi UBIGINT,"
    " uid_lo UBIGINT, \"offset\" BIGINT, length BIGINT, has_json BOOLEAN)"
)


@dataclass
class IndexResult:
    root: Path
    tars: int
    scanned: int  # tars (re)scanned now; the others were indexed already and unchanged
    samples: int
    truncated: list[str]
    without_stats: list[str]
    no_uid: int


def index_catalog(catalog: str | os.PathLike, shards_dir: str | os.PathLike | None = None,
                  workers: int = 2, progress: bool = False) -> IndexResult:
    """Build or refresh the shard index of ``shards_dir`` (default: the catalog's shards dir).

    Tars already indexed with the same size and mtime are kept; new or changed tars are scanned;
    rows of tars that disappeared are dropped. Opens the catalog read-write.
    """
    catalog = Path(catalog)
    if not catalog.is_file():
        raise ShardError(f"{catalog}: catalog not found")
    con = connect(catalog, read_only=False)
    try:
        if shards_dir is None:
            shards_dir = recorded_shards_dir(con, catalog)
            if shards_dir is None:
                raise ShardError(f"{catalog}: no shards dir recorded; pass --shards DIR")
        root = Path(shards_dir).resolve()
        tars = list_tars(root)
        con.execute(_DDL)
        known = {name: (sid, size, mt) for sid, name, size, mt in con.execute(
            "SELECT shard_id, name, size, mtime_ns FROM shard_files WHERE root = ?", [str(root)]).fetchall()}
        todo, keep = [], set()
        for p in tars:
            st = p.stat()
            k = known.get(p.name)
            if k and k[1] == st.st_size and k[2] == st.st_mtime_ns:
                keep.add(k[0])
            else:
                todo.append(p)
        drop = [sid for sid, _, _ in known.values() if sid not in keep]
        scans = scan_paths(todo, workers, progress)
        (next_id,) = con.execute("SELECT coalesce(max(shard_id) + 1, 0) FROM shard_files").fetchone()
        files, index = scan_to_tables(scans, int(next_id), root)
        con.execute("BEGIN")
        if drop:
            con.execute("DELETE FROM shard_index WHERE shard_id IN (SELECT unnest(?::INTEGER[]))", [drop])
            con.execute("DELETE FROM shard_files WHERE shard_id IN (SELECT unnest(?::INTEGER[]))", [drop])
        con.register("new_files", files)
        con.register("new_index", index)
        con.execute("INSERT INTO shard_files SELECT * FROM new_files")
        con.execute("INSERT INTO shard_index SELECT * FROM new_index")
        con.execute("COMMIT")
        rows = con.execute(
            "SELECT name, samples, truncated, has_stats, no_uid, size FROM shard_files WHERE root = ? ORDER BY name",
            [str(root)]).fetchall()
    finally:
        con.close()
    return IndexResult(root, len(rows), len(todo), sum(r[1] for r in rows),
                       [f"{r[0]} (ends at byte {r[5]})" for r in rows if r[2]], [r[0] for r in rows if not r[3]],
                       sum(r[4] for r in rows))


def index_for(con: duckdb.DuckDBPyConnection, roots: list[Path], catalog: str | os.PathLike | None = None,
              workers: int = 1, progress: bool = False) -> dict:
    """Make ``plan_files`` (temp table) and ``plan_index`` (temp view) on ``con`` for ``roots``.

    The catalog is attached read-only and its shard index is used in place (not copied, so
    memory does not grow with the pool) for tars whose size and mtime are unchanged; tars it
    does not cover, or that changed, are scanned now. Shard ids are renumbered 0..n-1 in
    (root, tar name) order. Returns counts of what was used.
    """
    attached = False
    if catalog is not None and Path(catalog).is_file():
        con.execute(f"ATTACH {sql_literal(str(Path(catalog).resolve()))} AS curate_cat (READ_ONLY)")
        attached = bool(con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'curate_cat' "
            "AND table_name = 'shard_index'").fetchone()[0])
    catalog_files = con.execute("SELECT * FROM curate_cat.shard_files").fetchall() if attached else []
    files_rows, old_ids, new_ids, scanned_parts = [], [], [], []
    next_id = 0
    for root in roots:
        root = Path(root).resolve()
        tars = list_tars(root)
        known = {}
        if attached:
            # filtered in Python: shard_files is small, and a first bound parameter makes the
            # duckdb module import pandas (over a second per process)
            known = {r[2]: r for r in catalog_files if r[1] == str(root)}
        todo = []
        for p in tars:
            st = p.stat()
            k = known.get(p.name)
            if k and k[3] == st.st_size and k[4] == st.st_mtime_ns:
                files_rows.append({"shard_id": next_id, "root": str(root), "name": p.name, "size": k[3],
                                   "mtime_ns": k[4], "samples": k[5], "truncated": k[6], "has_stats": k[7],
                                   "no_uid": k[8]})
                old_ids.append(k[0])
                new_ids.append(next_id)
            else:
                todo.append((p, next_id, len(files_rows)))
                files_rows.append(None)  # filled in after the scan
            next_id += 1
        for (p, sid, pos), scan in zip(todo, scan_paths([t[0] for t in todo], workers, progress)):
            f, ix = scan_to_tables([scan], sid, root)
            files_rows[pos] = f.to_pylist()[0]
            scanned_parts.append(ix)
    files = pa.Table.from_pylist(files_rows, schema=FILES_SCHEMA)
    scanned = pa.concat_tables(scanned_parts) if scanned_parts else INDEX_SCHEMA.empty_table()
    idmap = pa.table({"old_id": pa.array(old_ids, pa.int32()), "new_id": pa.array(new_ids, pa.int32())})
    for name, table in (("plan_files", files), ("plan_scanned", scanned), ("plan_idmap", idmap)):
        con.register("_arrow_in", table)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM _arrow_in")
        con.unregister("_arrow_in")
    cols = 'key, uid_hi, uid_lo, "offset", length, has_json'
    from_catalog = (f"SELECT m.new_id AS shard_id, {cols} FROM curate_cat.shard_index i "
                    f"JOIN plan_idmap m ON i.shard_id = m.old_id UNION ALL " if attached else "")
    con.execute(f"CREATE OR REPLACE TEMP VIEW plan_index AS {from_catalog}SELECT shard_id, {cols} FROM plan_scanned")
    return {"tars": files.num_rows, "from_catalog": len(old_ids), "scanned": len(scanned_parts)}
