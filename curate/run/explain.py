"""Why was it dropped: a filter's ``WHERE`` split into its conjuncts, the rows each one rejects
(``curate run --explain``) and every dropped uid with the first conjunct that rejected it
(``curate run --dropped OUT.parquet``). docs/explain.md.

The query is split twice, and both must agree: DuckDB's own tokenizer (:mod:`curate.sqltokens`)
cuts the text at the top-level ``AND`` of the final ``SELECT``'s ``WHERE`` (an ``AND`` inside
parentheses, ``CASE ... END`` or ``BETWEEN ... AND`` does not split), so each conjunct keeps its
text exactly as the user wrote it; sqlglot parses the query and flattens its ``WHERE`` into the
same conjuncts, which proves the shape (one ``SELECT``, no set operation at the top). A ``WITH``
chain is kept as written in front of every query built here; its final ``WHERE`` is explained.
A query that cannot be split (``UNION``, a parenthesised query, no ``FROM``, ...) runs as a
whole, and the explanation says why in one line.

Everything runs on the connection the filter was prepared on (:func:`curate.run.query.open_filter`:
sandboxed, its parameters set, ``read_subset()`` registered, ``fraction_threshold()`` already
evaluated into variables by :func:`curate.run.query.precompute_thresholds`), from the pieces of
that prepared query; the pieces as written by the user are what is shown and stored.

Semantics, as in SQL's ``WHERE``: a conjunct whose value is NULL rejects the row (only TRUE
keeps it). "Alone" counts the rows of the ``FROM`` a conjunct rejects on its own; the funnel
counts, in file order, the rows that passed every earlier conjunct and fail this one. When the
``FROM`` (its joins) yields a different number of rows than ``pool`` holds, the difference is a
first step of its own, so the rejections always add up to pool rows minus kept rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import OutputError, atomic_path, check_output
from curate.catalog.connection import catalog_read_paths, default_catalog
from curate.progress import duckdb_bar
from curate.run.query import (FilterFile, FilterError, check_uid_column, filter_error, open_filter,
                              precompute_thresholds)
from curate.run.plot import Histogram, draw_histograms
from curate.run.shape import QueryShape, _depths, _kw, split_query  # noqa: F401 (re-exported)
from curate.sqltokens import call_arguments, tokenize

#: rows per Arrow batch written to the --dropped parquet file
_BATCH_ROWS = 1 << 16
DROPPED_SCHEMA = pa.schema([("uid", pa.string()), ("conjunct", pa.int32()), ("rejected_by", pa.string())])


def sqlglot_conjuncts(sql: str) -> list[str] | str:
    """The final SELECT's WHERE conjuncts as sqlglot parses them (each in sqlglot's DuckDB
    spelling, for comparison); a string saying why not."""
    import sqlglot  # lazy: sqlglot stays off `curate run`'s start-up path
    from sqlglot import exp  # lazy: as above

    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except Exception as e:  # noqa: BLE001 - any sqlglot failure means it cannot prove the shape
        return f"sqlglot cannot parse it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if not isinstance(tree, exp.Select):
        return f"it is a {type(tree).__name__.upper()}, not one SELECT"
    where = tree.args.get("where")
    if where is None:
        return []
    parts = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
    return [p.sql(dialect="duckdb") for p in parts]


def _same_by_sqlglot(pieces: list[str], canonical: list[str]) -> bool:
    import sqlglot  # lazy: as in sqlglot_conjuncts

    if len(pieces) != len(canonical):
        return False
    try:
        return all(sqlglot.parse_one(p, read="duckdb").sql(dialect="duckdb") == c for p, c in zip(pieces, canonical))
    except Exception:  # noqa: BLE001 - a piece sqlglot cannot read on its own: not the same split
        return False


@dataclass(frozen=True)
class SplitFilter:
    """A filter's query split: ``shown`` as the user wrote it, ``run`` the prepared query's pieces
    (read_subset() and fraction_threshold() replaced), conjunct for conjunct."""

    shown: QueryShape
    run: QueryShape


def split_filter_query(flt: FilterFile, query: str) -> SplitFilter | str:
    """Split the filter as written (checked by sqlglot) and its prepared ``query`` the same way;
    a one-line reason when either cannot be split or they differ."""
    shown = split_query(flt.query)
    if isinstance(shown, str):
        return shown
    canonical = sqlglot_conjuncts(flt.query)
    if isinstance(canonical, str):
        return canonical
    if not _same_by_sqlglot(shown.conjuncts, canonical):
        return "sqlglot and DuckDB's tokenizer split its WHERE differently"
    run = split_query(query)
    if isinstance(run, str) or len(run.conjuncts) != len(shown.conjuncts) or (run.rest is None) != (shown.rest is None):
        return "the prepared query does not split like the file"
    return SplitFilter(shown, run)


# -- the funnel ---------------------------------------------------------------------------------

@dataclass
class Step:
    """One line of the funnel."""

    index: int  # 1-based conjunct number; 0: the FROM clause (joins); -1: the clauses after WHERE
    sql: str  # as written in the filter file
    alone: int | None  # rows of the FROM this conjunct rejects on its own (None: not a conjunct)
    rows_in: int
    rejected: int  # rows that passed every earlier step and fail this one
    rows_left: int


@dataclass
class Explanation:
    filter: Path
    pool_rows: int
    kept: int
    steps: list[Step] = field(default_factory=list)
    from_sql: str | None = None  # the FROM clause as written
    from_rows: int | None = None
    reason: str | None = None  # why the filter could not be split (then ``steps`` is empty)
    dropped: Path | None = None
    dropped_rows: int | None = None

    @property
    def split(self) -> bool:
        return self.reason is None


def _one_line(sql: str) -> str:
    """``sql`` on one line: comments dropped, each run of whitespace between tokens one space
    (string literals untouched: the tokenizer knows where they end)."""
    out, end = [], None
    for t in tokenize(sql):
        if end is not None and t.start > end:
            out.append(" ")
        out.append(sql[t.start:t.end])
        end = t.end
    return "".join(out)


def _pool_rows(con) -> int:
    return int(con.execute("SELECT sum(num_rows) FROM pool_files").fetchone()[0] or 0)


def explain_open(con, flt: FilterFile, query: str) -> Explanation:
    """The funnel of ``flt`` on ``con``, where ``query`` is its prepared query (thresholds
    precomputed, result checked). Two queries at most: one pass over the FROM for every count,
    and one count of the whole query when clauses after WHERE drop rows too (or it cannot be split)."""
    pool_rows = _pool_rows(con)
    split = split_filter_query(flt, query)
    if isinstance(split, str):
        return Explanation(flt.path, pool_rows, _count(con, query, flt), reason=split)
    run, shown = split.run, split.shown
    n = len(run.conjuncts)
    cols = ["count(*)"]
    cols += [f"count(*) FILTER (WHERE ({c}))" for c in run.conjuncts]
    cols += [f"count(*) FILTER (WHERE {' AND '.join(f'({c})' for c in run.conjuncts[:k])})" for k in range(2, n + 1)]
    sql = f"{run.prefix}\nSELECT {', '.join(cols)}\nFROM {run.from_sql}"
    try:
        row = con.execute(sql).fetchone()
    except duckdb.Error as e:
        raise filter_error(flt.path, e, con) from None
    from_rows, alone = int(row[0]), [int(v) for v in row[1:n + 1]]
    cumulative = alone[:1] + [int(v) for v in row[n + 1:]]
    steps = []
    if from_rows != pool_rows:
        steps.append(Step(0, f"FROM {shown.from_sql}", pool_rows - from_rows, pool_rows, pool_rows - from_rows,
                          from_rows))
    rows = from_rows
    for k in range(n):
        steps.append(Step(k + 1, shown.conjuncts[k], from_rows - alone[k], rows, rows - cumulative[k], cumulative[k]))
        rows = cumulative[k]
    kept = rows
    if run.rest is not None:
        kept = _count(con, query, flt)
        steps.append(Step(-1, shown.rest, None, rows, rows - kept, kept))
    return Explanation(flt.path, pool_rows, kept, steps, shown.from_sql, from_rows)


def _count(con, query: str, flt: FilterFile) -> int:
    try:
        return int(con.execute(f"SELECT count(*) FROM ({query})").fetchone()[0])
    except duckdb.Error as e:
        raise filter_error(flt.path, e, con) from None


def format_explanation(ex: Explanation, name=None) -> list[str]:
    """The funnel as printed by ``curate run --explain``: one line per step, widths aligned."""
    name = name or ex.filter
    if not ex.split:
        return [f"{name}: --explain cannot split this filter into conjuncts ({ex.reason}); it ran as a whole: "
                f"kept {ex.kept:,} of {ex.pool_rows:,} pool rows"]
    lines = [f"{name}: funnel over {ex.pool_rows:,} pool rows"
             + (f" (FROM {_one_line(ex.from_sql)}: {ex.from_rows:,} rows)" if ex.from_sql else "")]
    table = [("#", "alone rejects", "rows in", "rejected", "rows left", "conjunct")]
    for s in ex.steps:
        label = {0: "from", -1: "rest"}.get(s.index, str(s.index))
        table.append((label, "-" if s.alone is None else f"{s.alone:,}", f"{s.rows_in:,}", f"{s.rejected:,}",
                      f"{s.rows_left:,}", _one_line(s.sql)))
    if len(table) == 1:
        table.append(("-", "-", f"{ex.from_rows:,}", "0", f"{ex.from_rows:,}", "(no WHERE: every row is kept)"))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    pct = 100.0 * ex.kept / ex.pool_rows if ex.pool_rows else 0.0
    lines.append(f"  kept {ex.kept:,} of {ex.pool_rows:,} pool rows ({pct:.2f}%)")
    return lines


# -- the dropped rows ---------------------------------------------------------------------------

def _read_subset_inputs(flt: FilterFile, params: dict) -> list[Path]:
    """Subset files the filter reads with read_subset('file') or read_subset(getvariable('p'))."""
    tokens = tokenize(flt.query)
    out = []
    for k, t in enumerate(tokens):
        if not (t.is_name("read_subset") and k + 2 < len(tokens)):
            continue
        nxt = tokens[k + 2]
        if nxt.kind == "string_const" and nxt.value:
            out.append(Path(nxt.value))
        elif nxt.is_name("getvariable") and k + 4 < len(tokens) and tokens[k + 4].value in params:
            out.append(Path(str(params[tokens[k + 4].value])))
    return out


def check_not_input(dest, con, flt: FilterFile, params: dict, catalog, others=()) -> Path:
    """``dest`` checked as an output (:func:`curate.atomic.check_output`) that is none of the
    run's inputs: the filter file, the catalog, a file the catalog points at or a directory it
    reads, a subset file the filter reads, or one of ``others`` (the run's own outputs)."""
    dest = check_output(dest)
    target = Path(os.path.realpath(dest))
    files, dirs = catalog_read_paths(con, catalog)
    inputs = [flt.path, Path(catalog), *(Path(f) for f in files if "://" not in f),
              *_read_subset_inputs(flt, params), *(Path(o) for o in others)]
    for p in inputs:
        if Path(os.path.realpath(p)) == target:
            raise OutputError(f"{dest}: refusing to overwrite {p}, an input of this run")
    for d in dirs:
        if "://" not in d and target.is_relative_to(os.path.realpath(d)):
            raise OutputError(f"{dest}: refusing to write inside {d}, a directory the catalog reads")
    return dest


def write_dropped(con, flt: FilterFile, query: str, dest, explanation: Explanation | None = None) -> int:
    """Write every row of the filter's scope that it did not keep to ``dest`` (parquet: ``uid``,
    ``conjunct`` (1-based, in file order; 0: the FROM/joins or the whole query), ``rejected_by``
    (that conjunct's text as written)), sorted by uid; returns the number of rows.

    Streams: DuckDB evaluates and sorts, Arrow batches go to a temporary file renamed at the end.
    ``dest`` should have been checked with :func:`check_not_input` first."""
    split = split_filter_query(flt, query)
    if isinstance(split, str):
        texts = [f"(the whole filter: {split})"]
        body = f"SELECT p.uid, 0 AS conjunct FROM pool AS p ANTI JOIN ({query}) AS q ON p.uid = q.uid"
    else:
        run, shown = split.run, split.shown
        texts = [f"FROM {shown.from_sql}", *shown.conjuncts]
        if run.rest is not None:
            texts.append(shown.rest)
        whens = " ".join(f"WHEN ({c}) IS NOT TRUE THEN {k}" for k, c in enumerate(run.conjuncts, 1))
        rest = f" ELSE {len(run.conjuncts) + 1}" if run.rest is not None else ""
        case = f"CASE {whens}{rest} END" if run.conjuncts else str(len(run.conjuncts) + 1)
        all_true = " AND ".join(f"({c})" for c in run.conjuncts) or "true"
        scope = f"{run.prefix}\nSELECT {run.projection} AS uid, {case} AS conjunct\nFROM {run.from_sql}"
        if run.rest is None:
            body = f"SELECT uid, conjunct FROM ({scope}\nWHERE ({all_true}) IS NOT TRUE) AS s"
        else:  # rows that pass the WHERE but not the clauses after it: uids the whole query did not return
            body = (f"SELECT uid, conjunct FROM ({scope}) AS s WHERE conjunct <= {len(run.conjuncts)} "
                    f"OR uid NOT IN (SELECT uid FROM ({query}) AS q WHERE uid IS NOT NULL)")
        pool_rows = explanation.pool_rows if explanation else _pool_rows(con)
        from_rows = explanation.from_rows if explanation else None
        if from_rows != pool_rows:  # pool rows the FROM (its joins) does not reach
            body += (f"\nUNION ALL SELECT p.uid, 0 FROM pool AS p ANTI JOIN ({run.prefix}\nSELECT {run.projection} "
                     f"AS uid FROM {run.from_sql}) AS f ON p.uid = f.uid")
    sql = f"SELECT uid, conjunct::INTEGER AS conjunct FROM ({body}) AS d ORDER BY uid, conjunct"
    labels = pa.array(texts, pa.string())  # the user's text stays data: looked up per batch, never in SQL
    rows = 0
    with atomic_path(dest, suffix=".parquet") as tmp:
        try:
            reader = con.execute(sql).to_arrow_reader(_BATCH_ROWS)
        except duckdb.Error as e:
            raise filter_error(flt.path, e, con) from None
        with pq.ParquetWriter(tmp, DROPPED_SCHEMA) as writer:
            for batch in reader:
                uid, conjunct = batch.column(0).cast(pa.string()), batch.column(1)
                writer.write_batch(pa.RecordBatch.from_arrays([uid, conjunct, labels.take(conjunct)],
                                                              schema=DROPPED_SCHEMA))
                rows += batch.num_rows
    return rows


# -- the thresholded scores (--plot) ------------------------------------------------------------

_NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                  "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL")
_COMPARISONS = (">=", ">", "<=", "<")


@dataclass(frozen=True)
class Threshold:
    """A conjunct comparing a numeric column with a threshold: ``col >= t``, ``t < col``,
    ``datacomp_ge(col, t)``, ... (texts from the prepared query; ``shown`` as written)."""

    conjunct: int  # 1-based
    shown: str
    column: str  # the column, as in the prepared query
    threshold: str  # the threshold expression, as in the prepared query
    shown_column: str  # the column as written


def _is_column(text: str) -> bool:
    import sqlglot  # lazy: sqlglot stays off `curate run`'s start-up path
    from sqlglot import exp  # lazy: as above

    try:
        return isinstance(sqlglot.parse_one(text, read="duckdb"), exp.Column)
    except Exception:  # noqa: BLE001 - not parseable alone: not a plain column
        return False


def _reads_no_column(text: str) -> bool:
    """No column of the row in ``text``: columns only inside a subquery or a
    ``fraction_threshold(...)`` (whole-pool scalars)."""
    import sqlglot  # lazy: as in _is_column
    from sqlglot import exp  # lazy: as above

    try:
        tree = sqlglot.parse_one(text, read="duckdb")
    except Exception:  # noqa: BLE001 - unknown: not a threshold we can draw
        return False
    for col in tree.find_all(exp.Column):
        node = col.parent
        while node is not None and not (isinstance(node, (exp.Select, exp.Subquery)) or (
                isinstance(node, exp.Anonymous) and str(node.name).lower() == "fraction_threshold")):
            node = node.parent
        if node is None:
            return False
    return True


def _threshold_of(piece: str) -> tuple[str, str] | None:
    """(column, threshold) texts of a conjunct that compares a plain column with a threshold."""
    tokens = tokenize(piece)
    if not tokens:
        return None
    if tokens[0].is_name("datacomp_ge"):
        found = call_arguments(tokens, 0)
        if found and found[0] == len(tokens) - 1 and len(found[1]) == 1:
            comma = found[1][0]
            col = piece[tokens[1].end:tokens[comma].start].strip()
            thr = piece[tokens[comma].end:tokens[-1].start].strip()
            return (col, thr) if _is_column(col) and _reads_no_column(thr) else None
        return None
    depth = _depths(tokens)
    ops = [i for i, t in enumerate(tokens) if depth[i] == 0 and t.kind == "operator" and t.value in _COMPARISONS]
    if len(ops) != 1 or any(depth[i] == 0 and t.kind == "keyword" for i, t in enumerate(tokens)):
        return None
    left, right = piece[:tokens[ops[0]].start].strip(), piece[tokens[ops[0]].end:].strip()
    if _is_column(left) and _reads_no_column(right):
        return left, right
    if _is_column(right) and _reads_no_column(left):
        return right, left
    return None


def threshold_targets(con, flt: FilterFile, query: str) -> tuple[SplitFilter, list[Threshold]]:
    """The conjuncts of ``flt`` that threshold a numeric column; a one-line :class:`FilterError`
    when the filter cannot be split or has none."""
    split = split_filter_query(flt, query)
    if isinstance(split, str):
        raise FilterError(f"{flt.path}: --plot cannot split this filter into conjuncts ({split})")
    out = []
    for k, (piece, shown) in enumerate(zip(split.run.conjuncts, split.shown.conjuncts), 1):
        found = _threshold_of(piece)
        if found is None:
            continue
        try:
            probe = f"{split.run.prefix}\nSELECT ({found[0]}) AS s FROM {split.run.from_sql} LIMIT 0"
            typ = str(con.sql(probe).types[0])
        except duckdb.Error:
            continue
        if typ.upper().startswith(_NUMERIC_TYPES):
            as_written = _threshold_of(shown)
            out.append(Threshold(k, shown, *found, as_written[0] if as_written else found[0]))
    if not out:
        raise FilterError(f"{flt.path}: --plot: the filter compares no numeric column with a threshold "
                          "(col >= value, col < value, datacomp_ge(col, value), ...): nothing to draw")
    return split, out


def score_histograms(con, flt: FilterFile, split: SplitFilter, targets: list[Threshold], bins: int = 50) -> list:
    """Per thresholded column, the rows of the FROM in ``bins`` equal bins between the smallest
    and largest finite score (and threshold), and how many of them the filter kept."""
    run = split.run
    kept = " AND ".join(f"({c})" for c in run.conjuncts) or "true"
    hists: list[Histogram] = []
    by_column: dict[str, list[Threshold]] = {}
    for t in targets:
        by_column.setdefault(" ".join(t.column.split()).lower(), []).append(t)
    try:
        for group in by_column.values():
            col = group[0].column
            values = []
            for t in group:
                try:
                    v = con.execute(f"SELECT ({t.threshold})::DOUBLE").fetchone()[0]
                except duckdb.Error:
                    v = None
                values.append(None if v is None or v != v or v in (float("inf"), float("-inf")) else float(v))
            scores = f"{run.prefix}\nSELECT ({col})::DOUBLE AS s, (({kept}) IS TRUE) AS kept FROM {run.from_sql}"
            lo, hi, missing = con.execute(
                f"SELECT min(s) FILTER (WHERE isfinite(s)), max(s) FILTER (WHERE isfinite(s)), "
                f"count(*) FILTER (WHERE s IS NULL OR NOT isfinite(s)) FROM ({scores})").fetchone()
            finite = [v for v in values if v is not None]
            lo = min([lo, *finite]) if lo is not None else (min(finite) if finite else 0.0)
            hi = max([hi, *finite]) if hi is not None else (max(finite) if finite else 1.0)
            width = (hi - lo) / bins if hi > lo else 1.0
            counts = con.execute(
                "SELECT least(greatest(floor((s - ?) / ?), 0), ?)::INTEGER AS b, count(*), "
                f"count(*) FILTER (WHERE kept) "
                f"FROM ({scores}) WHERE isfinite(s) GROUP BY b", [lo, width, bins - 1]).fetchall()
            rows, kept_rows = [0] * bins, [0] * bins
            for b, n, k in counts:
                rows[b], kept_rows[b] = int(n), int(k)
            hists.append(Histogram(group[0].shown_column, [lo + width * i for i in range(bins + 1)], rows, kept_rows,
                                   [(t.shown, v) for t, v in zip(group, values)], int(missing)))
    except duckdb.Error as e:
        raise filter_error(flt.path, e, con) from None
    return hists


# -- one call -----------------------------------------------------------------------------------

def inspect_prepared(con, flt: FilterFile, query: str, params: dict, catalog, explain: bool = True, dropped=None,
                     plot=None, outputs=(), name=None) -> Explanation | None:
    """``--explain``, ``--dropped`` and ``--plot`` on a prepared connection (the one ``curate run``
    fetches from): outputs checked and the plot's scores found first, so a bad request writes nothing."""
    if dropped is not None:
        dropped = check_not_input(dropped, con, flt, params, catalog, outputs)
    if plot is not None:
        plot = check_not_input(plot, con, flt, params, catalog, [*outputs, *([dropped] if dropped else [])])
        split, targets = threshold_targets(con, flt, query)
    ex = explain_open(con, flt, query) if explain or dropped is not None else None
    if dropped is not None:
        ex.dropped_rows = write_dropped(con, flt, query, dropped, ex)
        ex.dropped = dropped
    if plot is not None:
        hists = score_histograms(con, flt, split, targets)
        draw_histograms(hists, plot, f"{name or flt.path.stem}: scores it thresholds (grey: all rows, blue: kept)")
    return ex


def explain_filter(filter_path, catalog=None, sets: dict | None = None, dropped=None, plot=None,
                   progress: bool = False, outputs=()) -> Explanation:
    """``--explain`` (with ``--dropped``, ``--plot``) without writing a subset: open and prepare
    the filter the way ``curate run`` does (:func:`curate.run.query.open_filter`), then explain it
    on that connection."""
    catalog = Path(catalog) if catalog else default_catalog()
    opened = open_filter(filter_path, catalog, sets, progress=progress, row_level=False,  # whole columns
                         settings={"enable_progress_bar": duckdb_bar(progress)})
    con, flt = opened.con, opened.flt
    try:
        query, _ = precompute_thresholds(con, opened.query)
        check_uid_column(con, query, flt.path)
        return inspect_prepared(con, flt, query, opened.params, catalog, dropped=dropped, plot=plot, outputs=outputs)
    finally:
        con.close()


__all__ = ["Explanation", "QueryShape", "SplitFilter", "Step", "Threshold", "check_not_input", "explain_filter",
           "explain_open", "format_explanation", "inspect_prepared", "score_histograms", "split_filter_query",
           "split_query", "sqlglot_conjuncts", "threshold_targets", "write_dropped"]
