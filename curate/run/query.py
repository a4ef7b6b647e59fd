"""A filter file made ready to run: the one path the local runner, the Ray runner, lint and
TiC export all take.

A filter file is DuckDB SQL: optional ``SET VARIABLE name = default;`` statements (its
parameters, overridable with ``--set name=value``, which reach DuckDB as bound values), then one
query returning a single ``uid`` column. Rows may repeat (a uid returned k times = k copies).
``read_subset('path.npy')`` in a filter reads another subset file as a table with a ``uid``
column, so subsets compose with INTERSECT / UNION ALL / EXCEPT / joins.

The steps, in order (:func:`open_filter` runs the first three):

1. :func:`load_filter`: read the file (a path, or a bundled filter by name:
   :func:`curate.resources.filter_file`) and split it into its setup statements and its query;
   anything but ``SET VARIABLE name = <constant>`` lines and one query is refused here, before
   anything runs (:func:`split_filter`);
2. :func:`build_features`: build the feature views the filter reads that are missing or stale,
   and describe them for the manifest. Producers write to the catalog, so this comes first,
   before the catalog is opened for reading;
3. :func:`curate.catalog.connection.connect`, :func:`sandbox_catalog` (the connection reads
   only what the catalog points at, its configuration locked: docs/safety.md) and
   :func:`prepare`, once: the setup statements, the ``--set`` overrides (type-checked) and
   ``read_subset()`` replaced by registered tables;
4. :func:`precompute_thresholds` (the local engines; Ray computes them across partitions) and
   :func:`check_uid_column`: the query binds and returns exactly one VARCHAR column ``uid``.

:func:`bundled_filters` lists the filters shipped with curate with their declared parameters.
"""

from __future__ import annotations

import decimal
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb

from curate import resources, storage
from curate.catalog.connection import catalog_read_paths, connect, default_catalog, sandbox
from curate.catalog.remote import register_catalog_filesystems
from curate.catalog.schema import POOL_COLUMNS, read_footer
from curate.errors import CurateError
from curate.features.registry import ensure_features, needed_producers, producer
from curate.run.ondemand import CAPTION_TABLES
from curate.run.thresholds import VARIABLE_PREFIX, extract_fraction_thresholds
from curate.sqltokens import tokenize
from curate.subset import subset_to_arrow
from curate.uids import BadUid

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SET_VARIABLE = re.compile(r"^\s*SET\s+VARIABLE\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
_TYPE = re.compile(r"[A-Za-z0-9_(), \[\]]+\Z")
_DENIED_PATH = re.compile(r'Cannot access (?:file|directory) "([^"]*)"')
#: where the sandbox rules are written down, named in every refusal
SANDBOX_DOC = "filters are sandboxed: docs/safety.md"


class FilterError(CurateError):
    """A filter file that cannot run: syntax, binding, wrong result columns, bad parameter."""


# -- parameters ---------------------------------------------------------------------------------

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
    """``--set KEY=VALUE`` options as a dict of typed values (:func:`parse_value`)."""
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


def json_value(v):
    """A parameter or threshold value as JSON can hold it (DECIMAL -> float, others -> str)."""
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


# -- the file -----------------------------------------------------------------------------------

@dataclass
class FilterFile:
    path: Path
    text: str
    setup: list[str]  # statements before the query (SET VARIABLE ...)
    query: str
    params: list[str] = field(default_factory=list)
    query_ok: bool = True  # False: the last statement is not a query (:func:`split_filter` says why)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_filter(path: str | Path) -> FilterFile:
    """Read and split a filter file: ``path`` as given if it exists, else a bundled filter by name
    (``clip_score_l14_30pct``, ``tic/year``). Needs no catalog. A statement a filter may not hold
    (:func:`check_filter_text`) is a :class:`FilterError` before anything runs."""
    flt, problems = split_filter(path)
    if problems:
        raise FilterError(problems[0])
    return flt


#: the first word of the one query a filter holds (SELECT / WITH / VALUES / FROM-first / a
#: parenthesised set operation)
_QUERY_WORDS = {"select", "with", "values", "from", "("}
#: words that make a SET VARIABLE value read something (a subquery), so not a constant
_QUERY_KEYWORDS = {"select", "from", "with", "values", "table", "pivot", "unpivot", "describe", "summarize",
                   "show", "union", "except", "intersect"}
_NOT_ALLOWED = "is not allowed in a filter: a filter holds SET VARIABLE lines and one query"


def split_filter(path: str | Path) -> tuple[FilterFile | None, list[str]]:
    """:func:`load_filter` without raising: the file split into its statements, and every problem
    found (each one line naming the file and the statement); the file is None when it cannot be
    split at all (missing, a syntax error, no statement)."""
    path = resources.filter_file(path)
    if not path.is_file():
        return None, [f"{path}: filter file not found"]
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, [f"{path}: cannot read the filter file ({e})"]
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as e:
        return None, [f"{path}: {one_line(e)}"]
    if not statements:
        return None, [f"{path}: no SQL statement in the file"]
    pieces = _statement_texts(text)
    if len(pieces) != len(statements):  # not expected: fall back to DuckDB's (normalised) texts
        pieces = [s.query for s in statements]
    problems = []
    params: list[str] = []
    setup_sql = []  # the statements before the query that are allowed
    query_ok = True
    for n, (stmt, piece) in enumerate(zip(statements, pieces), 1):
        last = n == len(statements)
        problem = (_query_problem(stmt, piece, params) if last else _setup_problem(piece, params))
        if problem:
            problems.append(f"{path}: statement {n} ({_first_words(piece)}) {problem}")
            query_ok = query_ok and not (last and problem.startswith("is not allowed"))
        elif not last:
            setup_sql.append(piece)
    return FilterFile(path, text, setup_sql, pieces[-1], params, query_ok), problems


def check_filter_text(path) -> list[str]:
    """Every statement of the filter ``path`` that a filter may not hold, one line each."""
    return split_filter(path)[1]


def _statement_texts(text: str) -> list[str]:
    """The file's statements as written (split at top-level ``;``), empty ones dropped."""
    tokens = tokenize(text)
    out, start, seen = [], 0, False
    for t in tokens:
        if t.is_op(";"):
            if seen:
                out.append(text[start:t.start].strip())
            start, seen = t.end, False
        else:
            seen = True
    if seen:
        out.append(text[start:].strip())
    return out


def _first_words(sql: str, n: int = 4, width: int = 40) -> str:
    """The start of a statement, for a message: its first ``n`` words, at most ``width`` characters."""
    words = _strip_comments(sql).split()
    head = " ".join(words[:n])
    if len(head) > width:
        return head[: width - 4].rstrip() + " ..."
    return head + (" ..." if len(words) > n else "")


def _query_problem(stmt, piece: str, params: list[str]) -> str | None:
    tokens = tokenize(piece)
    first = tokens[0].value.lower() if tokens and tokens[0].value else ""
    if stmt.type != duckdb.StatementType.SELECT or first not in _QUERY_WORDS:
        return _NOT_ALLOWED + " (the last statement must be a query returning a `uid` column)"
    return _undeclared(tokens, params)


def _undeclared(tokens, params: list[str]) -> str | None:
    """``getvariable('name')`` of a name no earlier SET VARIABLE declares (DuckDB would read NULL)."""
    for k, t in enumerate(tokens):
        if t.is_name("getvariable") and k + 3 < len(tokens) and tokens[k + 1].is_op("(") \
                and tokens[k + 2].kind == "string_const" and tokens[k + 3].is_op(")"):
            name = tokens[k + 2].value
            if name is not None and name not in params and not name.startswith(VARIABLE_PREFIX):
                declared = ", ".join(params) or "none"
                return (f"reads getvariable('{name}'), but no SET VARIABLE {name} = ... declares it "
                        f"(this filter declares: {declared})")
    return None


def _setup_problem(piece: str, params: list[str]) -> str | None:
    """Why a statement before the query is not a ``SET VARIABLE name = <constant>``; the name
    is appended to ``params`` when it is one."""
    tokens = tokenize(piece)
    if not (len(tokens) >= 4 and tokens[0].is_name("set") and tokens[1].is_name("variable")
            and tokens[2].kind in ("identifier", "keyword") and tokens[2].value
            and _IDENT.match(tokens[2].value) and (tokens[3].is_op("=") or tokens[3].is_name("to"))):
        return _NOT_ALLOWED
    name = tokens[2].value if piece[tokens[2].start] == '"' else piece[tokens[2].start:tokens[2].end]
    value = tokens[4:]
    if not value:
        return _NOT_ALLOWED
    for k, t in enumerate(value):
        if t.kind == "keyword" and (t.value or "").lower() in _QUERY_KEYWORDS:
            params.append(name)
            return ("is not allowed in a filter: a SET VARIABLE value must be a constant, not a query "
                    f"({t.value.upper()} ...)")
        if t.is_name("fraction_threshold"):
            params.append(name)
            return ("is not allowed in a filter: a SET VARIABLE value must be a constant; "
                    "fraction_threshold() reads the pool: use it only in the query")
    problem = _undeclared(value, params)
    if problem:
        return problem
    params.append(name)
    return None


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def denied_path(e: Exception) -> str | None:
    """The path a sandboxed connection refused to read, from DuckDB's PermissionException (or
    a URL with a ``..`` segment, which curate's remote filesystems refuse: :mod:`curate.storage`)."""
    if isinstance(e, duckdb.PermissionException):
        m = _DENIED_PATH.search(str(e))
        return m.group(1) if m else "a file"
    if isinstance(e, duckdb.Error):
        return storage.dot_segment_url(str(e))
    return None


def filter_error(where, e: Exception, con=None, catalog=None) -> "FilterError":
    """A DuckDB error of a filter as one line naming ``where``: a read outside the sandbox names
    the path; a pool view that no longer binds says the pool changed since ``catalog init``."""
    path = denied_path(e)
    if path is not None:
        return FilterError(f"{where}: reads {path}, outside what the catalog points at ({SANDBOX_DOC})")
    if con is not None and isinstance(e, (duckdb.BinderException, duckdb.IOException, duckdb.InvalidInputException)):
        changed = pool_changed(con, catalog)
        if changed:
            return FilterError(f"{where}: {changed}")
    return FilterError(f"{where}: {one_line(e)}")


def pool_changed(con, catalog=None) -> str | None:
    """Why the catalog's pool files no longer match what ``catalog init`` recorded (a file gone,
    unreadable, or without a column the ``pool`` view reads); None when they still match."""
    try:
        con.execute("SELECT * FROM pool LIMIT 0").fetchall()
        return None
    except duckdb.Error:
        pass
    try:
        rows = con.execute("SELECT path FROM pool_files ORDER BY file_id").fetchall()
        extra = [r[0] for r in con.execute(
            "SELECT value FROM curate_meta WHERE key LIKE 'extra_column:%' ORDER BY key").fetchall()]
    except duckdb.Error:
        return None
    base = Path(catalog or _catalog_path(con)).resolve().parent
    expected = [*POOL_COLUMNS, *extra]
    problems = []
    for (stored,) in rows:
        if storage.is_url(stored):
            try:
                gone = not storage.exists(stored, storage.storage_options_from_env())
            except (CurateError, OSError):
                gone = False  # cannot tell: DuckDB's own message is shown
            if gone:
                problems.append(f"{stored} is missing")
            continue
        path = Path(stored) if Path(stored).is_absolute() else base / stored
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            _, cols = read_footer(path, path)
        except CurateError:
            problems.append(f"{path} is not a readable parquet file")
            continue
        missing = [c for c in expected if c not in cols]
        if missing:
            problems.append(f"{path} has no column {missing[0]}")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"the pool changed since `curate catalog init`: {problems[0]}{more}; "
            f"re-run `curate catalog init` over the pool")


_TIC_ATTACH = ("add the TiC views with `curate tic attach CATALOG --tic-dir DIR` (a pool built from a "
               "table: `curate pool timesplit CATALOG`)")
#: views no producer builds on first use, and the command that adds each to a catalog
MISSING_VIEW_HINTS = {
    "timesplit": _TIC_ATTACH,
    "tic_eval": _TIC_ATTACH,
    "tic_yearly": "add it with `curate tic attach CATALOG --tic-dir DIR` (TiC's yearly uid files)",
    "imagenet_classes": "add it with `curate tic attach CATALOG --tic-dir DIR`",
    "period_split": "add it with `curate pool timesplit CATALOG --time-col COL`",
    "download_status": "add it with `curate download-status --data-dir DIR --catalog CATALOG`",
    "cluster_targets": "add a cluster set with `curate clusters import` or `curate clusters build`",
    "shard_index": "index the shards with `curate shards index CATALOG`",
    "shard_files": "index the shards with `curate shards index CATALOG`",
}
_MISSING_TABLE = re.compile(r"Table with name (\w+) does not exist")
#: the tables ``read_subset(...)`` calls became -> the call as the filter writes it
SUBSET_TEXT: dict[str, str] = {}
_SUBSET_NAME = re.compile(r"__subset_\d+")


def one_line(e: Exception) -> str:
    """A DuckDB error as one line (its first two non-empty lines): how filter errors are shown.
    A view the catalog lacks names the command that adds it (DuckDB's own message would suggest
    ``sqlite_master``)."""
    m = _MISSING_TABLE.search(str(e))
    if m and m.group(1).lower() in MISSING_VIEW_HINTS:
        name = m.group(1).lower()
        return f"the catalog has no view {name}; {MISSING_VIEW_HINTS[name]}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if lines else type(e).__name__
    return _SUBSET_NAME.sub(lambda m: SUBSET_TEXT.get(m.group(0), m.group(0)), text)


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
                SUBSET_TEXT[name] = sql[t.start:tokens[end].end]  # errors show the user's own text
            out.append(sql[pos : t.start])
            out.append(registered[key])
            pos = tokens[end].end
            i = end + 1
            continue
        i += 1
    out.append(sql[pos:])
    return "".join(out)


# -- preparing on a connection ------------------------------------------------------------------

def _check_sets(flt: FilterFile, sets: dict) -> None:
    unknown = [k for k in sets if k not in flt.params]
    if unknown:
        declared = ", ".join(flt.params) or "none"
        raise FilterError(f"{flt.path}: unknown parameter '{unknown[0]}' (this filter declares: {declared})")


def _set_parameters(con, flt: FilterFile, sets: dict, registered: dict) -> dict:
    """The setup statements and the overrides on ``con``; every declared parameter's value."""
    _check_sets(flt, sets)
    for stmt in flt.setup:
        try:
            con.execute(substitute_subsets(stmt, con, {}, registered))
        except duckdb.Error as e:
            raise filter_error(flt.path, e) from None
    for key, val in sets.items():
        _check_set_type(con, flt, key, val)
        con.execute(f"SET VARIABLE {key} = ?", [val])  # key checked against _IDENT and the declared names
    params = {}
    for key in flt.params:
        # key matched _SET_VARIABLE (an identifier); not bound, because binding any parameter
        # makes DuckDB import pandas (0.3 s on every run)
        params[key] = json_value(con.execute(f"SELECT getvariable('{key}')").fetchone()[0])
    return params


_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
            "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL")


def _check_set_type(con, flt: FilterFile, key: str, val) -> None:
    """``--set key=val`` must fit the type the filter declares ``key`` with (a number for a
    numeric default, true/false for a boolean one); a :class:`FilterError` naming both if not."""
    declared, typ = con.execute(f"SELECT getvariable('{key}'), typeof(getvariable('{key}'))").fetchone()
    if not _TYPE.match(typ or "") or typ in ("VARCHAR", "NULL"):
        return
    numeric = typ.startswith(_NUMERIC)
    if isinstance(val, bool):
        ok = typ == "BOOLEAN"
    elif isinstance(val, (int, float)):
        ok = numeric or typ == "BOOLEAN" and val in (0, 1) or not typ == "BOOLEAN"
    else:
        try:
            ok = con.execute(f"SELECT TRY_CAST(? AS {typ}) IS NOT NULL", [str(val)]).fetchone()[0] and not numeric
        except duckdb.Error:
            ok = False
    if not ok:
        shown = str(val).lower() if isinstance(val, bool) else val
        kind = "a number" if numeric else "true or false" if typ == "BOOLEAN" else f"a {typ} value"
        raise FilterError(f"--set {key}={shown}: {key} is a {typ} parameter (declared {json_value(declared)} "
                          f"in {flt.path}); give {kind}")


def prepare(con, flt: FilterFile, sets: dict) -> tuple[str, dict]:
    """Run the filter's setup statements, apply overrides, return the final query and params."""
    registered: dict = {}
    params = _set_parameters(con, flt, sets, registered)
    query = substitute_subsets(flt.query, con, params, registered)
    return query, params


def _without_catalog(step: Callable):
    """``step(con)`` on a scratch in-memory DuckDB; None if it fails there (it needs the catalog)."""
    scratch = duckdb.connect(":memory:")
    try:
        sandbox(scratch)  # reads nothing at all
        return step(scratch)
    except (CurateError, duckdb.Error):
        return None
    finally:
        scratch.close()


def declared_params(flt: FilterFile, sets: dict | None = None) -> dict | None:
    """The filter's parameters (declared defaults, then ``sets``) evaluated without a catalog;
    None when a setup statement needs one (it reads the pool or a catalog macro). An unknown
    name in ``sets`` is a :class:`FilterError`."""
    sets = sets or {}
    _check_sets(flt, sets)
    return _without_catalog(lambda con: _set_parameters(con, flt, sets, {}))


def filter_features(catalog, flt: FilterFile, params: dict, progress: bool,
                    open_prepared: Callable | None = None, row_level: bool = True, engine=None) -> dict:
    """Build the feature views ``flt`` references that are missing or stale, and describe them
    for the manifest. Call with no connection to ``catalog`` open (producers write to it).

    Caption tables (``text_features``, ``text_lang_cld3``) are built per part and, with
    ``row_level`` and ``open_prepared`` (see :func:`curate.run.ondemand.build_needed`), only for
    the rows that can pass the filter; otherwise whole columns."""
    built = ensure_features(catalog, flt.text, params, progress=progress, skip=CAPTION_TABLES)
    features = {}
    for view in needed_producers(flt.text):
        if view in CAPTION_TABLES:
            continue
        describe = getattr(producer(view), "describe", None)
        features[view] = {"built_now": view in built, **(describe(catalog, params) if describe else {})}
    if any(view in CAPTION_TABLES for view in needed_producers(flt.text)):
        from curate.run.ondemand import build_needed  # lazy: only filters that read caption tables

        parts = build_needed(catalog, flt, open_prepared, row_level=row_level and open_prepared is not None,
                             progress=progress, engine=engine)
        for view, now in parts.items():
            describe = getattr(producer(view), "describe", None)
            features[view] = {"built_now": any(p["rows_computed_now"] for p in now.values()), "parts_now": now,
                              **(describe(catalog, params) if describe else {})}
    return features


def build_features(catalog, flt: FilterFile, sets: dict, progress: bool = False, *, row_level: bool = True,
                   storage_options: dict | None = None, engine=None) -> dict:
    """Step 2: the feature views ``flt`` needs, built for its parameters; ``{}`` when it reads
    none. The filter is prepared once without the catalog first (so a bad parameter or subset
    file fails before anything is built); one whose setup needs the catalog is prepared there
    (a short read-only connection, closed before producers write). Caption tables are computed
    only for the rows that can pass the filter unless ``row_level`` is false (``--explain``)."""
    if not needed_producers(flt.text):
        return {}
    _check_sets(flt, sets)
    params = _without_catalog(lambda con: prepare(con, flt, sets)[1])
    if params is None:
        con = connect(catalog)
        try:
            register_catalog_filesystems(con)
            sandbox_catalog(con, catalog)
            params = prepare(con, flt, sets)[1]
        finally:
            con.close()

    def open_prepared():
        opened = open_filter(flt, catalog, sets, features=False, storage_options=storage_options)
        return opened.con, opened.query

    return filter_features(catalog, flt, params, progress, open_prepared, row_level, engine)


@dataclass
class OpenFilter:
    """A filter prepared on an open, read-only catalog connection (close ``con`` when done)."""

    con: duckdb.DuckDBPyConnection
    flt: FilterFile
    query: str  # read_subset() calls replaced; fraction_threshold() calls still in it
    params: dict  # every declared parameter, after overrides, as JSON values
    features: dict  # feature views the filter reads: built now?, and their description
    context: object = None  # what ``before_prepare`` returned


def _catalog_path(con) -> Path:
    """The file of the catalog ``con`` has open."""
    found = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(found[0]) if found and found[0] else default_catalog()


def sandbox_catalog(con, catalog=None) -> None:
    """Lock ``con`` (a catalog connection) down to reading what the catalog points at:
    :func:`curate.catalog.connection.sandbox` with :func:`catalog_read_paths` (plus DuckDB's own
    spill directory). Every filter runs on such a connection (docs/safety.md)."""
    files, dirs = catalog_read_paths(con, catalog or _catalog_path(con))
    spill = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    if spill:
        dirs.append(spill if "://" in spill else str(Path(spill).resolve()))
    sandbox(con, files, dirs)


def open_filter(filter_path, catalog=None, sets: dict | None = None, *, progress: bool = False,
                features: bool = True, before_prepare: Callable | None = None,
                settings: dict | None = None, storage_options: dict | None = None,
                row_level: bool = True, engine=None) -> OpenFilter:
    """Steps 1-3: load ``filter_path``, build its feature views (unless ``features=False``),
    connect to ``catalog`` and prepare the filter there once.

    ``before_prepare(con)`` runs on the new connection before the setup statements (the Ray
    runner registers remote filesystems there); its result is :attr:`OpenFilter.context`.
    ``settings`` (DuckDB options, e.g. ``enable_progress_bar``) are set next; then the
    connection is sandboxed (:func:`sandbox_catalog`) and its configuration locked.

    A catalog over object storage (``curate ray catalog-init``) keeps its URLs: DuckDB reads
    them through fsspec filesystems registered first with ``storage_options`` (default
    ``$CURATE_STORAGE_OPTIONS``), never through an extension fetched at run time, and the
    sandbox allows exactly the pool's ``s3://bucket/prefix/`` and its listed files.
    """
    catalog = Path(catalog) if catalog else default_catalog()
    sets = sets or {}
    flt = filter_path if isinstance(filter_path, FilterFile) else load_filter(filter_path)
    with storage.options_given(storage_options):  # feature builds read the pool with them too
        built = (build_features(catalog, flt, sets, progress, row_level=row_level, storage_options=storage_options,
                                engine=engine) if features else {})
    con = connect(catalog)
    try:
        register_catalog_filesystems(con, storage_options)
        context = before_prepare(con) if before_prepare else None
        for name, value in (settings or {}).items():
            con.execute(f"SET {name} = ?", [value])  # names are curate's own, never user input
        sandbox_catalog(con, catalog)
        query, params = prepare(con, flt, sets)
    except BaseException:
        con.close()
        raise
    return OpenFilter(con, flt, query, params, built, context)


# -- thresholds and the result check ------------------------------------------------------------

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


def check_uid_column(con, query: str, where) -> None:
    """Bind ``query`` without running it; a :class:`FilterError` naming ``where`` unless it
    returns exactly one column, ``uid``, of type VARCHAR."""
    try:
        rel = con.sql(query)
        columns, types = rel.columns, rel.types
    except duckdb.Error as e:
        raise filter_error(where, e, con) from None
    if columns != ["uid"]:
        raise FilterError(f"{where}: the query must return exactly one column named `uid`; it returns "
                          f"{', '.join(columns)}")
    if str(types[0]) != "VARCHAR":
        raise FilterError(f"{where}: column `uid` has type {types[0]}, expected VARCHAR (32 hex characters)")


def locate_bad_uid(con, err: BadUid, path) -> CurateError:
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


# -- the bundled filters ------------------------------------------------------------------------

@dataclass
class FilterInfo:
    """A bundled filter: its name for ``curate run NAME``, its parameters, what it does."""

    name: str  # relative to the filters directory, without .sql: "laion2b", "tic/year"
    path: Path
    params: dict  # declared defaults (the SQL text of one that needs a catalog to evaluate)
    summary: str | None  # the first line of the file's leading comment


def describe_filter(path, name: str | None = None) -> FilterInfo:
    """Name, declared parameters with their defaults, and summary line of one filter file."""
    flt = load_filter(path)
    params = declared_params(flt)
    if params is None:  # a default that reads the catalog: show what the file says
        params = {}
        for stmt in flt.setup:
            m = _SET_VARIABLE.match(_strip_comments(stmt))
            if m:
                params[m.group(1)] = _strip_comments(stmt)[m.end():].strip().lstrip("=").strip().rstrip(";")
    summary = None
    for line in flt.text.splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("--"):
            summary = line.lstrip()[2:].strip() or None
        break
    return FilterInfo(name or flt.path.stem, flt.path, params, summary)


def bundled_filters() -> list[FilterInfo]:
    """Every filter shipped with curate (``filters/*.sql``, ``filters/tic/*.sql``), by name."""
    root = resources.filters_dir()
    return [describe_filter(p, p.relative_to(root).with_suffix("").as_posix()) for p in resources.list_filters()]
