"""Every bundled filter's subset bytes on three pools, as one table of SHA-256s.

Used by ``test_outputs_unchanged.py`` and, once, to record ``filter_outputs.json`` from the
code as it was before the package restructuring (issue 15, commit db8c791): run this file as a
script with that checkout first on ``PYTHONPATH`` and it prints the table. It therefore imports
the old module names when the new ones are missing.

Pools: the bundled example catalog (text features built, no cluster set: the image-based
filters are skipped there); a generated 3 x 400-row pool with text features and an imported
cluster set ``xlarge``; a generated 3 x 300-row pool with TiC views from curate's TiC-format
artifact writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

try:  # the restructured package
    from curate.catalog.connection import init_catalog
    from curate.features.clusters import import_cluster_set
    from curate.features.text import build_text_features
    from curate.pool.sample import generate_pool
    from curate.run.runner import run_filter
except ImportError:  # the flat package before issue 15 (to record the expected table)
    from curate.catalog import init_catalog
    from curate.clusters import import_cluster_set
    from curate.runner import run_filter
    from curate.samplepool import generate_pool
    from curate.textfeatures import build_text_features
from curate.tic.artifacts import make_tic_artifacts
from curate.tic.attach import attach

REPO = Path(__file__).resolve().parents[2]
FILTERS = sorted((REPO / "filters").glob("*.sql"))
TIC_FILTERS = sorted((REPO / "filters" / "tic").glob("*.sql"))
IMAGE_BASED = {"image_based", "image_based_clip_score_l14_30pct"}
#: not in the table recorded at db8c791: filters added since (issue 19; pinned against numpy in
#: tests/run/test_negcliploss_normsim_filters.py) and tic/replay, whose semantics changed on
#: purpose (issue 18: exact sample counts instead of a hash fraction; pinned in tests/tic)
SINCE_RECORDING = {"negcliploss_30pct", "normsim_inf", "negcliploss_normsim", "replay", "semdedup", "dbp", "decontaminate"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundled(work: Path) -> dict:
    out = {}
    for flt in FILTERS:
        if flt.stem in IMAGE_BASED or flt.stem in SINCE_RECORDING:
            continue
        run_filter(flt, catalog=REPO / "catalog.duckdb.example", out=work / "bundled" / f"{flt.stem}.npy",
                   progress=False)
        out[f"bundled/{flt.stem}"] = _sha(work / "bundled" / f"{flt.stem}.npy")
    return out


def generated(work: Path) -> dict:
    root = work / "gen"
    generate_pool(root / "pool", files=3, rows_per_file=400, seed=3, npz=True, shards=False)
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool")
    rng = np.random.default_rng(0)
    cents = rng.normal(size=(16, 768)).astype(np.float32)
    np.save(root / "centroids.npy", cents)
    np.save(root / "targets.npy", cents[[1, 3, 5, 7, 9]] * 2)
    import_cluster_set(cat, "xlarge", root / "centroids.npy", [root / "targets.npy"])
    build_text_features(cat, progress=False)  # in-process: a small pool (any engine gives the same table)
    out = {}
    for flt in FILTERS:
        if flt.stem in SINCE_RECORDING:
            continue
        run_filter(flt, catalog=cat, out=root / "out" / f"{flt.stem}.npy", progress=False)
        out[f"generated/{flt.stem}"] = _sha(root / "out" / f"{flt.stem}.npy")
    return out


def tic(work: Path) -> dict:
    root = work / "tic"
    generate_pool(root / "pool", files=3, rows_per_file=300, seed=11, npz=False, shards=False)
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool")
    make_tic_artifacts(cat, root / "art")
    attach(cat, root / "art")
    for name, flt in (("basic_filter", "clip_score_b32_threshold"),
                      ("image_based_clip_score_l14_30pct", "clip_score_l14_30pct")):
        run_filter(REPO / "filters" / f"{flt}.sql", catalog=cat, out=root / "subsets" / f"{name}.npy",
                   progress=False)
    out = {}
    old = os.getcwd()
    os.chdir(root)  # year_basic / year_bestpool read subsets/*.npy relative to here
    try:
        for flt in (f for f in TIC_FILTERS if f.stem not in SINCE_RECORDING):
            for sets in ({}, {"year": 2016} if "year" in flt.stem else {"fraction": 0.25} if flt.stem == "replay" else None):
                if sets is None:
                    continue
                tag = flt.stem + "".join(f"_{k}{v}" for k, v in sets.items())
                run_filter(flt, catalog=cat, out=root / "out" / f"{tag}.npy", sets=sets, progress=False)
                out[f"tic/{tag}"] = _sha(root / "out" / f"{tag}.npy")
    finally:
        os.chdir(old)
    return out


def all_outputs(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    return {**bundled(work), **generated(work), **tic(work)}


if __name__ == "__main__":
    w = Path(sys.argv[1])
    if w.exists():
        shutil.rmtree(w)
    print(json.dumps(all_outputs(w), indent=1, sort_keys=True))
