"""Scaling of the Ray engine: partitions on 1, 2 and 4 workers, central steps measured apart.

Simulates scale with a generated pool of many files (each file = one partition, as a DataComp
parquet would be). For each worker count W it runs ``curate ray run`` (``max_in_flight=W``)
with the DataComp-1B-style global step ``fraction_threshold`` (filters/clip_score_l14_30pct.sql)
and prints, from the run's manifest:

* partition throughput (rows/s) and throughput per worker — flat means no central bottleneck;
* the threshold (3 distributed histogram passes) and the assembly (parallel bucket sorts, then
  a byte-stream concatenation on the driver).

Then the central steps are compared with the way DataComp does them on one node, implemented
here: ``get_threshold`` (gather the whole score column, full sort) and assembly by one global
sort of every selected uid. Ratios are measured in this run.

This machine has 2 cores: W=4 runs 4 tasks on 2 cores (oversubscribed), so per-worker
throughput there is expected to halve; on a real cluster each worker brings its own cores.

    python bench/bench_ray_scale.py [--files 8] [--rows-per-file 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FILTER = REPO / "filters" / "clip_score_l14_30pct.sql"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows-per-file", type=int, default=1_000_000)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()

    import duckdb

    from curate.catalog.connection import connect, init_catalog
    from curate.engine import Engine
    from curate.engine.ray import connect_ray
    from curate.run.ray import run_filter_ray
    from curate.run.ray_threshold import PASSES
    from curate.run.runner import run_filter
    from curate.pool.sample import generate_pool
    from curate.uids import hex_array_to_pairs, sort_pairs

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        t = time.perf_counter()
        generate_pool(tmp / "pool", files=args.files, rows_per_file=args.rows_per_file, seed=1,
                      npz=False, shards=False, fast=True)
        cat = init_catalog(tmp / "cat.duckdb", pool=tmp / "pool")
        rows = args.files * args.rows_per_file
        print(f"pool: {rows:,} rows in {args.files} files ({time.perf_counter() - t:.1f}s to generate)")
        print(f"machine: {os.cpu_count()} cores; Ray started with num_cpus=4 (W=4 oversubscribes)")
        connect_ray(num_cpus=4)

        t = time.perf_counter()
        run_filter(FILTER, catalog=cat, out=tmp / "local.npy")
        local_s = time.perf_counter() - t
        print(f"local engine (one process, DuckDB multi-threaded): {local_s:.2f}s")

        print(f"load average before the runs (other processes on this machine): {os.getloadavg()[0]:.1f}")
        print("\n W | partitions s | rows/s     | rows/s/worker (wall) | rows/s in a task | threshold s "
              "(rows/s/pass) | bucket sort s | concat s | total s | identical")
        base = base_task = None
        for w in [int(x) for x in args.workers.split(",")]:
            out = tmp / f"ray{w}.npy"
            t = time.perf_counter()
            run_filter_ray(FILTER, catalog=cat, out=out, engine=Engine("ray", max_in_flight=w), bucket_records=1 << 20,
                           keep_work=True)
            total = time.perf_counter() - t
            e = json.loads(out.with_suffix(".json").read_text())["engine"]
            task_s = sum(json.loads(p.read_text())["seconds"] for p in Path(e["work_dir"]).glob("part-*.json"))
            shutil.rmtree(e["work_dir"])
            print_load = os.getloadavg()[0]
            rate, task_rate = rows / e["partitions_seconds"], rows / task_s
            base, base_task = base or rate, base_task or task_rate
            same = out.read_bytes() == (tmp / "local.npy").read_bytes()
            print(f" {w} | {e['partitions_seconds']:12.2f} | {rate:10,.0f} | {rate / w:11,.0f} ({rate / w / base:.2f}x) "
                  f"| {task_rate:9,.0f} ({task_rate / base_task:.2f}x) | {e['threshold_seconds']:6.2f} "
                  f"({len(PASSES) * rows / e['threshold_seconds']:10,.0f}) "
                  f"| {e['bucket_sort_seconds']:13.2f} | {e['concatenate_seconds']:8.3f} | {total:7.2f} | {same}"
                  f"   (load {print_load:.1f})")

        # -- central steps, DataComp's way (one node) vs ours --------------------------------------
        con = connect(cat)
        files = [r[0] for r in con.execute("SELECT path FROM pool_files ORDER BY file_id").fetchall()]
        con.close()
        t = time.perf_counter()
        cols = [duckdb.sql(f"SELECT clip_l14_similarity_score FROM read_parquet('{f}')").fetchnumpy()
                ["clip_l14_similarity_score"] for f in files]  # bench-only: paths we generated
        x = np.concatenate(cols)
        n = int(len(x) * 0.3)
        naive_thr = (-np.sort(-x))[n]
        naive_thr_s = time.perf_counter() - t

        from curate.run.ray_threshold import exact_threshold, partition_histogram

        sent = []

        def run_pass(level, prefix):
            out = [partition_histogram(iter([c.astype(np.float32)]), level, prefix) for c in cols]
            sent.append(sum(d.nbytes + c.nbytes + 8 for _, d, c in out))
            return out

        t = time.perf_counter()
        res = exact_threshold(run_pass, 0.3)
        ours_thr_s = time.perf_counter() - t
        assert res.threshold == float(naive_thr), (res.threshold, naive_thr)
        # what reaches the driver: DataComp gathers N floats; we gather sparse histograms
        print(f"\nthreshold: DataComp get_threshold (gather {len(x):,} floats + full sort) {naive_thr_s:.2f}s on "
              f"one node, driver receives {len(x) * 4 / 1e6:.2f} MB; ours: {len(sent)} passes, driver receives "
              f"{sum(sent) / 1e6:.3f} MB ({len(x) * 4 / sum(sent):.0f}x less), same passes in one process "
              f"{ours_thr_s:.2f}s; identical value {res.threshold!r}")

        sel = np.load(tmp / "local.npy", mmap_mode="r")
        t = time.perf_counter()
        # DataComp: every worker returns its uids; one process concatenates and sorts them all
        import pyarrow as pa

        from curate.uids import pairs_to_hex_array

        hexes = pairs_to_hex_array(np.asarray(sel["f0"]), np.asarray(sel["f1"]))
        rng = np.random.default_rng(0)
        hexes = pa.array(np.asarray(hexes.to_pylist(), dtype=object)[rng.permutation(len(hexes))], pa.string())
        t = time.perf_counter()
        hi, lo = hex_array_to_pairs(hexes)
        hi, lo = sort_pairs(hi, lo)
        central_sort_s = time.perf_counter() - t
        print(f"assembly: one global sort of {len(sel):,} uids on the driver {central_sort_s:.2f}s vs our driver "
              f"share (concatenation only) {e['concatenate_seconds']:.3f}s "
              f"({central_sort_s / max(e['concatenate_seconds'], 1e-6):.0f}x less central work; "
              f"the sort itself ran in {e['buckets']} bucket tasks)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
