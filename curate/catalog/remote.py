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


def init_remote_catalog(catalog, metadata_url: str, shards_url: str | None = None,
                        storage_options: dict | None = None, overwrite: bool = False) -> Path:
    """Create the local catalog file ``catalog`` over the parquet files under ``metadata_url``."""
    catalog = Path(catalog).resolve()
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
            "features_dir": str(catalog.parent / f"{catalog.name}.features"),
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
