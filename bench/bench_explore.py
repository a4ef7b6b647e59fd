"""Benchmark: `curate explore` on a 10M-row pool: the first page of a query, and what a page
of thumbnails reads.

The pool is bench_filter.py's generated 10M-row pool (metadata only). Its catalog is copied and
given a shard index of the real size (10M rows, one per pool uid) whose entries point at the
real samples of the bundled pool's two tars, reused in turn: generating 10M JPEGs in tars is
out of reach here, and what the index size changes is the lookup, not the read (one ``pread``
of one sample either way). Prints, from one process (a :class:`curate.explore.session.Session`,
what the server calls):

  * opening the session (no tar is scanned: the catalog has an index);
  * running clip_score_l14_30pct.sql (through curate.run.run_filter, as `curate run`);
  * the first page of 100 kept samples after the query (metadata + shard lookup): target 1 s;
    beside it a bare DuckDB count of the pool rows in the page's uid range (the bound: the pool
    is not ordered by uid, so finding a page's rows is a scan of that column);
  * 100 thumbnails of that page: reads counted (target: 100 reads, one per sample);
  * the first page of the dropped part, and a kept page at offset 1,000,000.

Usage: python bench/bench_explore.py [--rows-per-file 1000000] [--files 10] [--work bench/_work]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.explore.session import Session  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402
from curate.shards.index import build_index  # noqa: E402

SHARDS = ROOT / "data" / "sample_pool" / "shards"


def catalog_with_index(work: Path, files: int, rows: int) -> Path:
    pool = work / f"pool_{files}x{rows}"
    if not pool.exists():
        print(f"generating {files}x{rows} rows ...", flush=True)
        generate_pool(pool, files=files, rows_per_file=rows, seed=1, npz=False, shards=False, fast=True)
    base = work / f"catalog_{files}x{rows}.duckdb"
    if not base.exists():
        init_catalog(base, pool=pool)
    cat = work / f"explore_catalog_{files}x{rows}.duckdb"
    if cat.exists():
        return cat
    t0 = time.perf_counter()
    tmp = cat.with_name(cat.name + ".building")
    shutil.copyfile(base, tmp)
    shard_files, index = build_index(SHARDS)
    con = duckdb.connect(str(tmp))
    con.register("bf", shard_files)
    con.register("bi", index)
    con.execute("CREATE TABLE shard_files AS SELECT * FROM bf")
    con.execute("CREATE TEMP TABLE b AS SELECT row_number() OVER (ORDER BY shard_id, \"offset\") - 1 AS k, * FROM bi "
                "WHERE uid_hi IS NOT NULL")
    m = con.execute("SELECT count(*) FROM b").fetchone()[0]
    con.execute(f"CREATE TABLE shard_index AS SELECT b.shard_id, b.key, uid_hi(p.uid) AS uid_hi, "
                f"uid_lo(p.uid) AS uid_lo, b.\"offset\", b.length, b.has_json "
                f"FROM (SELECT uid, row_number() OVER () - 1 AS n FROM pool) p JOIN b ON b.k = p.n % {m}")
    n = con.execute("SELECT count(*) FROM shard_index").fetchone()[0]
    con.close()
    tmp.rename(cat)
    print(f"catalog with a {n:,}-row shard index over {m:,} real samples in {time.perf_counter() - t0:.1f}s")
    return cat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--rows-per-file", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cat = catalog_with_index(args.work, args.files, args.rows_per_file)
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        s = Session(cat, Path(scratch))
        print(f"session opened in {time.perf_counter() - t0:.2f}s (shards: {s.reader.source}, "
              f"{s.pool_rows:,} rows)")
        t0 = time.perf_counter()
        res = s.run({"filter": "clip_score_l14_30pct"})
        print(f"query: kept {res.info['count']:,} in {time.perf_counter() - t0:.2f}s "
              f"(run_filter {res.info['elapsed']:.2f}s)")
        t0 = time.perf_counter()
        page = s.page(res.rid, "kept", 0, 100)
        t_page = time.perf_counter() - t0
        with_image = [r["uid"] for r in page["rows"] if r["image"]]
        # the bound: finding any uid in an unordered pool is a scan of the uid column
        con = duckdb.connect(str(cat), read_only=True)
        t0 = time.perf_counter()
        con.execute("SELECT count(*) FROM pool WHERE uid BETWEEN ? AND ?",
                    [page["rows"][0]["uid"], page["rows"][-1]["uid"]]).fetchone()
        t_bound = time.perf_counter() - t0
        con.close()
        print(f"first page of 100 kept samples after the query: {t_page:.3f}s "
              f"({len(with_image)} with an image); a bare scan of the uid column for the page's uid range: {t_bound:.3f}s "
              f"({t_page / t_bound:.2f}x)")
        reads0, bytes0 = s.reader.reads, s.reader.bytes_read
        t0 = time.perf_counter()
        for uid in with_image:
            s.image(uid, 200)
        t_thumbs = time.perf_counter() - t0
        print(f"{len(with_image)} thumbnails: {s.reader.reads - reads0} reads, "
              f"{(s.reader.bytes_read - bytes0) / 1024:.0f} KiB, {t_thumbs:.3f}s (decode + resize included)")
        t0 = time.perf_counter()
        s.page(res.rid, "dropped", 0, 100)
        print(f"first page of 100 dropped samples (counts the part once): {time.perf_counter() - t0:.3f}s")
        t0 = time.perf_counter()
        s.page(res.rid, "kept", 1_000_000, 100)
        print(f"kept page at offset 1,000,000: {time.perf_counter() - t0:.3f}s")
        s.close()


if __name__ == "__main__":
    main()
