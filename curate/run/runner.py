"""Run a filter: a SQL file over the catalog becomes a DataComp subset file and its manifest.

A filter file is DuckDB SQL: optional ``SET VARIABLE name = default;`` statements (its
parameters, overridable with ``--set name=value``, which reach DuckDB as bound values), then one
query returning a single ``uid`` column. Rows may repeat (a uid returned k times = k copies).
``read_subset('path.npy')`` in a filter reads another subset file as a table with a ``uid``
column, so subsets compose with INTERSECT / UNION ALL / EXCEPT / joins.

The query streams out of DuckDB in Arrow batches of uid strings; :mod:`curate.uids` turns them
into (hi, lo) pairs, which are sorted and written with :func:`curate.subset.write_records`.
Only the selected uids (16 bytes each) are held in memory, never the pool.
"""

from __future__ import annotations

import decimal
import hashlib
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from curate import __version__
from curate.atomic import write_json
from curate.catalog.connection import connect, default_catalog
from curate.errors import CurateError
from curate.features.registry import ensure_features, needed_producers, producer
from curate.sqltokens import tokenize
from curate.subset import subset_to_arrow, write_records
from curate.run.thresholds import extract_fraction_thresholds
from curate.uids import SUBSET_DTYPE, BadUid, hex_array_to_records, sort_records

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SET_VARIABLE = re.compile(r"^\s*SET\s+VARIABLE\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


class FilterError(CurateError):
    """A filter file that cannot run: syntax, binding, wrong result columns, bad parameter."""


#: rows per Arrow batch fetched from DuckDB: small enough to stay in cache while parsing
_BATCH_ROWS = 1 << 16


def parse_value(text: str):
    """Type a ``--set`` value: int, then float, then true/false, else the string itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_sets(pairs) -> dict:
    out = {}
    for item in pairs or ():
        if "=" not in item:
            raise FilterError(f"--set {item!r}: expected KEY=VALUE")
        key, val = item.split("=", 1)
        key = key.strip()
        if not _IDENT.match(key):
            raise FilterError(f"--set {item!r}: {key!r} is not a parameter name")
        out[key] = parse_value(val)
    return out


@dataclass
class FilterFile:
    path: Path
    text: str
    setup: list[str]  # statements before the query (SET VARIABLE ...)
    query: str
    params: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_filter(path: str | Path, con: duckdb.DuckDBPyConnection) -> FilterFile:
    path = Path(path)
    if not path.is_file():
        raise FilterError(f"{path}: filter file not found")
    text = path.read_text()
    try:
        statements = con.extract_statements(text)
    except duckdb.Error as e:
        raise FilterError(f"{path}: {_one_line(e)}") from None
    if not statements:
        raise FilterError(f"{path}: no SQL statement in the file")
    *setup, last = statements
    if last.type != duckdb.StatementType.SELECT:
        raise FilterError(f"{path}: the last statement must be a query returning a `uid` column")
    setup_sql = [s.query for s in setup]
    params = [m.group(1) for q in setup_sql if (m := _SET_VARIABLE.match(_strip_comments(q)))]
    return FilterFile(path, text, setup_sql, last.query, params)


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def substitute_subsets(sql: str, con, variables: dict, registered: dict) -> str:
    """Replace ``read_subset('file')`` / ``read_subset(getvariable('p'))`` with registered tables."""
    if "read_subset" not in sql.lower():
        return sql
    tokens = tokenize(sql)

    def literal(k: int) -> bool:
        return k < len(tokens) and tokens[k].kind == "string_const" and tokens[k].value is not None

    def op(k: int, text: str) -> bool:
        return k < len(tokens) and tokens[k].is_op(text)

    out, pos, i = [], 0, 0
    while i < len(tokens):
        t = tokens[i]
        if t.is_name("read_subset") and op(i + 1, "("):
            arg, end = None, None
            if literal(i + 2) and op(i + 3, ")"):
                arg, end = tokens[i + 2].value, i + 3
            elif i + 2 < len(tokens) and tokens[i + 2].is_name("getvariable") and op(i + 3, "(") \
                    and literal(i + 4) and op(i + 5, ")") and op(i + 6, ")"):
                name = tokens[i + 4].value
                if name not in variables:
                    raise FilterError(f"read_subset(getvariable('{name}')): no parameter '{name}' is set")
                arg, end = str(variables[name]), i + 6
            if arg is None:
                raise FilterError("read_subset() takes one file path: read_subset('subsets/x.npy')")
            key = str(Path(arg).resolve())
            if key not in registered:
                name = f"__subset_{len(registered)}"
                con.register(name, subset_to_arrow(arg))
                registered[key] = name
            out.append(sql[pos : t.start])
            out.append(registered[key])
            pos = tokens[end].end
            i = end + 1
            continue
        i += 1
    out.append(sql[pos:])
    return "".join(out)


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


def prepare(con, flt: FilterFile, sets: dict) -> tuple[str, dict]:
    """Run the filter's setup statements, apply overrides, return the final query and params."""
    unknown = [k for k in sets if k not in flt.params]
    if unknown:
        declared = ", ".join(flt.params) or "none"
        raise FilterError(f"{flt.path}: unknown parameter '{unknown[0]}' (this filter declares: {declared})")
    registered: dict = {}
    for stmt in flt.setup:
        try:
            con.execute(substitute_subsets(stmt, con, {}, registered))
        except duckdb.Error as e:
            raise FilterError(f"{flt.path}: {_one_line(e)}") from None
    for key, val in sets.items():
        con.execute(f"SET VARIABLE {key} = ?", [val])  # key checked against _IDENT and the declared names
    params = {}
    for key in flt.params:
        # key matched _SET_VARIABLE (an identifier); not bound, because binding any parameter
        # makes DuckDB import pandas (0.3 s on every run)
        params[key] = _json_value(con.execute(f"SELECT getvariable('{key}')").fetchone()[0])
    query = substitute_subsets(flt.query, con, params, registered)
    return query, params


def precompute_thresholds(con, query: str) -> tuple[str, list[dict]]:
    """Evaluate each ``fraction_threshold(score, fraction)`` of ``query`` once, up front, into a
    typed variable; return the query reading the variables instead, and the values found.

    The result is the same, only faster: DuckDB pushes ``score >= <constant>`` into the parquet
    scan (skipping rows before it decodes their uids), but not ``score >= (scalar subquery)``.
    A call that cannot be evaluated on its own (it names something outside ``pool``) leaves the
    query untouched, so DuckDB reports or evaluates it exactly as written.
    """
    rewritten, calls = extract_fraction_thresholds(query)
    found = []
    for call in calls:
        try:
            con.execute(f"SET VARIABLE {call.variable} = "
                        f"fraction_threshold(({call.score_sql}), ({call.fraction_sql}))")
            value = con.execute(f"SELECT getvariable('{call.variable}')").fetchone()[0]
        except duckdb.Error:
            return query, []
        # None: fewer numeric scores than the rank, DataComp's NaN threshold (nothing kept)
        found.append({"score": call.score_sql, "fraction": call.fraction_sql, "threshold": value})
    return rewritten, found


def filter_features(catalog, flt: FilterFile, params: dict, progress: bool) -> dict:
    """Build the feature views ``flt`` references that are missing or stale, and describe them
    for the manifest. Call with no connection to ``catalog`` open (producers write to it)."""
    built = ensure_features(catalog, flt.text, params, progress=progress)
    features = {}
    for view in needed_producers(flt.text):
        describe = getattr(producer(view), "describe", None)
        features[view] = {"built_now": view in built, **(describe(catalog, params) if describe else {})}
    return features


def _json_value(v):
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


def run_filter(filter_path, catalog=None, out=None, sets=None, progress=False) -> RunResult:
    """Run ``filter_path`` on ``catalog`` and write the sorted subset ``out`` plus its manifest."""
    t0 = time.perf_counter()
    catalog = Path(catalog) if catalog else default_catalog()
    out = Path(out) if out else Path("subsets") / (Path(filter_path).stem + ".npy")
    con = connect(catalog)
    flt = load_filter(filter_path, con)
    query, params = prepare(con, flt, sets or {})
    features = {}
    if needed_producers(flt.text):
        con.close()  # producers open the catalog read-write
        features = filter_features(catalog, flt, params, progress)
        con = connect(catalog)
        flt = load_filter(filter_path, con)
        query, params = prepare(con, flt, sets or {})
    # DuckDB's bar writes to stdout; only show it to a person at a terminal
    con.execute(f"SET enable_progress_bar = {'true' if progress else 'false'}")
    query, thresholds = precompute_thresholds(con, query)
    try:
        rel = con.sql(query)
        columns, types = rel.columns, rel.types
    except duckdb.Error as e:
        raise FilterError(f"{flt.path}: {_one_line(e)}") from None
    if columns != ["uid"]:
        raise FilterError(
            f"{flt.path}: the query must return exactly one column named `uid`; it returns "
            f"{', '.join(columns)}"
        )
    if str(types[0]) != "VARCHAR":
        raise FilterError(f"{flt.path}: column `uid` has type {types[0]}, expected VARCHAR (32 hex characters)")
    # Let DuckDB's threads run a couple of batches ahead of this one while it parses the uids
    # of the last (the default buffer of about 1 MB stalls the query after every batch or so;
    # much larger ones cost more in page faults than they save: bench/bench_filter.py).
    con.execute("SET streaming_buffer_size = '4MB'")
    parts = []
    try:
        reader = con.execute(query).to_arrow_reader(_BATCH_ROWS)
        for batch in reader:
            try:
                parts.append(hex_array_to_records(batch.column(0)))
            except BadUid as e:
                raise _locate_bad_uid(con, e, flt.path) from None
    except duckdb.Error as e:
        raise FilterError(f"{flt.path}: {_one_line(e)}") from None
    pool_rows = int(con.execute("SELECT sum(num_rows) FROM pool_files").fetchone()[0] or 0)
    con.close()  # before sorting: the memory DuckDB gives back is what the sort allocates next
    records = np.concatenate(parts) if parts else np.empty(0, SUBSET_DTYPE)
    del parts
    records = sort_records(records)
    f0, f1 = records["f0"], records["f1"]
    distinct = int(len(records) and 1 + np.count_nonzero((f0[1:] != f0[:-1]) | (f1[1:] != f1[:-1])))
    write_records(out, records)
    elapsed = time.perf_counter() - t0
    manifest = out.with_suffix(".json")
    write_json(manifest, manifest_record(out, flt, params, features, catalog, pool_rows, int(len(records)),
                                         distinct, elapsed, thresholds=thresholds))
    return RunResult(out, manifest, int(len(records)), distinct, pool_rows, params, elapsed, thresholds)


def manifest_record(out, flt: FilterFile, params: dict, features: dict, catalog: Path, pool_rows: int,
                    count: int, distinct: int, elapsed: float, versions: dict | None = None,
                    thresholds: list | None = None) -> dict:
    """The JSON manifest written beside a subset file (local and ray engines alike)."""
    record = {
        "subset": str(out),
        "filter": str(flt.path),
        "filter_sha256": flt.sha256,
        "params": {k: _json_value(v) for k, v in params.items()},
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
        record["thresholds"] = [{**t, "threshold": _json_value(t["threshold"])} for t in thresholds]
    return record


def _locate_bad_uid(con, err: BadUid, path: Path) -> CurateError:
    """Turn a bad uid in a query result into an error naming the pool file and row it came from."""
    where = ""
    try:
        hit = con.execute(
            "SELECT file, \"row\" FROM pool WHERE uid IS NOT DISTINCT FROM ? LIMIT 1", [err.value]
        ).fetchone()
        if hit:
            src = con.execute("SELECT path FROM pool_files WHERE file = ?", [hit[0]]).fetchone()
            where = f" (pool file {src[0] if src else hit[0]}, row {hit[1]}, column uid)"
    except duckdb.Error:
        pass
    return CurateError(f"{path}: {err}{where}")
