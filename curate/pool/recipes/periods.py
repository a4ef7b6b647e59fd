"""Time views over a pool's own time column: ``timesplit``, periods and a train/test split by uid.

TiC-DataComp ships its time map as uid files (``curate tic attach``); a pool built from a
timestamped table carries the time itself (``time_utc``, see :mod:`curate.pool.build`). This
module gives such a catalog the same view, plus what TiC's YFCC15M and RedCaps scripts add:

* ``timesplit(uid, year, month, period)``: year and month of the time column (UTC), and the
  period the sample belongs to: a year group (``time_periods`` table, e.g. YFCC15M's 2004-2008,
  2009-2010, 2011-2012, 2013-2014), a column of the pool (RedCaps: the year in the annotation
  file name), or by default the year itself. A sample whose year is in no group has period NULL.
* ``period_split(uid, period, split)``: a 99/1 ``train``/``test`` split per period, like TiC's
  ``train_test_split(test_size=0.01)`` but reproducible: within a period the test samples are
  the ``ceil(test_fraction * n)`` uids with the smallest ``sha256_hex(f"{seed}:{uid}")`` (ties,
  which need a SHA-256 collision, broken by uid). The size rule is scikit-learn's (``ceil`` of a
  double product); membership depends only on the seed and the period's uids, never on an RNG,
  the machine or the row order.
* ``tic_eval(uid, task, year, wnid, class_id)``: the test samples as retrieval eval uids, so the
  TiC split filters (``filters/tic/year.sql`` ...) and ``curate tic export`` leave them out of
  training as they do for TiC-DataComp. ``year`` names the sample's *period* by its last year
  (YFCC15M: 2008, 2010, 2012, 2014; RedCaps: the file year; default: the year), so
  ``curate tic export`` writes one retrieval eval set per period, as TiC evaluates them.

Settings (groups, seed, fraction) live in the tables ``time_periods`` and ``holdout_settings``
(inserted as bound parameters), so the views stay plain SQL that also runs in the DuckDB shell.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import duckdb
import numpy as np

from curate.atomic import replace_dir, write_json
from curate.catalog.checks import check_can_create
from curate.catalog.connection import CatalogError, connect, default_catalog, sql_identifier
from curate.errors import CurateError
from curate.pool.build import TIME_COLUMN
from curate.progress import Progress
from curate.subset import write_subset

#: TiC-YFCC15M's four year groups (``tic-yfcc15m/create_splits.py``), by upload year.
YFCC15M_GROUPS = [("2004-2008", 2004, 2008), ("2009-2010", 2009, 2010),
                  ("2011-2012", 2011, 2012), ("2013-2014", 2013, 2014)]
TEST_FRACTION = 0.01

_GROUP_RE = re.compile(r"\s*(\d{4})\s*(?:-\s*(\d{4}))?\s*\Z")
_TIME_TYPES = ("TIMESTAMP", "DATE", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S")


class PeriodError(CurateError):
    """Period or split settings that do not fit the pool."""


def parse_groups(spec: str) -> list[tuple[str, int, int]]:
    """``"2004-2008,2009-2010,2011"`` -> ``[("2004-2008", 2004, 2008), ..., ("2011", 2011, 2011)]``.

    Groups must be ascending and must not overlap.
    """
    groups = []
    for part in spec.split(","):
        m = _GROUP_RE.match(part)
        if not m:
            raise PeriodError(f"year group {part.strip()!r} is not YYYY or YYYY-YYYY")
        first = int(m.group(1))
        last = int(m.group(2) or first)
        if last < first:
            raise PeriodError(f"year group {part.strip()!r} ends before it starts")
        if groups and first <= groups[-1][2]:
            raise PeriodError(f"year group {part.strip()!r} overlaps or precedes {groups[-1][0]!r}")
        groups.append((f"{first}-{last}" if last != first else str(first), first, last))
    return groups


def holdout_size(n: int, test_fraction: float = TEST_FRACTION) -> int:
    """scikit-learn's ``train_test_split`` test size for a float ``test_size``: ``ceil(f * n)``."""
    return math.ceil(test_fraction * n)


def create_time_views(
    catalog: str | os.PathLike | None,
    time_col: str = TIME_COLUMN,
    groups: list[tuple[str, int, int]] | None = None,
    period_col: str | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int | str = 0,
    tic_eval: bool = True,
) -> dict:
    """Create ``timesplit``, ``period_split`` (and ``tic_eval``) in ``catalog``; return counts.

    Give at most one of ``groups`` (year groups) and ``period_col`` (a pool column holding the
    period); with neither, every year is its own period. Opens the catalog read-write: call it
    with no other connection to the catalog open.
    """
    if groups is not None and period_col is not None:
        raise PeriodError("give year groups or a period column, not both")
    if not 0 < test_fraction < 1:
        raise PeriodError(f"test fraction {test_fraction!r} is not between 0 and 1")
    catalog = Path(catalog) if catalog else default_catalog()
    con = connect(catalog, read_only=False)
    try:
        types = {name: typ for name, typ, *_ in con.execute("DESCRIBE pool").fetchall()}
        if time_col not in types:
            raise PeriodError(f"{catalog}: the pool has no time column {time_col!r} "
                              f"(build the pool with --time-col; columns: {', '.join(types)})")
        if types[time_col].split("(")[0] not in _TIME_TYPES:
            raise PeriodError(f"{catalog}: pool column {time_col!r} has type {types[time_col]}, "
                              f"not TIMESTAMP or DATE")
        if period_col is not None and period_col not in types:
            raise PeriodError(f"{catalog}: the pool has no period column {period_col!r}")
        t = "p." + sql_identifier(time_col)
        con.execute("CREATE OR REPLACE TABLE time_periods (period VARCHAR PRIMARY KEY, "
                    "first_year INTEGER NOT NULL, last_year INTEGER NOT NULL)")
        if groups:
            con.executemany("INSERT INTO time_periods VALUES (?, ?, ?)", [list(g) for g in groups])
        con.execute("CREATE OR REPLACE TABLE holdout_settings (seed VARCHAR NOT NULL, test_fraction DOUBLE NOT NULL)")
        con.execute("INSERT INTO holdout_settings VALUES (?, ?)", [str(seed), float(test_fraction)])
        if groups is not None:
            period_sql = (f"(SELECT g.period FROM time_periods AS g "
                          f"WHERE year({t}) BETWEEN g.first_year AND g.last_year)")
        elif period_col is not None:
            period_sql = f"CAST(p.{sql_identifier(period_col)} AS VARCHAR)"
        else:
            period_sql = f"CAST(year({t}) AS VARCHAR)"
        con.execute(f"""
            CREATE OR REPLACE VIEW timesplit AS
            SELECT p.uid,
                   CAST(year({t}) AS INTEGER) AS year,
                   CAST(month({t}) AS INTEGER) AS month,
                   {period_sql} AS period
            FROM pool AS p
            WHERE {t} IS NOT NULL""")
        con.execute("""
            CREATE OR REPLACE VIEW period_split AS
            WITH ranked AS (
                SELECT t.uid, t.period,
                       row_number() OVER (PARTITION BY t.period
                                          ORDER BY sha256(s.seed || ':' || t.uid), t.uid) AS rank,
                       count(*) OVER (PARTITION BY t.period) AS n,
                       s.test_fraction
                FROM timesplit AS t CROSS JOIN holdout_settings AS s
                WHERE t.period IS NOT NULL
            )
            SELECT uid, period,
                   CASE WHEN rank <= ceil(test_fraction * n) THEN 'test' ELSE 'train' END AS split
            FROM ranked""")
        if tic_eval:
            con.execute("""
                CREATE OR REPLACE VIEW tic_eval AS
                SELECT s.uid, 'retrieval' AS task,
                       CAST(coalesce(g.last_year, TRY_CAST(s.period AS INTEGER), t.year) AS INTEGER) AS year,
                       CAST(NULL AS VARCHAR) AS wnid, CAST(NULL AS INTEGER) AS class_id
                FROM period_split AS s
                JOIN timesplit AS t USING (uid)
                LEFT JOIN time_periods AS g ON g.period = s.period
                WHERE s.split = 'test'""")
        return period_counts(con)
    except duckdb.Error as e:
        raise CatalogError(f"{catalog}: cannot create the time views ({e})") from None
    finally:
        con.close()


def period_counts(con) -> list[tuple]:
    """``(period, train, test)`` per period, and ``(None, unmapped, 0)`` for samples in no period."""
    rows = con.execute("""
        SELECT period, count(*) FILTER (WHERE split = 'train'), count(*) FILTER (WHERE split = 'test')
        FROM period_split GROUP BY period ORDER BY period""").fetchall()
    unmapped = con.execute("SELECT count(*) FROM timesplit WHERE period IS NULL").fetchone()[0]
    untimed = con.execute(
        "SELECT (SELECT count(*) FROM pool) - (SELECT count(*) FROM timesplit)").fetchone()[0]
    out = [(p, int(a), int(b)) for p, a, b in rows]
    if unmapped or untimed:
        out.append((None, int(unmapped + untimed), 0))
    return out


def export_period_splits(catalog: str | os.PathLike | None, out: str | os.PathLike, progress: bool = True) -> dict:
    """Write ``OUT/{period}/{train,test}.npy`` (DataComp subset files) and ``OUT/sizes.json``.

    One sorted query over ``period_split``, streamed: each (period, split) group is
    contiguous, so at most one group's uids are held at a time.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PeriodError(f"{out}: exists and is not a directory")
    check_can_create(out, PeriodError, "output directory")
    # built beside OUT and swapped in when complete: a failed run leaves an earlier export as it was
    with replace_dir(out, _OWNED, what="curate pool export-splits", error=PeriodError) as build:
        return _export(catalog, build, progress)


# what export-splits writes under OUT: only these are ever replaced
_OWNED = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/(?:train|test)\.npy|sizes\.json")


def _export(catalog, out: Path, progress: bool) -> dict:
    con = connect(catalog, read_only=True)
    sizes: dict[str, dict[str, int]] = {}
    try:
        try:
            periods = [r[0] for r in con.execute(
                "SELECT DISTINCT period FROM period_split ORDER BY period").fetchall()]
        except duckdb.CatalogException:
            raise PeriodError(f"{catalog or default_catalog()}: no period_split view (create it with "
                              f"`curate pool timesplit`)") from None
        for period in Progress(periods, desc="periods", unit="period", disable=not progress):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", period):
                raise PeriodError(f"period {period!r} cannot be a directory name")
            for split in ("train", "test"):
                hi, lo = [], []
                res = con.execute(
                    "SELECT uid_hi(uid) AS hi, uid_lo(uid) AS lo FROM period_split "
                    "WHERE period = ? AND split = ? ORDER BY hi, lo", [period, split])
                # duckdb renamed fetch_record_batch to to_arrow_reader (1.5 warns, 2.0 drops it)
                reader = (res.to_arrow_reader if hasattr(res, "to_arrow_reader") else res.fetch_record_batch)(1 << 20)
                for batch in reader:
                    hi.append(batch.column(0).to_numpy().astype(np.uint64, copy=False))
                    lo.append(batch.column(1).to_numpy().astype(np.uint64, copy=False))
                h = np.concatenate(hi) if hi else np.empty(0, np.uint64)
                l_ = np.concatenate(lo) if lo else np.empty(0, np.uint64)
                write_subset(out / period / f"{split}.npy", h, l_)
                sizes.setdefault(period, {})[split] = int(len(h))
    finally:
        con.close()
    write_json(out / "sizes.json", sizes)
    return sizes
