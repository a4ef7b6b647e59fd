"""``curate run --engine ray``: the same filter file, run per pool file on a Ray cluster.

:func:`run_filter_ray` takes the arguments of :func:`curate.run.runner.run_filter` (plus the
engine and where to keep work) and writes the same outputs: a subset ``.npy`` byte-identical to
the local engine's and a manifest with the same keys (plus ``engine``). The steps:

1. :func:`_plan`, on the driver: open the filter like every engine
   (:func:`curate.run.query.open_filter`: feature tables, ``SET VARIABLE`` statements and
   ``--set`` overrides), cut the global ``fraction_threshold`` calls out of the query and check
   the rest is row-local (:mod:`curate.run.plan`); what workers need (:mod:`.partition`).
2. :func:`_thresholds`: each threshold in three histogram passes over the partitions
   (:mod:`.ray_threshold`); the driver only adds up at most 2,048 counters per partition and pass.
3. :func:`_partitions`: the query on each pool file with DuckDB, thresholds and parameters as
   typed variables; a sorted run per file (:mod:`.partition`).
4. :func:`_assemble`: uid-prefix buckets sorted in parallel, then concatenated (or published as
   a directory of bucket files) (:mod:`.assemble`).

Tasks run through :func:`curate.engine.map_tasks` on the Ray engine. Everything a step writes
lives under ``WORK/<fingerprint>/`` with a marker per finished partition and bucket, so a killed
run started again with the same arguments skips what is done; Ray retries a task whose worker
died. The work directory is removed after success unless ``keep_work``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from curate import __version__, storage
from curate.catalog.connection import default_catalog
from curate.engine import Engine, map_tasks
from curate.engine.ray import EngineError, cluster_cpus, put
from curate.run.assemble import (bucket_slices, concatenate_buckets, plan_buckets, sort_bucket,
                                 write_bucket_directory)
from curate.run.partition import (PoolContext, capture_variables, file_keyed_views, filter_partition,
                                  pool_context, threshold_pass)
from curate.run.plan import row_local_problem
from curate.run.query import (FilterError, FilterFile, OpenFilter, check_uid_column, load_filter, one_line,
                              open_filter)
from curate.run.ray_threshold import PASSES, exact_threshold
from curate.run.runner import RunResult, default_out, manifest_record
from curate.run.thresholds import ThresholdCall, extract_fraction_thresholds, mentions_fraction_threshold

LAYOUTS = ("file", "buckets")


def run_filter_ray(filter_path, catalog=None, out=None, sets=None, progress=False, *,
                   engine: Engine | None = None, work_dir: str | None = None, keep_work: bool = False,
                   bucket_records: int = 1 << 22, layout: str = "file", storage_options: dict | None = None,
                   crash_once: str | None = None) -> RunResult:
    """Run ``filter_path`` on ``catalog`` with Ray; write the subset ``out`` and its manifest.

    ``engine``: ``Engine(kind="ray", address=..., num_cpus=..., max_in_flight=...)`` (default: a
    Ray started here, or the one this process is connected to). ``out`` may be a local path or a
    URL (``s3://bucket/subsets/x.npy``); with ``layout="buckets"`` it is a directory of sorted
    bucket files plus ``buckets.json``. ``bucket_records`` sizes the sort buckets; ``work_dir``
    (default ``OUT.work``) keeps finished partitions for a rerun to resume from.
    ``crash_once`` (tests): a marker path; the first partition task to find it missing creates
    it and kills its own worker process.
    """
    t0 = time.perf_counter()
    engine = engine if engine is not None else Engine("ray")
    if not engine.distributed:
        raise EngineError("run_filter_ray needs a ray engine; curate.run.run_filter runs a filter locally")
    if layout not in LAYOUTS:
        raise FilterError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    catalog = Path(catalog) if catalog else default_catalog()
    out = str(out) if out else str(default_out(filter_path, "" if layout == "buckets" else ".npy"))
    if not storage.is_url(out):
        out = str(Path(out).resolve())  # workers may not share the driver's working directory
    if work_dir and not storage.is_url(work_dir):
        work_dir = str(Path(work_dir).resolve())
    if storage_options is None:
        storage_options = storage.storage_options_from_env()

    plan = _plan(filter_path, catalog, sets or {}, progress, storage_options)
    work = work_dir or (out.rstrip("/") + ".work")
    run_dir = storage.join(work, plan.fingerprint)
    engine.start()
    timings: dict = {}
    with _timed(timings, "threshold_seconds"):
        thresholds = _thresholds(plan, engine, run_dir, storage_options, progress)
    with _timed(timings, "partitions_seconds"):
        markers, resumed = _partitions(plan, engine, run_dir, storage_options, progress, crash_once)
    buckets, count = _assemble(markers, engine, run_dir, out, layout, bucket_records, storage_options, progress,
                               timings)
    distinct = sum(int(b["distinct"]) for b in buckets)
    if not keep_work:
        _remove_work(run_dir, work, storage_options)
    elapsed = time.perf_counter() - t0
    manifest = _manifest_path(out, layout)
    storage.write_json(manifest, {
        **manifest_record(out, plan.flt, plan.params, plan.features, catalog, plan.pool_rows, int(count), distinct,
                          elapsed, versions={"ray": _ray_version()}),
        "engine": {
            "name": "ray",
            "address": engine.address,
            "partitions": len(plan.ctx.files),
            "partitions_resumed": resumed,
            "buckets": len(buckets),
            "layout": layout,
            "thresholds": thresholds,
            "work_dir": run_dir if keep_work else None,
            **timings,
        },
    }, storage_options)
    return RunResult(out if storage.is_url(out) else Path(out), manifest if storage.is_url(manifest) else Path(manifest),
                     int(count), distinct, plan.pool_rows, plan.params, elapsed)


@dataclass
class _Plan:
    """What the driver decided before any task runs."""

    flt: FilterFile
    params: dict
    features: dict
    ctx: PoolContext  # shipped to every task
    calls: list[ThresholdCall]
    fractions: dict  # threshold variable -> its fraction
    worker_query: str  # the filter's own query, fraction_threshold() calls cut out
    pool_rows: int
    fingerprint: str  # names the work directory: same arguments and inputs, same work


def _open(filter_path, catalog, sets: dict, progress: bool, storage_options) -> OpenFilter:
    """The filter opened on the catalog, its pool's context (remote files readable) attached."""
    flt = load_filter(filter_path)
    for stmt in flt.setup:
        if extract_fraction_thresholds(stmt)[1]:
            raise FilterError(f"{flt.path}: the ray engine computes fraction_threshold() only in the "
                              f"query, not in a SET VARIABLE statement; use --engine local")

    def attach_pool(con) -> PoolContext:
        ctx = pool_context(con, catalog, storage_options)
        storage.register_filesystems(con, _inputs(ctx), storage_options)
        return ctx

    return open_filter(flt, catalog, sets, progress=progress, before_prepare=attach_pool,
                       storage_options=storage_options)


def _plan(filter_path, catalog, sets: dict, progress: bool, storage_options) -> _Plan:
    """Step 1, on the driver: open and check the filter, and capture what the workers need."""
    opened = _open(filter_path, catalog, sets, progress, storage_options)
    con, flt, ctx = opened.con, opened.flt, opened.context
    try:
        rewritten, calls = extract_fraction_thresholds(opened.query)
        for call in calls:
            # an inner call would be evaluated per pool file by the outer call's score: refuse it
            if mentions_fraction_threshold(call.score_sql) or mentions_fraction_threshold(call.fraction_sql):
                raise FilterError(f"{flt.path}: the ray engine cannot compute a fraction_threshold() nested "
                                  f"inside another fraction_threshold(); use --engine local")
        # workers get the filter's own query text (read_subset() calls intact: each worker registers
        # the subsets itself); the calls are numbered the same way in both texts
        worker_query, _ = extract_fraction_thresholds(flt.query)
        ctx.partitioned_views = file_keyed_views(con, [v[0] for v in ctx.views])
        fractions = _fractions(con, flt, calls)
        # binds on the sandboxed connection first: a read outside the catalog is named as such
        check_uid_column(con, rewritten, flt.path)
        problem = row_local_problem(rewritten, ["pool", *ctx.partitioned_views])
        if problem:
            raise FilterError(f"{flt.path}: cannot run per pool file on the ray engine: {problem}; "
                              f"use --engine local")
        ctx.variables = [v for v in capture_variables(con) if v[0] not in fractions]
    finally:
        con.close()
    return _Plan(flt, opened.params, opened.features, ctx, calls, fractions, worker_query,
                 sum(int(f[3]) for f in ctx.files), _fingerprint(worker_query, calls, ctx, storage_options))


def _fractions(con, flt: FilterFile, calls: list[ThresholdCall]) -> dict:
    """Each call's fraction, evaluated with the filter's variables; its variable is declared
    (NULL) so that the rewritten query binds."""
    fractions = {}
    for call in calls:
        con.execute(f"SET VARIABLE {call.variable} = CAST(NULL AS FLOAT)")
        try:
            fraction = con.execute(f"SELECT ({call.fraction_sql})::DOUBLE").fetchone()[0]
        except duckdb.Error as e:
            raise FilterError(f"{flt.path}: fraction_threshold(..., {call.fraction_sql}): {one_line(e)}") from None
        if fraction is None or not 0 <= fraction < 1:
            # the same check, and message, as the fraction_threshold SQL macro
            raise FilterError(f"{flt.path}: fraction must be in [0, 1), got "
                              f"{'NULL' if fraction is None else fraction}")
        fractions[call.variable] = fraction
    return fractions


def _fingerprint(worker_query: str, calls: list[ThresholdCall], ctx: PoolContext, storage_options) -> str:
    return hashlib.sha256(json.dumps({
        "curate": __version__, "query": worker_query, "calls": [c.__dict__ for c in calls],
        "variables": ctx.variables, "files": ctx.files, "views": ctx.views, "extra": ctx.extra_columns,
        "partitioned": ctx.partitioned_views,
        "inputs": _identities(_inputs(ctx), storage_options),
    }, default=str, sort_keys=True).encode()).hexdigest()[:16]


def _thresholds(plan: _Plan, engine: Engine, run_dir: str, storage_options, progress: bool) -> dict:
    """Step 2, the global one: exact thresholds from histograms, cached for a restarted run.
    Every task after it receives them as typed variables."""
    thresholds = {}
    thr_path = storage.join(run_dir, "thresholds.json")
    if plan.calls and storage.exists(thr_path, storage_options):
        thresholds = storage.read_json(thr_path, storage_options)
    elif plan.calls:
        ctx_ref = put(plan.ctx)
        file_ids = [f[0] for f in plan.ctx.files]
        for call in plan.calls:
            def run_pass(level, prefix, call=call):
                # a generator: the driver adds histograms up as they arrive, never holding them all
                return map_tasks(threshold_pass, [(ctx_ref, fid, call.score_sql, level, prefix) for fid in file_ids],
                                 engine, desc=f"threshold pass {level + 1}/{len(PASSES)}", progress=progress)
            res = exact_threshold(run_pass, plan.fractions[call.variable])
            thresholds[call.variable] = {"score": call.score_sql, "fraction": plan.fractions[call.variable],
                                         **res.as_dict()}
        storage.write_json(thr_path, thresholds, storage_options)
    for var, thr in thresholds.items():
        plan.ctx.variables.append((var, "FLOAT", thr["threshold"]))
    return thresholds


def _partitions(plan: _Plan, engine: Engine, run_dir: str, storage_options, progress: bool,
                crash_once: str | None) -> tuple[list[dict], int]:
    """Step 3: the filter on every pool file without a marker yet. The markers of all files,
    in file order, and how many were there before this run."""
    ctx_ref = put(plan.ctx)
    file_ids = [f[0] for f in plan.ctx.files]
    todo, markers = [], {}
    for fid in file_ids:
        marker_path = storage.join(run_dir, f"part-{fid:05d}.json")
        if storage.exists(marker_path, storage_options):
            markers[fid] = _compact(storage.read_json(marker_path, storage_options))
        else:
            todo.append((ctx_ref, fid, plan.worker_query, plan.params, str(plan.flt.path),
                         storage.join(run_dir, f"part-{fid:05d}.npy"), marker_path, crash_once))
    resumed = len(markers)
    for m in map_tasks(filter_partition, todo, engine, desc="partitions", progress=progress):
        markers[m["file_id"]] = _compact(m)
    return [markers[fid] for fid in file_ids], resumed


def _assemble(markers: list[dict], engine: Engine, run_dir: str, out: str, layout: str, bucket_records: int,
              storage_options, progress: bool, timings: dict) -> tuple[list[dict], int]:
    """Step 4: prefix buckets sorted in parallel, then concatenated into ``out`` (or published
    as a bucket directory). The bucket markers and the record count."""
    with _timed(timings, "bucket_sort_seconds"):
        ranges = plan_buckets(markers, bucket_records, min_buckets=min(cluster_cpus(), 64))
        bucket_tasks = []
        for (p0, p1), slices in zip(ranges, bucket_slices(markers, ranges)):
            stem = storage.join(run_dir, f"bucket-{p0:04x}-{p1:04x}")
            bucket_tasks.append((slices, stem + ".npy", stem + ".json", storage_options))
        buckets = list(map_tasks(sort_bucket, bucket_tasks, engine, desc="buckets", progress=progress))
    with _timed(timings, "concatenate_seconds"):
        if layout == "file":
            count = concatenate_buckets(buckets, out, storage_options)
        else:
            count = write_bucket_directory(buckets, out, storage_options)
    return buckets, count


def _remove_work(run_dir: str, work: str, storage_options) -> None:
    storage.remove_tree(run_dir, storage_options)
    if not storage.is_url(work):
        try:
            storage.local_path(work).rmdir()
        except OSError:
            pass  # other runs' work is still there


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    t = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t, 3)


def _manifest_path(out: str, layout: str) -> str:
    if layout == "buckets":
        return storage.join(out, "manifest.json")
    return out[: -len(".npy")] + ".json" if out.endswith(".npy") else out + ".json"


def _inputs(ctx: PoolContext) -> list[str]:
    """Every file a partition reads: its pool file and the feature views' files."""
    return [f[2] for f in ctx.files] + [p for v in ctx.views for p in v[2]]


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
    import ray  # lazy: optional extra [ray]

    return ray.__version__
