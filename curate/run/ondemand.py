"""Caption features built on demand: only the columns a filter reads, only for the rows that can
still pass it.

DataComp's text baselines read per-caption features that cost microseconds a caption each:
word and character counts, the WordNet entity flag, fastText's language, CLD3's language
(:mod:`curate.features.text`, :mod:`curate.features.cld3`). Computing all of them for every row
before the first filter runs made a cold ``curate run`` as slow as DataComp itself. Here a filter
pays only for what it needs:

* **Columns.** Each table is made of *parts* (``counts``, ``entity``, ``lang`` of
  ``text_features``; ``cld3`` of ``text_lang_cld3``), each computed on its own. A filter builds
  the parts whose columns it names (:func:`needed_parts`); ``SELECT *`` over a caption table
  names them all.
* **Rows.** When the filter's query has the shape ``SELECT ... FROM ... JOIN <caption table> ...
  WHERE c1 AND c2 AND ...`` (:func:`row_plan`), parts are computed in order of cost, each only
  for the rows that pass every conjunct that does not read it or a costlier part. That is exact:
  ``WHERE`` keeps a row only when every conjunct is TRUE, so a row that fails (or is NULL on) a
  cheaper conjunct is dropped whatever the costlier feature says. ``laion2b.sql`` runs CLD3 only
  on the rows whose B/32 score passes 0.28; ``basic_filter.sql`` runs fastText only on the
  captions of more than two words and five characters on images of the right size.

The tables keep one row per pool row; a value not yet computed is NULL (the DuckDB shell sees
NULL, never a wrong value), and each output records how many rows of each part it holds. A later
filter that needs more rows computes only the missing ones; ``curate features text`` still
computes everything. The subset a filter gives is byte-identical whichever rows were computed
before, in whatever order filters ran.

When the shape does not allow the row restriction (a caption column read inside a subquery, in
a setup statement, in a ``WITH`` or the ``FROM`` clause, the table read twice, a set operation),
the parts the filter names are computed for every row. ``curate run --explain`` and
``--dropped`` count rows per conjunct on their own, so they always compute whole columns.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from curate.errors import CurateError
from curate.run.shape import split_query
from curate.sqltokens import sql_literal, tokenize

#: caption views and the module:attribute of their :class:`~curate.features.text.CaptionTable`
CAPTION_TABLES = {
    "text_features": "curate.features.text:TABLE",
    "text_lang_cld3": "curate.features.cld3:TABLE",
}


def caption_table(view: str):
    import importlib  # lazy: the producer modules load fastText/WordNet wrappers (see registry)

    module, attr = CAPTION_TABLES[view].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class PartNeed:
    view: str
    part: str
    columns: tuple[str, ...]
    cost: int


def _names(sql: str) -> set[str]:
    return {t.value.lower() for t in tokenize(sql) if t.kind in ("identifier", "keyword") and t.value}


def _has_star(sql: str) -> bool:
    """A ``*`` that selects columns (``SELECT *``, ``t.*``, ``, *``), not ``count(*)`` or ``a * b``."""
    tokens = tokenize(sql)
    for i, t in enumerate(tokens):
        if t.is_op("*") and i > 0:
            prev = tokens[i - 1]
            if prev.is_op(",") or prev.is_op(".") or prev.kind == "keyword" and prev.value in ("select", "distinct", "all"):
                return True
    return False


def needed_parts(sql: str) -> list[PartNeed]:
    """The parts of the caption tables ``sql`` reads, cheapest first: a part is needed when the
    text names one of its columns (or selects ``*``) and names its table."""
    names = _names(sql)
    star = None
    out = []
    for view in CAPTION_TABLES:
        if view not in names:
            continue
        if star is None:
            star = _has_star(sql)
        for part in caption_table(view).parts.values():
            if star or any(c in names for c in part.columns):
                out.append(PartNeed(view, part.name, tuple(part.columns), part.cost))
    return sorted(out, key=lambda p: p.cost)


def caption_columns() -> dict[str, PartNeed]:
    """Every caption column -> its part."""
    out = {}
    for view in CAPTION_TABLES:
        for part in caption_table(view).parts.values():
            for c in part.columns:
                out[c] = PartNeed(view, part.name, tuple(part.columns), part.cost)
    return out


@dataclass(frozen=True)
class RowPlan:
    """The query cut so that a part's needed rows can be selected (see :func:`restriction_sql`)."""

    prefix: str
    from_sql: str
    aliases: dict  # caption view -> its alias in FROM
    conjuncts: list  # (text, caption columns it reads)
    spans: dict  # caption view -> (start, end[, name]) of its name in from_sql


def row_plan(setup: list[str], query: str) -> RowPlan | str:
    """How ``query`` (prepared: read_subset() replaced) can restrict the rows a part is computed
    for, or a short reason why it cannot (then parts are computed for every row)."""
    columns = caption_columns()
    caption_names = set(CAPTION_TABLES) | set(columns)
    for stmt in setup:
        if _names(stmt) & caption_names:
            return "a setup statement reads a caption table"
    shape = split_query(query)
    if isinstance(shape, str):
        return shape
    if _names(shape.prefix) & caption_names:
        return "its WITH clause reads a caption table"
    aliases, spans = {}, {}
    tokens = tokenize(shape.from_sql)
    depth = 0
    for i, t in enumerate(tokens):
        if t.is_op("("):
            depth += 1
        elif t.is_op(")"):
            depth -= 1
        if t.kind in ("identifier", "keyword") and (t.value or "").lower() in columns:
            return f"its FROM clause reads the caption column {t.value}"
        name = (t.value or "").lower() if t.kind in ("identifier", "keyword") else ""
        if name in CAPTION_TABLES and not (i > 0 and tokens[i - 1].is_op(".")):
            if depth or name in aliases:
                return f"it reads {name} more than once or inside a subquery"
            nxt = tokens[i + 1:i + 3]
            spans[name] = (t.start, t.end)
            if nxt and nxt[0].is_name("as") and len(nxt) > 1 and nxt[1].kind == "identifier":
                aliases[name] = nxt[1].value
            elif nxt and nxt[0].kind == "identifier":
                aliases[name] = nxt[0].value
            else:
                aliases[name] = name
                spans[name] = (t.start, t.end, name)  # the subquery standing in for it needs the name
    conjuncts = []
    for text in [shape.projection, shape.rest or "", *shape.conjuncts]:
        names = _names(text)
        if names & caption_names and names & {"select", "fraction_threshold"}:
            return "a caption column is read inside a subquery or a fraction_threshold()"
    for text in shape.conjuncts:
        conjuncts.append((text, frozenset(_names(text) & set(columns))))
    if not aliases:
        return "it reads no caption table in its FROM clause"
    return RowPlan(shape.prefix, shape.from_sql, aliases, conjuncts, spans)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def restriction_sql(plan: RowPlan, need: PartNeed, computed: set[str], only_missing: bool = False,
                    files: list[str] | None = None) -> str:
    """The rows (``file``, ``row``) of ``need.view`` that pass every conjunct reading only pool
    columns and the ``computed`` caption columns; with ``only_missing``, only those whose value
    is NULL. (Without it, which rows already hold current values is for
    :func:`curate.features.parts.build_parts` to say: a value computed with other settings, e.g.
    another language-ID model, is present but stale.)"""
    alias = _ident(plan.aliases[need.view])
    kept = [(text, cols) for text, cols in plan.conjuncts if cols <= computed]
    keep = [f"({text})" for text, _ in kept] or ["true"]
    if only_missing:  # exact only where no output holds stale values of the part (see build_needed)
        keep.append(f"{alias}.{_ident(need.columns[0])} IS NULL")
    if files is not None:  # a chunk of pool files (DuckDB reads only those: a filter on the file name)
        keep.append(f"{alias}.file IN ({', '.join(sql_literal(f) for f in files)})")
    # a caption table none of whose columns the kept conjuncts read stands for exactly the pool's
    # (uid, file, row): read those from the pool, so nothing has to exist before the first part
    read = set().union(*(cols for _, cols in kept)) if kept else set()
    if only_missing:
        read |= {need.columns[0]}
    columns = caption_columns()
    from_sql = plan.from_sql
    for view, span in sorted(plan.spans.items(), key=lambda kv: -kv[1][0]):
        if not any(columns[c].view == view for c in read):
            stand_in = '(SELECT uid, file, "row" FROM main.pool)' + (f" AS {span[2]}" if len(span) > 2 else "")
            from_sql = from_sql[:span[0]] + stand_in + from_sql[span[1]:]
    # each piece on its own lines: the query's own comments end at a newline
    # rows repeat where a join does (rows_by_file makes them unique; DISTINCT here costs more)
    return (f"{plan.prefix}\nSELECT {alias}.file AS file, {alias}.\"row\" AS \"row\"\n"
            f"FROM {from_sql}\nWHERE " + "\n  AND ".join(keep)).strip()


#: pool rows whose row numbers are listed at a time (8 bytes each): a pool larger than this is
#: restricted and computed a chunk of pool files at a time
CHUNK_ROWS = 16_000_000


def _chunks(status: dict, limit: int) -> list[list[str] | None]:
    """Pool files (``status``: file -> (done, rows)) in runs of at most ``limit`` rows (a file
    larger than that on its own); ``[None]`` (every file at once) when the pool fits."""
    if sum(n for _, n in status.values()) <= limit:
        return [None]
    out, cur, size = [], [], 0
    for f, (_, n) in status.items():
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += n
    if cur:
        out.append(cur)
    return out


def rows_by_file(con, sql: str) -> dict[str, np.ndarray]:
    """file -> sorted unique row numbers of a :func:`restriction_sql` result (one list per pool
    file out of DuckDB: no Python object per row)."""
    # sorting and de-duplicating each file's list in numpy is cheaper than DuckDB's list(DISTINCT
    # ... ORDER BY ...) (0.13 s of 1M rows)
    table = con.execute(f"SELECT file, list(\"row\") AS rows FROM ({sql}) GROUP BY file").to_arrow_table()
    rows = table.column("rows").combine_chunks()
    return {str(f): np.unique(rows[i].values.to_numpy().astype(np.int64))
            for i, f in enumerate(table.column("file").to_pylist())}


def _rows_to_compute(con, plan: RowPlan, need: PartNeed, computed: set[str], cov, files=None) -> dict[str, np.ndarray]:
    """The rows of ``need`` the filter may need that could lack a current value ({}: none).

    NULL means "not computed" exactly when no output holds stale values of the part (``cov``:
    its :class:`~curate.features.parts.Coverage`): then one ``count(*)`` over the rows still NULL
    says whether anything is missing. Otherwise every restricted row is returned and
    :func:`~curate.features.parts.build_parts` (or ``missing_rows``) says which hold current values."""
    exact = not cov.stale and any(k for k, _ in cov.status.values())
    sql = restriction_sql(plan, need, computed, only_missing=exact, files=files)
    if exact and not int(con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]):
        return {}
    return rows_by_file(con, sql)


class _Prepared:
    """The filter's prepared connection, opened when first needed and closed before anything is
    built (building registers views: it writes the catalog)."""

    def __init__(self, open_prepared: Callable):
        self._open, self.con, self.query = open_prepared, None, None

    def __enter__(self):
        return self

    def get(self):
        if self.con is None:
            self.con, self.query = self._open()
        return self.con, self.query

    def close(self):
        if self.con is not None:
            con, self.con = self.con, None
            con.close()

    def __exit__(self, *exc):
        self.close()


def _start_workers(needs: list[PartNeed], coverage: dict, catalog, engine, fresh: bool = False):
    """Start the worker processes of the first part of ``needs`` that runs in processes (and
    load its table's models there) now, while the restrictions and the parts before it are
    computed here (:func:`~curate.features.parts.warm_pool`); with ``fresh``, only if that part
    was never computed for any row (a partly computed one may need nothing: the restriction
    says). Returns the :class:`~curate.engine.WarmPool`, or a null context (whose value is None)."""
    from curate.features import parts as textfeatures  # lazy: see caption_table

    todo = [n for n in needs if not coverage[(n.view, n.part)].complete]
    for need in todo:
        table = caption_table(need.view)
        if not table.parts[need.part].threads:
            status = coverage[(need.view, need.part)].status
            if fresh and any(done for done, _ in status.values()):
                break
            missing = sum(n - done for done, n in status.values())
            return textfeatures.warm_pool(table, catalog, [n.part for n in todo if n.view == need.view], missing,
                                          engine)
    return contextlib.nullcontext()


def build_needed(catalog, flt, open_prepared: Callable, *, row_level: bool = True, progress: bool = True,
                 engine=None) -> dict[str, dict]:
    """Compute the caption parts ``flt`` reads, for the rows it needs; returns, per view, what was
    computed (for the run manifest).

    ``open_prepared()`` returns ``(con, query)``: a sandboxed, read-only catalog connection with
    the filter's setup statements run and parameters set, and its prepared query; the caller's
    :func:`curate.run.query.open_filter` without features. It is opened only when a part is not
    complete, and closed before a part is computed (computing writes the catalog's view).

    What is complete comes from the outputs' metadata (no data read). For a part computed for
    some rows, one ``count(*)`` of the restriction over rows still NULL says whether anything is
    missing (when no output holds stale values of it; otherwise the rows are handed to
    :func:`~curate.features.parts.build_parts`, which knows which values are current).
    """
    from curate.features import parts as textfeatures  # lazy: see caption_table

    needs = needed_parts(flt.text)
    if not needs:
        return {}
    coverage = {}
    for view in dict.fromkeys(n.view for n in needs):
        got = textfeatures.part_coverage(caption_table(view), catalog, [n.part for n in needs if n.view == view])
        if any(c.outputs and (not c.registered or c.outputs < len(c.status)) for c in got.values()):
            # outputs there but no view (a run killed before it registered it), or a view over
            # outputs some of which are gone or stale: (re)write those as all-NULL ones and register
            # the view, so that the restrictions can read what was computed
            textfeatures.ensure_skeleton(caption_table(view), catalog)
        coverage.update({(view, part): cov for part, cov in got.items()})
    plan: RowPlan | str | None = None if row_level else "whole columns were asked for"
    report: dict[str, dict] = {}
    built: set[str] = set()
    computed: set[str] = set()
    started = None  # the WarmPool of this run, once one is started
    with _Prepared(open_prepared) as prepared, contextlib.ExitStack() as workers:
        for i, need in enumerate(needs):
            table = caption_table(need.view)
            cov = coverage[(need.view, need.part)]
            total = sum(n for _, n in cov.status.values())
            entry = report.setdefault(need.view, {})
            entry[need.part] = {"rows_computed_now": 0, "rows": total}
            if cov.complete:
                computed |= set(need.columns)
                continue
            if not started:  # a part never computed: its workers start before any restriction runs
                started = workers.enter_context(_start_workers(needs[i:], coverage, catalog, engine, fresh=True))
            if not isinstance(plan, str) and plan is None:
                plan = row_plan(flt.setup, prepared.get()[1])  # the prepared query (subsets registered)
            t0 = time.perf_counter()
            done = 0
            restricted = not isinstance(plan, str)
            # the row lists of a chunk of pool files at a time (8 bytes a row): memory bounded by
            # CHUNK_ROWS, not by the pool; one chunk for a pool of up to CHUNK_ROWS rows
            for files in _chunks(cov.status, CHUNK_ROWS) if restricted else [None]:
                rows = None
                if restricted:
                    rows = _rows_to_compute(prepared.get()[0], plan, need, computed, cov, files)
                    if not rows:
                        continue
                if not started:  # (a part computed for some rows: only now is there work for them)
                    started = workers.enter_context(_start_workers(needs[i:], coverage, catalog, engine))
                prepared.close()
                res = textfeatures.build_parts(table, catalog, [need.part], rows=rows, engine=engine,
                                               progress=progress)
                built.add(need.view)
                done += res.part_rows.get(need.part, 0)
            if need.view not in built and not any(k for k, _ in cov.status.values()):
                prepared.close()
                textfeatures.ensure_skeleton(table, catalog)  # the view exists for what reads it next
                built.add(need.view)
            entry[need.part] = {"rows_computed_now": done, "rows": total, "restricted": restricted}
            if progress and done:
                which = ("the rows that pass the filter's cheaper conditions" if restricted
                         else f"every row ({plan})")
                print(f"{need.view}.{need.part}: computed {done:,} of {total:,} rows "
                      f"({which}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            computed |= set(need.columns)
    return report


def missing_parts(catalog, flt, open_prepared: Callable) -> list[str]:
    """``view.part`` names that ``flt`` would compute before it runs (empty: it runs as it is), found
    without writing anything, the way :func:`build_needed` finds them (outputs' metadata, then the
    part's restriction). For read-only users (``curate explore``)."""
    import duckdb  # lazy: the connection's own module, for its error type

    from curate.features import parts as textfeatures  # lazy: see caption_table

    needs = needed_parts(flt.text)
    coverage = {}
    try:
        for view in dict.fromkeys(n.view for n in needs):
            got = textfeatures.part_coverage(caption_table(view), catalog, [n.part for n in needs if n.view == view])
            coverage.update({(view, part): cov for part, cov in got.items()})
    except CurateError:  # e.g. a pool file gone: running the filter would fail or rebuild
        return [f"{n.view}.{n.part}" for n in needs]
    plan: RowPlan | str | None = None
    computed: set[str] = set()
    with _Prepared(open_prepared) as prepared:
        for need in needs:
            cov = coverage[(need.view, need.part)]
            if not cov.complete:
                if plan is None:
                    plan = row_plan(flt.setup, prepared.get()[1])
                if isinstance(plan, str) or not cov.registered:
                    return [f"{need.view}.{need.part}"]
                try:
                    rows = _rows_to_compute(prepared.get()[0], plan, need, computed, cov)
                except duckdb.Error:  # an output listed in the view is gone: it would be rebuilt
                    return [f"{need.view}.{need.part}"]
                if rows and textfeatures.missing_rows(caption_table(need.view), catalog, [need.part], rows):
                    return [f"{need.view}.{need.part}"]
            computed |= set(need.columns)
    return []


__all__ = ["CAPTION_TABLES", "PartNeed", "RowPlan", "build_needed", "caption_columns", "missing_parts", "needed_parts",
           "restriction_sql", "row_plan", "rows_by_file"]
