"""Benchmark (issue 19): SemDeDup and density-based pruning against the bare matmul and the paper's way.

On a generated pool with npz embeddings (curate.pool.sample.generate_pool, 768-d `l14_img`) and a
cluster set made by `curate clusters build` (faiss k-means, --k clusters), printed from one run:

  * the producers, in this process with `curate run`'s engine (none: tasks in this process) and
    stage by stage: nearest-centroid assignments (`cluster_assignments`), the npz -> float32 .npy
    conversion, `build_semdedup` (pass 1: per cluster the order, the distances to the centroid and
    the blocked pairwise similarities; pass 2: one table per pool file) and `build_dbp` (d_intra
    from the semdedup table, d_inter from the K x K centroid similarities, quotas, flags);
  * the bound for SemDeDup: the same pairwise cosine work as a bare float32 matmul per cluster of
    n members on in-memory unit rows: `x @ x.T`, which numpy hands to BLAS syrk (n^2 d / 2
    multiply-adds, the least work); beside it the column-block products `x[:b] @ x[a:b].T` that
    curate.features.semdedup.earlier_max computes, and `earlier_max` itself on the same arrays
    (the kernel: those products plus the triangle mask and the column argmax);
  * the bound for DBP's distance computations: the K x K centroid product and the top-`neighbors`
    sort (`inter_distances`' work) and, for scale, a bare read of the semdedup columns it scans;
  * the naive way for SemDeDup, the paper's reference code path (facebookresearch/SemDeDup:
    sort_clusters.py then semdedup.py) re-implemented in numpy: the whole pool's embeddings in
    memory, per cluster the distances to the centroid and a sort, the FULL n x n similarity
    matrix, np.triu(S, 1) and the column max M; removed = M > 1 - eps. Its removed sets are
    compared with curate's for two eps values (the generated embeddings hold no near copies:
    their largest similarities are ~0.1-0.2, so 0.87 removes about half). For DBP there is no naive run (see the docs);
  * the filter runs (`curate run filters/semdedup.sql` / `dbp.sql` in fresh processes, tables
    built; another eps: no rebuild; another fraction: the dbp table is rebuilt from the semdedup
    tables), and a cold `semdedup.sql` run on a fresh catalog (cluster set imported, nothing
    else built: assignments, conversion and the table are built inside the run).

Ratio = bound time / our time (1.0 = as fast as the bare matmuls). Peak RSS of this process at
the end (the naive way's full matrices included).

Usage: python bench/bench_semdedup_dbp.py [--files 4] [--rows-per-file 50000] [--k 40] [--eps 0.07,0.87]
       [--work bench/_work/semdedup]   (figures in docs/semdedup-dbp.md: the defaults)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.catalog.connection import connect, init_catalog  # noqa: E402
from curate.features import dbp as dbpmod, semdedup as sd  # noqa: E402
from curate.features.clusters import assign_pool, get_cluster_set  # noqa: E402
from curate.features.embeddings import convert_embeddings, open_npy, pool_embedding_files  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402

KEY = "l14_img"
#: clusters up to this size also get the whole n x n product in the bound (16k: 1 GiB)
FULL_MAX = 16_384
NAME = "bench"


def say(msg: str) -> None:
    print(msg, flush=True)


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def curate(args: list[str], log: Path) -> float:
    """``curate ARGS`` in a fresh process (this tree's package); wall seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log, "ab") as out:
        out.write(("$ curate " + " ".join(args) + "\n").encode())
        out.flush()
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "curate", *args], stdout=out, stderr=out, env=env)
    if rc:
        sys.exit(f"error: curate {' '.join(args)} exited {rc}; see {log}")
    return time.perf_counter() - t0


def cluster_members(cat: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster, index of the row's file in ``files``, row) of every pool row, sorted by cluster,
    file, row (the order curate's pass 1 reads them in)."""
    con = connect(cat)
    try:
        t = con.execute('SELECT cluster, file, "row" FROM cluster_assignments WHERE cluster_set = ? '
                        'ORDER BY cluster, file, "row"', [NAME]).to_arrow_table()
    finally:
        con.close()
    index = {f: i for i, f in enumerate(files)}
    fi = np.array([index[f] for f in t.column(1).to_pylist()], np.int64)
    return t.column(0).to_numpy().astype(np.int64), fi, t.column(2).to_numpy().astype(np.int64)


# ---- bounds --------------------------------------------------------------------------------

def matmul_bound(sizes: list[int], d: int) -> dict:
    """Seconds over clusters of ``sizes`` (random unit float32 rows, in memory): ``syrk``: the whole
    ``x @ x.T`` per cluster (numpy hands a product with its own transpose to BLAS syrk: n^2 d / 2
    multiply-adds, the least work; skipped for clusters over FULL_MAX members), ``blocked``: the
    column-block products that earlier_max computes, ``kernel``: earlier_max itself."""
    rng = np.random.default_rng(0)
    big = rng.normal(size=(max(sizes), d)).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    out = {"syrk": 0.0, "blocked": 0.0, "kernel": 0.0, "madds": 0.0, "syrk_skipped": 0}
    for n in sizes:
        x = big[:n]
        block = max(1, sd.SIM_CELLS // max(1, n))
        t0 = time.perf_counter()
        for a in range(1, n, block):
            b = min(n, a + block)
            np.matmul(x[:b], x[a:b].T)
        t1 = time.perf_counter()
        sd.earlier_max(x)
        t2 = time.perf_counter()
        out["blocked"] += t1 - t0
        out["kernel"] += t2 - t1
        out["madds"] += n * n * d / 2
        if n <= FULL_MAX:
            t0 = time.perf_counter()
            np.matmul(x, x.T)
            out["syrk"] += time.perf_counter() - t0
        else:
            out["syrk_skipped"] += 1
    return out


def dbp_distance_bound(centroids: np.ndarray, neighbors: int) -> float:
    """The K x K centroid similarities and the top-``neighbors`` sort, bare."""
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    t0 = time.perf_counter()
    s = c @ c.T
    np.partition(-s, min(neighbors, len(c) - 1), axis=1)
    return time.perf_counter() - t0


# ---- the paper's way (sort_clusters.py + semdedup.py), in numpy --------------------------------

def naive_semdedup(cat: Path, eps_list: list[float]) -> tuple[float, dict, int]:
    """Seconds, {eps: set of (file index, row) removed}, largest cluster (its n x n matrix)."""
    files = pool_embedding_files(cat, KEY)
    t0 = time.perf_counter()
    embs = np.concatenate([np.asarray(open_npy(ef, KEY)) for ef in files])  # the code's whole-pool memmap
    offsets = np.cumsum([0] + [ef.num_rows for ef in files])
    cl, fi, rw = cluster_members(cat, [ef.file for ef in files])
    centroids = get_cluster_set(cat, NAME).centroids().astype(np.float32)
    removed = {e: [] for e in eps_list}
    bounds = np.flatnonzero(np.diff(cl)) + 1
    biggest = 0
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(cl)]):
        ids = offsets[fi[a:b]] + rw[a:b]
        x = embs[ids]
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = centroids[cl[a]] / np.linalg.norm(centroids[cl[a]])
        dist = 1 - x @ c
        order = np.argsort(-dist.astype(np.float64), kind="stable")  # keep_hard: farthest first
        x = x[order]
        s = x @ x.T  # pairwise_sim_matrix
        m = np.triu(s, 1).max(axis=0)  # torch.triu(..., diagonal=1), max over dim 0
        biggest = max(biggest, b - a)
        for e in eps_list:
            gone = order[m > np.float32(1 - e)]
            removed[e].extend(zip(fi[a:b][gone].tolist(), rw[a:b][gone].tolist()))
    return time.perf_counter() - t0, {e: set(v) for e, v in removed.items()}, biggest


def ours_removed(cat: Path, eps: float) -> set:
    con = connect(cat)
    try:
        rows = con.execute('SELECT file, "row" FROM semdedup WHERE clusters = ? '
                           "AND coalesce(max_sim, 0) > CAST(1 - ? AS FLOAT)", [NAME, eps]).fetchall()
    finally:
        con.close()
    index = {ef.file: i for i, ef in enumerate(pool_embedding_files(cat, KEY))}
    return {(index[a], int(b)) for a, b in rows}


# ---- main ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows-per-file", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=40, help="k-means clusters (40: ~5,000 members each at 200k rows)")
    ap.add_argument("--eps", default="0.07,0.87",
                    help="eps values whose removed sets are compared with the paper's way")
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "semdedup")
    a = ap.parse_args()
    work = a.work.resolve()
    n_rows = a.files * a.rows_per_file
    pool = work / f"pool_{a.files}x{a.rows_per_file}"
    log = work / "bench_semdedup_dbp.log"
    work.mkdir(parents=True, exist_ok=True)
    say(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; log: {log}")
    if not (pool / "metadata").is_dir():
        t, _ = timed(generate_pool, pool, files=a.files, rows_per_file=a.rows_per_file, seed=0, npz=True,
                     shards=False, fast=True)
        say(f"generated {n_rows:,} rows with npz embeddings in {t:.1f}s")

    cat = work / "cat.duckdb"
    for p in (cat, work / "cat.features", work / "cold.duckdb", work / "cold.features"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    init_catalog(cat, pool=pool, features_dir=work / "cat.features")
    t_km = curate(["clusters", "build", str(cat), "--name", NAME, "--k", str(a.k), "--niter", str(a.niter),
                   "--no-caption-filter"], log)
    say(f"curate clusters build --k {a.k} --niter {a.niter} (faiss k-means over {n_rows:,} x 768): {t_km:.1f}s")

    # -- producers, stage by stage ------------------------------------------------------------
    t_assign, _ = timed(assign_pool, cat, NAME, progress=False)
    t_convert, _ = timed(convert_embeddings, cat, KEY, progress=False)
    t_sd, res = timed(sd.build_semdedup, cat, NAME, progress=False)
    t_dbp, dres = timed(dbpmod.build_dbp, cat, NAME, progress=False)
    cl, _, _ = cluster_members(cat, [ef.file for ef in pool_embedding_files(cat, KEY)])
    sizes = np.bincount(cl)
    sizes = sizes[sizes > 0].tolist()
    say(f"clusters: {len(sizes)} with members, sizes {min(sizes):,}-{max(sizes):,} (median {int(np.median(sizes)):,}); "
        f"semdedup pass-1 steps: {res.steps}")
    say(f"producers: assignments {t_assign:.2f}s, npz -> .npy {t_convert:.2f}s, semdedup {t_sd:.2f}s, "
        f"dbp {t_dbp:.2f}s (budget {dres.budget:,}, quotas sum {dres.kept:,})")

    # -- bounds -------------------------------------------------------------------------------
    bd = matmul_bound(sizes, 768)
    bound = bd["syrk"] if not bd["syrk_skipped"] else bd["blocked"]
    say(f"SemDeDup pairwise work: {bd['madds'] / 1e9:.1f} G multiply-adds (n^2 d / 2 per cluster) "
        f"over {len(sizes)} clusters")
    if not bd["syrk_skipped"]:
        say(f"  bound: bare x @ x.T per cluster (BLAS syrk)  {bd['syrk']:7.2f}s "
            f"({2 * bd['madds'] / bd['syrk'] / 1e9:5.1f} GFLOP/s)")
    else:
        say(f"  ({bd['syrk_skipped']} clusters over {FULL_MAX:,} members: no whole-matrix bound; "
            f"the blocked one is used)")
    say(f"  bare matmuls of earlier_max's column blocks {bd['blocked']:7.2f}s -> bound / blocked = "
        f"{bound / bd['blocked']:.2f}x")
    say(f"  earlier_max on the same arrays (kernel)     {bd['kernel']:7.2f}s -> bound / kernel = "
        f"{bound / bd['kernel']:.2f}x")
    say(f"  build_semdedup end to end (gather, both passes, parquet)  {t_sd:.2f}s -> bound / ours = "
        f"{bound / t_sd:.2f}x; with the assignments and the conversion {t_assign + t_convert + t_sd:.2f}s -> "
        f"{bound / (t_assign + t_convert + t_sd):.2f}x")
    cs = get_cluster_set(cat, NAME)
    t_inter = dbp_distance_bound(cs.centroids().astype(np.float32), dbpmod.DEFAULTS["neighbors"])
    t_ours_inter, _ = timed(dbpmod.inter_distances, cs.centroids(), dbpmod.DEFAULTS["neighbors"])
    sd_files = sorted((work / "cat.features" / "semdedup" / NAME).glob("*.parquet"))
    t_scan, _ = timed(lambda: [pq.read_table(f, columns=["uid", "cluster", "rank", "max_sim", "dist_to_centroid"])
                               for f in sd_files])
    say(f"DBP distances: bare K x K centroid product + top-{dbpmod.DEFAULTS['neighbors']} {t_inter:.3f}s, "
        f"inter_distances {t_ours_inter:.3f}s; build_dbp {t_dbp:.2f}s is reading the semdedup tables "
        f"(bare read of its columns {t_scan:.2f}s), the quotas and writing one table per file")

    # -- the paper's way --------------------------------------------------------------------------
    eps_list = [float(e) for e in a.eps.split(",")]
    t_naive, removed, biggest = naive_semdedup(cat, eps_list)
    same = []
    for e in eps_list:
        ours = ours_removed(cat, e)
        same.append(f"eps {e:g}: {len(ours):,} removed, {'EQUAL' if ours == removed[e] else 'DIFFERENT'} "
                    f"({len(ours ^ removed[e])} differ)")
    say(f"paper's way (sort + full n x n matrix + triu + column max, numpy, whole pool in memory): {t_naive:.2f}s "
        f"-> {t_naive / t_sd:.2f}x our build; largest matrix {biggest:,}^2 floats = {biggest ** 2 * 4 / 2**20:,.0f} MB")
    say("  removed sets vs curate: " + "; ".join(same))

    # -- filter runs ------------------------------------------------------------------------------
    out = work / "subsets"
    out.mkdir(exist_ok=True)
    runs = [("semdedup.sql, tables built", ["filters/semdedup.sql", "--set", f"clusters={NAME}"]),
            ("semdedup.sql --set eps=0.3 (no rebuild)", ["filters/semdedup.sql", "--set", f"clusters={NAME}",
                                                         "--set", "eps=0.3"]),
            ("dbp.sql, table built", ["filters/dbp.sql", "--set", f"clusters={NAME}"]),
            ("dbp.sql --set fraction=0.3 (dbp rebuilt)", ["filters/dbp.sql", "--set", f"clusters={NAME}",
                                                          "--set", "fraction=0.3"])]
    for i, (what, args) in enumerate(runs):
        t = curate(["run", str(ROOT / args[0]), "-c", str(cat), "-o", str(out / f"run{i}.npy"), *args[1:]], log)
        kept = len(np.load(out / f"run{i}.npy"))
        say(f"curate run {what}: {t:.2f}s, kept {kept:,} of {n_rows:,}")
    cold = work / "cold.duckdb"
    init_catalog(cold, pool=pool, features_dir=work / "cold.features")
    np.save(work / "centroids.npy", cs.centroids())
    curate(["clusters", "import", str(cold), "--name", NAME, "--centroids", str(work / "centroids.npy")], log)
    t = curate(["run", str(ROOT / "filters/semdedup.sql"), "-c", str(cold), "-o", str(out / "cold.npy"),
                "--set", f"clusters={NAME}"], log)
    same = (out / "cold.npy").read_bytes() == (out / "run0.npy").read_bytes()
    say(f"curate run semdedup.sql cold (fresh catalog, cluster set imported, everything built in the run): "
        f"{t:.2f}s; subset {'identical' if same else 'DIFFERENT'}")
    say(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
