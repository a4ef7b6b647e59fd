"""Export every TiC split of a catalog as DataComp subset files, in one pass over the pool.

TiC's scripts reshard the pool once per split. Here a single DuckDB query joins the pool with
``timesplit`` and ``tic_eval`` and streams its rows ordered by ``(year, uid)``; each Arrow
batch is routed to open writers: the year's file and the files of its months (a month is a
subsequence of its year, so it comes out sorted too). Evaluation uids never go to training
files; they are collected (they are few) into the eval subsets. Output, under ``OUT``::

    yearly/{YYYY}.npy   + yearly/sizes.json      {"YYYY": count}   (TiC: training_yearly_noeval)
    monthly/{YYYYMM}.npy + monthly/sizes.json    {"YYYYMM": count} (eval uids removed)
    eval/retrieval/{YYYY}.npy, eval/datacompnet/{YYYY}.npy, eval/alluids.npy (+ sizes.json)
    eval/uid2classid/{YYYY}.json                 {uid: ImageNet class id} (TiC: a pickle)
    export.json                                   what was exported, from which catalog

Subset files are byte-identical to ``np.save`` of the sorted ``u8,u8`` array (the header of a
1-D ``u8,u8`` npy is always 128 bytes, so it is written last over a placeholder). Training
files keep pool duplicates (a uid twice in the pool is written twice, as DataComp's
resharder would copy it twice); eval files are sorted and unique, as TiC's
``generate_eval_uids.py`` writes them.

``--filter`` restricts the training splits to a subset file (``.npy``) or a filter's result
(``.sql`` or a bundled filter's name, with ``--set``), e.g. TiC's "basic" and "bestpool"
variants; the eval sets are the same for every variant, as in TiC. A ``.sql`` filter is opened
like a run's (:mod:`curate.run.query`); on a distributed engine it runs first, per pool file
(:func:`curate.run.run_filter`), and its subset file restricts the export.

:func:`export_tic` is the whole ``curate tic export``: the filter, :func:`export_splits`, then
the eval sets resharded into clip_benchmark webdatasets (:mod:`curate.tic.evalsets`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa

from curate import resources
from curate.atomic import atomic_path, replace_dir, write_json
from curate.catalog.connection import connect, shards_dir
from curate.engine import Engine
from curate.progress import Progress, duckdb_bar
from curate.run import RunResult, run_filter
from curate.run.query import (build_features, check_uid_column, filter_error, load_filter, precompute_thresholds,
                               prepare, sandbox_catalog)
from curate.subset import NPY_HEADER_LEN, npy_header, subset_to_arrow
from curate.tic import YEAR_MAX, YEAR_MIN, TicError
from curate.tic.evalsets import EvalSetResult, reshard_eval_sets
from curate.uids import SUBSET_DTYPE, pairs_to_hex_array, to_records

BATCH = 1 << 18  # rows per Arrow batch of the export stream


class SubsetStream:
    """Append sorted record chunks to a subset ``.npy``; the header is filled in on close."""

    def __init__(self, dest: Path):
        self.dest = Path(dest)
        self._ctx = atomic_path(self.dest)
        self._tmp = self._ctx.__enter__()
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * NPY_HEADER_LEN)
        self.count = 0
        self._last = None

    def write(self, records: np.ndarray) -> None:
        if not len(records):
            return
        if self._last is not None and tuple(records[0]) < self._last:
            raise AssertionError(f"{self.dest}: records out of order")  # the query orders them
        self._f.write(records.tobytes())
        self.count += len(records)
        self._last = tuple(records[-1])

    def close(self) -> int:
        self._f.seek(0)
        self._f.write(npy_header(self.count))
        self._f.close()
        self._ctx.__exit__(None, None, None)
        return self.count

    def abort(self) -> None:
        self._f.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


@dataclass
class ExportResult:
    out: Path
    yearly: dict[str, int] = field(default_factory=dict)
    monthly: dict[str, int] = field(default_factory=dict)
    retrieval: dict[str, int] = field(default_factory=dict)
    datacompnet: dict[str, int] = field(default_factory=dict)
    pool_rows: int = 0
    rows_read: int = 0
    filter: str | None = None
    elapsed: float = 0.0


# Only pool rows whose uid equals a timesplit/tic_eval uid are read; those were checked to be 32
# lowercase hex digits at attach time, so the casts below cannot see a malformed uid.
_QUERY = """
WITH ev AS (
    SELECT uid,
           min(year) FILTER (WHERE task = 'retrieval') AS r_year,
           min(year) FILTER (WHERE task = 'datacompnet') AS d_year,
           min(class_id) FILTER (WHERE task = 'datacompnet') AS class_id
    FROM tic_eval GROUP BY uid)
SELECT coalesce(t.year, ev.r_year, ev.d_year) AS year, t.month,
       ('0x' || p.uid[1:16])::UBIGINT AS hi, ('0x' || p.uid[17:32])::UBIGINT AS lo,
       ev.uid IS NOT NULL AS is_eval, ev.r_year, ev.d_year, ev.class_id
FROM pool AS p
LEFT JOIN timesplit AS t ON t.uid = p.uid
LEFT JOIN ev ON ev.uid = p.uid
WHERE (t.uid IS NOT NULL OR ev.uid IS NOT NULL) {keep}
ORDER BY year, hi, lo
"""


def ensure_filter_features(catalog, filter_path, sets: dict, progress: bool = False) -> None:
    """Build the feature views a ``.sql`` filter needs for its parameters (call with no
    connection open; :func:`curate.run.query.build_features`)."""
    if filter_path is None:
        return
    path = resources.filter_file(filter_path)
    if path.suffix == ".sql" and path.is_file():
        build_features(catalog, load_filter(path), sets, progress)


def keep_condition(con, flt: Path, sets: dict) -> str:
    """Register the uids a filter or subset file selects as temp table ``__tic_keep``; return the
    WHERE condition export uses (eval rows always pass, training rows only if kept)."""
    flt = resources.filter_file(flt)
    if flt.suffix == ".sql":
        f = load_filter(flt)
        sandbox_catalog(con)  # the filter, and the export after it, read only what the catalog points at
        query, _ = prepare(con, f, sets)
        query, _ = precompute_thresholds(con, query)
        check_uid_column(con, query, flt)
        try:
            con.execute(f"CREATE TEMP TABLE __tic_keep AS SELECT DISTINCT uid FROM ({query})")
        except duckdb.Error as e:
            raise filter_error(flt, e, con) from None
    else:
        if sets:
            raise TicError(f"--set applies to a .sql filter, not to the subset file {flt}")
        con.register("__tic_keep_arrow", subset_to_arrow(flt))
        con.execute("CREATE TEMP TABLE __tic_keep AS SELECT DISTINCT uid FROM __tic_keep_arrow")
    return "AND (ev.uid IS NOT NULL OR p.uid IN (SELECT uid FROM __tic_keep))"


def export_splits(catalog, out, filter_path=None, sets: dict | None = None, progress: bool = False) -> ExportResult:
    """Write every yearly, monthly and eval subset of ``catalog`` under ``out`` (one pool pass)."""
    t0 = time.perf_counter()
    catalog, out = Path(catalog), Path(out)
    sets = sets or {}
    ensure_filter_features(catalog, filter_path, sets, progress)
    con = connect(catalog)
    missing = [v for v in ("timesplit", "tic_eval") if not con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [v]).fetchone()[0]]
    if missing:
        raise TicError(f"{catalog}: no {missing[0]} view; run `curate tic attach {catalog} --tic-dir DIR` first")
    res = ExportResult(out, pool_rows=int(con.execute("SELECT sum(num_rows) FROM pool_files").fetchone()[0] or 0))
    keep = ""
    if duckdb_bar(progress):  # DuckDB's bar goes to stdout: only at a terminal
        con.execute("SET enable_progress_bar = true")  # before a filter locks the configuration
    if filter_path is not None:
        keep = keep_condition(con, Path(filter_path), sets)
        res.filter = str(filter_path)

    writers: dict[str, SubsetStream] = {}  # "yearly/2016", "monthly/201610"
    evals: dict[tuple[str, int], list[np.ndarray]] = {}
    classes: dict[int, dict[str, int]] = {}

    def close_year(year: int | None) -> None:
        for key in [k for k in writers if year is None or k.split("/")[1].startswith(str(year))]:
            n = writers.pop(key).close()
            (res.yearly if key.startswith("yearly") else res.monthly)[key.split("/")[1]] = n

    current = None
    seen: list[int] = []  # the first and last year of any row streamed (training or eval)
    try:
        reader = con.execute(_QUERY.format(keep=keep)).to_arrow_reader(BATCH)
        bar = Progress(desc="tic export", unit="row", unit_scale=True, disable=not progress)
        for batch in reader:
            res.rows_read += batch.num_rows
            bar.update(batch.num_rows)
            cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
            year = np.asarray(cols["year"].to_numpy(zero_copy_only=False), dtype=np.int64)
            month = np.asarray(cols["month"].fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
            hi = np.asarray(cols["hi"].to_numpy(zero_copy_only=False), dtype=np.uint64)
            lo = np.asarray(cols["lo"].to_numpy(zero_copy_only=False), dtype=np.uint64)
            is_eval = np.asarray(cols["is_eval"].to_numpy(zero_copy_only=False), dtype=bool)
            if len(year):
                seen = [min(seen[:1] + [int(year.min())]), max(seen[1:] + [int(year.max())])]
            if is_eval.any():
                idx = np.flatnonzero(is_eval)
                ev_rec = to_records(hi[idx], lo[idx])
                for task, col in (("retrieval", "r_year"), ("datacompnet", "d_year")):
                    ys = cols[col].take(pa.array(idx))
                    valid = np.asarray(ys.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
                    yv = np.asarray(ys.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
                    for y in np.unique(yv[valid]):
                        evals.setdefault((task, int(y)), []).append(ev_rec[valid & (yv == y)])
                cls = cols["class_id"].take(pa.array(idx)).to_pylist()
                uids = pairs_to_hex_array(hi[idx], lo[idx]).to_pylist()
                dy = cols["d_year"].take(pa.array(idx)).to_pylist()
                for u, c, y in zip(uids, cls, dy):
                    if c is not None:
                        classes.setdefault(int(y), {})[u] = int(c)
            train = ~is_eval
            if not train.any():
                continue
            for y in np.unique(year[train]):
                y = int(y)
                if y != current:
                    close_year(current)
                    current = y
                sel = train & (year == y)
                rec = to_records(hi[sel], lo[sel])
                _writer(writers, f"yearly/{y}", out / "yearly" / f"{y}.npy").write(rec)
                m_of = month[sel]
                for m in np.unique(m_of):
                    if m == 0:
                        continue  # timesplit from yearly files only: no months
                    key = f"monthly/{y}{int(m):02d}"
                    _writer(writers, key, out / "monthly" / f"{y}{int(m):02d}.npy").write(rec[m_of == m])
        close_year(None)
        bar.close()
    except duckdb.Error as e:
        for w in writers.values():
            w.abort()
        raise TicError(f"{catalog}: export query failed: {str(e).splitlines()[0]}") from None
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        con.close()

    for y in _year_range(seen):  # a year with no training sample: an empty file and 0 (tic plan skips it)
        if str(y) not in res.yearly:
            _write_records(out / "yearly" / f"{y}.npy", np.empty(0, SUBSET_DTYPE))
            res.yearly[str(y)] = 0
    if res.yearly:
        write_json(out / "yearly" / "sizes.json", dict(sorted(res.yearly.items())))
    if res.monthly:
        write_json(out / "monthly" / "sizes.json", dict(sorted(res.monthly.items())))
    everything = []
    for (task, year), parts in sorted(evals.items()):
        rec = np.unique(np.concatenate(parts))  # sorted unique, as generate_eval_uids.py writes
        everything.append(rec)
        _write_records(out / "eval" / task / f"{year}.npy", rec)
        getattr(res, task)[str(year)] = len(rec)
    for task in ("retrieval", "datacompnet"):
        if getattr(res, task):
            write_json(out / "eval" / task / "sizes.json", getattr(res, task))
    if everything:
        allu = np.unique(np.concatenate(everything))
        _write_records(out / "eval" / "alluids.npy", allu)
    for year, m in sorted(classes.items()):
        write_json(out / "eval" / "uid2classid" / f"{year}.json", dict(sorted(m.items())))
    res.elapsed = time.perf_counter() - t0
    write_json(out / "export.json", {
        "catalog": str(catalog.resolve()), "filter": res.filter, "params": sets,
        "pool_rows": res.pool_rows, "rows_read": res.rows_read,
        "yearly": res.yearly, "monthly": res.monthly,
        "eval": {"retrieval": res.retrieval, "datacompnet": res.datacompnet},
        "elapsed_seconds": round(res.elapsed, 3),
    })
    return res


def _year_range(seen: list[int]) -> range:
    """Every year ``yearly/sizes.json`` lists: from the first to the last year of any streamed
    row, and from TiC's first year (2014) on when the rows are within TiC's years, so that
    ``curate tic plan``'s first step (2014..its year) finds a size for each of its years."""
    if not seen:
        return range(0)
    first, last = seen
    if YEAR_MIN <= first <= YEAR_MAX:
        first = YEAR_MIN
    return range(first, last + 1)


def _writer(writers: dict, key: str, path: Path) -> SubsetStream:
    if key not in writers:  # opened once per split; a split's rows are contiguous in the stream
        writers[key] = SubsetStream(path)
    return writers[key]


def _write_records(path: Path, rec: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rec, dtype=SUBSET_DTYPE), allow_pickle=False)


@dataclass
class TicExport:
    """What :func:`export_tic` did."""

    splits: ExportResult
    filter_run: RunResult | None = None  # the .sql filter run on a distributed engine first
    eval_sets: EvalSetResult | None = None  # None: not resharded (see the lines it reported)


def export_tic(catalog, out, filter_path=None, sets: dict | None = None, *, eval_sets: bool | None = None,
               shards=None, engine: Engine | None = None, progress: bool = False,
               echo: Callable[[str], None] | None = None) -> TicExport:
    """``curate tic export``: every split file (:func:`export_splits`), then the eval sets as
    clip_benchmark webdatasets (:func:`curate.tic.evalsets.reshard_eval_sets`).

    ``filter_path`` restricts the training splits (a subset file, a ``.sql`` filter or a bundled
    filter's name; ``sets`` its parameters). ``engine``: a distributed one runs a ``.sql`` filter
    per pool file first, and the eval-set shards as its tasks (the streaming pass that writes the
    split files stays here). ``eval_sets``: None reshards them when there is a shard directory
    (``shards``, default the catalog's), True requires one, False skips them. ``echo`` receives
    one line per finished step (the command prints them).
    """
    echo = echo or (lambda line: None)
    out = Path(out)
    # built beside OUT and swapped in when complete: a failed run leaves an earlier export as it
    # was; only the export's own entries are replaced, the rest of OUT (tic prepare's data dirs,
    # the user's files) is left alone
    with replace_dir(out, _OWNED, entries=EXPORT_ENTRIES, what="curate tic export", error=TicError) as build:
        cache, kept = out / "eval" / _RESHARD, build / "eval" / _RESHARD
        if cache.is_dir() and not cache.is_symlink():  # the eval sets' resharder outputs: a rerun resumes them
            kept.parent.mkdir()
            cache.rename(kept)
        try:
            done = _export_tic(catalog, build, out, filter_path, sets, eval_sets, shards, engine, progress, echo)
        except BaseException:
            if kept.is_dir() and out.is_dir() and not cache.exists():
                (out / "eval").mkdir(exist_ok=True)
                kept.rename(cache)
            raise
    done.splits.out = out
    if done.eval_sets is not None:
        e = done.eval_sets
        e.dirs = {_moved(k, build, out): v for k, v in e.dirs.items()}
        e.missing = {_moved(k, build, out): v for k, v in e.missing.items()}
        e.tasklist = e.tasklist and _moved(e.tasklist, build, out)
    return done


# the top-level entries of OUT that tic export writes (and replaces as a whole on a rerun), and
# the files it writes under them: a rerun refuses an OUT whose entries hold anything else
EXPORT_ENTRIES = ("yearly", "monthly", "eval", "filter", "export.json")
_RESHARD = ".reshard"
_OWNED = re.compile(r"(?:yearly|monthly)/(?:-?[0-9]+\.npy|sizes\.json)|eval/.+|filter/.+|export\.json"
                    r"|(?:yearly|monthly)/\..+\.tmp")


def _moved(path: str, build: Path, out: Path) -> str:
    p = Path(path)
    return str(out / p.relative_to(build)) if p.is_relative_to(build) else path


def _export_tic(catalog, out: Path, shown: Path, filter_path, sets, eval_sets, shards, engine, progress,
                echo) -> TicExport:
    """:func:`export_tic` into ``out`` (the new output being built); messages name ``shown``."""
    sets = sets or {}
    filter_run = None
    if filter_path is not None:
        filter_path = resources.filter_file(filter_path)
    if engine is not None and engine.distributed and filter_path is not None and filter_path.suffix == ".sql":
        subset = Path(out) / "filter" / (filter_path.stem + ".npy")
        filter_run = run_filter(filter_path, catalog=catalog, out=subset, sets=sets, progress=progress, engine=engine)
        echo(f"filter {filter_path} on ray: {filter_run.count:,} uids -> {shown / subset.relative_to(out)}")
        filter_path, sets = subset, {}
    r = export_splits(catalog, out, filter_path, sets, progress=progress)
    done = TicExport(r, filter_run)
    echo(f"read {r.rows_read:,} timestamped samples of {r.pool_rows:,}"
         + (f" (training splits ∩ {r.filter})" if r.filter else ""))
    echo(f"wrote {len(r.yearly)} yearly files ({sum(r.yearly.values()):,} uids) and {len(r.monthly)} monthly "
         f"files under {shown} in {r.elapsed:.2f}s")
    echo(f"eval subsets: retrieval {sum(r.retrieval.values()):,} uids, "
         f"datacompnet {sum(r.datacompnet.values()):,} uids in {len(r.retrieval) + len(r.datacompnet)} files")
    if eval_sets is False or not (r.retrieval or r.datacompnet):
        return done
    if shards is None:
        shards = shards_dir(catalog)
    if shards is None or not Path(shards).is_dir():
        if eval_sets:
            raise TicError(f"{catalog}: no pool shard directory to reshard the eval sets from; pass --shards DIR")
        echo("eval sets not resharded: the catalog has no shard directory (pass --shards DIR)")
        return done
    t0 = time.perf_counter()
    e = done.eval_sets = reshard_eval_sets(out, shards, catalog=catalog, progress=progress, engine=engine)
    echo(f"eval sets: {sum(e.dirs.values()):,} samples in {len(e.dirs)} clip_benchmark dirs under "
         f"{shown / 'eval'} (read {e.input_shards_read} of {e.input_shards_total} pool shards) "
         f"in {time.perf_counter() - t0:.2f}s")
    if e.missing:
        echo(f"note: {sum(e.missing.values()):,} eval uids have no downloaded sample in {shards}")
    tasklist = shown / Path(e.tasklist).relative_to(out)
    echo(f"wrote {tasklist} (curate eval --tasks {tasklist} --data-dir {shown})")
    return done


__all__ = ["export_splits", "export_tic", "ExportResult", "TicExport", "SubsetStream"]
