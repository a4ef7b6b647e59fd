"""Static and bind-time checks of a filter file against a catalog's schema.

sqlglot parses the filter's query and qualifies every column against the catalog's tables and
views (so a misspelt column is reported by name with the tables it could have come from);
DuckDB then binds the query without running it, which catches what sqlglot cannot know (macro
arguments, types) and tells us the result columns, which must be exactly one ``uid`` VARCHAR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import OptimizeError, ParseError
from sqlglot.optimizer.qualify import qualify

from curate.catalog.connection import connect
from curate.features.registry import PRODUCERS
from curate.run.runner import FilterError, _one_line, load_filter, prepare


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
    con = connect(catalog)
    report = LintReport(str(path))
    try:
        flt = load_filter(path, con)
        query, report.params = prepare(con, flt, {})
    except FilterError as e:
        report.errors.append(str(e))
        return report
    try:
        tree = sqlglot.parse_one(query, read="duckdb")
    except ParseError as e:
        err = e.errors[0] if e.errors else {}
        report.errors.append(
            f"{path}: syntax error at line {err.get('line', '?')}, column {err.get('col', '?')}: "
            f"{err.get('description', str(e))}"
        )
        return report
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
    if pending:  # DuckDB cannot bind a query over views that do not exist yet
        con.close()
        return report
    try:
        rel = con.sql(query)
        if rel.columns != ["uid"]:
            report.errors.append(
                f"{path}: the query must return exactly one column named `uid`; it returns "
                f"{', '.join(rel.columns)}")
        elif str(rel.types[0]) != "VARCHAR":
            report.errors.append(f"{path}: column `uid` has type {rel.types[0]}, expected VARCHAR")
    except duckdb.Error as e:
        report.errors.append(f"{path}: {_one_line(e)}")
    con.close()
    return report
