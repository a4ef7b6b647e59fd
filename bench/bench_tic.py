"""Benchmark: `curate tic export` (every yearly + monthly split in one pass) on a generated pool.

Prints, from one run:
  * ours vs the bound: one DuckDB pass that joins pool ⋈ timesplit ⋈ eval and sorts by
    (year, uid) into Arrow, with no file writing (what export cannot avoid);
  * ours vs the naive way TiC's scripts take: one query per split (9 years + ~100 months), each
    split's uid strings converted in a Python loop (``int(u[:16], 16)``, as TiC's
    ``uids_str_to_np`` / DataComp do) and the u8,u8 array sorted with numpy;
  * that both write identical subset files.
Also prints the time of `curate tic attach` (TiC files -> parquet views) for the same pool.

Usage: python bench/bench_tic.py [--rows-per-file 500000] [--files 2] [--work bench/_work]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.catalog.connection import connect, init_catalog  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402
from curate.tic.artifacts import make_tic_artifacts  # noqa: E402
from curate.tic.attach import attach  # noqa: E402
from curate.tic.export import export_splits  # noqa: E402


def naive(catalog, out: Path) -> float:
    """One query per split + Python uid conversion + sort, as TiC's scripts do it."""
    t0 = time.perf_counter()
    con = connect(catalog)
    splits = con.execute("SELECT DISTINCT year, month FROM timesplit ORDER BY 1, 2").fetchall()
    years = sorted({y for y, _ in splits})
    base = ("SELECT p.uid FROM pool p JOIN timesplit t ON t.uid = p.uid "
            "WHERE p.uid NOT IN (SELECT uid FROM tic_eval) AND ")
    jobs = [(out / "yearly" / f"{y}.npy", base + "t.year = ?", [y]) for y in years]
    jobs += [(out / "monthly" / f"{y}{m:02d}.npy", base + "t.year = ? AND t.month = ?", [y, m]) for y, m in splits]
    for path, sql, params in jobs:
        uids = [r[0] for r in con.execute(sql, params).fetchall()]
        arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
        arr.sort()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, arr)
    con.close()
    return time.perf_counter() - t0


def bound(catalog) -> float:
    t0 = time.perf_counter()
    con = connect(catalog)
    con.execute("""
        SELECT t.year, t.month, ('0x' || p.uid[1:16])::UBIGINT AS hi, ('0x' || p.uid[17:32])::UBIGINT AS lo,
               e.uid IS NOT NULL AS is_eval
        FROM pool p JOIN timesplit t ON t.uid = p.uid
        LEFT JOIN (SELECT DISTINCT uid FROM tic_eval) e ON e.uid = p.uid
        ORDER BY 1, 3, 4""").to_arrow_table()
    con.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-file", type=int, default=500_000)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "tic")
    a = ap.parse_args()
    n = a.rows_per_file * a.files
    work = a.work / f"pool_{n}"
    pool = work / "pool"
    if not (pool / "metadata").is_dir():
        generate_pool(pool, files=a.files, rows_per_file=a.rows_per_file, seed=0, npz=False, shards=False, fast=True)
    for d in ("art", "ours", "naive"):
        shutil.rmtree(work / d, ignore_errors=True)
    cat = work / "catalog.duckdb"
    for f in (cat, work / "catalog.duckdb.features"):
        shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
    init_catalog(cat, pool=pool)
    t = time.perf_counter()
    make_tic_artifacts(cat, work / "art")
    print(f"pool: {n:,} samples; generated TiC artifacts in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    attach(cat, work / "art")
    print(f"attach (TiC npy -> parquet views): {time.perf_counter() - t:.2f}s")

    t_bound = bound(cat)
    t = time.perf_counter()
    res = export_splits(cat, work / "ours")
    t_ours = time.perf_counter() - t
    t_naive = naive(cat, work / "naive")
    files = sorted(p.relative_to(work / "naive") for p in (work / "naive").rglob("*.npy"))
    same = all((work / "ours" / f).read_bytes() == (work / "naive" / f).read_bytes() for f in files
               if (work / "ours" / f).exists())
    print(f"splits: {len(res.yearly)} yearly + {len(res.monthly)} monthly files, "
          f"{sum(res.yearly.values()):,} training uids")
    print(f"bound  (one join+sort pass into Arrow, no writing): {t_bound:6.2f}s")
    print(f"ours   (curate tic export, one pass, all splits)   : {t_ours:6.2f}s  = {t_ours / t_bound:.2f}x the bound")
    print(f"naive  (one query per split + Python uid loop)     : {t_naive:6.2f}s  = {t_naive / t_ours:.1f}x ours")
    print(f"identical subset files: {same} ({len(files)} compared)")


if __name__ == "__main__":
    main()
