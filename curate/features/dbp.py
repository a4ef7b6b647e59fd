"""Density-based pruning (DBP): a budget shared among k-means clusters by their complexity.

Abbas, Rusak, Tirumala, Brendel, Chaudhuri and Morcos, *Effective pruning of web-scale datasets
based on complexity of concept clusters* (ICLR 2024, arXiv:2401.04578; code
github.com/amro-kamal/effective_pruning). After SemDeDup (:mod:`curate.features.semdedup`), for
each cluster j of the cluster set with n_j > 0 SemDeDup survivors:

* ``d_intra(j)``: the mean cosine distance ``1 - cos(x, c_j)`` of its survivors to its centroid;
* ``d_inter(j)``: the mean cosine distance of its centroid to the ``neighbors`` nearest other
  centroids (the code's ``compute_centroid_distances.py``: ``mean(1 - IP)`` over the 20 nearest,
  centroids L2-normalised here);
* ``C_j = d_inter(j) * d_intra(j)``, ``P_j = softmax(C / temperature)_j``;
* the quotas ``x`` solve the code's quadratic program (``prune.py`` ``pruning_qp``):
  minimise ``||x - P * B||^2`` subject to ``sum x = B`` and ``lb_j <= x_j <= n_j`` with
  ``lb_j = min(m, n_j - 1)``, ``m = int(B / K * balance)`` (``balance`` is the code's
  ``cls_bal_ratio``; ``m = 1`` when it is 0), K the number of clusters with survivors and
  ``B = min(int(N * fraction), sum n_j)``, N **all** pool rows (DataComp's fraction semantics);
  the code rounds with ``np.rint``. The program is a projection onto a box cut by a plane, so
  ``x_j = clip(P_j * B + lam, lb_j, n_j)`` with the one ``lam`` that makes the sum B: found by
  bisection here instead of the OSQP solver;
* within cluster j the first ``x_j`` survivors in SemDeDup's order (farthest from the centroid
  first: the code's ``which_to_keep = "hard"``) are kept.

The producer writes ``dbp(uid, file, row, clusters, eps, fraction, temperature, cluster, keep)``
per pool file (one setting per cluster set: other settings rebuild it, which reads only the
``semdedup`` tables) and ``dbp/NAME/_quotas.parquet`` (per cluster: members, survivors,
d_intra, d_inter, probability, quota, cutoff rank).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path
from curate.catalog.connection import connect, default_catalog, register_parquet_view
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.features.clusters import get_cluster_set
from curate.features.semdedup import DEFAULT_EPS, build_semdedup, clusters_param, registered_paths
from curate.features.semdedup import plan as semdedup_plan
from curate.features.tables import feature_root, read_table_meta, write_file_table

VIEW = "dbp"
META_KEY = b"curate.dbp"
SCHEMA_VERSION = 1
#: the paper code's defaults (prune.py: temperature 0.5, cls_bal_ratio 0.5; 20 nearest centroids);
#: fraction: our choice (the paper reports several; docs/semdedup-dbp.md)
DEFAULTS = {"eps": DEFAULT_EPS, "fraction": 0.5, "temperature": 0.5, "neighbors": 20, "balance": 0.5}
#: centroid-similarity cells per step of d_inter (float32: 64 MB)
SIM_CELLS = 1 << 24

OUTPUT_SCHEMA = pa.schema([("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                           ("clusters", pa.string()), ("eps", pa.float64()), ("fraction", pa.float64()),
                           ("temperature", pa.float64()), ("cluster", pa.int32()), ("keep", pa.bool_())])


class DBPError(CurateError):
    """Bad density-based pruning settings or inputs."""


def settings_from(params: dict | None = None, **overrides) -> dict:
    s = dict(DEFAULTS)
    for src in (params or {}, overrides):
        for name in DEFAULTS:
            if src.get(name) is not None:
                s[name] = src[name]
    try:
        eps, fraction, temperature = float(s["eps"]), float(s["fraction"]), float(s["temperature"])
        neighbors, balance = int(s["neighbors"]), float(s["balance"])
    except (TypeError, ValueError) as e:
        raise DBPError(f"dbp parameters: {e}") from None
    if not 0 <= fraction <= 1:
        raise DBPError(f"dbp parameter fraction: {fraction} must be in [0, 1]")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise DBPError(f"dbp parameter temperature: {temperature} must be a positive number")
    if not (0 <= eps < 1):
        raise DBPError(f"dbp parameter eps: {eps} must be in [0, 1)")
    if neighbors < 1:
        raise DBPError(f"dbp parameter neighbors: {neighbors} must be at least 1")
    if not 0 <= balance <= 1:
        raise DBPError(f"dbp parameter balance: {balance} must be in [0, 1]")
    return {"schema": SCHEMA_VERSION, "eps": eps, "fraction": fraction, "temperature": temperature,
            "neighbors": neighbors, "balance": balance}


# -- the formulas ----------------------------------------------------------------------------------

def inter_distances(centroids: np.ndarray, neighbors: int) -> np.ndarray:
    """Mean cosine distance of each centroid to its ``neighbors`` nearest other centroids
    (NaN when the set has one centroid); blocks of ``SIM_CELLS`` similarities."""
    c = np.asarray(centroids, np.float32)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), np.float32(1e-30))
    k = len(c)
    l_ = min(neighbors, k - 1)
    out = np.full(k, np.nan, np.float64)
    if l_ < 1:
        return out
    step = max(1, SIM_CELLS // k)
    for a in range(0, k, step):
        b = min(k, a + step)
        s = c[a:b] @ c.T
        s[np.arange(b - a), np.arange(a, b)] = -np.inf  # not itself
        top = -np.sort(-s, axis=1)[:, :l_]
        out[a:b] = np.mean(1.0 - top.astype(np.float64), axis=1)
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def qp_quotas(p: np.ndarray, n: np.ndarray, budget: int, balance: float) -> np.ndarray:
    """The paper code's quotas: argmin ||x - p*B||^2, sum x = B, lb <= x <= n, rounded (np.rint)."""
    p, n = np.asarray(p, np.float64), np.asarray(n, np.float64)
    k = len(n)
    if k == 0 or budget <= 0:
        return np.zeros(k, np.int64)
    m = int(budget / k * balance) if balance > 0 else 1
    lb, ub = np.minimum(m, n - 1), n
    t = p * budget
    lo, hi = float((lb - t).min()), float((ub - t).max())
    for _ in range(200):  # sum(clip(t + lam)) is nondecreasing in lam
        mid = 0.5 * (lo + hi)
        if np.clip(t + mid, lb, ub).sum() < budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            break
    return np.rint(np.clip(t + hi, lb, ub)).astype(np.int64)


# -- build ------------------------------------------------------------------------------------

def quotas_path(catalog, clusters: str) -> Path:
    """``dbp/NAME/_quotas.parquet``: the per-cluster figures of the last build."""
    return feature_root(Path(catalog) if catalog else default_catalog(), VIEW) / clusters / "_quotas.parquet"


@dataclass
class BuildResult:
    clusters: str
    settings: dict
    files: int = 0
    computed: list = field(default_factory=list)
    rows_computed: int = 0
    budget: int = 0
    kept: int = 0
    out_dir: Path | None = None
    elapsed: float = 0.0


def cluster_quotas(catalog, clusters: str, settings: dict) -> pa.Table:
    """Per cluster with members: members, survivors, d_intra, d_inter, prob, quota, cutoff."""
    cs = get_cluster_set(catalog, clusters)
    d_inter_all = inter_distances(cs.centroids(), settings["neighbors"])
    con = connect(catalog)
    try:
        con.execute("SET threads = 1")  # one summation order: the same bytes every time
        n_pool = con.execute("SELECT count(*) FROM pool").fetchone()[0]
        surv = "coalesce(max_sim, 0) <= CAST(1 - ? AS FLOAT)"  # as filters/semdedup.sql
        rows = con.execute(
            f"SELECT cluster, count(*), count(*) FILTER (WHERE {surv}), "
            f"fsum(dist_to_centroid::DOUBLE) FILTER (WHERE {surv}) "
            "FROM semdedup WHERE clusters = ? GROUP BY cluster ORDER BY cluster",
            [settings["eps"], settings["eps"], clusters]).fetchall()
        cl = np.array([r[0] for r in rows], np.int64)
        members = np.array([r[1] for r in rows], np.int64)
        n = np.array([r[2] for r in rows], np.int64)
        total = np.array([r[3] or 0.0 for r in rows], np.float64)
        live = n > 0
        d_intra = np.full(len(cl), np.nan)
        d_intra[live] = total[live] / n[live]
        d_inter = d_inter_all[cl] if len(cl) else np.empty(0)
        c = d_inter * d_intra
        prob = np.zeros(len(cl))
        quota = np.zeros(len(cl), np.int64)
        budget = min(int(n_pool * settings["fraction"]), int(n.sum()))
        if live.any():
            cj = c[live]
            if np.isnan(cj).all():
                cj = np.ones_like(cj)  # one centroid: nothing to compare
            cj = np.where(np.isnan(cj), np.nanmean(cj), cj)  # as the code does
            prob[live] = softmax(cj / settings["temperature"])
            quota[live] = qp_quotas(prob[live], n[live], budget, settings["balance"])
        q = pa.table({"cluster": pa.array(cl.astype(np.int32)), "quota": pa.array(quota)})
        con.register("dbp_quota_input", q)
        cut = dict(con.execute(
            'SELECT s.cluster, s."rank" FROM (SELECT cluster, "rank", row_number() OVER '
            f'(PARTITION BY cluster ORDER BY "rank") AS rn FROM semdedup WHERE clusters = ? AND {surv}) AS s '
            "JOIN dbp_quota_input AS q ON q.cluster = s.cluster WHERE s.rn = q.quota",
            [clusters, settings["eps"]]).fetchall())
        con.unregister("dbp_quota_input")
    finally:
        con.close()
    cutoff = np.array([cut.get(int(c_), -1) for c_ in cl], np.int64)
    return pa.table({"cluster": pa.array(cl.astype(np.int32)), "members": pa.array(members),
                     "survivors": pa.array(n), "d_intra": pa.array(d_intra), "d_inter": pa.array(d_inter),
                     "prob": pa.array(prob), "quota": pa.array(quota), "cutoff_rank": pa.array(cutoff)},
                    ).replace_schema_metadata({"budget": str(budget), "pool_rows": str(n_pool)})


def _file_task(catalog: str, clusters: str, settings: dict, file: str, rows: int, src: str,
               clusters_ids: list, cutoffs: list, out: str) -> int:
    t = pq.read_table(src, columns=["uid", "cluster", "rank", "max_sim"])
    if t.num_rows != rows:
        raise DBPError(f"{src}: {t.num_rows} rows, expected {rows}")
    cl = t.column("cluster").to_numpy().astype(np.int64)
    rank = t.column("rank").to_numpy()
    ms = t.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
    thr = np.float32(1 - settings["eps"])
    survives = np.where(np.isnan(ms), np.float32(0), ms) <= thr
    ids, cuts = np.asarray(clusters_ids, np.int64), np.asarray(cutoffs, np.int64)  # ids ascending
    pos = np.minimum(np.searchsorted(ids, cl), max(0, len(ids) - 1))
    cut = np.where((len(ids) > 0) & (ids[pos] == cl), cuts[pos], -1) if len(ids) else np.full(rows, -1, np.int64)
    keep = survives & (rank <= cut)
    cols = {"clusters": clusters, "eps": pa.array(np.full(rows, settings["eps"])),
            "fraction": pa.array(np.full(rows, settings["fraction"])),
            "temperature": pa.array(np.full(rows, settings["temperature"])),
            "cluster": pa.array(cl.astype(np.int32)), "keep": pa.array(keep)}
    meta = {"file": file, "rows": rows, "settings": settings, "source": _read_meta_any(src),
            "source_identity": _source_identity(Path(src))}
    return write_file_table(Path(out), t.column("uid").combine_chunks(), file, cols, OUTPUT_SCHEMA, META_KEY, meta)


def _read_meta_any(src) -> dict | None:
    try:
        return json.loads((pq.read_schema(src).metadata or {})[b"curate.semdedup"])["settings"]
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def _source_identity(src: Path) -> dict:
    """Size and hash of the last 4 KiB of a semdedup table (its parquet footer: metadata, every
    column's statistics and offsets): a rebuild with other contents has another. Not an mtime,
    which a copy or a fresh checkout of shipped tables does not keep."""
    size = src.stat().st_size
    with open(src, "rb") as fh:
        fh.seek(max(0, size - 4096))
        return {"bytes": size, "tail_sha256": hashlib.sha256(fh.read()).hexdigest()}


def _current(out: Path, settings: dict, rows: int, src: Path) -> bool:
    meta = read_table_meta(out, META_KEY)
    return bool(meta and meta.get("settings") == settings and meta.get("rows") == rows
                and meta.get("source") == _read_meta_any(src) and src.is_file()
                and meta.get("source_identity") == _source_identity(src))


def register(catalog) -> None:
    root = feature_root(catalog, VIEW)
    con = connect(catalog)
    try:
        names = [r[0] for r in con.execute("SELECT file FROM pool_files ORDER BY file_id").fetchall()]
    finally:
        con.close()
    files = [d / f"{n}.parquet" for d in sorted(root.iterdir()) if d.is_dir()
             for n in names if (d / f"{n}.parquet").is_file()] if root.is_dir() else []
    if files:
        register_parquet_view(catalog, VIEW, files,
                              'uid, file, "row", clusters, eps, fraction, temperature, cluster, keep')


def build_dbp(catalog=None, clusters: str = "", params: dict | None = None, progress: bool = True,
              force: bool = False, engine: Engine | None = None, **overrides) -> BuildResult:
    """The ``dbp`` table of cluster set ``clusters`` (SemDeDup built first when needed)."""
    t0 = time.perf_counter()
    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    settings = settings_from(params, **overrides)
    build_semdedup(catalog, clusters, progress=progress, engine=engine)
    sp = semdedup_plan(catalog, clusters)
    out_dir = feature_root(catalog, VIEW) / sp.name
    res = BuildResult(sp.name, settings, files=len(sp.files), out_dir=out_dir)
    todo = [f for f in sp.files
            if force or not (out_dir / f"{f.file}.parquet").is_file()
            or not _current(out_dir / f"{f.file}.parquet", settings, f.num_rows, sp.output(f.file))]
    quotas_path = out_dir / "_quotas.parquet"
    if todo or not quotas_path.is_file():
        q = cluster_quotas(catalog, sp.name, settings)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = dict(q.schema.metadata or {})
        meta[META_KEY] = json.dumps({"settings": settings}, sort_keys=True).encode()
        with atomic_path(quotas_path, suffix=".parquet") as tmp:
            pq.write_table(q.replace_schema_metadata(meta), tmp)
        ids, cuts = q.column("cluster").to_pylist(), q.column("cutoff_rank").to_pylist()
        todo = sp.files  # new quotas: every file's flags
        tasks = [(str(catalog), sp.name, settings, f.file, f.num_rows, str(sp.output(f.file)), ids, cuts,
                  str(out_dir / f"{f.file}.parquet")) for f in todo]
        for f, rows in zip(todo, map_tasks(_file_task, tasks, engine, desc=f"dbp {sp.name} files", progress=progress,
                                           unit="row", sizes=[f.num_rows for f in todo], start="spawn")):
            res.computed.append(f.file)
            res.rows_computed += rows
    q = pq.read_table(quotas_path)
    res.budget = int((q.schema.metadata or {}).get(b"budget", b"0"))
    res.kept = int(sum(q.column("quota").to_pylist()))
    register(catalog)
    res.elapsed = time.perf_counter() - t0
    return res


class _Producer:
    """``dbp`` for :mod:`curate.features.registry` (parameters ``clusters``, ``eps``, ``fraction``,
    ``temperature``, ``neighbors``, ``balance``)."""

    view = VIEW

    def is_current(self, catalog, params) -> bool:
        catalog = (Path(catalog) if catalog else default_catalog()).resolve()
        name = clusters_param(params)
        settings = settings_from(params)
        sp = semdedup_plan(catalog, name)
        if sp.todo:
            return False
        out_dir = feature_root(catalog, VIEW) / sp.name
        quotas = out_dir / "_quotas.parquet"
        if not quotas.is_file() or read_table_meta(quotas, META_KEY) != {"settings": settings}:
            return False
        if not all((out_dir / f"{f.file}.parquet").is_file()
                   and _current(out_dir / f"{f.file}.parquet", settings, f.num_rows, sp.output(f.file))
                   for f in sp.files):
            return False
        registered = registered_paths(catalog, VIEW)
        return all(str((out_dir / f"{f.file}.parquet").resolve()) in registered for f in sp.files)

    def build(self, catalog, params, progress: bool = True) -> None:
        res = build_dbp(catalog, clusters_param(params), params, progress=progress)
        if progress:
            print(f"dbp[{res.clusters}]: budget {res.budget:,}, quotas sum {res.kept:,}; computed "
                  f"{len(res.computed)} file(s) in {res.elapsed:.1f}s", file=sys.stderr, flush=True)

    def describe(self, catalog, params) -> dict:
        return {"clusters": clusters_param(params), "settings": settings_from(params)}


PRODUCER = _Producer()
