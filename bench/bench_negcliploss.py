"""Benchmark: negCLIPLoss and NormSim (`curate features negcliploss` / `normsim`) against the bare
float32 matrix multiplies of the same shapes.

negCLIPLoss costs, per round and batch of B rows, one B x d by d x B product (the image-text
similarities) plus two log-sum-exps over the B x B scores; NormSim costs one N x d by d x M
product against M target rows. The bound is numpy's float32 matmul (this machine's BLAS) on
in-memory arrays of exactly those shapes. Printed, from one run on a generated pool:

  * bound: K * ceil(N/B) products of B x d @ d x B;
  * ours in memory: :func:`curate.features.negcliploss.batch_normalisers` on the same arrays
    (matmul in row chunks + stabilised row/column log-sum-exps);
  * ours end to end: :func:`build_negcliploss` on the pool (npz -> float32 .npy conversion,
    then pass 1: seeded permutation, gathering each batch from the memory maps, the batch maths;
    pass 2: each file's CLIP scores, its rows' normalisers, the parquet write), timed without and
    with the one-off conversion;
  * the same three for NormSim (N pool rows x M targets);
  * peak RSS.

Ratio = bound time / our time (1.0 = as fast as the bare multiply; target >= 0.5).

Usage: python bench/bench_negcliploss.py [--files 4] [--rows-per-file 8192] [--batch-size 8192] [--k 2]
       [--targets 16384] [--work bench/_work]
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

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.features import negcliploss as nl  # noqa: E402
from curate.features.embeddings import convert_embeddings  # noqa: E402
from curate.features.normsim import build_normsim, normsim  # noqa: E402
from curate.features.targets import import_target_set  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402

D = 768


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows-per-file", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--targets", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    a = ap.parse_args()
    work = a.work / "negcliploss"
    shutil.rmtree(work, ignore_errors=True)
    generate_pool(work / "pool", files=a.files, rows_per_file=a.rows_per_file, seed=0, shards=False, fast=True)
    cat = init_catalog(work / "cat.duckdb", pool=work / "pool")
    n, b, k = a.files * a.rows_per_file, a.batch_size, a.k
    batches = k * -(-n // b)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(b, D)).astype(np.float32)
    txt = rng.normal(size=(b, D)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    sizes = [min(b, n - j * b) for j in range(-(-n // b))] * k

    def bound():
        for m in sizes:
            np.matmul(img[:m], txt[:m].T)

    def in_memory():
        for m in sizes:
            nl.batch_normalisers(img[:m], txt[:m], 0.01)

    bound()  # warm BLAS threads
    t_bound, _ = timed(bound)
    t_mem, _ = timed(in_memory)
    t_conv, _ = timed(lambda: [convert_embeddings(cat, key, progress=False) for key in ("l14_img", "l14_txt")])
    t_e2e, res = timed(lambda: nl.build_negcliploss(cat, progress=False, batch_size=b, k=k, tau=0.01))
    assert res.rows_computed == n
    print(f"negCLIPLoss: N={n:,} rows, d={D}, batch {b}, K={k} ({batches} batches, "
          f"{2 * sum(m * m for m in sizes) * D / 1e9:.0f} GFLOP)")
    print(f"  bound (bare float32 matmul, same shapes):  {t_bound:7.2f}s  {n * k / t_bound:12,.0f} rows*rounds/s")
    print(f"  ours in memory (matmul + log-sum-exps):    {t_mem:7.2f}s  {n * k / t_mem:12,.0f} rows*rounds/s  "
          f"ratio {t_bound / t_mem:.2f}")
    print(f"  ours end to end (gather, both passes):     {t_e2e:7.2f}s  {n * k / t_e2e:12,.0f} rows*rounds/s  "
          f"ratio {t_bound / t_e2e:.2f}")
    print(f"  + one-off npz -> float32 .npy conversion:  {t_conv:7.2f}s  ratio with it {t_bound / (t_e2e + t_conv):.2f}")

    m = a.targets
    t = rng.normal(size=(m, D)).astype(np.float32)
    np.save(work / "targets.npy", t)
    import_target_set(cat, "bench", [work / "targets.npy"])
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    x = np.concatenate([img, txt])[: min(n, 2 * b)]
    reps = -(-n // len(x))

    def nbound():
        for _ in range(reps):
            np.matmul(x, tn.T)

    def nmem():
        for _ in range(reps):
            normsim(x, tn)

    nbound()
    t_nb, _ = timed(nbound)
    t_nm, _ = timed(nmem)
    t_ne, r2 = timed(lambda: build_normsim(cat, "bench", progress=False))
    rows = reps * len(x)
    print(f"NormSim: N={n:,} rows x M={m:,} targets, d={D} ({2 * n * m * D / 1e9:.0f} GFLOP)")
    print(f"  bound (bare float32 matmul, same shapes):  {t_nb * n / rows:7.2f}s  {rows / t_nb:12,.0f} rows/s")
    print(f"  ours in memory (matmul + max + squares):   {t_nm * n / rows:7.2f}s  {rows / t_nm:12,.0f} rows/s  "
          f"ratio {t_nb / t_nm:.2f}")
    print(f"  ours end to end (from the npz, parquet):   {t_ne:7.2f}s  {n / t_ne:12,.0f} rows/s  "
          f"ratio {t_nb * n / rows / t_ne:.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
