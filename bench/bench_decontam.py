"""Benchmark: the eval-neighbour search (`curate decontam build`, view `eval_neighbors`) against a
bare faiss search of the same shapes.

The search costs, per pool batch of R rows, one R x d by d x M inner-product scan over the M eval
rows (faiss ``IndexFlatIP.range_search``, float32 BLAS inside). The bound is that bare call on
in-memory arrays of exactly those shapes, batch by batch. Printed, from one run on a generated
pool with M eval rows (random unit vectors plus copies of 64 pool images, so pairs are found):

  * bound: ``IndexFlatIP(d).range_search(batch, threshold)`` over the N pool rows;
  * ours in memory: :class:`curate.features.decontam.NeighborSearch` on the same arrays (the
    same faiss call, the float64 threshold check, sorting the pairs);
  * ours end to end: :func:`build_eval_neighbors` on the pool (streaming each npz, the search,
    the uid lookup, the parquet write);
  * peak RSS.

Ratio = bound time / our time (1.0 = as fast as the bare search; target >= 0.5). The bound and
the in-memory search are timed ``--repeat`` times, interleaved, and the fastest of each is kept
(on a shared machine the load drifts between runs more than the two differ).

Usage: python bench/bench_decontam.py [--files 4] [--rows-per-file 8192] [--eval 8192]
       [--threshold 0.95] [--repeat 3] [--work bench/_work]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.features import decontam as dc  # noqa: E402
from curate.features.embeddings import iter_batches, pool_embedding_files  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402

D = 768
PLANTED = 64


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows-per-file", type=int, default=8192)
    ap.add_argument("--eval", type=int, default=8192)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--repeat", type=int, default=3, help="bound and in-memory runs, interleaved; the fastest counts")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    a = ap.parse_args()
    work = a.work / "decontam"
    shutil.rmtree(work, ignore_errors=True)
    generate_pool(work / "pool", files=a.files, rows_per_file=a.rows_per_file, seed=0, shards=False, fast=True)
    cat = init_catalog(work / "cat.duckdb", pool=work / "pool")
    files = pool_embedding_files(cat, "l14_img")
    x = np.concatenate([b for ef in files for b in iter_batches(ef, "l14_img", batch_rows=dc.ROWS)])
    n, m = len(x), a.eval
    rng = np.random.default_rng(0)
    e = rng.normal(size=(m, D)).astype(np.float32)
    e[rng.choice(m, PLANTED, replace=False)] = x[rng.choice(n, PLANTED, replace=False)]
    np.save(work / "eval.npy", e)
    es = dc.import_eval_set(cat, "bench", work / "eval.npy")
    en = es.embeddings(mmap=False)
    batches = [np.ascontiguousarray(x[i:i + dc.ROWS]) for i in range(0, n, dc.ROWS)]

    def bound():
        index = faiss.IndexFlatIP(D)
        index.add(en)
        return sum(int(index.range_search(b, a.threshold)[0][-1]) for b in batches)

    def in_memory():
        s = dc.NeighborSearch(en, a.threshold, gpu=False)
        return sum(len(s.search(b)[0]) for b in batches)

    bound()  # warm the BLAS / OpenMP threads
    runs = [(timed(bound), timed(in_memory)) for _ in range(a.repeat)]  # interleaved: load drifts
    t_bound, pairs_bound = min(b for b, _ in runs)
    t_mem, pairs = min(m for _, m in runs)
    t_e2e, res = timed(lambda: dc.build_eval_neighbors(cat, "bench", a.threshold, progress=False, force=True))
    assert res.rows_computed == n and pairs >= PLANTED
    print(f"eval neighbours: N={n:,} pool rows x M={m:,} eval rows, d={D} ({2 * n * m * D / 1e9:.0f} GFLOP), "
          f"cosine >= {a.threshold}: {pairs:,} pairs (bare faiss: {pairs_bound:,} above the radius)")
    print(f"  bound (bare faiss IndexFlatIP.range_search):  {t_bound:7.2f}s  {n / t_bound:12,.0f} rows/s")
    print(f"  ours in memory (NeighborSearch):             {t_mem:7.2f}s  {n / t_mem:12,.0f} rows/s  "
          f"ratio {t_bound / t_mem:.2f}")
    print(f"  ours end to end (from the npz, parquet):     {t_e2e:7.2f}s  {n / t_e2e:12,.0f} rows/s  "
          f"ratio {t_bound / t_e2e:.2f}")
    print(f"faiss threads {faiss.omp_get_max_threads()}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
