"""Static and bind-time checks of a filter file against a catalog's schema.

The filter is never run: every statement it may not hold is reported (:func:`curate.run.query.split_filter`),
then it is prepared like a run (:mod:`curate.run.query`) on the sandboxed connection, without building
feature tables. sqlglot parses the filter's query and qualifies every column against the
catalog's tables and views (so a misspelt column is reported by name with the tables it could
have come from); DuckDB then binds the query without running it, which catches what sqlglot
cannot know (macro arguments, types) and checks the result is exactly one ``uid`` VARCHAR.

sqlglot is imported when a filter is linted, never on ``curate run``'s start-up path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from curate.features.registry import PRODUCERS
from curate.run.query import MISSING_VIEW_HINTS, FilterError, check_uid_column, open_filter, split_filter


@dataclass
class LintReport:
    path: str
    errors: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _schema(con) -> dict:
    schema: dict = {}
    for table, column, dtype in con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
    ).fetchall():
        schema.setdefault(table, {})[column] = dtype
    return schema


def lint_filter(path, catalog=None) -> LintReport:
    """Check the filter ``path`` (a file or a bundled filter's name) against ``catalog``."""
    report = LintReport(str(path))
    flt, problems = split_filter(path)  # every statement a filter may not hold, each one line
    report.errors.extend(problems)
    if flt is None or not flt.query_ok:
        return report
    try:
        # the allowed statements only, on the sandboxed connection; nothing is built or written
        opened = open_filter(flt, catalog, features=False)
    except FilterError as e:
        report.errors.append(str(e))
        return report
    con = opened.con
    report.params = opened.params
    try:
        pending = _static_checks(opened.query, path, con, report)
        if pending is None or pending:  # a syntax error; or views DuckDB cannot bind before they exist
            return report
        try:
            check_uid_column(con, opened.query, path)  # binds (prepares) the query; never runs it
        except FilterError as e:
            report.errors.append(str(e))
    finally:
        con.close()
    return report


def _static_checks(query: str, path, con, report: LintReport) -> set[str] | None:
    """sqlglot's checks: syntax, tables, functions, columns. The producer views the query reads
    that are not built yet (their columns cannot be checked); None after a syntax error."""
    import sqlglot  # lazy: sqlglot stays off `curate run`'s start-up path
    from sqlglot import exp  # lazy: as above
    from sqlglot.errors import OptimizeError, ParseError  # lazy: as above
    from sqlglot.optimizer.qualify import qualify  # lazy: as above

    try:
        tree = sqlglot.parse_one(query, read="duckdb")
    except ParseError as e:
        err = e.errors[0] if e.errors else {}
        report.errors.append(
            f"{path}: syntax error at line {err.get('line', '?')}, column {err.get('col', '?')}: "
            f"{err.get('description', str(e))}"
        )
        return None
    schema = _schema(con)
    ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
    pending = set()  # views a producer builds on first `curate run`: known, columns unchecked
    for table in tree.find_all(exp.Table):
        name = table.name
        if not name or isinstance(table.this, exp.Func):
            continue
        if name not in schema and name in PRODUCERS:
            if name not in pending:
                report.notes.append(f"{name}: not built yet; `curate run` builds it first")
                report.tables.append(name)
            pending.add(name)
        elif name not in schema and name not in ctes:
            if name in MISSING_VIEW_HINTS:
                report.errors.append(f"{path}: the catalog has no view {name}; {MISSING_VIEW_HINTS[name]}")
            else:
                known = ", ".join(sorted(schema)) or "none"
                report.errors.append(f"{path}: unknown table '{name}' (the catalog has: {known})")
        elif name not in report.tables:
            report.tables.append(name)
    known_functions = {r[0].lower() for r in con.execute("SELECT DISTINCT function_name FROM duckdb_functions()").fetchall()}
    for fn in tree.find_all(exp.Func):
        if isinstance(fn, (exp.Connector, exp.Binary, exp.Not, exp.Paren)):
            continue  # AND/OR/comparisons are operators, not functions
        name = fn.name if isinstance(fn, exp.Anonymous) else fn.sql_name()
        name = (name or "").lower()
        if not name:
            continue
        if isinstance(fn, exp.Anonymous) and name not in known_functions:
            report.errors.append(f"{path}: unknown function '{name}'")
        if name not in report.functions:
            report.functions.append(name)
    if not report.errors and not pending:
        try:
            qualify(tree.copy(), schema=schema, dialect="duckdb", validate_qualify_columns=True)
        except OptimizeError as e:
            report.errors.append(f"{path}: {e}")
        except Exception:  # noqa: BLE001 - sqlglot may not model every DuckDB construct; DuckDB binds below
            pass
    return pending
