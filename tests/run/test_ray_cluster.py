"""The Ray engine on a local Ray (2 CPUs): byte-identical subsets, worker loss, resume, S3.

Ray starts once per session (``ray_session``). The reference for every check is the local
engine (:func:`curate.run.runner.run_filter`) on the same catalog, itself pinned by the filter tests.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.engine import Engine  # noqa: E402
from curate.errors import CurateError  # noqa: E402
from curate.run.runner import run_filter  # noqa: E402
from tests.conftest import loopback_s3  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FILTERS = sorted((REPO / "filters").glob("*.sql"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3 pool files x 400 rows with embeddings, text features, a cluster set 'xlarge', a target
    set 'in1k', an eval set 'evals' (copies of 5 pool images, for decontaminate) and
    ``subsets/subset.npy`` (every pool uid) beside the catalog."""
    from curate.pool.sample import generate_pool

    root = tmp_path_factory.mktemp("raypool")
    generate_pool(root / "pool", files=3, rows_per_file=400, seed=3, npz=True, shards=False)
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool")
    try:
        import curate.features.clusters as C
        from curate.features.targets import import_target_set
        from curate.features.text import build_text_features

        rng = np.random.default_rng(0)
        cents = rng.normal(size=(16, 768)).astype(np.float32)
        np.save(root / "centroids.npy", cents)
        np.save(root / "targets.npy", cents[[1, 3, 5, 7, 9]] * 2)
        C.import_cluster_set(cat, "xlarge", root / "centroids.npy", [root / "targets.npy"])
        import_target_set(cat, "in1k", [root / "targets.npy"])  # NormSim's target set
        build_text_features(cat, engine=Engine(workers=1), progress=False)
        from curate.features.decontam import import_eval_set

        first = sorted((root / "pool" / "metadata").glob("*.npz"))[0]
        with np.load(first) as z:
            np.save(root / "evals.npy", z["l14_img"][[3, 50, 51, 200, 399]].astype(np.float32))
        import_eval_set(cat, "evals", root / "evals.npy")
        run_filter(REPO / "filters" / "no_filter.sql", catalog=cat, out=root / "subsets" / "subset.npy")
    except ImportError as e:  # the text/embed extras are missing: filters needing them fail below
        print(f"feature producers unavailable: {e}")
    return cat


#: every bundled filter runs on both engines; decontaminate reads a subset relative to the catalog here
SETS = {"decontaminate": {"subset": "subsets/subset.npy", "threshold": 0.99}}
#: filters that read no pool rows run whole, as one task (curate.run.ray: single_task)
SINGLE_TASK = {"decontaminate"}


@pytest.mark.parametrize("flt", FILTERS, ids=[f.stem for f in FILTERS])
def test_every_baseline_filter_is_byte_identical(ray_session, pool, tmp_path, flt, monkeypatch):
    from curate.run.ray import run_filter_ray

    monkeypatch.chdir(Path(pool).parent)
    sets = SETS.get(flt.stem)
    local = run_filter(flt, catalog=pool, out=tmp_path / "local.npy", sets=sets)
    res = run_filter_ray(flt, catalog=pool, out=tmp_path / "ray.npy", bucket_records=97, sets=sets)
    assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "ray.npy", shallow=False)
    assert (res.count, res.distinct, res.pool_rows) == (local.count, local.distinct, local.pool_rows)
    man = json.loads((tmp_path / "ray.json").read_text())
    single = flt.stem in SINGLE_TASK
    assert man["engine"]["partitions"] == (1 if single else 3) and man["engine"]["buckets"] > 1
    assert bool(man["engine"]["single_task"]) == single
    assert not (tmp_path / "ray.npy.work").exists()  # work removed after success


def test_threshold_with_set_and_nan_matches_local(ray_session, make_catalog, tmp_path):
    from curate.run.ray import run_filter_ray

    nan = float("nan")
    files = [[{"uid": f"{i:032x}", "clip_l14_similarity_score": s} for i, s in enumerate(scores, start)]
             for start, scores in ((0, [0.1, nan, 0.5, 0.5]), (10, [nan, 0.3, 0.5, 0.9, None]), (20, [0.2]))]
    cat = make_catalog(files)
    flt = REPO / "filters" / "clip_score_l14_30pct.sql"
    for fraction in ("0.3", "0.5", "0.0"):
        run_filter(flt, catalog=cat, out=tmp_path / "l.npy", sets={"fraction": float(fraction)})
        run_filter_ray(flt, catalog=cat, out=tmp_path / "r.npy", sets={"fraction": float(fraction)})
        assert filecmp.cmp(tmp_path / "l.npy", tmp_path / "r.npy", shallow=False), fraction
    # N = 10 rows (NaN and NULL count), n = int(10 * 0.3) = 3 of [0.9, 0.5, 0.5, 0.5, 0.3, ...]: 0.5
    thr = json.loads((tmp_path / "r.json").read_text())["engine"]["thresholds"]
    assert list(thr.values())[0]["rank"] == 0
    run_filter_ray(flt, catalog=cat, out=tmp_path / "r.npy", sets={"fraction": 0.3})
    thr = list(json.loads((tmp_path / "r.json").read_text())["engine"]["thresholds"].values())[0]
    assert (thr["n_rows"], thr["n_numeric"], thr["rank"], thr["threshold"]) == (10, 7, 3, 0.5)
    with pytest.raises(CurateError, match=r"fraction must be in \[0, 1\), got 1.5"):
        run_filter_ray(flt, catalog=cat, out=tmp_path / "bad.npy", sets={"fraction": 1.5})


def test_bucket_directory_layout(ray_session, pool, tmp_path):
    from curate.run.assemble import concat_bucket_directory
    from curate.run.ray import run_filter_ray

    flt = REPO / "filters" / "no_filter.sql"
    run_filter(flt, catalog=pool, out=tmp_path / "local.npy")
    res = run_filter_ray(flt, catalog=pool, out=tmp_path / "dir", layout="buckets", bucket_records=200)
    index = json.loads((tmp_path / "dir" / "buckets.json").read_text())
    assert len(index["buckets"]) >= 6 and index["count"] == res.count == 1200
    assert (tmp_path / "dir" / "manifest.json").is_file()
    concat_bucket_directory(tmp_path / "dir", tmp_path / "joined.npy")
    assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "joined.npy", shallow=False)


def test_global_queries_are_refused_with_a_reason(ray_session, pool, tmp_path):
    from curate.run.ray import run_filter_ray

    flt = tmp_path / "dedup.sql"
    flt.write_text("SELECT DISTINCT uid FROM pool\n")
    with pytest.raises(CurateError, match="DISTINCT needs the whole pool; use --engine local"):
        run_filter_ray(flt, catalog=pool, out=tmp_path / "x.npy")
    flt.write_text("SET VARIABLE t = fraction_threshold(clip_b32_similarity_score, 0.5);\n"
                   "SELECT uid FROM pool WHERE datacomp_ge(clip_b32_similarity_score, getvariable('t'))\n")
    with pytest.raises(CurateError, match="only in the query"):
        run_filter_ray(flt, catalog=pool, out=tmp_path / "x.npy")
    # a threshold inside another threshold's score would be computed per pool file
    flt.write_text("SELECT uid FROM pool WHERE datacomp_ge(clip_l14_similarity_score, fraction_threshold(\n"
                   "  CASE WHEN datacomp_ge(clip_b32_similarity_score, fraction_threshold(clip_b32_similarity_score, 0.5))\n"
                   "       THEN clip_l14_similarity_score END, 0.2))\n")
    with pytest.raises(CurateError, match="nested inside another fraction_threshold"):
        run_filter_ray(flt, catalog=pool, out=tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_bad_uid_names_the_pool_file_and_row(ray_session, make_catalog, tmp_path):
    from curate.run.ray import run_filter_ray

    cat = make_catalog([[{"uid": f"{i:032x}"} for i in range(3)], [{"uid": "a" * 32}, {"uid": "not-a-uid"}]],
                       check_uid_values=False)  # init refuses it; this tests run's own check
    with pytest.raises(CurateError, match=r"'not-a-uid'.*0001\.parquet, row 1, column uid"):
        run_filter_ray(REPO / "filters" / "no_filter.sql", catalog=cat, out=tmp_path / "x.npy")


def test_killed_worker_is_retried_with_identical_result(ray_session, pool, tmp_path):
    from curate.run.ray import run_filter_ray

    flt = REPO / "filters" / "clip_score_b32_threshold.sql"
    run_filter(flt, catalog=pool, out=tmp_path / "local.npy")
    marker = tmp_path / "crashed"
    run_filter_ray(flt, catalog=pool, out=tmp_path / "ray.npy", crash_once=str(marker))
    assert marker.is_file()  # a worker process really died (os._exit) and Ray re-ran its task
    assert int(marker.read_text()) != os.getpid()
    assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "ray.npy", shallow=False)


DRIVER = """
import sys
from curate.engine import Engine
from curate.engine.ray import connect_ray
from curate.run.ray import run_filter_ray
connect_ray(address=sys.argv[1])
run_filter_ray(sys.argv[2], catalog=sys.argv[3], out=sys.argv[4], work_dir=sys.argv[5],
               engine=Engine("ray", max_in_flight=1))
"""


def test_killed_run_resumes_from_completed_partitions(ray_session, tmp_path):
    from curate.run.ray import run_filter_ray
    from curate.pool.sample import generate_pool

    generate_pool(tmp_path / "pool", files=8, rows_per_file=2000, seed=5, npz=False, shards=False, fast=True)
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    flt = REPO / "filters" / "clip_score_l14_30pct.sql"
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, ray_session, str(flt), str(cat),
                             str(tmp_path / "ray.npy"), str(work)], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(work.glob("*/part-*.json")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole driver, mid-run
    proc.wait()
    done_before = len(list(work.glob("*/part-*.json")))
    print("partitions done when the driver was killed:", done_before)
    assert 1 <= done_before < 8, done_before
    assert not (tmp_path / "ray.npy").exists()
    res = run_filter_ray(flt, catalog=cat, out=tmp_path / "ray.npy", work_dir=str(work))
    man = json.loads((tmp_path / "ray.json").read_text())
    assert man["engine"]["partitions_resumed"] >= done_before
    run_filter(flt, catalog=cat, out=tmp_path / "local.npy")
    assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "ray.npy", shallow=False)
    assert res.pool_rows == 16000
    assert not work.exists() or not any(work.iterdir())


@pytest.fixture
def s3():
    pytest.importorskip("moto")
    with loopback_s3("pool") as (opts, _):
        yield opts


def test_pool_and_outputs_on_s3(ray_session, pool, s3, tmp_path):
    from curate import storage
    from curate.catalog.remote import init_remote_catalog
    from curate.run.ray import run_filter_ray

    fs, _ = storage.filesystem("s3://pool", s3)
    meta = Path(pool).parent / "pool" / "metadata"
    for f in sorted(meta.glob("*.parquet")):
        fs.put(str(f), f"pool/datacomp/metadata/{f.name}")
    cat = init_remote_catalog(tmp_path / "remote.duckdb", "s3://pool/datacomp/metadata", storage_options=s3)
    flt = REPO / "filters" / "clip_score_l14_30pct.sql"
    run_filter(flt, catalog=pool, out=tmp_path / "local.npy")
    res = run_filter_ray(flt, catalog=cat, out="s3://pool/subsets/l14.npy", storage_options=s3,
                         bucket_records=150)
    assert res.out == "s3://pool/subsets/l14.npy"
    assert fs.cat_file("pool/subsets/l14.npy") == (tmp_path / "local.npy").read_bytes()
    man = json.loads(fs.cat_file("pool/subsets/l14.json"))
    assert man["count"] == res.count and man["engine"]["buckets"] > 1
    assert not fs.exists("pool/subsets/l14.npy.work")  # remote work dir removed


def test_text_features_on_ray_match_the_local_build(ray_session, tmp_path):
    pytest.importorskip("fasttext")
    import pyarrow.parquet as pq

    from curate.pool.sample import generate_pool
    from curate.features.text import build_text_features

    ray_engine = Engine(kind="ray")

    generate_pool(tmp_path / "pool", files=2, rows_per_file=150, seed=9, npz=False, shards=False)
    local = init_catalog(tmp_path / "local.duckdb", pool=tmp_path / "pool", features_dir=tmp_path / "fl")
    remote = init_catalog(tmp_path / "ray.duckdb", pool=tmp_path / "pool", features_dir=tmp_path / "fr")
    build_text_features(local, engine=Engine(workers=1), progress=False)
    res = build_text_features(remote, progress=False, engine=ray_engine)
    assert sorted(res.computed) == sorted(p.stem for p in (tmp_path / "pool" / "metadata").glob("*.parquet"))
    for f in sorted((tmp_path / "fl" / "text_features").glob("*.parquet")):
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "fr" / "text_features" / f.name))
    again = build_text_features(remote, progress=False, engine=ray_engine)
    assert again.computed == [] and len(again.skipped) == 2  # resume: nothing stale
    from click.testing import CliRunner

    from curate.cli.main import main

    r = CliRunner().invoke(main, ["ray", "features-text", "-c", str(remote)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("text_features: computed 0 file(s) (0 captions), 2 up to date")
    # the CLD3 table (laion2b) the same way: Ray tasks equal the local build, then resume
    from curate.features.cld3 import build_text_lang_cld3

    build_text_lang_cld3(local, engine=Engine(workers=1), progress=False)
    r = CliRunner().invoke(main, ["features", "cld3", str(remote), "--engine", "ray"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("text_lang_cld3: computed 2 file(s) (300 captions")
    for f in sorted((tmp_path / "fl" / "text_lang_cld3").glob("*.parquet")):
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "fr" / "text_lang_cld3" / f.name))
    again = build_text_lang_cld3(remote, progress=False, engine=ray_engine)
    assert again.computed == [] and len(again.skipped) == 2


def test_cli_ray_run_and_errors(ray_session, pool, tmp_path):
    from click.testing import CliRunner

    from curate.cli.main import main

    out = tmp_path / "s.npy"
    r = CliRunner().invoke(main, ["ray", "run", str(REPO / "filters" / "clip_score_b32_threshold.sql"),
                                  "-c", str(pool), "-o", str(out), "--set", "threshold=0.3"])
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and f"wrote {out}" in r.output and "(ray engine)" in r.output
    run_filter(REPO / "filters" / "clip_score_b32_threshold.sql", catalog=pool, out=tmp_path / "l.npy",
               sets={"threshold": 0.3})
    assert filecmp.cmp(out, tmp_path / "l.npy", shallow=False)
    r = CliRunner().invoke(main, ["ray", "run", str(REPO / "filters" / "no_filter.sql"), "-c", str(pool),
                                  "-o", str(out), "--storage-options", "{not json"])
    assert r.exit_code == 1 and r.output.startswith("error: --storage-options: not JSON")
    r = CliRunner().invoke(main, ["ray", "run", "--help"])
    assert "Example:" in r.output


def test_read_subset_relative_path_and_empty_result(ray_session, pool, chdir_tmp):
    from curate.run.ray import run_filter_ray

    run_filter(REPO / "filters" / "clip_score_b32_threshold.sql", catalog=pool, out="subsets/b32.npy")
    flt = chdir_tmp / "within.sql"
    flt.write_text("SELECT uid FROM pool WHERE uid IN (SELECT uid FROM read_subset('subsets/b32.npy'))\n"
                   "  AND clip_l14_similarity_score > 0.25\n")
    run_filter(flt, catalog=pool, out="subsets/local.npy")
    res = run_filter_ray(flt, catalog=pool, out="subsets/ray.npy")
    assert res.count > 0
    assert filecmp.cmp("subsets/local.npy", "subsets/ray.npy", shallow=False)
    # nothing selected: still a valid, byte-identical empty subset
    run_filter(REPO / "filters" / "clip_score_b32_threshold.sql", catalog=pool, out="e_local.npy",
               sets={"threshold": 2})
    res = run_filter_ray(REPO / "filters" / "clip_score_b32_threshold.sql", catalog=pool, out="e_ray.npy",
                         sets={"threshold": 2})
    assert res.count == 0 and res.distinct == 0
    assert filecmp.cmp("e_local.npy", "e_ray.npy", shallow=False)


TIC_FILTERS = sorted((REPO / "filters" / "tic").glob("*.sql"))


@pytest.fixture(scope="module")
def tic_pool(tmp_path_factory):
    """A pool with TiC views (made with curate's own TiC-format artifact writer) and the two
    subsets the year_basic / year_bestpool variants read."""
    from curate.tic.artifacts import make_tic_artifacts
    from curate.tic.attach import attach

    root = tmp_path_factory.mktemp("ticpool")
    from curate.pool.sample import generate_pool

    generate_pool(root / "pool", files=3, rows_per_file=300, seed=11, npz=False, shards=False)
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool")
    make_tic_artifacts(cat, root / "art")
    attach(cat, root / "art")
    for name, flt in (("basic_filter", "clip_score_b32_threshold"), ("image_based_clip_score_l14_30pct",
                                                                      "clip_score_l14_30pct")):
        run_filter(REPO / "filters" / f"{flt}.sql", catalog=cat, out=root / "subsets" / f"{name}.npy")
    return cat


@pytest.mark.parametrize("flt", TIC_FILTERS, ids=[f.stem for f in TIC_FILTERS])
def test_every_tic_filter_is_byte_identical(ray_session, tic_pool, flt, monkeypatch):
    from curate.run.ray import run_filter_ray

    monkeypatch.chdir(tic_pool.parent)  # the variants read subsets/*.npy relative to here
    sets = {"year": 2016} if "year" in flt.stem else {}
    local = run_filter(flt, catalog=tic_pool, out=f"out/{flt.stem}_local.npy", sets=sets)
    if flt.stem == "replay":  # exactly `samples` rows: a global ORDER BY ... LIMIT (docs/tic.md)
        with pytest.raises(CurateError, match="LIMIT needs the whole pool; use --engine local"):
            run_filter_ray(flt, catalog=tic_pool, out=f"out/{flt.stem}_ray.npy", sets=sets)
        assert local.count == 100
        return
    run_filter_ray(flt, catalog=tic_pool, out=f"out/{flt.stem}_ray.npy", sets=sets)
    assert filecmp.cmp(f"out/{flt.stem}_local.npy", f"out/{flt.stem}_ray.npy", shallow=False)
    assert local.count > 0, "the split should not be empty on the generated artifacts"
