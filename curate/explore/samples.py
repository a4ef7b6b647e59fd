"""Sample bytes straight from the pool's webdataset tars, through the shard index.

The shard index (:mod:`curate.shards.index`) records each sample's tar and byte range. Reading a
sample is one ``os.pread`` of that range, parsed in memory with
:func:`curate.shards.tar.sample_members`: no tar scan and nothing extracted to disk. A catalog
with a shard index (``curate shards index``) is used as it is; for a catalog that records a
shards directory but has no index, the tars' headers are indexed once when the reader starts
(held in memory, never written to the catalog). A pool without shards has no reader: the
explorer then shows metadata only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from curate.catalog.connection import connect, recorded_shards_dir, sql_literal
from curate.shards.index import build_index
from curate.shards.tar import sample_members

#: member extensions shown as the sample's image, in order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Location:
    path: str
    offset: int
    length: int


class ShardReader:
    """uid -> the sample's byte range in its tar, and its members read with one ``pread``.

    ``reads`` and ``bytes_read`` count what was read from the tars (the tests and the benchmark
    check that a page of N thumbnails is N reads of N samples' bytes).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, source: str):
        self.con = con  # an in-memory DuckDB holding (or attaching) shard_files and shard_index
        self.source = source  # "catalog" (its index) or "scanned DIR" (indexed at start)
        self.reads = 0
        self.bytes_read = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, catalog) -> "ShardReader | None":
        """The reader of ``catalog``'s shards; None when the catalog records no shards directory
        and has no shard index."""
        catalog = Path(catalog)
        cat = connect(catalog)
        try:
            has_index = bool(cat.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'shard_index' "
                "AND database_name = current_database()").fetchone()[0])
            root = recorded_shards_dir(cat, catalog)
        finally:
            cat.close()
        mem = duckdb.connect(":memory:")
        if has_index:
            mem.execute(f"ATTACH {sql_literal(str(catalog.resolve()))} AS cat (READ_ONLY)")
            mem.execute("CREATE VIEW shard_files AS SELECT * FROM cat.shard_files")
            mem.execute("CREATE VIEW shard_index AS SELECT * FROM cat.shard_index")
            return cls(mem, "catalog")
        if root is None or not root.is_dir() or not any(root.glob("*.tar")):
            mem.close()
            return None
        files, index = build_index(root)
        for name, table in (("shard_files", files), ("shard_index", index)):
            mem.register("arrow_in", table)
            mem.execute(f"CREATE TABLE {name} AS SELECT * FROM arrow_in")
            mem.unregister("arrow_in")
        return cls(mem, f"scanned {root}")

    def locate(self, hi: np.ndarray, lo: np.ndarray) -> dict[tuple[int, int], Location]:
        """Where each uid (hi, lo) is: its tar, offset and length (uids not in the shards are absent).
        A uid in several tars keeps the first by (tar name, offset)."""
        cur = self.con.cursor()
        try:
            cur.register("wanted", pa.table({"hi": pa.array(hi, pa.uint64()), "lo": pa.array(lo, pa.uint64())}))
            rows = cur.execute(
                "SELECT i.uid_hi, i.uid_lo, f.root, f.name, i.\"offset\", i.length "
                "FROM shard_index i JOIN shard_files f USING (shard_id) "
                "SEMI JOIN wanted w ON i.uid_hi = w.hi AND i.uid_lo = w.lo "
                "ORDER BY f.root, f.name, i.\"offset\"").fetchall()
        finally:
            cur.close()
        out: dict[tuple[int, int], Location] = {}
        for h, lo_, root, name, off, length in rows:
            out.setdefault((int(h), int(lo_)), Location(str(Path(root) / name), int(off), int(length)))
        return out

    def warm(self, max_rows: int = 50_000_000) -> None:
        """Read the shard index's columns once (an index of up to ``max_rows`` rows), so that the
        first page's lookup does not load them from disk."""
        cur = self.con.cursor()
        try:
            if cur.execute("SELECT count(*) FROM shard_index").fetchone()[0] <= max_rows:
                cur.execute('SELECT bit_xor(uid_hi), bit_xor(uid_lo), bit_xor("offset"), bit_xor(length), '
                            'bit_xor(shard_id) FROM shard_index').fetchone()
        finally:
            cur.close()

    def members(self, loc: Location) -> dict[str, bytes]:
        """The sample's members (extension -> bytes), read with one ``pread`` of its byte range."""
        fd = os.open(loc.path, os.O_RDONLY)
        try:
            data = os.pread(fd, loc.length, loc.offset)
        finally:
            os.close(fd)
        with self._lock:
            self.reads += 1
            self.bytes_read += len(data)
        return {ext: bytes(body) for ext, body in sample_members(data, loc.offset, loc.offset, len(data), loc.path)}

    def image(self, loc: Location) -> tuple[str, bytes] | None:
        """(extension, bytes) of the sample's image member, None when it has none."""
        m = self.members(loc)
        for ext in IMAGE_EXTS:
            if ext in m:
                return ext, m[ext]
        return None

    def close(self) -> None:
        self.con.close()
