"""The shard layout: where each sample of a webdataset pool sits, and whether a shard dir is sound.

A *shard* is a webdataset tar (img2dataset's ``{:08d}.tar`` with ``KEY.jpg/.txt/.json``, or one
of our reshard outputs with ``{uid}-{j}.*``). A *sample* is a run of consecutive members that
share a key (webdataset's grouping rule: key = basename up to its first dot). The *shard index*
records, for every sample, the tar it is in, its byte range (first header to the end of its last
member's padded data), whether it has a ``json`` member, and its uid as two uint64 halves. The
uid comes from img2dataset's per-shard parquet (``key -> uid``) when present, else from the
sample's ``json`` (``uid`` field, as DataComp's resharder reads it). Building the index reads
tar *headers* only (plus the small json members when there is no parquet), once; it is stored
in the catalog (tables ``shard_files`` and ``shard_index``) so that resharding can plan from it
and read only the byte ranges of selected samples.

``verify_dir`` checks a shard directory the way a trainer will use it: every tar parses to its
end, per-tar sample counts match ``_stats.json`` and ``sizes.json``, keys are well-formed, and
for a reshard output the totals agree with ``meta.json`` and ``sample_ids.npy``.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError

BLOCK = 512
_ZERO = bytes(BLOCK)
# webdataset's split of a member path into (key, extension): key ends at the basename's first dot
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_UID_KEY = re.compile(r"^[0-9a-f]{32}-[0-9]+$")
_IMG2DATASET_KEY = re.compile(r"^[0-9]+$")

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
    ("truncated", pa.bool_()),  # the tar ends inside a member; the incomplete sample is left out
    ("has_stats", pa.bool_()),
    ("no_uid", pa.int64()),  # samples whose uid could not be read (no json, no parquet row)
])


class ShardError(CurateError):
    """A shard or shard directory that cannot be used as it is."""


# ----------------------------------------------------------------------------------- tar headers

def _octal(field: bytes, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise ShardError(f"{where}: corrupt tar header (size field {field!r})") from None


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        rec = data[sp + 1 : pos + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


@dataclass
class TarEntry:
    """One regular member: its name, where its header chain starts and where its data is."""

    name: str
    start: int  # offset of the first header block belonging to it (PAX / GNU long name included)
    data: int  # offset of its data
    size: int

    @property
    def end(self) -> int:  # end of its data padded to a block
        return self.data + -(-self.size // BLOCK) * BLOCK


def walk_tar(read, start: int, end: int, where: str, check: bool = True):
    """Yield the regular members of tar bytes in ``[start, end)``; ``read(offset, n)`` gives bytes.

    Stops at the end-of-archive block or at ``end``. ``check=False`` skips header checksums (for
    bytes already checked when the shard was indexed). Returns (as the generator's value) the
    offset where parsing stopped and whether the data ran out inside a member (a truncated tar).
    """
    pos = start
    pending_name, chain_start = None, None
    pax: dict[str, str] = {}
    while pos + BLOCK <= end:
        h = bytes(read(pos, BLOCK))
        if len(h) < BLOCK:
            return pos, True
        if h == _ZERO:
            return pos, False
        if check and _octal(h[148:156], where) != sum(h) - sum(h[148:156]) + 256:
            raise ShardError(f"{where}: corrupt tar header at byte {pos} (bad checksum)")
        size = _octal(h[124:136], where)
        flag = h[156:157]
        data = pos + BLOCK
        nxt = data + -(-size // BLOCK) * BLOCK
        if chain_start is None:
            chain_start = pos
        if flag in (b"x", b"L", b"g"):
            if data + size > end:
                return pos, True
            body = bytes(read(data, size))
            if flag == b"x":
                pax = _pax_records(body)
            elif flag == b"L":
                pending_name = body.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                chain_start = None  # a global header belongs to no member
            pos = nxt
            continue
        name = h[0:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar":
            prefix = h[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        name = pending_name or pax.get("path") or name.decode("utf-8", "replace")
        if "size" in pax:
            size = int(pax["size"])
            nxt = data + -(-size // BLOCK) * BLOCK
        if data + size > end:
            return pos if chain_start is None else chain_start, True
        if flag in (b"0", b"\0", b"7"):
            yield TarEntry(name, chain_start, data, size)
        pending_name, chain_start, pax = None, None, {}
        pos = nxt
    return pos, pos < end


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's (key, extension) of a member path; (None, None) if it has no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def group_samples(entries):
    """Group consecutive members with the same key into samples: yields (key, [(TarEntry, ext)])."""
    key, members = None, []
    for e in entries:
        k, ext = split_key(e.name)
        if k is None or os.path.basename(e.name).startswith("__"):
            continue
        if k != key and members:
            yield key, members
            members = []
        key = k
        members.append((e, ext))
    if members:
        yield key, members


# ---------------------------------------------------------------------------------- scanning

@dataclass
class ShardScan:
    path: Path
    size: int
    mtime_ns: int
    keys: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    has_json: list = field(default_factory=list)
    json_at: list = field(default_factory=list)  # (data offset, size) of the json member or None
    truncated: bool = False


def scan_tar(path: str | os.PathLike) -> ShardScan:
    """Read the headers of one tar and list its samples with their byte ranges."""
    path = Path(path)
    st = path.stat()
    scan = ShardScan(path, st.st_size, st.st_mtime_ns)
    with open(path, "rb") as f:
        fd = f.fileno()

        def read(off, n):
            return os.pread(fd, n, off)

        gen = walk_tar(read, 0, st.st_size, str(path))
        entries = []
        try:
            while True:
                entries.append(next(gen))
        except StopIteration as stop:
            _, scan.truncated = stop.value if stop.value else (0, False)
    samples = list(group_samples(entries))
    if scan.truncated and samples:
        # the member the tar ends in belongs to the next sample or to the last one we saw; a
        # sample whose later members were cut off must not be copied as if complete
        samples.pop()
    for key, members in samples:
        js = next((m for m, ext in members if ext == "json"), None)
        scan.keys.append(key)
        scan.offsets.append(members[0][0].start)
        scan.lengths.append(members[-1][0].end - members[0][0].start)
        scan.has_json.append(js is not None)
        scan.json_at.append((js.data, js.size) if js is not None else None)
    return scan


def _uids_from_parquet(pq_path: Path, keys: list[str]):
    """img2dataset's per-shard parquet maps key -> uid; None if it has no such columns."""
    try:
        t = pq.read_table(pq_path, columns=["key", "uid"])
    except Exception:  # noqa: BLE001 - no parquet, or one without key/uid: fall back to the json
        return None
    from curate.uids import hex_to_pair

    m = dict(zip(t.column("key").to_pylist(), t.column("uid").to_pylist()))
    out = []
    for k in keys:
        u = m.get(os.path.basename(k))
        try:
            out.append(hex_to_pair(u) if isinstance(u, str) else None)
        except CurateError:
            out.append(None)
    return out


def _uid_pair(u) -> tuple[int, int] | None:
    if not isinstance(u, str) or len(u) != 32:
        return None
    try:
        v = int(u, 16)
    except ValueError:
        return None
    return v >> 64, v & 0xFFFFFFFFFFFFFFFF


def scan_shard(path: str | os.PathLike) -> tuple[ShardScan, list]:
    """Scan a tar and find each sample's uid.

    The sample's json is authoritative (DataComp's resharder reads ``json["uid"]``); for samples
    without a json, img2dataset's per-shard parquet (``key -> uid``) still tells which uid the
    sample was, so a subset entry for it is reported as "no json" rather than "absent".
    """
    scan = scan_tar(path)
    path = Path(path)
    uids = []
    with open(path, "rb") as f:
        for at in scan.json_at:
            if at is None:
                uids.append(None)
                continue
            try:
                d = json.loads(os.pread(f.fileno(), at[1], at[0]))
            except (ValueError, UnicodeDecodeError):
                uids.append(None)
                continue
            uids.append(_uid_pair(d.get("uid")) if isinstance(d, dict) else None)
    if not all(scan.has_json) and path.with_suffix(".parquet").is_file():
        from_parquet = _uids_from_parquet(path.with_suffix(".parquet"), scan.keys)
        if from_parquet is not None:
            uids = [u if has else p for u, has, p in zip(uids, scan.has_json, from_parquet)]
    return scan, uids


def _scan_job(args):
    path = args
    return scan_shard(path)


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
    """Scan tars (in parallel when ``workers > 1``), keeping the input order."""
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="index shards", unit="tar", disable=not progress)
    out = []
    if workers > 1 and len(paths) > 1:
        with ProcessPoolExecutor(workers) as ex:
            for r in ex.map(_scan_job, paths, chunksize=1):
                out.append(r)
                bar.update()
    else:
        for p in paths:
            out.append(scan_shard(p))
            bar.update()
    bar.close()
    return out


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
    from curate.catalog.connection import catalog_meta, resolve_path

    catalog = Path(catalog)
    if not catalog.is_file():
        raise ShardError(f"{catalog}: catalog not found")
    con = duckdb.connect(str(catalog))
    try:
        if shards_dir is None:
            stored = catalog_meta(con).get("shards_dir")
            if not stored:
                raise ShardError(f"{catalog}: no shards dir recorded; pass --shards DIR")
            shards_dir = resolve_path(con, stored, catalog)
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
            "SELECT name, samples, truncated, has_stats, no_uid FROM shard_files WHERE root = ? ORDER BY name",
            [str(root)]).fetchall()
    finally:
        con.close()
    return IndexResult(root, len(rows), len(todo), sum(r[1] for r in rows),
                       [r[0] for r in rows if r[2]], [r[0] for r in rows if not r[3]], sum(r[4] for r in rows))


def index_for(con: duckdb.DuckDBPyConnection, roots: list[Path], catalog: str | os.PathLike | None = None,
              workers: int = 1, progress: bool = False) -> dict:
    """Make ``plan_files`` (temp table) and ``plan_index`` (temp view) on ``con`` for ``roots``.

    The catalog is attached read-only and its shard index is used in place (not copied, so
    memory does not grow with the pool) for tars whose size and mtime are unchanged; tars it
    does not cover, or that changed, are scanned now. Shard ids are renumbered 0..n-1 in
    (root, tar name) order. Returns counts of what was used.
    """
    from curate.catalog.connection import sql_literal

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


# ------------------------------------------------------------------------------------- verify

@dataclass
class VerifyReport:
    root: Path
    tars: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    reshard_output: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dir(root: str | os.PathLike, progress: bool = False, inputs=None, catalog=None) -> VerifyReport:
    """Check a shard directory: tars parse, counts match stats/sizes, keys are well-formed.

    For a reshard output, ``inputs`` (the input shard dirs) recomputes independently how many
    entries of ``sample_ids.npy`` the input holds and compares it with the samples written.
    """
    from tqdm import tqdm

    root = Path(root)
    rep = VerifyReport(root)
    tars = list_tars(root, required=False)  # an empty reshard output (empty subset) is valid
    rep.tars = len(tars)
    sizes = None
    if (root / "sizes.json").is_file():
        try:
            sizes = json.loads((root / "sizes.json").read_text())
        except ValueError as e:
            rep.problems.append(f"{root / 'sizes.json'}: not JSON ({e})")
    meta = None
    if (root / "meta.json").is_file():
        try:
            meta = json.loads((root / "meta.json").read_text())
        except ValueError as e:
            rep.problems.append(f"{root / 'meta.json'}: not JSON ({e})")
    rep.reshard_output = meta is not None and "output_count" in meta
    if meta is None and (root / ".curate_reshard.json").is_file():
        rep.problems.append(f"{root}: an unfinished reshard (no meta.json); run the same command again to finish it")
    key_re = _UID_KEY if rep.reshard_output else None
    seen_uid_counts: dict[tuple[int, int], set] = {}
    for tar in tqdm(tars, desc="verify", unit="tar", disable=not progress):
        try:
            scan = scan_tar(tar)
        except ShardError as e:
            rep.problems.append(str(e))
            continue
        n = len(scan.keys)
        rep.samples += n
        if scan.truncated:
            rep.problems.append(f"{tar}: truncated (ends inside a member)")
        keys = scan.keys
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            rep.problems.append(f"{tar}: key {dup!r} appears in two samples")
        for k in keys:
            base = os.path.basename(k)
            if key_re is not None:
                bad = not key_re.match(base)
            else:
                bad = not (_UID_KEY.match(base) or _IMG2DATASET_KEY.match(base))
            if bad:
                rep.problems.append(f"{tar}: malformed key {k!r}")
                break
        if rep.reshard_output:
            for k in keys:
                uid, _, j = os.path.basename(k).partition("-")
                if _UID_KEY.match(os.path.basename(k)):
                    pair = (int(uid[:16], 16), int(uid[16:], 16))
                    seen_uid_counts.setdefault(pair, set()).add(int(j))
        stats = tar.with_name(tar.name[: -len(".tar")] + "_stats.json")
        if stats.is_file():
            try:
                succ = json.loads(stats.read_text()).get("successes")
            except ValueError:
                succ = None
            if succ != n:
                rep.problems.append(f"{stats}: successes={succ} but {tar.name} holds {n} samples")
        else:
            rep.problems.append(f"{stats}: missing")
        if sizes is not None and sizes.get(tar.name) != n:
            rep.problems.append(f"{root / 'sizes.json'}: {tar.name}={sizes.get(tar.name)} but the tar holds {n} samples")
    if sizes is not None:
        extra = sorted(set(sizes) - {t.name for t in tars})
        if extra:
            rep.problems.append(f"{root / 'sizes.json'}: lists {extra[0]} which does not exist")
    if rep.reshard_output:
        if meta.get("output_count") != rep.samples:
            rep.problems.append(f"{root / 'meta.json'}: output_count={meta.get('output_count')} but the tars hold {rep.samples}")
        if meta.get("output_shard_count") != rep.tars:
            rep.problems.append(f"{root / 'meta.json'}: output_shard_count={meta.get('output_shard_count')} but there are {rep.tars} tars")
        present = meta.get("subset_entries_present")
        if present is not None and present != rep.samples:
            rep.problems.append(f"{root / 'meta.json'}: {present} subset entries were present in the input but {rep.samples} samples were written")
        ids = root / "sample_ids.npy"
        if ids.is_file():
            _check_sample_ids(ids, seen_uid_counts, rep)
            if inputs:
                from curate.shards.reshard import present_count

                want = present_count(inputs, ids, catalog)["subset_entries_present"]
                if want != rep.samples:
                    rep.problems.append(f"{root}: the input holds {want} entries of sample_ids.npy but "
                                        f"{rep.samples} samples were written")
        else:
            rep.problems.append(f"{ids}: missing")
    return rep


def _check_sample_ids(ids: Path, seen: dict, rep: VerifyReport) -> None:
    """Every output uid is in the subset, with copies j = 0..k-1 where k is its multiplicity."""
    from curate.subset import open_subset

    try:
        arr = open_subset(ids)
    except CurateError as e:
        rep.problems.append(str(e))
        return
    if not seen:
        return
    hi, lo = np.asarray(arr["f0"]), np.asarray(arr["f1"])
    for (h, l_), js in seen.items():
        a = int(np.searchsorted(hi, np.uint64(h), "left"))
        b = int(np.searchsorted(hi, np.uint64(h), "right"))
        k = int((lo[a:b] == np.uint64(l_)).sum())
        if js != set(range(k)):
            rep.problems.append(f"{ids}: uid {h:016x}{l_:016x} is listed {k} times but the output "
                                f"has copies {sorted(js)[:5]}")
            return
