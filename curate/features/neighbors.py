"""Pool embedding analytics: nearest neighbours and near-duplicate groups.

:func:`nearest` scans one embedding key file by file (BLAS inner products, a running top-k), so a
query against any pool needs one batch of embeddings in memory. The query is a vector or the
embedding of a uid in the pool.

:func:`near_duplicates` finds groups of samples whose embeddings are within a similarity
threshold, the SemDeDup way: only samples in the same cluster of a cluster set are compared
(pairs across clusters are missed, by design: it makes the work ~N^2/K instead of N^2), pairs
with inner product >= threshold are linked, and each connected group keeps its first member in
pool order (smallest ``(file, row)``). The result is a uid-keyed table
``near_duplicates(dedup_set, uid, file, row, group_uid, keep)`` holding only samples that have a
duplicate; a filter drops the extra copies with
``WHERE uid NOT IN (SELECT uid FROM near_duplicates WHERE dedup_set = 'NAME' AND NOT keep)``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path, write_json
from curate.catalog.connection import connect, default_catalog, features_dir, register_parquet_view
from curate.features.clusters import assign_pool, get_cluster_set
from curate.features.embeddings import (check_key, convert_embeddings, iter_batches, open_npy, pool_dim,
                               pool_embedding_files, row_embedding)
from curate.errors import CurateError
from curate.progress import Progress

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
#: samples per near-duplicate step (clusters are packed into steps of at most this many rows)
STEP_ROWS = 200_000


@dataclass
class Neighbor:
    uid: str
    file: str
    row: int
    score: float


def locate_uid(con, uid: str) -> tuple[str, int]:
    hit = con.execute('SELECT file, "row" FROM pool WHERE uid = ? ORDER BY file, "row" LIMIT 1', [uid]).fetchone()
    if hit is None:
        raise CurateError(f"uid {uid!r}: not in the pool")
    return hit[0], int(hit[1])


def nearest(catalog=None, key: str = "l14_img", vector=None, uid: str | None = None, k: int = 10,
            progress: bool = False) -> list[Neighbor]:
    """The ``k`` pool samples with the largest inner product with ``vector`` (or ``uid``'s embedding).

    Ties keep the earlier sample in pool order. With ``uid`` the sample itself is included
    (score = its squared norm), as a query for "what looks like this" usually wants to see it.
    """
    catalog = Path(catalog) if catalog else default_catalog()
    check_key(key)
    if (vector is None) == (uid is None):
        raise CurateError("give exactly one of a query vector or a uid")
    if k < 1:
        raise CurateError(f"k={k}: must be at least 1")
    files = pool_embedding_files(catalog, key)
    dim = pool_dim(files, key)
    if uid is not None:
        con = connect(catalog)
        try:
            f, r = locate_uid(con, uid)
        finally:
            con.close()
        q = row_embedding(catalog, key, f, r)
    else:
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != dim:
            raise CurateError(f"query vector has dimension {q.shape[0]}, the pool's '{key}' has {dim}")
    # running top-k as (score, global position); ties broken by position via a stable sort
    best_s = np.empty(0, np.float32)
    best_p = np.empty(0, np.int64)
    offsets, start = [], 0
    for ef in Progress(files, desc=f"neighbours {key}", unit="file", disable=not progress):
        offsets.append((start, ef))
        pos = start
        for batch in iter_batches(ef, key, dim=dim):
            s = batch @ q
            cand = np.arange(len(s))
            if len(s) > k:
                # everything tied with the k-th best stays a candidate, so pool order decides ties
                kth = np.partition(s, len(s) - k)[len(s) - k]
                cand = np.flatnonzero(s >= kth)
            best_s = np.concatenate([best_s, s[cand]])
            best_p = np.concatenate([best_p, pos + cand])
            if len(best_s) > k:
                order = np.lexsort((best_p, -best_s))[:k]
                best_s, best_p = best_s[order], best_p[order]
            pos += len(batch)
        start += ef.num_rows
    order = np.lexsort((best_p, -best_s))[:k]
    hits = []
    for s, p in zip(best_s[order], best_p[order]):
        for off, ef in reversed(offsets):
            if p >= off:
                hits.append((ef.file, int(p - off), float(s)))
                break
    con = connect(catalog)
    try:
        out = []
        for f, r, s in hits:
            u = con.execute('SELECT uid FROM pool WHERE file = ? AND "row" = ?', [f, r]).fetchone()
            out.append(Neighbor(u[0] if u else None, f, r, s))
    finally:
        con.close()
    return out


# -- near-duplicate groups --------------------------------------------------------------------

def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected component label (smallest member index) of each of n nodes given edges i-j."""
    parent = np.arange(n)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def _groups_in_cluster(x: np.ndarray, threshold: float) -> np.ndarray | None:
    """Component root per row of x (rows in pool order) for pairs with x_i . x_j >= threshold."""
    n = len(x)
    if n < 2:
        return None
    ii, jj = [], []
    block = max(1, (1 << 22) // n)
    for a in range(0, n, block):
        s = x[a : a + block] @ x.T
        r, c = np.nonzero(s >= threshold)
        keep = c > r + a
        ii.append(r[keep] + a)
        jj.append(c[keep])
    i, j = np.concatenate(ii), np.concatenate(jj)
    if not len(i):
        return None
    return _components(n, i, j)


def near_duplicates(catalog=None, clusters: str = "", threshold: float = 0.95, key: str | None = None,
                    name: str | None = None, progress: bool = True) -> dict:
    """Write near-duplicate groups for ``key`` within the clusters of cluster set ``clusters``.

    Resumable per step (a step is a range of clusters with at most ``STEP_ROWS`` rows, or one
    bigger cluster); memory is one step's embeddings. Registers ``near_duplicates``.
    """
    catalog = Path(catalog) if catalog else default_catalog()
    cs = get_cluster_set(catalog, clusters)
    key = check_key(key or cs.key)
    name = name or f"{cs.name}_{key}_{threshold:g}"
    if not _NAME_RE.match(name):
        raise CurateError(f"near-duplicate set name {name!r}: use letters, digits, '_', '.', '-'")
    t0 = time.perf_counter()
    assign_pool(catalog, cs.name, progress=progress)
    convert_embeddings(catalog, key, progress=progress)  # random access needs the memory maps
    files = pool_embedding_files(catalog, key)
    dim = pool_dim(files, key)
    maps = {ef.file: open_npy(ef, key, dim) for ef in files}
    con = connect(catalog)
    try:
        out_dir = features_dir(con, catalog) / "near_duplicates" / name
        counts = con.execute(
            "SELECT cluster, count(*) FROM cluster_assignments WHERE cluster_set = ? GROUP BY cluster ORDER BY cluster",
            [cs.name]).fetchall()
        steps, cur, cur_n = [], [], 0
        for c, n in counts:
            if cur and cur_n + n > STEP_ROWS:
                steps.append((cur[0], cur[-1]))
                cur, cur_n = [], 0
            cur.append(c)
            cur_n += n
        if cur:
            steps.append((cur[0], cur[-1]))
        stamp = {"cluster_set": cs.name, "centroids_sha256": cs.meta["centroids_sha256"], "key": key,
                 "threshold": threshold, "steps": [list(s) for s in steps]}
        stamp_path = out_dir / "_set.json"
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) != stamp:
            shutil.rmtree(out_dir)  # other clusters, key or threshold under the same name
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(stamp_path, stamp)
        for si, (lo, hi) in enumerate(Progress(steps, desc=f"near-duplicates {name}", unit="step",
                                               disable=not progress)):
            path = out_dir / f"step-{si:06d}.parquet"
            if path.is_file():
                continue
            rows = con.execute(
                'SELECT cluster, uid, file, "row" FROM cluster_assignments '
                'WHERE cluster_set = ? AND cluster BETWEEN ? AND ? ORDER BY cluster, file, "row"',
                [cs.name, lo, hi]).to_arrow_table()
            cl = rows.column("cluster").to_numpy()
            fl = rows.column("file").to_pylist()
            rw = rows.column("row").to_numpy()
            ud = rows.column("uid").to_pylist()
            res = {k: [] for k in ("uid", "file", "row", "group_uid", "keep")}
            bounds = np.flatnonzero(np.diff(cl)) + 1
            for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(cl)]):
                if b - a < 2:
                    continue
                x = np.stack([maps[fl[t]][rw[t]] for t in range(a, b)])
                roots = _groups_in_cluster(x, threshold)
                if roots is None:
                    continue
                sizes = np.bincount(roots, minlength=b - a)
                for t in range(b - a):
                    if sizes[roots[t]] > 1:
                        res["uid"].append(ud[a + t])
                        res["file"].append(fl[a + t])
                        res["row"].append(int(rw[a + t]))
                        res["group_uid"].append(ud[a + roots[t]])
                        res["keep"].append(bool(roots[t] == t))
            table = pa.table({"dedup_set": pa.array([name] * len(res["uid"]), pa.string()),
                              "uid": pa.array(res["uid"], pa.string()), "file": pa.array(res["file"], pa.string()),
                              "row": pa.array(res["row"], pa.int64()),
                              "group_uid": pa.array(res["group_uid"], pa.string()),
                              "keep": pa.array(res["keep"], pa.bool_())})
            with atomic_path(path, suffix=".parquet") as tmp:
                pq.write_table(table, tmp)
        all_files = sorted((features_dir(con, catalog) / "near_duplicates").glob("*/step-*.parquet"))
    finally:
        con.close()
    register_parquet_view(catalog, "near_duplicates", all_files, 'dedup_set, uid, file, "row", group_uid, keep')
    con = connect(catalog)
    try:
        n_dup, n_drop = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT keep) FROM near_duplicates WHERE dedup_set = ?",
            [name]).fetchone()
    finally:
        con.close()
    return {"dedup_set": name, "cluster_set": cs.name, "key": key, "threshold": threshold,
            "steps": len(steps), "in_groups": int(n_dup), "drop": int(n_drop),
            "seconds": round(time.perf_counter() - t0, 2), "dir": str(out_dir)}
