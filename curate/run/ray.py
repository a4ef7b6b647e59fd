"""``curate run --engine ray``: the same filter file, run per pool file on a Ray cluster.

:func:`run_filter_ray` takes the arguments of :func:`curate.run.runner.run_filter` (plus engine
options) and writes the same outputs: a subset ``.npy`` byte-identical to the local engine's
and a manifest with the same keys (plus ``engine``). The steps:

1. On the driver: load the filter, build missing feature tables, run its ``SET VARIABLE``
   statements and ``--set`` overrides (:func:`curate.run.runner.prepare`), cut the global
   ``fraction_threshold`` calls out of the query and check the rest is row-local
   (:mod:`curate.run.plan`).
2. Each threshold: three histogram passes over the partitions (:mod:`.threshold`); the driver
   only adds up at most 2,048 counters per partition and pass.
3. Each pool file: the query on that file with DuckDB, thresholds and parameters as typed
   variables; a sorted run per file (:mod:`.partition`).
4. uid-prefix buckets sorted in parallel, then concatenated (or published as a directory of
   bucket files) (:mod:`.assemble`).

Everything a step writes lives under ``WORK/<fingerprint>/`` with a marker per finished
partition and bucket, so a killed run started again with the same arguments skips what is done;
Ray retries a task whose worker died. The work directory is removed after success unless
``keep_work``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import duckdb
import numpy as np

from curate import __version__
from curate.catalog.connection import connect, default_catalog
from curate import storage
from curate.run.assemble import (bucket_slices, concatenate_buckets, plan_buckets, sort_bucket,
                                         write_bucket_directory)
from curate.engine.ray import cluster_cpus, connect_ray, put, ray_imap, ray_map
from curate.run.partition import (capture_variables, file_keyed_views, filter_partition, pool_context,
                                          threshold_pass)
from curate.run.plan import extract_fraction_thresholds, row_local_problem
from curate.run.ray_threshold import PASSES, exact_threshold
from curate.features.registry import needed_producers
from curate.run.runner import FilterError, RunResult, _one_line, filter_features, load_filter, manifest_record, prepare

LAYOUTS = ("file", "buckets")


def _manifest_path(out: str, layout: str) -> str:
    if layout == "buckets":
        return storage.join(out, "manifest.json")
    return out[: -len(".npy")] + ".json" if out.endswith(".npy") else out + ".json"


def _open(catalog, filter_path, storage_options):
    """The catalog (remote pool files readable), its context for workers, and the filter."""
    con = connect(catalog)
    ctx = pool_context(con, catalog, storage_options)
    storage.register_filesystems(con, [f[2] for f in ctx.files] + [p for v in ctx.views for p in v[2]],
                                 storage_options)
    flt = load_filter(filter_path, con)
    for stmt in flt.setup:
        if extract_fraction_thresholds(stmt)[1]:
            raise FilterError(f"{flt.path}: the ray engine computes fraction_threshold() only in the "
                              f"query, not in a SET VARIABLE statement; use --engine local")
    return con, ctx, flt


def run_filter_ray(filter_path, catalog=None, out=None, sets=None, progress=False, *,
                   address: str | None = None, num_cpus: int | None = None,
                   max_in_flight: int | None = None, work_dir: str | None = None,
                   keep_work: bool = False, bucket_records: int = 1 << 22, layout: str = "file",
                   storage_options: dict | None = None, crash_once: str | None = None) -> RunResult:
    """Run ``filter_path`` on ``catalog`` with Ray; write the subset ``out`` and its manifest.

    ``out`` may be a local path or a URL (``s3://bucket/subsets/x.npy``); with
    ``layout="buckets"`` it is a directory of sorted bucket files plus ``buckets.json``.
    ``address`` joins a running cluster (default: start a local Ray with ``num_cpus``).
    ``max_in_flight`` caps concurrent tasks; ``bucket_records`` sizes the sort buckets.
    ``crash_once`` (tests): a marker path; the first partition task to find it missing creates
    it and kills its own worker process.
    """
    t0 = time.perf_counter()
    if layout not in LAYOUTS:
        raise FilterError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    catalog = Path(catalog) if catalog else default_catalog()
    out = str(out) if out else str(Path("subsets") / (Path(filter_path).stem + ("" if layout == "buckets" else ".npy")))
    if not storage.is_url(out):
        out = str(Path(out).resolve())  # workers may not share the driver's working directory
    if work_dir and not storage.is_url(work_dir):
        work_dir = str(Path(work_dir).resolve())
    if storage_options is None:
        storage_options = storage.storage_options_from_env()

    con, ctx, flt = _open(catalog, filter_path, storage_options)
    query, params = prepare(con, flt, sets or {})
    features = {}
    if needed_producers(flt.text):
        con.close()  # producers open the catalog read-write
        features = filter_features(catalog, flt, params, progress)
        con, ctx, flt = _open(catalog, filter_path, storage_options)
        query, params = prepare(con, flt, sets or {})
    rewritten, calls = extract_fraction_thresholds(query)
    # workers get the filter's own query text (read_subset() calls intact: each worker registers
    # the subsets itself); the calls are numbered the same way in both texts
    worker_query, _ = extract_fraction_thresholds(flt.query)
    ctx.partitioned_views = file_keyed_views(con, [v[0] for v in ctx.views])
    problem = row_local_problem(rewritten, ["pool", *ctx.partitioned_views])
    if problem:
        raise FilterError(f"{flt.path}: cannot run per pool file on the ray engine: {problem}; "
                          f"use --engine local")
    fractions = {}
    for call in calls:
        con.execute(f"SET VARIABLE {call.variable} = CAST(NULL AS FLOAT)")
        try:
            fraction = con.execute(f"SELECT ({call.fraction_sql})::DOUBLE").fetchone()[0]
        except duckdb.Error as e:
            raise FilterError(f"{flt.path}: fraction_threshold(..., {call.fraction_sql}): {_one_line(e)}") from None
        if fraction is None or not 0 <= fraction < 1:
            # the same check, and message, as the fraction_threshold SQL macro
            raise FilterError(f"{flt.path}: fraction must be in [0, 1), got "
                              f"{'NULL' if fraction is None else fraction}")
        fractions[call.variable] = fraction
    try:
        rel = con.sql(rewritten)
        columns, types = rel.columns, rel.types
    except duckdb.Error as e:
        raise FilterError(f"{flt.path}: {_one_line(e)}") from None
    if columns != ["uid"]:
        raise FilterError(f"{flt.path}: the query must return exactly one column named `uid`; it returns "
                          f"{', '.join(columns)}")
    if str(types[0]) != "VARCHAR":
        raise FilterError(f"{flt.path}: column `uid` has type {types[0]}, expected VARCHAR (32 hex characters)")
    ctx.variables = [v for v in capture_variables(con) if v[0] not in fractions]
    pool_rows = sum(int(f[3]) for f in ctx.files)
    con.close()

    fingerprint = hashlib.sha256(json.dumps({
        "curate": __version__, "query": worker_query, "calls": [c.__dict__ for c in calls],
        "variables": ctx.variables, "files": ctx.files, "views": ctx.views, "extra": ctx.extra_columns,
        "partitioned": ctx.partitioned_views,
        "inputs": _identities([f[2] for f in ctx.files] + [p for v in ctx.views for p in v[2]], storage_options),
    }, default=str, sort_keys=True).encode()).hexdigest()[:16]
    work = work_dir or (out.rstrip("/") + ".work")
    run_dir = storage.join(work, fingerprint)

    connect_ray(address, num_cpus)
    ctx_ref = put(ctx)
    file_ids = [f[0] for f in ctx.files]
    timings = {}

    # 1. global step: exact thresholds from histograms, cached for a restarted run
    thresholds = {}
    t = time.perf_counter()
    thr_path = storage.join(run_dir, "thresholds.json")
    if calls and storage.exists(thr_path, storage_options):
        thresholds = storage.read_json(thr_path, storage_options)
    elif calls:
        for call in calls:
            def run_pass(level, prefix, call=call):
                # a generator: the driver adds histograms up as they arrive, never holding them all
                return ray_imap(threshold_pass, [(ctx_ref, fid, call.score_sql, level, prefix) for fid in file_ids],
                                desc=f"threshold pass {level + 1}/{len(PASSES)}", progress=progress,
                                max_in_flight=max_in_flight)
            res = exact_threshold(run_pass, fractions[call.variable])
            thresholds[call.variable] = {"score": call.score_sql, "fraction": fractions[call.variable], **res.as_dict()}
        storage.write_json(thr_path, thresholds, storage_options)
    timings["threshold_seconds"] = round(time.perf_counter() - t, 3)
    for var, thr in thresholds.items():
        ctx.variables.append((var, "FLOAT", thr["threshold"]))
    if thresholds:
        ctx_ref = put(ctx)

    # 2. the filter on every pool file
    t = time.perf_counter()
    todo, markers = [], {}
    for fid in file_ids:
        marker_path = storage.join(run_dir, f"part-{fid:05d}.json")
        if storage.exists(marker_path, storage_options):
            markers[fid] = _compact(storage.read_json(marker_path, storage_options))
        else:
            todo.append((ctx_ref, fid, worker_query, params, str(flt.path),
                         storage.join(run_dir, f"part-{fid:05d}.npy"), marker_path, crash_once))
    skipped = len(markers)
    for m in ray_imap(filter_partition, todo, desc="partitions", progress=progress, max_in_flight=max_in_flight):
        markers[m["file_id"]] = _compact(m)
    ordered = [markers[fid] for fid in file_ids]
    timings["partitions_seconds"] = round(time.perf_counter() - t, 3)

    # 3. sorted assembly: prefix buckets sorted in parallel, then concatenated
    t = time.perf_counter()
    ranges = plan_buckets(ordered, bucket_records, min_buckets=min(cluster_cpus(), 64))
    bucket_tasks = []
    for (p0, p1), slices in zip(ranges, bucket_slices(ordered, ranges)):
        stem = storage.join(run_dir, f"bucket-{p0:04x}-{p1:04x}")
        bucket_tasks.append((slices, stem + ".npy", stem + ".json", storage_options))
    buckets = ray_map(sort_bucket, bucket_tasks, desc="buckets", progress=progress, max_in_flight=max_in_flight)
    timings["bucket_sort_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    if layout == "file":
        count = concatenate_buckets(buckets, out, storage_options)
    else:
        count = write_bucket_directory(buckets, out, storage_options)
    timings["concatenate_seconds"] = round(time.perf_counter() - t, 3)
    distinct = sum(int(b["distinct"]) for b in buckets)
    if not keep_work:
        storage.remove_tree(run_dir, storage_options)
        if not storage.is_url(work):
            try:
                storage.local_path(work).rmdir()
            except OSError:
                pass  # other runs' work is still there
    elapsed = time.perf_counter() - t0
    manifest = _manifest_path(out, layout)
    storage.write_json(manifest, {
        **manifest_record(out, flt, params, features, catalog, pool_rows, int(count), distinct, elapsed,
                          versions={"ray": _ray_version()}),
        "engine": {
            "name": "ray",
            "address": address,
            "partitions": len(file_ids),
            "partitions_resumed": skipped,
            "buckets": len(buckets),
            "layout": layout,
            "thresholds": thresholds,
            "work_dir": run_dir if keep_work else None,
            **timings,
        },
    }, storage_options)
    return RunResult(out if storage.is_url(out) else Path(out), manifest if storage.is_url(manifest) else Path(manifest),
                     int(count), distinct, pool_rows, params, elapsed)


def _compact(marker: dict) -> dict:
    # 4,096 prefix counts per partition: int32 arrays, not Python ints (26k files at xlarge)
    marker["prefix_counts"] = np.asarray(marker["prefix_counts"], dtype=np.int32)
    return marker


def _identities(paths, storage_options) -> list:
    """(path, size, mtime) of every input, so a rebuilt feature file is not mistaken for done work."""
    out = []
    for p in paths:
        try:
            if storage.is_url(p):
                fs, fp = storage.filesystem(p, storage_options)
                info = fs.info(fp)
                out.append((p, info.get("size"), str(info.get("LastModified") or info.get("mtime") or "")))
            else:
                st = Path(p).stat()
                out.append((p, st.st_size, st.st_mtime_ns))
        except (OSError, FileNotFoundError):
            out.append((p, None, None))  # the query itself reports a missing file
    return out


def _ray_version() -> str:
    import ray

    return ray.__version__
