"""The bundled sample pool and ``catalog.duckdb.example``, and the check that they are current.

``build_example(root)`` regenerates both from fixed arguments; ``catalog_fingerprint`` is what
the test compares between the committed catalog and a freshly built one (DuckDB files are not
byte-reproducible, their contents are).
"""

from __future__ import annotations

from pathlib import Path

from curate import resources
from curate.catalog.connection import connect, init_catalog
from curate.errors import CurateError
from curate.features.cld3 import build_text_lang_cld3
from curate.features.text import build_text_features
from curate.pool.sample import generate_pool

SAMPLE_POOL_DIR = Path("data") / "sample_pool"
SAMPLE_POOL_ARGS = dict(files=2, rows_per_file=1000, seed=0, npz=True, shards=True, image_size=40)
CATALOG_NAME = "catalog.duckdb.example"


def build_example(root: str | Path | None = None, text_features: bool = True) -> Path:
    """Regenerate the sample pool and its catalog under ``root``.

    With ``text_features`` (needs the ``text`` extra) the catalog ships with its text feature
    tables built (``text_features`` and ``text_lang_cld3``), so the text baselines run on it
    without writing into the repository.
    """
    root = Path(root) if root is not None else resources.SOURCE_ROOT
    if root is None:
        raise CurateError("curate catalog example regenerates the files of a source checkout; pass --root DIR")
    pool = root / SAMPLE_POOL_DIR
    generate_pool(pool, **SAMPLE_POOL_ARGS)
    catalog = init_catalog(root / CATALOG_NAME, pool=pool, relative=True, overwrite=True,
                           features_dir=pool / "features")
    if text_features:
        build_text_features(catalog, progress=False, force=True)  # a small pool: computed in this process
        build_text_lang_cld3(catalog, progress=False, force=True)
    return catalog


def catalog_fingerprint(catalog: str | Path) -> dict:
    """Everything a catalog defines, as comparable data: meta, files, view SQL, macros, tables."""
    con = connect(catalog)
    out = {
        "meta": sorted(con.execute("SELECT key, value FROM curate_meta WHERE key <> 'created_at'").fetchall()),
        "pool_files": con.execute("SELECT * FROM pool_files ORDER BY file_id").fetchall(),
        "views": con.execute(
            "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal AND NOT temporary "
            "ORDER BY view_name").fetchall(),
        "macros": con.execute(
            "SELECT function_name, macro_definition FROM duckdb_functions() "
            "WHERE function_type IN ('macro', 'table_macro') AND NOT internal "
            "AND database_name <> 'temp' ORDER BY 1").fetchall(),
        "tables": con.execute(
            "SELECT table_name, sql FROM duckdb_tables() WHERE NOT temporary ORDER BY 1").fetchall(),
    }
    con.close()
    return out
