"""The catalog: a DuckDB file whose views expose a DataComp pool to SQL.

``init_catalog`` checks every metadata parquet (schema and types with
:mod:`curate.catalog.schema`, row count), records the files in a ``pool_files`` table and
creates the views and macros defined by the SQL in ``sql/catalog``. ``connect`` is the one way
the rest of ``curate`` opens a catalog.

Paths: DuckDB resolves relative paths in a saved view against the process's working directory,
before ``file_search_path``; a catalog opened from elsewhere would silently read another
``data/``. So catalogs store absolute paths by default. A catalog made with ``relative=True``
(the bundled example, which must work from any clone) stores paths relative to its own
directory, and ``connect`` shadows its views with temporary ones built on absolute paths.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from curate import __version__, resources
from curate.catalog.checks import check_duplicate_uids, check_can_create, check_npz, check_output_file, check_uids
from curate.catalog.schema import IGNORED_FILES, POOL_COLUMNS, check_columns, extra_columns, read_footer
from curate.errors import CurateError
from curate.sqltokens import sql_list, sql_literal

SQL_DIR = resources.sql_dir()
EXAMPLE_CATALOG = resources.example_catalog()

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: DuckDB's message when another process holds the catalog file's lock
_LOCK_RE = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
#: how long opening a catalog waits for another process's lock (seconds; $CURATE_LOCK_WAIT)
LOCK_WAIT_S = 60.0


class CatalogError(CurateError):
    """A pool or catalog that cannot be used as it is."""


def sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class PoolFile:
    file_id: int
    file: str  # stem, shared by the .parquet and its .npz
    path: Path  # absolute
    num_rows: int
    npz: Path | None
    first_shard: int  # img2dataset numbering: ceil(rows / 10000) shards per file, continued


def scan_metadata(metadata_dir: Path) -> tuple[list[PoolFile], list[str]]:
    """Check every file of a DataComp metadata dir; return the parquet files and extra columns."""
    metadata_dir = Path(metadata_dir)
    if not metadata_dir.is_dir():
        raise CatalogError(f"{metadata_dir}: metadata directory not found")
    names = sorted(p.name for p in metadata_dir.iterdir() if not p.name.startswith("."))
    parquets = [n for n in names if n.endswith(".parquet")]
    npzs = {n[: -len(".npz")] for n in names if n.endswith(".npz")}
    stray = [n for n in names if not n.endswith((".parquet", ".npz")) and n not in IGNORED_FILES]
    if stray:
        raise CatalogError(
            f"{metadata_dir / stray[0]}: not a .parquet or .npz file; the metadata directory must "
            f"hold only the pool's parquet files and their .npz embeddings"
        )
    if not parquets:
        raise CatalogError(f"{metadata_dir}: no .parquet files (empty pool)")
    files: list[PoolFile] = []
    extra: list[str] | None = None
    first_schema_file = None
    shard = 0
    for i, name in enumerate(parquets):
        path = (metadata_dir / name).resolve()
        meta, cols = read_footer(path, path, CatalogError)
        found = f" (a CommonPool parquet has {', '.join(POOL_COLUMNS)}); found {', '.join(cols)}"
        check_columns(path, cols, POOL_COLUMNS, CatalogError, missing=lambda col: found)
        these = extra_columns(cols)
        if extra is None:
            extra, first_schema_file = these, path
        elif these != extra:
            raise CatalogError(
                f"{path}: extra columns {these} differ from {first_schema_file.name}'s {extra}; "
                f"all pool files must have the same schema"
            )
        stem = name[: -len(".parquet")]
        npz = (metadata_dir / f"{stem}.npz").resolve() if stem in npzs else None
        files.append(PoolFile(i, stem, path, meta.num_rows, npz, shard))
        shard += -(-meta.num_rows // 10000)
    if sum(f.num_rows for f in files) == 0:
        raise CatalogError(f"{metadata_dir}: the pool's parquet files hold no rows (empty pool)")
    return files, extra or []


#: The catalog's own bookkeeping tables (every catalog, local or remote, has them).
CATALOG_TABLES_DDL = (
    "CREATE TABLE curate_meta (key VARCHAR PRIMARY KEY, value VARCHAR);"
    "CREATE TABLE pool_files (file_id INTEGER PRIMARY KEY, file VARCHAR UNIQUE, path VARCHAR,"
    " num_rows BIGINT, row_start BIGINT, npz VARCHAR, first_shard INTEGER);"
    "CREATE TABLE curate_views (name VARCHAR PRIMARY KEY, select_sql VARCHAR, paths VARCHAR[],"
    " options VARCHAR)"
)


def _render(sql: str, values: dict[str, str]) -> str:
    for key, val in values.items():
        sql = sql.replace(f"@{key}@", val)
    return sql


def catalog_sql_files() -> list[Path]:
    return sorted((SQL_DIR / "catalog").glob("*.sql"))


def _view_values(con, base: Path | None) -> dict[str, str]:
    """Template values for the view SQL, from the catalog's own pool_files/meta tables."""
    rows = con.execute("SELECT path FROM pool_files ORDER BY file_id").fetchall()
    paths = [str(base / p) if base is not None else p for (p,) in rows]
    extra = [r[0] for r in con.execute(
        "SELECT value FROM curate_meta WHERE key LIKE 'extra_column:%' ORDER BY key").fetchall()]
    return {
        "pool_files": "[" + ", ".join(sql_literal(p) for p in paths) + "]",
        "extra_columns": "".join(f"{sql_identifier(c)}, " for c in extra),
    }


def create_views(con, values: dict[str, str], temp: bool) -> None:
    """Run ``sql/catalog/*.sql`` (the pool views and macros) on ``con`` with the template
    ``values`` (``pool_files``, ``extra_columns``); ``temp``: only the views, as TEMP views."""
    for path in catalog_sql_files():
        sql = _render(path.read_text(), values)
        if temp:
            if "CREATE OR REPLACE VIEW" not in sql:
                continue  # macros are stored in the catalog already
            sql = sql.replace("CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW")
        try:
            con.execute(sql)
        except duckdb.Error as e:
            raise CatalogError(f"{path}: {e}") from None


def init_catalog(
    catalog: str | os.PathLike,
    pool: str | os.PathLike | None = None,
    metadata: str | os.PathLike | None = None,
    shards: str | os.PathLike | None = None,
    relative: bool = False,
    overwrite: bool = False,
    features_dir: str | os.PathLike | None = None,
    allow_duplicate_uids: bool = False,
    check_npz_files: bool = True,
    check_uid_values: bool = True,
) -> Path:
    """Create a catalog over a DataComp pool (``pool/metadata``, ``pool/shards``).

    Besides the schema, the pool's uids (32 hex digits, none in two files unless
    ``allow_duplicate_uids``) and its npz files are checked (:mod:`curate.catalog.checks`;
    ``check_uid_values``/``check_npz_files`` = False only to test the later readers' own
    checks). The file is written under a temporary name and renamed when complete; its
    directory is created if missing.
    """
    catalog = Path(catalog).resolve()
    if pool is None and metadata is None:
        raise CatalogError("give --pool DATA_DIR or --metadata DIR")
    metadata_dir = Path(metadata) if metadata else Path(pool) / "metadata"
    shards_dir = Path(shards) if shards else (Path(pool) / "shards" if pool else None)
    check_new_catalog(catalog, overwrite)
    files, extra = scan_metadata(metadata_dir)
    if check_uid_values:
        check_uids([f.path for f in files], CatalogError)
    if not allow_duplicate_uids:
        check_duplicate_uids([f.path for f in files], CatalogError)
    if check_npz_files:
        check_npz([(f.npz, f.num_rows) for f in files if f.npz is not None], CatalogError)
    base = catalog.parent

    def stored(p: Path | None) -> str | None:
        if p is None:
            return None
        p = Path(p).resolve()
        return os.path.relpath(p, base) if relative else str(p)

    with building_catalog(catalog) as con:
        meta = {
            "curate_version": __version__,
            "paths": "relative" if relative else "absolute",
            "metadata_dir": stored(metadata_dir),
            "shards_dir": stored(shards_dir) if shards_dir else None,
            "features_dir": stored(Path(features_dir) if features_dir else catalog.parent / f"{catalog.name}.features"),
        }
        if not relative:
            meta["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for i, col in enumerate(extra):
            meta[f"extra_column:{i:04d}"] = col
        con.executemany("INSERT INTO curate_meta VALUES (?, ?)", [(k, v) for k, v in meta.items()])
        row_start = 0
        for f in files:
            con.execute(
                "INSERT INTO pool_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                [f.file_id, f.file, stored(f.path), f.num_rows, row_start, stored(f.npz), f.first_shard],
            )
            row_start += f.num_rows
        con.execute(f"SET file_search_path = {sql_literal(str(base))}")
        create_views(con, _view_values(con, None), temp=False)
        # bind-check now, so a broken pool fails here rather than at the first query
        con.execute("SELECT count(*) FROM pool").fetchall()
    return catalog


def check_new_catalog(catalog: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to create ``catalog`` over an existing file unless ``overwrite`` (commands that
    build a pool first call it before the long work, not after)."""
    if Path(catalog).is_dir():
        raise CatalogError(f"{catalog}: is a directory, not a catalog file")
    check_can_create(catalog, CatalogError, "catalog")
    if Path(catalog).exists() and not overwrite:
        raise CatalogError(f"{catalog}: already exists (use --overwrite to replace it)")


@contextlib.contextmanager
def building_catalog(catalog: Path):
    """A connection to a new catalog file with curate's tables, written under a temporary
    name and renamed to ``catalog`` only when the block succeeds (nothing is left on failure)."""
    check_output_file(catalog, CatalogError, "catalog")
    tmp = catalog.with_name(f".{catalog.name}.{os.getpid()}.tmp")
    leftovers = (tmp, Path(str(tmp) + ".wal"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    try:
        try:
            con = duckdb.connect(str(tmp))
        except duckdb.Error as e:
            raise CatalogError(f"{catalog}: cannot write the catalog ({str(e).splitlines()[0]})") from None
        con.execute(CATALOG_TABLES_DDL)
        yield con
        con.close()
        try:
            os.replace(tmp, catalog)
        except OSError as e:
            raise CatalogError(f"{catalog}: cannot write the catalog ({e.strerror or e})") from None
    except BaseException:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        raise


def _lock_wait_s() -> float:
    try:
        return max(0.0, float(os.environ.get("CURATE_LOCK_WAIT", LOCK_WAIT_S)))
    except ValueError:
        raise CurateError(f"CURATE_LOCK_WAIT={os.environ['CURATE_LOCK_WAIT']!r}: expected a number of seconds") from None


def open_catalog_file(path: str | os.PathLike, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect`` on a catalog file, waiting (with backoff, up to ``$CURATE_LOCK_WAIT``
    seconds, default :data:`LOCK_WAIT_S`) while another process holds its lock: e.g. a second
    ``curate run`` that registers a feature table the first is building. Still locked after that:
    one line naming the catalog and the process holding it."""
    deadline = time.monotonic() + _lock_wait_s()
    delay, told = 0.05, False
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as e:
            m = _LOCK_RE.search(str(e))
            if not m:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise CatalogError(
                    f"{path}: locked by another process ({m.group(1)}, PID {m.group(2)}); wait for it to "
                    f"finish, or close it if it is a DuckDB shell or notebook holding the catalog open, "
                    f"then re-run") from None
            if not told:
                print(f"{path}: waiting for process {m.group(2)} ({m.group(1)}) to release the catalog "
                      f"(up to {_lock_wait_s():.0f}s)", file=sys.stderr)
                told = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)


def default_catalog() -> Path:
    """``$CURATE_CATALOG`` if set, else the bundled example catalog."""
    if os.environ.get("CURATE_CATALOG"):
        return Path(os.environ["CURATE_CATALOG"])
    if EXAMPLE_CATALOG is None:
        raise CurateError("no catalog: pass --catalog FILE or set CURATE_CATALOG (the bundled example "
                          "catalog comes with a source checkout, not with the wheel)")
    return EXAMPLE_CATALOG


def connect(catalog: str | os.PathLike | None = None, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open a catalog so that its views read the right files whatever the working directory."""
    path = Path(catalog) if catalog else default_catalog()
    if not path.is_file():
        raise CatalogError(f"{path}: catalog not found (create one with `curate catalog init`)")
    try:
        con = open_catalog_file(path, read_only=read_only)
    except duckdb.Error as e:
        raise CatalogError(f"{path}: cannot open as a DuckDB catalog ({e})") from None
    try:
        mode = con.execute("SELECT value FROM curate_meta WHERE key = 'paths'").fetchone()
    except duckdb.Error:
        raise CatalogError(f"{path}: not a curate catalog (no curate_meta table)") from None
    if mode and mode[0] == "relative":
        base = path.resolve().parent
        con.execute(f"SET file_search_path = {sql_literal(str(base))}")
        try:
            create_views(con, _view_values(con, base), temp=True)
        except (duckdb.Error, CurateError) as e:
            con.close()
            why = str(e).splitlines()[0][:300]
            raise CatalogError(f"{path}: cannot open its views: {why} (a pool file it lists is missing or "
                               f"unreadable)") from None
        for name, select_sql, paths, options in con.execute("SELECT * FROM curate_views").fetchall():
            try:
                con.execute(parquet_view_sql(name, select_sql, [str(base / p) for p in paths], options, temp=True))
            except duckdb.Error:
                # a feature table whose files are gone: leave the view out, so that its producer
                # rebuilds it (and re-registers it) and a query naming it gets the missing-view hint
                continue
    return con


def resolve_path(con, stored: str | None, catalog: str | os.PathLike | None = None) -> Path | None:
    """An absolute path for a path stored in the catalog (relative ones are relative to it)."""
    if stored is None:
        return None
    p = Path(stored)
    if p.is_absolute():
        return p
    cat = Path(catalog) if catalog else default_catalog()
    return cat.resolve().parent / p


def features_dir(con, catalog: str | os.PathLike | None = None) -> Path:
    """Where producers write feature tables for this catalog (parquet, one dir per table)."""
    return resolve_path(con, catalog_meta(con)["features_dir"], catalog)


def recorded_shards_dir(con, catalog: str | os.PathLike | None = None) -> Path | None:
    """The pool shard directory the open catalog ``con`` records (None when it records none)."""
    stored = catalog_meta(con).get("shards_dir")
    return resolve_path(con, stored, catalog) if stored else None


def shards_dir(catalog: str | os.PathLike | None = None) -> Path | None:
    """The pool shard directory a catalog records (None when it records none)."""
    con = connect(catalog)
    try:
        return recorded_shards_dir(con, catalog)
    finally:
        con.close()


def parquet_view_sql(name: str, select_sql: str, paths: list[str], options: str | None, temp: bool) -> str:
    """``CREATE OR REPLACE [TEMP] VIEW name AS SELECT select_sql FROM read_parquet(paths, ...)``:
    the DDL of a producer's view (a ``curate_views`` row)."""
    files = "[" + ", ".join(sql_literal(p) for p in paths) + "]"
    opts = f", {options}" if options else ""
    kind = "TEMP VIEW" if temp else "VIEW"
    return (f"CREATE OR REPLACE {kind} {sql_identifier(name)} AS SELECT {select_sql} "
            f"FROM read_parquet({files}, union_by_name = true{opts})")


def register_parquet_view(catalog: str | os.PathLike, name: str, files: list[str | os.PathLike],
                          select_sql: str = "*", options: str | None = None) -> None:
    """Create (or replace) a catalog view over parquet files a producer wrote, e.g. text features.

    ``select_sql`` is the projection (SQL written by curate, never user input). The files are
    recorded in ``curate_views`` so that relative catalogs can re-point the view on open.
    Opens the catalog read-write: call it with no other connection to the catalog open.
    """
    if not _IDENT_RE.match(name):
        raise CatalogError(f"{name!r} is not a valid view name")
    catalog = Path(catalog) if catalog else default_catalog()
    try:
        con = open_catalog_file(catalog, read_only=False)
    except duckdb.Error as e:
        raise CatalogError(f"{catalog}: cannot open the catalog for writing ({str(e).splitlines()[0]})") from None
    try:
        relative = catalog_meta(con).get("paths") == "relative"
        base = catalog.resolve().parent
        abs_paths = [str(Path(f).resolve()) for f in files]
        stored = [os.path.relpath(p, base) for p in abs_paths] if relative else abs_paths
        if not abs_paths:
            raise CatalogError(f"view {name}: no files to register")
        con.execute(parquet_view_sql(name, select_sql, abs_paths, options, temp=False)
                    if not relative else
                    f"SET file_search_path = {sql_literal(str(base))}")
        if relative:
            con.execute(parquet_view_sql(name, select_sql, stored, options, temp=False))
        con.execute("INSERT OR REPLACE INTO curate_views VALUES (?, ?, ?, ?)", [name, select_sql, stored, options])
    finally:
        con.close()


def catalog_meta(con) -> dict[str, str]:
    return dict(con.execute("SELECT key, value FROM curate_meta").fetchall())


def describe_catalog(con) -> dict:
    """What a catalog holds: row count, files (and how many have an .npz), views and tables
    (for `curate catalog info`)."""
    n_rows, n_files, n_npz = con.execute("SELECT sum(num_rows), count(*), count(npz) FROM pool_files").fetchone()
    objects = con.execute(
        "SELECT table_name, table_type FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_catalog <> 'temp' ORDER BY table_name"
    ).fetchall()
    return {"rows": int(n_rows or 0), "files": int(n_files), "npz": int(n_npz), "objects": objects,
            "meta": catalog_meta(con)}


def catalog_summary(catalog: str | os.PathLike | None = None) -> dict:
    """:func:`describe_catalog` of a catalog file (default: :func:`default_catalog`), opened
    read-only and closed again."""
    con = connect(catalog)
    try:
        return describe_catalog(con)
    finally:
        con.close()


# -- the filter sandbox -------------------------------------------------------------------------

def sandbox(con, allowed_paths=(), allowed_directories=()) -> None:
    """Lock ``con`` down for running a filter someone else wrote: it may read only
    ``allowed_paths`` (files) and what lies under ``allowed_directories`` (local directories or
    ``s3://bucket/prefix/`` URLs); no other file, no network, no extension installed or loaded,
    and no setting changed afterwards (``lock_configuration``). Views and registered Arrow
    tables created before keep working when their files are allowed; set other options first.
    """
    dirs = []
    for d in allowed_directories:
        d = str(d)
        dirs.append(d if d.endswith("/") else d + "/")
    con.execute(f"SET allowed_directories = {sql_list(dirs)}")
    con.execute(f"SET allowed_paths = {sql_list(str(p) for p in allowed_paths)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def catalog_read_paths(con, catalog: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """What the open catalog ``con`` points at, as ``(files, directories)`` for :func:`sandbox`:
    every pool parquet and ``.npz``, every file of a registered parquet view (``curate_views``),
    and the metadata and features directories. Relative entries are resolved against the
    catalog's directory; URLs are kept as they are."""
    cat = Path(catalog) if catalog else default_catalog()
    base = cat.resolve().parent

    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        if "://" in p or Path(p).is_absolute():
            return p
        return str(base / p)

    files: list[str] = []
    for path, npz in con.execute("SELECT path, npz FROM pool_files").fetchall():
        files += [p for p in (absolute(path), absolute(npz)) if p]
    for (paths,) in con.execute("SELECT paths FROM curate_views").fetchall():
        files += [absolute(p) for p in paths or ()]
    meta = catalog_meta(con)
    dirs = [absolute(meta[k]) for k in ("metadata_dir", "features_dir") if meta.get(k)]
    return files, dirs
