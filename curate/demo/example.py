"""The bundled sample pool and ``catalog.duckdb.example``, and the check that they are current.

``build_example(root)`` regenerates both from fixed arguments; ``catalog_fingerprint`` is what
the test compares between the committed catalog and a freshly built one (DuckDB files are not
byte-reproducible, their contents are).

With ``methods`` it also writes the stand-ins the issue-19 filters need on this synthetic pool
(:func:`build_method_examples`: a NormSim target set, a cluster set, an eval set) and builds
their tables, so every bundled filter runs on the example without writing into the repository.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import resources
from curate.atomic import atomic_path, write_json
from curate.catalog.connection import connect, init_catalog
from curate.errors import CurateError
from curate.features.cld3 import build_text_lang_cld3
from curate.features.text import build_text_features
from curate.pool.sample import CONCEPTS, generate_pool

SAMPLE_POOL_DIR = Path("data") / "sample_pool"
SAMPLE_POOL_ARGS = dict(files=2, rows_per_file=1000, seed=0, npz=True, shards=True, image_size=40)
CATALOG_NAME = "catalog.duckdb.example"


def build_example(root: str | Path | None = None, text_features: bool = True, methods: bool = True) -> Path:
    """Regenerate the sample pool and its catalog under ``root``.

    With ``text_features`` (needs the ``text`` extra) the catalog ships with its text feature
    tables built (``text_features`` and ``text_lang_cld3``), so the text baselines run on it
    without writing into the repository; with ``methods`` (needs text features and the ``embed``
    extra) the issue-19 filters' tables and stand-ins too (:func:`build_method_examples`).
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
    if methods:  # needs text features (the k-means caption prefilter) and faiss
        build_method_examples(root, catalog)
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


# -- stand-ins for the issue-19 methods on the synthetic pool (docs/negcliploss-normsim.md,
# semdedup-dbp.md, decontamination.md: "On the bundled pool") ---------------------------------

TARGETS_FILE = Path("data") / "sample_targets" / "l14_img.npy"
EVALS_DIR = Path("data") / "sample_evals"
TARGET_SET, CLUSTER_SET, EVAL_SET = "in1k_standin", "sample_k16", "evals"
TARGET_CONCEPTS = range(8)  # the "ImageNet classes" of the stand-in: dog, cat, car, ... boat


def standin_targets(seed: int = 0, per_concept: int = 8) -> np.ndarray:
    """L/14 "images" of 8 of the sample pool's 16 concepts, drawn as ``generate_pool`` draws its
    image embeddings (its concept centres, the second draw of ``default_rng(seed)``, plus the
    same noise), unit rows, float16: a stand-in for ImageNet-1k's embeddings."""
    rng = np.random.default_rng(seed)
    rng.normal(0, 1, (len(CONCEPTS), 512))  # the b32 centres, drawn first
    centres = rng.normal(0, 1, (len(CONCEPTS), 768)) / np.sqrt(768)
    noise = np.random.default_rng([seed, 19])
    x = np.concatenate([centres[c] + noise.normal(0, 1 / np.sqrt(768), (per_concept, 768)) * 0.8
                        for c in TARGET_CONCEPTS])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def standin_evals(pool: Path, seed: int = 19) -> tuple[np.ndarray, pa.Table]:
    """Eval "images" for decontamination, made from the pool's own L/14 image embeddings: exact
    copies of pool samples (eval images scraped into the pool), near copies at cosine 0.97 and
    0.90, and fresh ones; two tasks, one pool sample copied in both. Returns (float16 rows,
    keys table ``task, eval_key, pool_uid, kind``; pool_uid is empty for fresh images)."""
    files = sorted((pool / "metadata").glob("*.parquet"))
    emb, uid, score = [], [], []
    for f in files:
        with np.load(f.with_suffix(".npz")) as z:
            emb.append(z["l14_img"].astype(np.float32))
        t = pq.read_table(f, columns=["uid", "clip_l14_similarity_score"])
        uid += t.column("uid").to_pylist()
        score.append(t.column("clip_l14_similarity_score").to_numpy(zero_copy_only=False))
    emb, score = np.concatenate(emb), np.nan_to_num(np.concatenate(score), nan=-1.0)
    rng = np.random.default_rng(seed)
    order = np.argsort(-score, kind="stable")
    high, low = order[: len(order) // 10], order[len(order) // 2:]  # in / out of the top 30% by L/14 score
    picked = np.concatenate([rng.choice(high, 5, replace=False), rng.choice(low, 5, replace=False)])
    dim = emb.shape[1]

    def near(i, cos):
        v = rng.normal(size=dim)
        x = emb[i] / np.linalg.norm(emb[i])
        v -= (v @ x) * x
        return x + np.sqrt(1 / cos**2 - 1) * v / np.linalg.norm(v)

    def fresh():
        return rng.normal(0, 1 / np.sqrt(dim), dim) + emb[rng.integers(len(emb))] * 0.6

    rows = ([("standin_a", "copy", i, emb[i]) for i in picked[[0, 1, 5, 6]]]
            + [("standin_a", "near 0.97", i, near(i, 0.97)) for i in picked[[2, 7]]]
            + [("standin_a", "fresh", None, fresh()) for _ in range(4)]
            + [("standin_b", "copy", i, emb[i]) for i in picked[[0, 3, 8]]]
            + [("standin_b", "near 0.90", i, near(i, 0.90)) for i in picked[[4, 9]]]
            + [("standin_b", "fresh", None, fresh()) for _ in range(4)])
    x = np.stack([r[3] for r in rows])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    keys = pa.table({"task": [r[0] for r in rows], "eval_key": [f"s{k:07d}" for k in range(len(rows))],
                     "pool_uid": ["" if r[2] is None else uid[r[2]] for r in rows],
                     "kind": [r[1] for r in rows]})
    return x, keys


def _save_npy(path: Path, x: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array(fh, x, allow_pickle=False)


def build_method_examples(root: Path, catalog: Path) -> None:
    """Write the stand-in files under ``root/data`` and build every issue-19 table on the
    example catalog at the filters' default settings (the float32 embedding copies the builds
    make are removed: they are a cache, 12 MB)."""
    from curate.features.clusters import build_cluster_set  # lazy: only regenerating the example needs the producers
    from curate.features.dbp import build_dbp  # lazy: as above
    from curate.features.decontam import build_eval_neighbors, import_eval_set  # lazy: as above
    from curate.features.negcliploss import build_negcliploss  # lazy: as above
    from curate.features.normsim import build_normsim  # lazy: as above
    from curate.features.targets import import_target_set  # lazy: as above

    root = Path(root)
    _save_npy(root / TARGETS_FILE, standin_targets())
    x, keys = standin_evals(root / SAMPLE_POOL_DIR)
    _save_npy(root / EVALS_DIR / "l14_img.npy", x)
    with atomic_path(root / EVALS_DIR / "keys.parquet", suffix=".parquet") as tmp:
        pq.write_table(keys, tmp)
    build_negcliploss(catalog, progress=False)
    import_target_set(catalog, TARGET_SET, [root / TARGETS_FILE], overwrite=True)
    build_normsim(catalog, TARGET_SET, progress=False)
    build_cluster_set(catalog, CLUSTER_SET, k=16, seed=0, target_files=[root / TARGETS_FILE], overwrite=True,
                      progress=False)
    build_dbp(catalog, CLUSTER_SET, progress=False)  # SemDeDup first
    import_eval_set(catalog, EVAL_SET, root / EVALS_DIR / "l14_img.npy", root / EVALS_DIR / "keys.parquet",
                    model="stand-in: the pool's own l14_img rows (curate.demo.example.standin_evals)",
                    overwrite=True)
    build_eval_neighbors(catalog, EVAL_SET, progress=False)
    features = root / SAMPLE_POOL_DIR / "features"
    shutil.rmtree(features / "embeddings", ignore_errors=True)
    prefix = json.dumps(str(root.resolve()) + "/")[1:-1]  # the sets record their source files: repository-relative here
    for meta in (features / "targets" / TARGET_SET / "set.json", features / "clusters" / CLUSTER_SET / "set.json",
                 features / "eval_sets" / EVAL_SET / "set.json"):
        write_json(meta, json.loads(meta.read_text().replace(prefix, "")))
