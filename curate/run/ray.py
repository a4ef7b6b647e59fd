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
   :func:`_scalars`: each other whole-pool scalar of the query (an uncorrelated scalar subquery
   reading ``pool``, :func:`global_scalars`) evaluated once by DuckDB on the driver's catalog
   connection, its own SQL text, with the thresholds set.
3. :func:`_partitions`: the query on each pool file with DuckDB, thresholds, scalars and
   parameters as typed variables; a sorted run per file (:mod:`.partition`). A query that reads
   no ``pool`` rows at all (``decontaminate.sql``: a subset minus a feature table) and cannot be
   split runs whole, as one task.
4. :func:`_assemble`: uid-prefix buckets sorted in parallel, then concatenated (or published as
   a directory of bucket files) (:mod:`.assemble`).

Tasks run through :func:`curate.engine.map_tasks` on the Ray engine. Everything a step writes
lives under ``WORK/<fingerprint>/`` with a marker per finished partition and bucket, so a killed
run started again with the same arguments skips what is done; Ray retries a task whose worker
died. The work directory is removed after success unless ``keep_work``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import sqlglot
from sqlglot import exp

from curate import __version__, storage
from curate.catalog.connection import default_catalog
from curate.engine import Engine, map_tasks
from curate.engine.ray import EngineError, cluster_cpus, put
from curate.run.assemble import (bucket_slices, concatenate_buckets, plan_buckets, sort_bucket,
                                 write_bucket_directory)
from curate.run.partition import (PoolContext, capture_variables, check_variable, file_keyed_views,
                                  filter_partition, pool_context, threshold_pass)
from curate.run.plan import row_local_problem
from curate.run.query import (FilterError, FilterFile, OpenFilter, check_uid_column, filter_error, load_filter,
                              one_line, open_filter)
from curate.run.ray_threshold import PASSES, exact_threshold
from curate.run.runner import RunResult, default_out, manifest_record
from curate.run.thresholds import (ThresholdCall, extract_fraction_thresholds, mentions_fraction_threshold,
                                   subquery_spans)

LAYOUTS = ("file", "buckets")
SCALAR_PREFIX = "__curate_global_scalar_"


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

    plan = _plan(filter_path, catalog, sets or {}, progress, storage_options, engine)
    work = work_dir or (out.rstrip("/") + ".work")
    run_dir = storage.join(work, plan.fingerprint)
    timings: dict = {}
    try:
        engine.start()
        with _timed(timings, "threshold_seconds"):
            thresholds = _thresholds(plan, engine, run_dir, storage_options, progress)
        with _timed(timings, "scalars_seconds"):
            scalars = _scalars(plan, thresholds, run_dir, storage_options)
    finally:
        plan.con.close()
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
            "partitions": 1 if plan.single_task else len(plan.ctx.files),
            "partitions_resumed": resumed,
            "buckets": len(buckets),
            "layout": layout,
            "thresholds": thresholds,
            "scalars": scalars,
            "single_task": plan.single_task,
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
    worker_query: str  # the filter's own query, fraction_threshold() calls and global scalars cut out
    scalars: list[tuple[str, str]]  # (variable, the scalar subquery's SQL on the driver)
    single_task: str | None  # why the query runs whole, as one task (it reads no pool rows)
    pool_rows: int
    fingerprint: str  # names the work directory: same arguments and inputs, same work
    con: duckdb.DuckDBPyConnection  # the driver's catalog connection, open until the scalars are known


def _open(filter_path, catalog, sets: dict, progress: bool, storage_options, engine=None) -> OpenFilter:
    """The filter opened on the catalog, its pool's context (remote files readable) attached;
    the caption features it needs computed as tasks on ``engine`` (the cluster)."""
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
                       storage_options=storage_options, engine=engine)


def _plan(filter_path, catalog, sets: dict, progress: bool, storage_options, engine=None) -> _Plan:
    """Step 1, on the driver: open and check the filter, and capture what the workers need."""
    opened = _open(filter_path, catalog, sets, progress, storage_options, engine)
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
        partitioned = ["pool", *ctx.partitioned_views]
        fractions = _fractions(con, flt, calls)
        for call in calls:
            if any(_global_scalar(con, call.score_sql, span, partitioned, scalar_position=False)
                   for span in subquery_spans(call.score_sql)):
                raise FilterError(f"{flt.path}: the ray engine cannot compute a fraction_threshold() whose score "
                                  f"reads the whole pool in a subquery; use --engine local")
        rewritten, worker_query, scalars = global_scalars(con, rewritten, worker_query, partitioned)
        # binds on the sandboxed connection first: a read outside the catalog is named as such
        check_uid_column(con, rewritten, flt.path)
        problem = row_local_problem(rewritten, partitioned)
        single_task = None
        if problem:
            if _reads_any(rewritten, ["pool"]):
                raise FilterError(f"{flt.path}: cannot run per pool file on the ray engine: {problem}; "
                                  f"use --engine local")
            # no pool rows at all (a subset and feature tables): its size is not the pool's; run it whole
            single_task = f"the query reads no pool rows and cannot be split ({problem})"
        variables = {v[0] for v in scalars} | set(fractions)
        ctx.variables = [v for v in capture_variables(con) if v[0] not in variables]
        fingerprint = _fingerprint(worker_query, calls, ctx, storage_options, scalars, single_task)
    except BaseException:
        con.close()
        raise
    return _Plan(flt, opened.params, opened.features, ctx, calls, fractions, worker_query, scalars, single_task,
                 sum(int(f[3]) for f in ctx.files), fingerprint, con)


def global_scalars(con, query: str, worker_query: str, partitioned) -> tuple[str, str, list[tuple[str, str]]]:
    """Cut every whole-pool scalar subquery out of ``query`` (the driver's text, subsets
    registered) and of ``worker_query`` (the filter's own text): each becomes
    ``(SELECT getvariable('__curate_global_scalar_N'))``, declared on ``con`` with the
    subquery's type.

    A whole-pool scalar is a parenthesised SELECT in an expression (not in FROM, IN, EXISTS,
    ANY/ALL) that reads ``pool`` or a file-keyed view and binds on its own, i.e. does not refer
    to the outer query's rows: its value is the same for every row, and it needs every pool
    file. The two texts differ only in their ``read_subset(...)`` calls, so their subqueries
    pair up in order. Returns both texts and ``[(variable, subquery SQL of query), ...]``.
    """
    spans, worker_spans = subquery_spans(query), subquery_spans(worker_query)
    if len(spans) != len(worker_spans):
        return query, worker_query, []  # cannot pair them: nothing cut, the row-local check decides
    chosen: list[int] = []
    for i, span in enumerate(spans):
        if any(spans[j].start <= span.start and span.end <= spans[j].end for j in chosen):
            continue  # inside one already cut out
        if _global_scalar(con, query, span, partitioned):
            chosen.append(i)
    scalars = []
    for n, i in enumerate(chosen):
        var, sql = f"{SCALAR_PREFIX}{n}", query[spans[i].start:spans[i].end]
        typ = str(con.sql(f"SELECT {sql}").types[0])
        check_variable(var, typ)
        con.execute(f"SET VARIABLE {var} = CAST(NULL AS {typ})")  # so that the rewritten query binds
        scalars.append((var, sql))
    for n, i in reversed(list(enumerate(chosen))):
        # still a subquery, as in the local engine's query: a bare constant would be pushed into
        # the parquet scan, where DuckDB's row-group statistics (NaN left out) can keep a NaN row
        # that `x = c` evaluated row by row rejects
        call = f"(SELECT getvariable('{SCALAR_PREFIX}{n}'))"
        query = query[:spans[i].start] + call + query[spans[i].end:]
        worker_query = worker_query[:worker_spans[i].start] + call + worker_query[worker_spans[i].end:]
    return query, worker_query, scalars


_NOT_SCALAR_BEFORE = {"in", "exists", "any", "all", "some", "array", "from", "join", "lateral", "as"}
_PROBE = "__curate_scalar_probe"


def _global_scalar(con, sql: str, span, partitioned, scalar_position: bool = True) -> bool:
    """``sql[span]`` is a scalar subquery (in an expression) that reads a partitioned table and
    does not refer to the rows of the query around it."""
    text = sql[span.start:span.end]
    if not _reads_any(text[1:-1], partitioned):
        return False
    if scalar_position:
        if span.before in _NOT_SCALAR_BEFORE:
            return False
        try:  # the span replaced by a column name parses as a column, not as a table
            probe = sqlglot.parse_one(sql[:span.start] + f" {_PROBE} " + sql[span.end:], read="duckdb")
        except Exception:  # noqa: BLE001 - sqlglot cannot read it: leave it in the query
            return False
        if not any(c.name == _PROBE for c in probe.find_all(exp.Column)):
            return False
    try:
        con.sql(f"SELECT {text}")  # binds alone: no reference to an outer row
    except duckdb.Error:
        return False
    return True


def _reads_any(sql: str, names) -> bool:
    """``sql`` reads one of the tables ``names`` (outside another schema)."""
    wanted = {n.lower() for n in names}
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except Exception:  # noqa: BLE001 - cannot tell: assume it does
        return True
    return any(t.name.lower() in wanted and t.db in ("", "main") for t in tree.find_all(exp.Table))


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


def _fingerprint(worker_query: str, calls: list[ThresholdCall], ctx: PoolContext, storage_options,
                 scalars: list, single_task: str | None) -> str:
    return hashlib.sha256(json.dumps({
        "curate": __version__, "query": worker_query, "calls": [c.__dict__ for c in calls],
        "scalars": scalars, "single_task": single_task,
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


def _scalars(plan: _Plan, thresholds: dict, run_dir: str, storage_options) -> dict:
    """Step 2b, on the driver: each whole-pool scalar subquery evaluated once by DuckDB on the
    catalog connection (its own SQL, the thresholds set as the workers get them), cached for a
    restarted run; every partition receives it as a typed variable (exact: its VARCHAR form,
    cast back to its type)."""
    if not plan.scalars:
        return {}
    path = storage.join(run_dir, "scalars.json")
    if storage.exists(path, storage_options):
        found = storage.read_json(path, storage_options)
    else:
        con = plan.con
        for var, thr in thresholds.items():
            con.execute(f"SET VARIABLE {var} = CAST(? AS FLOAT)", [thr["threshold"]])
        found = {}
        for var, sql in plan.scalars:
            try:
                con.execute(f"SET VARIABLE {var} = {sql}")
                typ, value = con.execute(f"SELECT type, getvariable('{var}')::VARCHAR FROM duckdb_variables() "
                                         f"WHERE name = ?", [var]).fetchone()  # value: its VARCHAR form
            except duckdb.Error as e:
                raise filter_error(plan.flt.path, e, con) from None
            found[var] = {"sql": " ".join(sql.split()), "type": typ, "value": value}
        storage.write_json(path, found, storage_options)
    for var, got in found.items():
        check_variable(var, got["type"])
        plan.ctx.variables.append((var, got["type"], got["value"]))
    return found


def _partitions(plan: _Plan, engine: Engine, run_dir: str, storage_options, progress: bool,
                crash_once: str | None) -> tuple[list[dict], int]:
    """Step 3: the filter on every pool file without a marker yet. The markers of all files,
    in file order, and how many were there before this run. A single-task query runs once,
    with every feature view whole."""
    ctx = dataclasses.replace(plan.ctx, partitioned_views=[]) if plan.single_task else plan.ctx
    ctx_ref = put(ctx)
    file_ids = [f[0] for f in plan.ctx.files][:1 if plan.single_task else None]
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
