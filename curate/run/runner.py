"""The local engine: a filter file over the catalog becomes a DataComp subset file and its
manifest, in one DuckDB query on this machine.

The filter is opened by :func:`curate.run.query.open_filter` (parameters, feature tables, one
prepared connection), its ``fraction_threshold()`` calls are evaluated up front and its result
checked (:mod:`curate.run.query`). The query then streams out of DuckDB in Arrow batches of uid
strings; :mod:`curate.uids` turns them into (hi, lo) pairs, which are sorted and written with
:func:`curate.subset.write_records`. Only the selected uids (16 bytes each) are held in memory,
never the pool.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from curate import __version__
from curate.atomic import check_output, write_json
from curate.catalog.connection import default_catalog
from curate.progress import DuckDBProgress, duckdb_settings
from curate.run.query import (FilterFile, check_uid_column, filter_error, json_value, locate_bad_uid, open_filter,
                              precompute_thresholds)
from curate.subset import write_records
from curate.uids import SUBSET_DTYPE, BadUid, hex_array_to_records, sort_records

#: rows per Arrow batch fetched from DuckDB: small enough to stay in cache while parsing
_BATCH_ROWS = 1 << 16


@dataclass
class RunResult:
    out: Path
    manifest: Path
    count: int
    distinct: int
    pool_rows: int
    params: dict
    elapsed: float
    thresholds: list = field(default_factory=list)  # fraction_threshold() values, in query order


def default_out(filter_path, suffix: str = ".npy") -> Path:
    """Where a run writes when no output is given: ``subsets/<filter name><suffix>``."""
    return Path("subsets") / (Path(filter_path).stem + suffix)


def run_filter(filter_path, catalog=None, out=None, sets=None, progress=False, before_fetch=None,
               row_level: bool = True) -> RunResult:
    """Run ``filter_path`` on ``catalog`` here and write the sorted subset ``out`` plus its manifest.

    ``filter_path`` is a file or a bundled filter's name; ``sets`` overrides its parameters.
    (:func:`curate.run.run_filter` is the same call with an engine to choose.)
    ``before_fetch(con, query, opened)``, if given, runs on the prepared, sandboxed connection
    once the query is checked and before its rows are fetched (``curate run --explain``), which
    counts rows per conjunct and so needs whole caption-feature columns: ``row_level=False``
    (:mod:`curate.run.ondemand`).
    """
    t0 = time.perf_counter()
    catalog = Path(catalog) if catalog else default_catalog()
    out = check_output(Path(out) if out else default_out(filter_path))  # before the work, not after
    # Feature builds show progress (log lines off a terminal: curate.progress); DuckDB's own bar
    # draws on stdout, so only at a terminal; elsewhere its progress is polled into lines. Let DuckDB's threads run a couple of
    # batches ahead of the one being parsed (the default buffer of about 1 MB stalls the query
    # after every batch or so; much larger ones cost more in page faults than they save:
    # bench/bench_filter.py). Set before the connection is sandboxed and locked.
    opened = open_filter(filter_path, catalog, sets, progress=progress,
                         settings={**duckdb_settings(progress), "streaming_buffer_size": "4MB"},
                         row_level=row_level)
    con, flt = opened.con, opened.flt
    try:
        query, thresholds = precompute_thresholds(con, opened.query)
        check_uid_column(con, query, flt.path)
        if before_fetch is not None:
            before_fetch(con, query, opened)
        with DuckDBProgress(con, f"{flt.path.stem} query", progress):
            parts = _fetch_records(con, query, flt.path)
        pool_rows = int(con.execute("SELECT sum(num_rows) FROM pool_files").fetchone()[0] or 0)
    finally:
        con.close()  # before sorting: the memory DuckDB gives back is what the sort allocates next
    records = np.concatenate(parts) if parts else np.empty(0, SUBSET_DTYPE)
    del parts
    records = sort_records(records)
    f0, f1 = records["f0"], records["f1"]
    distinct = int(len(records) and 1 + np.count_nonzero((f0[1:] != f0[:-1]) | (f1[1:] != f1[:-1])))
    write_records(out, records)
    elapsed = time.perf_counter() - t0
    manifest = out.with_suffix(".json")
    write_json(manifest, manifest_record(out, flt, opened.params, opened.features, catalog, pool_rows,
                                         int(len(records)), distinct, elapsed, thresholds=thresholds))
    return RunResult(out, manifest, int(len(records)), distinct, pool_rows, opened.params, elapsed, thresholds)


def _fetch_records(con, query: str, path: Path) -> list[np.ndarray]:
    """Stream the query's uids as record arrays, one per Arrow batch."""
    parts = []
    try:
        reader = con.execute(query).to_arrow_reader(_BATCH_ROWS)
        for batch in reader:
            try:
                parts.append(hex_array_to_records(batch.column(0)))
            except BadUid as e:
                raise locate_bad_uid(con, e, path) from None
    except duckdb.Error as e:
        raise filter_error(path, e, con) from None
    return parts


def manifest_record(out, flt: FilterFile, params: dict, features: dict, catalog: Path, pool_rows: int,
                    count: int, distinct: int, elapsed: float, versions: dict | None = None,
                    thresholds: list | None = None) -> dict:
    """The JSON manifest written beside a subset file (local and ray engines alike)."""
    record = {
        "subset": str(out),
        "filter": str(flt.path),
        "filter_sha256": flt.sha256,
        "params": {k: json_value(v) for k, v in params.items()},
        "features": features,
        "catalog": str(Path(catalog).resolve()),
        "pool_rows": pool_rows,
        "count": count,
        "distinct": distinct,
        "elapsed_seconds": round(elapsed, 3),
        "versions": {
            "curate": __version__,
            "duckdb": duckdb.__version__,
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "python": platform.python_version(),
            **(versions or {}),
        },
        "command": " ".join(sys.argv) if sys.argv else None,
    }
    if thresholds:
        # each fraction_threshold() call of the query, with the exact value it gave
        record["thresholds"] = [{**t, "threshold": json_value(t["threshold"])} for t in thresholds]
    return record
