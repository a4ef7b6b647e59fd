"""The explorer's state: filter results and their parts, pages, sample details, plots, exports.

Read-only on the catalog and the pool: every catalog connection is opened read-only and
sandboxed like a filter's (:func:`curate.run.query.sandbox_catalog`); a filter whose feature
views are missing or stale is refused (``curate run`` would build them, which writes to the
catalog). A filter runs through :func:`curate.run.run_filter`, the path of ``curate run``, into
the session's own scratch directory, so the exported subset file is the bytes ``curate run``
writes. Results are held as sorted distinct ``u8,u8`` records (16 bytes per kept uid, as in
``curate run``); pool rows are only ever read a page at a time.
"""

from __future__ import annotations

import io
import itertools
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from curate.catalog.connection import connect, default_catalog
from curate.errors import CurateError
from curate.sqltokens import sql_literal
from curate.explore.samples import Location, ShardReader
from curate.features.registry import needed_producers, producer
from curate.run import run_filter
from curate.run.ondemand import CAPTION_TABLES, missing_parts
from curate.run.query import (bundled_filters, declared_params, describe_filter, load_filter, open_filter, parse_value,
                              sandbox_catalog)
from curate.subset import open_subset, write_records
from curate.uids import hex_array_to_pairs, hex_array_to_records, pairs_to_hex_array

#: pool columns a grid card shows (and the CSV export holds, after uid)
CARD_COLUMNS = ["uid", "text", "clip_b32_similarity_score", "clip_l14_similarity_score",
                "original_width", "original_height", "file", "row"]
SCORE_COLUMNS = ["clip_l14_similarity_score", "clip_b32_similarity_score"]
MAX_PAGE = 500
#: kept samples whose card rows are fetched ahead after each page (one scan of the pool's uid
#: column finds a window nearly as fast as one page)
PREFETCH = 240
#: card rows held for pages (uid -> row; the oldest dropped first)
CACHED_ROWS = 50_000
#: pool rows per Arrow batch when the dropped part is streamed
_STREAM_ROWS = 1 << 16


@dataclass
class Part:
    """A set of samples shown as a grid: sorted distinct records, or the pool minus a result."""

    records: np.ndarray | None  # u8,u8 sorted distinct; None for ``dropped``
    complement_of: np.ndarray | None = None  # dropped: the pool rows whose uid is not in these
    total: int | None = None
    lookup: "SortedUids | None" = None  # complement_of, ready for lookups (made on first use)


@dataclass
class Result:
    rid: str
    label: str
    records: np.ndarray  # distinct uids, sorted
    info: dict
    subset: Path | None  # the file `curate run` would write (None for a subset file input)
    parts: dict = field(default_factory=dict)


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class Session:
    """One explorer over one catalog; ``work`` is a scratch directory for run outputs."""

    def __init__(self, catalog=None, work: Path | None = None, reader: bool = True):
        self.catalog = Path(catalog) if catalog else default_catalog()
        con = connect(self.catalog)  # fails early, one line, when it is not a catalog
        try:
            self.pool_rows = int(con.execute("SELECT coalesce(sum(num_rows), 0) FROM pool_files").fetchone()[0])
            self.columns = [d[0] for d in con.execute("SELECT * FROM pool LIMIT 0").description]
            self.views = [r[0] for r in con.execute("SELECT name FROM curate_views ORDER BY name").fetchall()]
            names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            self.has_timesplit = "timesplit" in names
            self.has_npz = bool(con.execute(
                "SELECT count(*) > 0 AND count(npz) = count(*) FROM pool_files").fetchone()[0])
        finally:
            con.close()
        self.work = Path(work) if work else None
        self.reader = ShardReader.open(self.catalog) if reader else None
        self.results: dict[str, Result] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.catalog_lock = threading.RLock()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="curate-explore")  # fetches ahead
        # shard lookups, beside a page's pool query (their own threads: a fetch waits on them)
        self._locator = ThreadPoolExecutor(2, thread_name_prefix="curate-explore-locate")
        self._locations: dict[str, Location] = {}  # uid -> where, filled by pages (bounded)
        self._con: duckdb.DuckDBPyConnection | None = None  # the open sandboxed connection (see connection())
        self._rows: OrderedDict[tuple[int, int], tuple | None] = OrderedDict()  # uid -> card row (None: not in pool)
        self._fetching: dict[tuple[int, int], Future] = {}  # uid -> the prefetch that is fetching its row
        if self.reader is not None:  # the shard index's first lookup reads it from disk: not on a page's time
            self._locator.submit(self.reader.warm)

    # -- connections -----------------------------------------------------------------------

    def connection(self) -> duckdb.DuckDBPyConnection:
        """The read-only catalog connection, sandboxed like a filter's, held under
        :attr:`catalog_lock` until :meth:`release`. It stays open between requests (a page does
        not re-open the catalog). DuckDB shares one database instance among a process's
        connections to a file, and the sandbox locks that instance's configuration, so it is
        closed (:meth:`own_connections`) before a filter run, a feature check or a neighbour
        search opens a connection of its own, under the same lock."""
        self.catalog_lock.acquire()
        try:
            if self._con is None:
                con = connect(self.catalog)
                try:
                    sandbox_catalog(con, self.catalog)
                except BaseException:
                    con.close()
                    raise
                self._con = con
        except BaseException:
            self.catalog_lock.release()
            raise
        return self._con

    def release(self, con, *registered: str) -> None:
        """Give the connection back, dropping the Arrow tables registered on it."""
        try:
            for name in registered:
                try:
                    con.unregister(name)
                except duckdb.Error:
                    pass
        finally:
            self.catalog_lock.release()

    def own_connections(self) -> None:
        """Close the held connection (call with :attr:`catalog_lock` held) before code that opens
        the catalog itself."""
        if self._con is not None:
            con, self._con = self._con, None
            con.close()

    # -- filters ---------------------------------------------------------------------------

    def filters(self) -> list[dict]:
        return [{"name": f.name, "params": {k: _jsonable(v) for k, v in f.params.items()}, "summary": f.summary}
                for f in bundled_filters()]

    def filter_params(self, path: str) -> dict:
        info = describe_filter(path)
        return {"name": str(info.path), "params": {k: _jsonable(v) for k, v in info.params.items()},
                "summary": info.summary}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def run(self, source: dict) -> Result:
        """Run a filter (``{"filter": name or path, "sets": {...}}``), a typed query
        (``{"sql": "SELECT uid FROM pool ..."}``) or read a subset file (``{"subset": path}``)."""
        if self.work is None:
            raise CurateError("this session has no scratch directory for results")
        rid = self._new_id("r")
        if source.get("subset"):
            path = Path(str(source["subset"])).expanduser()
            records = open_subset(path)
            distinct = distinct_sorted(np.asarray(records))  # open_subset checked the order
            info = {"label": path.name, "kind": "subset", "count": int(len(records)), "distinct": int(len(distinct)),
                    "pool_rows": self.pool_rows, "params": {}, "thresholds": [], "elapsed": 0.0}
            res = Result(rid, path.name, distinct, info, None)
        else:
            if source.get("sql"):
                flt_path = self.work / f"{rid}_query.sql"
                flt_path.write_text(str(source["sql"]).strip() + "\n")
                name = "query"
            elif source.get("filter"):
                flt_path = name = str(source["filter"])
            else:
                raise CurateError("give a filter, a query returning uid, or a subset file")
            sets = {str(k): parse_value(str(v)) for k, v in (source.get("sets") or {}).items() if str(v) != ""}
            flt = load_filter(flt_path)
            self._check_features(flt, sets)
            out = self.work / f"{rid}.npy"
            with self.catalog_lock:  # see connection(); one filter at a time uses every DuckDB thread
                self.own_connections()
                r = run_filter(flt_path, catalog=self.catalog, out=out, sets=sets)
            records = distinct_sorted(np.asarray(open_subset(r.out)))
            thresholds = [{"score": t["score"], "fraction": t["fraction"],
                           "threshold": None if t["threshold"] is None else float(t["threshold"])}
                          for t in r.thresholds]
            info = {"label": Path(name).stem if name != "query" else "query", "kind": "filter",
                    "filter": str(flt.path), "count": r.count, "distinct": r.distinct, "pool_rows": r.pool_rows,
                    "params": {k: _jsonable(v) for k, v in r.params.items()}, "thresholds": thresholds,
                    "elapsed": round(r.elapsed, 3)}
            res = Result(rid, info["label"], records, info, r.out)
        res.info["rid"] = rid
        res.parts = {"kept": Part(res.records, total=int(len(res.records))),
                     "dropped": Part(None, complement_of=res.records)}
        with self._lock:
            self.results[rid] = res
        return res

    def _check_features(self, flt, sets: dict) -> None:
        """Refuse a filter whose feature views would have to be built (that writes the catalog)."""
        views = needed_producers(flt.text)
        if not views:
            return
        params = declared_params(flt, sets) or {}
        with self.catalog_lock:  # caption tables are computed per part and row: there for what it reads?
            self.own_connections()
            missing = {m.split(".")[0] for m in missing_parts(self.catalog, flt, lambda: self._open_prepared(flt, sets))}
        for view in views:
            with self.catalog_lock:
                self.own_connections()
                current = view not in missing if view in CAPTION_TABLES else producer(view).is_current(self.catalog, params)
            if not current:
                raise CurateError(f"{flt.path}: feature view {view} is missing or out of date for this catalog; "
                                  f"build it with `curate run {flt.path}` or `curate features` first "
                                  f"(explore never writes to the catalog)")

    def _open_prepared(self, flt, sets: dict):
        """The filter prepared on a sandboxed read-only connection, nothing built (``(con, query)``)."""
        opened = open_filter(flt, self.catalog, sets, features=False)
        return opened.con, opened.query

    def compare(self, a: dict, b: dict) -> dict:
        ra, rb = self.run(a), self.run(b)
        cid = self._new_id("c")
        in_b, in_a = isin_sorted(ra.records, rb.records), isin_sorted(rb.records, ra.records)  # both sorted
        parts = {"a_only": ra.records[~in_b], "b_only": rb.records[~in_a], "both": ra.records[in_b]}
        res = Result(cid, f"{ra.label} vs {rb.label}", np.empty(0, ra.records.dtype),
                     {"rid": cid, "a": ra.info, "b": rb.info, **{f"count_{k}": int(len(v)) for k, v in parts.items()}},
                     None, {k: Part(v, total=int(len(v))) for k, v in parts.items()})
        with self._lock:
            self.results[cid] = res
        return res.info

    def result(self, rid: str) -> Result:
        try:
            return self.results[rid]
        except KeyError:
            raise CurateError(f"result {rid!r}: no such result in this session (run the query again)") from None

    def part(self, rid: str, part: str) -> Part:
        res = self.result(rid)
        if part not in res.parts:
            raise CurateError(f"part {part!r}: result {rid} has {', '.join(res.parts)}")
        return res.parts[part]

    # -- pages -----------------------------------------------------------------------------

    def page(self, rid: str, part: str = "kept", offset: int = 0, limit: int = 60, raw: bool = False) -> dict:
        """Rows ``offset..offset+limit`` of a part (kept and compare parts in uid order, dropped in
        pool order): the card columns, and whether the sample's image is in the shards. Values are
        made JSON-safe (NaN -> None) unless ``raw``.

        A kept page's rows come from one query for the page (with its shard lookup beside it), or
        from the rows fetched ahead: after each page, the next :data:`PREFETCH` samples' rows are
        fetched in the background. ``raw`` pages (the CSV export) always query and are not kept."""
        if not 1 <= limit <= MAX_PAGE:
            raise CurateError(f"limit={limit}: must be 1..{MAX_PAGE}")
        if offset < 0:
            raise CurateError(f"offset={offset}: must be >= 0")
        p = self.part(rid, part)
        if p.records is not None:
            recs = p.records[offset:offset + limit]
            if raw:
                rows = [r for r in self._query_rows(recs) if r is not None]
            else:
                rows = self._card_rows(recs)
                self._prefetch(p.records, offset + limit)
            total = p.total
        else:
            cols = ", ".join(f'p."{c}"' for c in CARD_COLUMNS)
            con = self.connection()
            try:
                if p.lookup is None:
                    p.lookup = SortedUids(p.complement_of)
                rows = self._dropped_rows(con, p.lookup, cols, offset, limit)
                if p.total is None:
                    p.total = self._dropped_count(con, p.lookup)
                total = p.total
            except duckdb.Error as e:
                raise CurateError(f"{self.catalog}: {_one_line(e)}") from None
            finally:
                self.release(con)
        out = [dict(zip(CARD_COLUMNS, r if raw else [_jsonable(v) for v in r])) for r in rows]
        if not raw:
            self._attach_images(out)
        return {"rid": rid, "part": part, "offset": offset, "limit": limit, "total": total, "rows": out,
                "shards": self.reader is not None}

    def _query_rows(self, recs: np.ndarray) -> list[tuple | None]:
        """The card row of each record's uid (its first pool row by file and row; None when the
        pool does not have it): one query over the pool."""
        if not len(recs):
            return []
        cols = ", ".join(f'p."{c}"' for c in CARD_COLUMNS)
        uids = pairs_to_hex_array(recs["f0"], recs["f1"])
        con = self.connection()
        try:
            con.register("page_uids", pa.table({"uid": uids, "k": pa.array(np.arange(len(uids)), pa.int64())}))
            # the records are sorted, so their uids are one range: it goes into the parquet scan
            # as a filter, and only the rows in it reach the join
            got = con.execute(
                f"SELECT w.k, {cols} FROM page_uids w JOIN pool p ON p.uid = w.uid "
                f"WHERE p.uid BETWEEN {sql_literal(uids[0].as_py())} AND {sql_literal(uids[-1].as_py())} "
                f"QUALIFY row_number() OVER (PARTITION BY w.k ORDER BY p.file, p.\"row\") = 1"
            ).fetchall()  # literals, not bound: hex we made; binding imports pandas
        except duckdb.Error as e:
            raise CurateError(f"{self.catalog}: {_one_line(e)}") from None
        finally:
            self.release(con, "page_uids")
        out: list[tuple | None] = [None] * len(recs)
        for k, *row in got:
            out[k] = tuple(row)
        return out

    def _fetch(self, recs: np.ndarray) -> dict:
        """Query the card rows and shard locations of ``recs`` (side by side) and keep them;
        uid -> row."""
        located = self._locator.submit(self.reader.locate, recs["f0"], recs["f1"]) if self.reader else None
        rows = self._query_rows(recs)
        if located is not None:
            located = located.result()
        keys = list(zip(recs["f0"].tolist(), recs["f1"].tolist()))
        with self._lock:
            for k, r in zip(keys, rows):
                self._rows[k] = r
                self._rows.move_to_end(k)
            while len(self._rows) > CACHED_ROWS:
                self._rows.popitem(last=False)
            if located is not None:
                self._remember_locations(keys, located)
        return dict(zip(keys, rows))

    def _card_rows(self, recs: np.ndarray) -> list[tuple]:
        """The card rows of ``recs`` (uids the pool lacks left out): those fetched ahead, waiting
        for a fetch under way, and one query for the rest."""
        keys = list(zip(recs["f0"].tolist(), recs["f1"].tolist()))
        with self._lock:
            waits = {self._fetching[k] for k in keys if k not in self._rows and k in self._fetching}
        for f in waits:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - a failed fetch ahead: the page queries itself below
                pass
        with self._lock:
            have = {k: self._rows[k] for k in keys if k in self._rows}
        missing = [i for i, k in enumerate(keys) if k not in have]
        if missing:
            have.update(self._fetch(recs[missing]))
        return [have[k] for k in keys if have[k] is not None]

    def settle(self) -> None:
        """Wait for the fetches ahead under way (the tests and the benchmark use it)."""
        while True:
            with self._lock:
                pending = set(self._fetching.values())
            if not pending:
                return
            for f in pending:
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - a failed fetch ahead is redone by the page that needs it
                    pass

    def _prefetch(self, records: np.ndarray | None, start: int, n: int = PREFETCH) -> None:
        """Fetch the rows of ``records[start:start + n]`` in the background, unless they are at
        hand or on their way."""
        if records is None or start >= len(records):
            return
        recs = records[start:start + n]
        keys = list(zip(recs["f0"].tolist(), recs["f1"].tolist()))
        fut: Future = Future()
        with self._lock:
            todo = [i for i, k in enumerate(keys) if k not in self._rows and k not in self._fetching]
            if not todo:
                return
            mine = [keys[i] for i in todo]
            for k in mine:
                self._fetching[k] = fut
        sub = recs[todo]

        def job():
            try:
                self._fetch(sub)
                fut.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the page waiting on it
                fut.set_exception(e)
            finally:
                with self._lock:
                    for k in mine:
                        if self._fetching.get(k) is fut:
                            del self._fetching[k]

        self._pool.submit(job)

    @staticmethod
    def _not_kept(batch: pa.Array, kept: "SortedUids") -> np.ndarray:
        """Which uids of an Arrow batch are not in ``kept`` (a value that is no uid never is)."""
        try:
            return ~kept.contains(hex_array_to_records(batch))
        except CurateError:  # some value is not a uid: one by one
            flags = []
            for u in batch.to_pylist():
                try:
                    flags.append(not kept.contains(hex_array_to_records(pa.array([u], pa.string())))[0])
                except CurateError:
                    flags.append(True)
            return np.array(flags, bool)

    def _dropped_rows(self, con, kept: "SortedUids", cols: str, offset: int, limit: int) -> list[tuple]:
        """Pool rows ``offset..offset+limit`` whose uid is not kept, in pool order: the pool is
        streamed in order (files by name, rows in order: DuckDB keeps a plain scan's order) and
        stops as soon as the page is full, so an early page reads an early part of the pool."""
        reader = con.execute(f"SELECT {cols} FROM pool p").to_arrow_reader(_STREAM_ROWS)
        out, skip = [], offset
        for batch in reader:
            idx = np.flatnonzero(self._not_kept(batch.column(0), kept))
            if skip >= len(idx):
                skip -= len(idx)
                continue
            idx = idx[skip:skip + limit - len(out)]
            skip = 0
            cols_py = [batch.column(k).take(pa.array(idx)).to_pylist() for k in range(batch.num_columns)]
            out.extend(zip(*cols_py))
            if len(out) >= limit:
                break
        return out

    def _dropped_count(self, con, kept: "SortedUids") -> int:
        """How many pool rows the result does not keep: one streamed pass over the uid column."""
        n = 0
        for batch in con.execute("SELECT uid FROM pool").to_arrow_reader(_STREAM_ROWS):
            n += int(np.count_nonzero(self._not_kept(batch.column(0), kept)))
        return n

    def _remember_locations(self, keys: list[tuple[int, int]], found: dict) -> None:
        """Record where each looked-up uid is (None: not in the shards); call under ``_lock``."""
        if len(self._locations) > 200_000:
            self._locations.clear()
        for h, lo_ in keys:
            self._locations[f"{h:016x}{lo_:016x}"] = found.get((h, lo_))

    def _attach_images(self, rows: list[dict]) -> None:
        """Mark each row with whether its image is in the shards (looking up the uids whose
        place is not known yet) and remember where it is for the image requests that follow."""
        if self.reader is None or not rows:
            for r in rows:
                r["image"] = False
            return
        with self._lock:
            unknown = [r["uid"] for r in rows if isinstance(r["uid"], str) and len(r["uid"]) == 32
                       and r["uid"] not in self._locations]
        if unknown:
            try:
                hi, lo = hex_array_to_pairs(pa.array(unknown, pa.string()))
            except CurateError:
                hi, lo = np.empty(0, np.uint64), np.empty(0, np.uint64)
            found = self.reader.locate(hi, lo)
            with self._lock:
                self._remember_locations(list(zip(hi.tolist(), lo.tolist())), found)
        with self._lock:
            for r in rows:
                r["image"] = self._locations.get(r["uid"]) is not None

    def location(self, uid: str) -> Location:
        if self.reader is None:
            raise CurateError("this pool has no shards: metadata only")
        with self._lock:
            known, loc = uid in self._locations, self._locations.get(uid)
        if loc is None:
            try:
                hi, lo = hex_array_to_pairs(pa.array([uid], pa.string()))
            except CurateError:
                raise CurateError(f"uid {uid!r}: not a uid (32 hex characters)") from None
            if not known:
                found = self.reader.locate(hi, lo)
                with self._lock:
                    self._remember_locations([(int(hi[0]), int(lo[0]))], found)
                loc = found.get((int(hi[0]), int(lo[0])))
            if loc is None:
                raise CurateError(f"uid {uid}: not in the pool's shards")
        return loc

    def image(self, uid: str, thumb: int | None = None) -> tuple[str, bytes]:
        """The sample's image as (media type, bytes): the member's own bytes, or a JPEG of at most
        ``thumb`` pixels a side."""
        got = self.reader.image(self.location(uid)) if self.reader else None
        if got is None:
            raise CurateError(f"uid {uid}: the sample has no image member")
        ext, data = got
        if not thumb:
            return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[ext], data
        from PIL import Image  # lazy: only thumbnails need pillow's decoders

        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
        except (OSError, ValueError) as e:
            raise CurateError(f"uid {uid}: the image cannot be decoded ({_one_line(e)})") from None
        return "image/jpeg", buf.getvalue()

    # -- one sample ------------------------------------------------------------------------

    def sample(self, uid: str, neighbours: int = 8) -> dict:
        """All pool columns of ``uid``, its feature-table values and nearest neighbours."""
        con = self.connection()
        try:
            cur = con.execute('SELECT * FROM pool WHERE uid = ? ORDER BY file, "row" LIMIT 1', [uid])
            names = [d[0] for d in cur.description]
            row = cur.fetchone()
            if row is None:
                raise CurateError(f"uid {uid!r}: not in the pool")
            meta = {k: _jsonable(v) for k, v in zip(names, row)}
            features = {}
            for view in self.views:
                try:
                    vcur = con.execute(f'SELECT * FROM "{view}" WHERE file = ? AND "row" = ? LIMIT 1',
                                       [meta["file"], meta["row"]])
                    vrow = vcur.fetchone()
                except duckdb.Error:
                    continue  # a view not keyed by (file, row)
                if vrow is not None:
                    for k, v in zip([d[0] for d in vcur.description], vrow):
                        if k not in ("uid", "file", "row"):
                            features[f"{view}.{k}"] = _jsonable(v)
        finally:
            self.release(con)
        out = {"uid": uid, "meta": meta, "features": features, "image": False, "neighbours": [],
               "neighbours_note": None}
        if self.reader is not None:
            try:
                self.location(uid)
                out["image"] = True
            except CurateError:
                pass
        if self.has_npz and neighbours:
            from curate.features.neighbors import nearest  # lazy: numpy scans only when a sample is opened

            try:
                with self.catalog_lock:
                    self.own_connections()
                    hits = nearest(self.catalog, key="l14_img", uid=uid, k=neighbours + 1)
                out["neighbours"] = [{"uid": h.uid, "score": round(h.score, 4)} for h in hits if h.uid != uid][:neighbours]
                out["neighbours_key"] = "l14_img"
                self._attach_images(out["neighbours"])
            except CurateError as e:
                out["neighbours_note"] = _one_line(e)
        else:
            out["neighbours_note"] = "no embeddings (.npz) in this pool"
        return out

    # -- plots -----------------------------------------------------------------------------

    def histogram(self, rid: str, column: str, bins: int = 40) -> dict:
        """Bin counts of ``column`` over the pool and over the kept part, and the thresholds the
        filter computed on it."""
        if column not in self.columns:
            raise CurateError(f"column {column!r}: not a pool column")
        res = self.result(rid)
        con = self.connection()
        try:
            con.register("kept", pa.table({"hi": pa.array(res.records["f0"], pa.uint64()),
                                           "lo": pa.array(res.records["f1"], pa.uint64())}))
            lo_, hi_ = con.execute(f'SELECT min("{column}"), max("{column}") FROM pool '
                                   f'WHERE isfinite("{column}")').fetchone()
            if lo_ is None:
                return {"column": column, "edges": [], "all": [], "kept": [], "thresholds": []}
            width = (hi_ - lo_) / bins or 1.0
            b = f'least({bins - 1}, CAST(floor(("{column}" - ?) / ?) AS INTEGER))'
            rows = con.execute(
                f'SELECT {b} AS bin, count(*), count(*) FILTER (WHERE k.hi IS NOT NULL) FROM pool p '
                f'LEFT JOIN (SELECT DISTINCT hi, lo FROM kept) k ON uid_hi(p.uid) = k.hi AND uid_lo(p.uid) = k.lo '
                f'WHERE isfinite("{column}") GROUP BY bin', [lo_, width]).fetchall()
        except duckdb.Error as e:
            raise CurateError(f"{self.catalog}: {_one_line(e)}") from None
        finally:
            self.release(con, "kept")
        all_, kept = [0] * bins, [0] * bins
        for i, n, k in rows:
            all_[i] += int(n)
            kept[i] += int(k)
        thresholds = [t["threshold"] for t in res.info.get("thresholds", [])
                      if column in t["score"] and t["threshold"] is not None]
        thresholds += _parameter_thresholds(res.info, column)
        return {"column": column, "edges": [lo_ + i * width for i in range(bins + 1)], "all": all_, "kept": kept,
                "thresholds": thresholds}

    def histogram_png(self, rid: str, column: str) -> bytes:
        h = self.histogram(rid, column)
        import matplotlib  # lazy: the plot extra, only when a histogram is drawn

        matplotlib.use("Agg")
        from matplotlib.figure import Figure  # lazy: as above

        fig = Figure(figsize=(6, 3.2), dpi=100)
        ax = fig.subplots()
        if h["edges"]:
            e = h["edges"]
            ax.stairs(h["all"], e, fill=True, color="#c8c8c8", label=f"pool ({sum(h['all']):,})")
            ax.stairs(h["kept"], e, fill=True, color="#2a7ab9", alpha=0.8, label=f"kept ({sum(h['kept']):,})")
            for t in h["thresholds"]:
                ax.axvline(t, color="#d62728", linestyle="--", label=f"threshold {t:.4g}")
        ax.set_xlabel(column)
        ax.set_ylabel("samples")
        ax.set_title(self.result(rid).label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def keep_rate(self, rid: str) -> list[dict]:
        """TiC catalogs: samples and kept samples per (year, month) of ``timesplit``."""
        if not self.has_timesplit:
            raise CurateError("this catalog has no timesplit view (not a TiC catalog)")
        res = self.result(rid)
        con = self.connection()
        try:
            con.register("kept", pa.table({"hi": pa.array(res.records["f0"], pa.uint64()),
                                           "lo": pa.array(res.records["f1"], pa.uint64())}))
            rows = con.execute(
                "SELECT t.year, t.month, count(*), count(k.hi) FROM timesplit t "
                "LEFT JOIN kept k ON uid_hi(t.uid) = k.hi AND uid_lo(t.uid) = k.lo "
                "GROUP BY ALL ORDER BY t.year, t.month NULLS FIRST").fetchall()
        except duckdb.Error as e:
            raise CurateError(f"{self.catalog}: {_one_line(e)}") from None
        finally:
            self.release(con, "kept")
        return [{"year": y, "month": m, "samples": int(n), "kept": int(k)} for y, m, n, k in rows]

    def keep_rate_png(self, rid: str) -> bytes:
        rows = self.keep_rate(rid)
        import matplotlib  # lazy: the plot extra, only when a plot is drawn

        matplotlib.use("Agg")
        from matplotlib.figure import Figure  # lazy: as above

        fig = Figure(figsize=(6, 3.2), dpi=100)
        ax = fig.subplots()
        labels = [f"{r['year']}" + (f"-{int(r['month']):02d}" if r["month"] is not None else "") for r in rows]
        ax.plot(range(len(rows)), [100.0 * r["kept"] / r["samples"] if r["samples"] else 0 for r in rows], marker="o")
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("kept %")
        ax.set_title(f"{self.result(rid).label}: keep rate by time")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    # -- exports ---------------------------------------------------------------------------

    def export_subset(self, rid: str, part: str = "kept") -> Path:
        """The part as a subset file: a filter's kept part is the very file ``curate run`` wrote;
        other parts are written the same way (sorted distinct u8,u8 .npy)."""
        res = self.result(rid)
        if part == "kept" and res.subset is not None:
            return res.subset
        p = self.part(rid, part)
        if p.records is None:
            raise CurateError(f"part {part!r} cannot be exported as a subset here: export the filter instead")
        out = self.work / f"{rid}_{part}.npy"
        if not out.is_file():
            write_records(out, p.records)
        return out

    def export_csv(self, rid: str, part: str = "kept"):
        """CSV lines (uid and the card columns) of a part, streamed a page at a time."""
        import csv  # lazy: only exports write CSV

        p = self.part(rid, part)
        total = p.total if p.records is not None else None
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CARD_COLUMNS)
        yield buf.getvalue()
        offset = 0
        while True:
            page = self.page(rid, part, offset, MAX_PAGE, raw=True)
            if not page["rows"]:
                return
            buf = io.StringIO()
            w = csv.writer(buf)
            for r in page["rows"]:
                w.writerow([r[c] for c in CARD_COLUMNS])
            yield buf.getvalue()
            offset += len(page["rows"])
            if total is not None and offset >= total:
                return

    def close(self) -> None:
        self._pool.shutdown()
        self._locator.shutdown()
        with self.catalog_lock:
            self.own_connections()
        if self.reader is not None:
            self.reader.close()


def distinct_sorted(records: np.ndarray) -> np.ndarray:
    """The distinct records of a sorted ``u8,u8`` array (a subset file's order), still sorted."""
    if len(records) < 2:
        return records.copy()
    keep = np.empty(len(records), bool)
    keep[0] = True
    keep[1:] = (records["f0"][1:] != records["f0"][:-1]) | (records["f1"][1:] != records["f1"][:-1])
    return records[keep]


def isin_sorted(a: np.ndarray, b) -> np.ndarray:
    """For each record of ``a``, whether it is in ``b`` (sorted records, or a :class:`SortedUids`
    to reuse over many calls): a binary search on the high half, then the low half compared (a
    loop only where several records share a high half)."""
    b = b if isinstance(b, SortedUids) else SortedUids(b)
    return b.contains(a)


class SortedUids:
    """Sorted uid records split into contiguous high and low halves, for repeated lookups
    (a search in a strided view of a structured array copies it on every call)."""

    def __init__(self, records: np.ndarray):
        self.hi = np.ascontiguousarray(records["f0"])
        self.lo = np.ascontiguousarray(records["f1"])

    def contains(self, a: np.ndarray) -> np.ndarray:
        out = np.zeros(len(a), bool)
        if len(a) == 0 or len(self.hi) == 0:
            return out
        ahi, alo = np.ascontiguousarray(a["f0"]), np.ascontiguousarray(a["f1"])
        # searching in key order is ~3x faster than in random order (each search starts near
        # the last one instead of missing the cache all the way down)
        order = np.argsort(ahi, kind="stable")
        i, j = np.empty(len(a), np.intp), np.empty(len(a), np.intp)
        i[order] = np.searchsorted(self.hi, ahi[order], "left")
        j[order] = np.searchsorted(self.hi, ahi[order], "right")
        one = (j - i) == 1
        out[one] = self.lo[i[one]] == alo[one]
        for k in np.flatnonzero((j - i) > 1):
            out[k] = bool(np.any(self.lo[i[k]:j[k]] == alo[k]))
        return out


def _parameter_thresholds(info: dict, column: str) -> list[float]:
    """Values of parameters a filter compares ``column`` with as ``datacomp_ge(column,
    getvariable('p'))`` (the fixed thresholds of laion2b.sql and the like)."""
    if not info.get("filter"):
        return []
    try:
        text = Path(info["filter"]).read_text()
    except OSError:
        return []
    pat = re.compile(r"datacomp_ge\(\s*(?:\w+\.)?" + re.escape(column) + r"\s*,\s*getvariable\('(\w+)'\)\s*\)")
    out = []
    for name in pat.findall(text):
        v = info.get("params", {}).get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def _jsonable(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    return str(v)

