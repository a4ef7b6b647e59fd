"""A catalog over a pool that lives in object storage (``s3://bucket/pool/metadata``).

The catalog file itself is a small local DuckDB file (copy it to every machine that needs it, or
let the Ray engine ship its tables to the workers, which it does). Its ``pool_files`` rows hold
URLs, and its views read them through fsspec (:func:`curate.storage.register_filesystems`).
The checks are those of ``curate catalog init`` (:mod:`curate.catalog.schema`): every parquet
has the nine CommonPool columns with the right types and the same extra columns; the ``.npz``
beside each is recorded.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from curate import __version__, storage
from curate.catalog.connection import CatalogError, _view_values, building_catalog, check_new_catalog, create_views
from curate.catalog.schema import IGNORED_FILES, check_columns, extra_columns, read_footer


def catalog_urls(con) -> list[str]:
    """Every URL the open catalog ``con`` points at: pool parquet and ``.npz`` files, files of
    registered parquet views, the metadata and features directories (local paths left out)."""
    found: list[str] = []
    for path, npz in con.execute("SELECT path, npz FROM pool_files ORDER BY file_id").fetchall():
        found += [p for p in (path, npz) if p]
    for (paths,) in con.execute("SELECT paths FROM curate_views").fetchall():
        found += [p for p in paths or () if p]
    meta = dict(con.execute("SELECT key, value FROM curate_meta").fetchall())
    found += [meta[k] for k in ("metadata_dir", "features_dir") if meta.get(k)]
    return [u for u in found if storage.is_url(u)]


def register_catalog_filesystems(con, storage_options: dict | None = None) -> list[str]:
    """Make the catalog's remote files readable on ``con`` through fsspec (never through a
    DuckDB extension fetched at run time). ``storage_options`` default to
    ``$CURATE_STORAGE_OPTIONS``. Call before :func:`curate.catalog.connection.sandbox`, which
    still limits what may be read to the catalog's own files and directories. Returns the URLs."""
    urls = catalog_urls(con)
    if urls:
        if storage_options is None:
            storage_options = storage.storage_options_from_env()
        storage.register_filesystems(con, urls, storage_options)
    return urls


def init_remote_catalog(catalog, metadata_url: str, shards_url: str | None = None,
                        storage_options: dict | None = None, overwrite: bool = False,
                        features_dir=None) -> Path:
    """Create the local catalog file ``catalog`` over the parquet files under ``metadata_url``.

    Feature tables of the pool are written to ``features_dir`` (a local directory; default:
    ``CATALOG.features`` beside the catalog file), never into the pool's bucket.
    """
    catalog = Path(catalog).resolve()
    if features_dir is not None and storage.is_url(features_dir):
        raise CatalogError(f"{features_dir}: the features directory must be a local directory")
    if storage.is_url(metadata_url) and ".." in str(metadata_url).split("://", 1)[1].split("/"):
        raise CatalogError(f"{metadata_url}: a '..' segment is not allowed in a pool URL")
    check_new_catalog(catalog, overwrite)
    fs, root = storage.filesystem(metadata_url, storage_options)
    proto = str(metadata_url).split("://", 1)[0]
    try:
        entries = sorted(fs.ls(root, detail=False))
    except FileNotFoundError:
        raise CatalogError(f"{metadata_url}: metadata directory not found") from None
    names = [e.rsplit("/", 1)[-1] for e in entries]
    names = [n for n in names if n and not n.startswith(".") and n not in IGNORED_FILES]
    parquets = [n for n in names if n.endswith(".parquet")]
    npzs = {n[: -len(".npz")] for n in names if n.endswith(".npz")}
    stray = [n for n in names if not n.endswith((".parquet", ".npz"))]
    if stray:
        raise CatalogError(f"{storage.join(metadata_url, stray[0])}: not a .parquet or .npz file")
    if not parquets:
        raise CatalogError(f"{metadata_url}: no .parquet files (empty pool)")
    base = str(metadata_url).rstrip("/")
    rows, extra, first = [], None, None
    shard = row_start = 0
    for i, name in enumerate(parquets):
        url = f"{base}/{name}"
        with fs.open(f"{root.rstrip('/')}/{name}", "rb") as f:
            meta, cols = read_footer(f, url, CatalogError)
        check_columns(url, cols, error=CatalogError)
        these = extra_columns(cols)
        if extra is None:
            extra, first = these, name
        elif these != extra:
            raise CatalogError(f"{url}: extra columns {these} differ from {first}'s {extra}")
        stem = name[: -len(".parquet")]
        npz = f"{base}/{stem}.npz" if stem in npzs else None
        rows.append((i, stem, url, meta.num_rows, row_start, npz, shard))
        row_start += meta.num_rows
        shard += -(-meta.num_rows // 10000)
    if row_start == 0:
        raise CatalogError(f"{metadata_url}: the pool's parquet files hold no rows (empty pool)")
    with building_catalog(catalog) as con:
        storage.register_filesystems(con, [metadata_url], storage_options)
        meta = {
            "curate_version": __version__,
            "paths": "absolute",
            "metadata_dir": base,
            "shards_dir": shards_url,
            "features_dir": str(Path(features_dir).resolve() if features_dir is not None
                                else catalog.parent / f"{catalog.name}.features"),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "storage": proto,
        }
        for i, col in enumerate(extra or []):
            meta[f"extra_column:{i:04d}"] = col
        con.executemany("INSERT INTO curate_meta VALUES (?, ?)", list(meta.items()))
        con.executemany("INSERT INTO pool_files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        create_views(con, _view_values(con, None), temp=False)
        con.execute("SELECT count(*) FROM pool").fetchall()  # bind-check through fsspec now
    return catalog
