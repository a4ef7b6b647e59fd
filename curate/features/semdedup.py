"""SemDeDup: semantic duplicates within the k-means clusters of the pool's image embeddings.

Abbas, Tirumala, Simig, Ganguli and Morcos, *SemDeDup: Data-efficient learning at web-scale
through semantic deduplication* (2023, arXiv:2303.09540; code github.com/facebookresearch/SemDeDup).
Within each cluster of a k-means clustering of the (L2-normalised) embeddings, the paper's code
(``semdedup.py``, with ``sort_clusters.py``'s ``keep_hard=True``):

1. orders the cluster's members by cosine distance to the centroid, **farthest first**;
2. takes the cosine similarity matrix of the members, zeroes its diagonal and lower triangle
   (``torch.triu(S, diagonal=1)``) and takes each column's maximum:
   ``M_j = max(0, max_{i before j} <x_i, x_j>)``;
3. removes member j when ``M_j > 1 - eps``.

So of every group of near duplicates the member farthest from the centroid survives, and a
sample is removed when *any* earlier sample (removed or not) is within ``eps`` of it.

The producer here computes what does not depend on ``eps`` once, per cluster set:
``semdedup(uid, file, row, clusters, cluster, rank, dist_to_centroid, max_sim, dup_of)`` where
``rank`` is the position in step 1's order (0 = farthest; ties by file, then row),
``dist_to_centroid = 1 - cos(x, centroid)``, ``max_sim`` the largest similarity with an earlier
member (NULL for the first; the paper's code floors it at 0, which changes nothing for
``eps < 1``) and ``dup_of`` the uid of that earlier member (first in order on ties).
``filters/semdedup.sql`` keeps a row when ``coalesce(max_sim, 0) <= 1 - eps`` (compared in
float32, as the paper's torch code compares), so any ``eps`` is a filter parameter, not a
rebuild. :mod:`curate.features.dbp` builds on the same table.

Work and memory (one cluster at a time):

* **pass 1**, tasks of :func:`curate.engine.map_tasks`: a *step* is a run of consecutive
  clusters with at most ``STEP_ROWS`` members in all (or one bigger cluster). A task reads its
  clusters' members from ``cluster_assignments``, gathers their embeddings from the float32
  memory maps (``curate embeddings convert`` is run first) and, cluster by cluster, computes the
  similarities in column blocks of ``SIM_CELLS`` cells: memory is one cluster's embeddings
  (``n x d`` float32) plus ``SIM_CELLS`` floats, never ``n x n``. It writes a work parquet sorted
  by ``(file, row)``.
* **pass 2**, one task per pool file: its rows from the work files (DuckDB skips row groups by
  their ``file`` statistics) -> ``semdedup/NAME/FILE.parquet`` via
  :func:`curate.features.tables.write_file_table`.

Every value depends only on the cluster's members and their order, which are the same whatever
the engine or the number of workers: the bytes are the same. Both passes skip finished work, so
a killed build resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path, write_json
from curate.catalog.connection import connect, default_catalog, register_parquet_view
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.features.clusters import assign_pool, check_name, get_cluster_set
from curate.features.embeddings import convert_embeddings, open_npy, pool_dim, pool_embedding_files
from curate.features.tables import feature_root, read_table_meta, write_file_table

VIEW = "semdedup"
META_KEY = b"curate.semdedup"
SCHEMA_VERSION = 1
#: cluster members per pass-1 task (whole clusters; a bigger cluster is a task of its own)
STEP_ROWS = 200_000
#: similarity cells per block inside a cluster (float32: 64 MB)
SIM_CELLS = 1 << 24
#: our default threshold (the paper picks eps for the fraction of data to keep)
DEFAULT_EPS = 0.07

OUTPUT_SCHEMA = pa.schema([("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                           ("clusters", pa.string()), ("cluster", pa.int32()), ("rank", pa.int64()),
                           ("dist_to_centroid", pa.float32()), ("max_sim", pa.float32()),
                           ("dup_of", pa.string())])
WORK_SCHEMA = pa.schema([("file", pa.string()), ("row", pa.int64()), ("uid", pa.string()),
                         ("cluster", pa.int32()), ("rank", pa.int64()), ("dist_to_centroid", pa.float32()),
                         ("max_sim", pa.float32()), ("dup_of", pa.string())])


class SemDeDupError(CurateError):
    """Bad SemDeDup settings or inputs."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, np.float32(1))


def order_in_cluster(dist: np.ndarray) -> np.ndarray:
    """The paper's order (``keep_hard``): cosine distance to the centroid descending; ties keep
    the given order (members come in ``(file, row)`` order: ties by file, then row)."""
    return np.argsort(-np.asarray(dist, np.float64), kind="stable")


def earlier_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``x`` (normalised, in order): the largest ``<x_i, x_j>`` over ``i < j`` and
    that ``i`` (first on ties); ``-inf``/``-1`` for row 0. Column blocks of ``SIM_CELLS``."""
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64)
    block = max(1, SIM_CELLS // max(1, n))
    for a in range(1, n, block):
        b = min(n, a + block)
        s = x[:b] @ x[a:b].T  # (b, b-a): rows i < b, columns j in [a, b)
        i = np.arange(b)[:, None]
        j = np.arange(a, b)[None, :]
        s[i >= j] = -np.inf
        arg[a:b] = s.argmax(axis=0)
        best[a:b] = s[arg[a:b], np.arange(b - a)]
    return best, arg


# -- plan ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    catalog: Path
    name: str
    settings: dict
    files: list
    out_dir: Path
    todo: list = field(default_factory=list)

    def output(self, file: str) -> Path:
        return self.out_dir / f"{file}.parquet"

    @property
    def work_dir(self) -> Path:
        ident = json.dumps({"settings": self.settings, "files": [[f.file, f.num_rows] for f in self.files]},
                           sort_keys=True)
        return self.out_dir / f"_work-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def plan(catalog, clusters: str, force: bool = False) -> Plan:
    catalog = Path(catalog) if catalog else default_catalog()
    cs = get_cluster_set(catalog, check_name(clusters))
    settings = {"schema": SCHEMA_VERSION, "clusters": cs.name, "key": cs.key,
                "centroids_sha256": cs.meta["centroids_sha256"]}
    files = pool_embedding_files(catalog, cs.key)
    if not files:
        raise SemDeDupError(f"{catalog}: the pool has no files")
    p = Plan(catalog, cs.name, settings, files, feature_root(catalog, VIEW) / cs.name)
    for f in files:
        meta = None if force else read_table_meta(p.output(f.file), META_KEY)
        if not (meta and meta.get("settings") == settings and meta.get("rows") == f.num_rows):
            p.todo.append(f)
    return p


def _steps(catalog, name: str) -> list[tuple[int, int, int]]:
    """``(first cluster, last cluster, members)`` of each pass-1 step, in cluster order."""
    con = connect(catalog)
    try:
        counts = con.execute("SELECT cluster, count(*) FROM cluster_assignments WHERE cluster_set = ? "
                             "GROUP BY cluster ORDER BY cluster", [name]).fetchall()
    finally:
        con.close()
    steps, cur, n = [], [], 0
    for c, k in counts:
        if cur and n + k > STEP_ROWS:
            steps.append((cur[0], cur[-1], n))
            cur, n = [], 0
        cur.append(int(c))
        n += int(k)
    if cur:
        steps.append((cur[0], cur[-1], n))
    return steps


# -- pass 1: clusters ---------------------------------------------------------------------------

#: per process: open memory maps (npy path -> array) and the cluster set's centroids
_MAPS: dict[str, np.ndarray] = {}
_CENTROIDS: dict[tuple, np.ndarray] = {}


def _pass1_task(catalog: str, name: str, key: str, files: list, lo: int, hi: int, out: str) -> int:
    """Clusters ``lo..hi`` of set ``name``: each member's rank, distance, max_sim, dup_of."""
    out = Path(out)
    if out.is_file():
        return 0
    cs = get_cluster_set(catalog, name)
    ck = (str(catalog), name, cs.meta["centroids_sha256"])
    if ck not in _CENTROIDS:  # once per process, however many steps it runs (100k x 768: 300 MB)
        _CENTROIDS.clear()
        _CENTROIDS[ck] = cs.centroids()
    centroids = _CENTROIDS[ck]
    by_file = {f.file: f for f in files}
    con = connect(catalog)
    try:
        t = con.execute('SELECT cluster, file, "row", uid FROM cluster_assignments WHERE cluster_set = ? '
                        'AND cluster BETWEEN ? AND ? ORDER BY cluster, file, "row"', [name, lo, hi]).to_arrow_table()
    finally:
        con.close()
    cl = t.column("cluster").to_numpy()
    fl = np.array(t.column("file").to_pylist(), dtype=object)
    rw = t.column("row").to_numpy().astype(np.int64)
    ud = np.array(t.column("uid").to_pylist(), dtype=object)
    n = len(cl)
    rank = np.empty(n, np.int64)
    dist = np.empty(n, np.float32)
    max_sim = np.full(n, np.nan, np.float32)
    dup_of = np.full(n, None, dtype=object)
    bounds = np.flatnonzero(np.diff(cl)) + 1
    for a, b in zip(np.r_[0, bounds].astype(int), np.r_[bounds, n].astype(int)):
        if b <= a:
            continue
        x = np.empty((b - a, int(cs.meta["dim"])), np.float32)
        for f in dict.fromkeys(fl[a:b]):  # members are sorted by file: one slice per file
            sel = np.flatnonzero(fl[a:b] == f)
            path = str(by_file[f].npy)
            if path not in _MAPS:
                if len(_MAPS) > 4096:
                    _MAPS.clear()
                _MAPS[path] = open_npy(by_file[f], key)
            x[sel] = _MAPS[path][rw[a:b][sel]]
        x = _normalise(x)
        c = _normalise(centroids[int(cl[a])][None, :])[0]
        d = (np.float32(1) - np.einsum("ij,j->i", x, c)).astype(np.float32)
        order = order_in_cluster(d)
        best, arg = earlier_max(x[order])
        idx = a + order
        rank[idx] = np.arange(b - a)
        dist[a:b] = d
        has = arg >= 0
        max_sim[idx[has]] = best[has]
        dup_of[idx[has]] = ud[a + order[arg[has]]]
    srt = np.lexsort((rw, fl.astype(str))) if n else np.empty(0, np.int64)
    table = pa.table({"file": pa.array(fl[srt].tolist(), pa.string()), "row": pa.array(rw[srt]),
                      "uid": pa.array(ud[srt].tolist(), pa.string()), "cluster": pa.array(cl[srt].astype(np.int32)),
                      "rank": pa.array(rank[srt]), "dist_to_centroid": pa.array(dist[srt]),
                      "max_sim": pa.array(max_sim[srt], mask=np.isnan(max_sim[srt])),
                      "dup_of": pa.array(dup_of[srt].tolist(), pa.string())}, schema=WORK_SCHEMA)
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=16384)
    return n


# -- pass 2: per pool file ----------------------------------------------------------------------

def _pass2_task(catalog: str, name: str, settings: dict, file: str, rows: int, work: list, out: str) -> int:
    con = connect(catalog)
    try:
        t = con.execute('SELECT uid, cluster, "rank", dist_to_centroid, max_sim, dup_of FROM read_parquet(?) '
                        'WHERE file = ? ORDER BY "row"', [work, file]).to_arrow_table()
    finally:
        con.close()
    if t.num_rows != rows:
        raise SemDeDupError(f"pool file {file}: {t.num_rows} rows in the cluster assignments, expected {rows}")
    cols = {"clusters": name, "cluster": t.column("cluster").combine_chunks(),
            "rank": t.column("rank").combine_chunks(),
            "dist_to_centroid": t.column("dist_to_centroid").combine_chunks(),
            "max_sim": t.column("max_sim").combine_chunks(), "dup_of": t.column("dup_of").combine_chunks()}
    meta = {"file": file, "rows": rows, "settings": settings}
    return write_file_table(Path(out), t.column("uid").combine_chunks(), file, cols, OUTPUT_SCHEMA, META_KEY, meta)


# -- build ----------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    clusters: str
    files: int = 0
    computed: list = field(default_factory=list)
    rows_computed: int = 0
    steps: int = 0
    out_dir: Path | None = None
    elapsed: float = 0.0


def register(catalog) -> None:
    """The view over every cluster set's tables of the pool's current files."""
    root = feature_root(catalog, VIEW)
    con = connect(catalog)
    try:
        names = [r[0] for r in con.execute("SELECT file FROM pool_files ORDER BY file_id").fetchall()]
    finally:
        con.close()
    files = [d / f"{n}.parquet" for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith("_")
             for n in names if (d / f"{n}.parquet").is_file()] if root.is_dir() else []
    if files:
        register_parquet_view(catalog, VIEW, files,
                              'uid, file, "row", clusters, cluster, "rank", dist_to_centroid, max_sim, dup_of')


def build_semdedup(catalog=None, clusters: str = "", progress: bool = True, force: bool = False,
                   engine: Engine | None = None) -> BuildResult:
    """The ``semdedup`` table of cluster set ``clusters`` for every pool file lacking a current one."""
    t0 = time.perf_counter()
    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    p = plan(catalog, clusters, force)
    res = BuildResult(p.name, files=len(p.files), out_dir=p.out_dir)
    if p.todo:
        key = p.settings["key"]
        assign_pool(catalog, p.name, progress=progress, engine=engine)
        convert_embeddings(catalog, key, progress=progress)
        files = pool_embedding_files(catalog, key)
        pool_dim(files, key)
        work = p.work_dir
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / "settings.json", p.settings)
        steps = _steps(catalog, p.name)
        res.steps = len(steps)
        paths = [work / f"step-{i:06d}.parquet" for i in range(len(steps))]
        tasks = [(str(catalog), p.name, key, files, lo, hi, str(path))
                 for (lo, hi, _), path in zip(steps, paths) if not path.is_file()]
        sizes = [n for (_, _, n), path in zip(steps, paths) if not path.is_file()]
        for _ in map_tasks(_pass1_task, tasks, engine, desc=f"semdedup {p.name} clusters", progress=progress,
                           unit="row", sizes=sizes, start="spawn"):
            pass
        work_files = [str(q) for q in paths]
        tasks2 = [(str(catalog), p.name, p.settings, f.file, f.num_rows, work_files, str(p.output(f.file)))
                  for f in p.todo]
        for f, rows in zip(p.todo, map_tasks(_pass2_task, tasks2, engine, desc=f"semdedup {p.name} files",
                                             progress=progress, unit="row", sizes=[f.num_rows for f in p.todo],
                                             start="spawn")):
            res.computed.append(f.file)
            res.rows_computed += rows
        _MAPS.clear()
        _CENTROIDS.clear()
        shutil.rmtree(work, ignore_errors=True)
    for stale in p.out_dir.glob("_work-*") if p.out_dir.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    register(catalog)
    res.elapsed = time.perf_counter() - t0
    return res


def registered_paths(catalog, view: str) -> set[str]:
    catalog = Path(catalog).resolve()
    con = connect(catalog)
    try:
        row = con.execute("SELECT paths FROM curate_views WHERE name = ?", [view]).fetchone()
    finally:
        con.close()
    return {str((catalog.parent / q).resolve()) for q in (row[0] if row else [])}


def clusters_param(params) -> str:
    if "clusters" not in (params or {}):
        raise SemDeDupError("a filter reading semdedup or dbp must declare `SET VARIABLE clusters = 'NAME';`")
    return check_name(str(params["clusters"]))


class _Producer:
    """``semdedup`` for :mod:`curate.features.registry` (cluster set: the ``clusters`` parameter)."""

    view = VIEW

    def is_current(self, catalog, params) -> bool:
        catalog = (Path(catalog) if catalog else default_catalog()).resolve()
        p = plan(catalog, clusters_param(params))
        if p.todo:
            return False
        registered = registered_paths(catalog, VIEW)
        return all(str(p.output(f.file).resolve()) in registered for f in p.files)

    def build(self, catalog, params, progress: bool = True) -> None:
        res = build_semdedup(catalog, clusters_param(params), progress=progress)
        if progress:
            print(f"semdedup[{res.clusters}]: computed {len(res.computed)} file(s) ({res.rows_computed:,} rows), "
                  f"in {res.elapsed:.1f}s", file=sys.stderr, flush=True)

    def describe(self, catalog, params) -> dict:
        p = plan(catalog, clusters_param(params))
        return {"settings": p.settings}


PRODUCER = _Producer()
