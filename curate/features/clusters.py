"""Cluster sets: k-means centroids over pool embeddings, their target clusters, and assignments.

DataComp's image-based baselines (reference §2.2-2.3) keep a sample when the centroid nearest
to its L/14 image embedding is also nearest to some ImageNet-1k image. Here that is three
tables, all keyed by the cluster set's name (the filters' ``clusters`` parameter):

* a **cluster set** ``FEATURES/clusters/NAME/``: ``centroids.npy`` (float32, K x d) and
  ``set.json`` (key, K, d, sha256, where it came from), made by :func:`build_cluster_set`
  (faiss k-means with DataComp's settings) or :func:`import_cluster_set` (DataComp's released
  files: ``torch.save``'d numpy arrays, ``.pt`` dicts with ``image_features``, ``.npy``);
* ``cluster_targets(cluster_set, cluster)``: the distinct nearest centroids of the target
  embeddings (``targets.parquet``);
* ``cluster_assignments(cluster_set, uid, file, row, cluster)``: every pool row's nearest
  centroid, one parquet per pool file (resumable; each file a task of
  :func:`curate.engine.map_tasks`, run where the :class:`~curate.engine.Engine` given says),
  built by the :data:`ASSIGNMENTS` producer the first time a filter needs it.

"Nearest" is DataComp's: **argmax of the inner product** with the centroids as stored (they are
not renormalised, so this is not the L2 k-means cell), first index on ties (``torch.argmax`` /
``np.argmax``), computed in float32 on float32 embeddings (DataComp calls ``.float()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import functools
import json
import os
import pickle
import re
import shutil
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from duckdb.sqltypes import FLOAT, INTEGER

from curate.atomic import atomic_path, file_sha256, replace_dir, write_json
from curate.catalog.connection import connect, default_catalog, features_dir, register_parquet_view
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.features.embeddings import EmbeddingError, iter_batches, pool_dim, pool_embedding_files
from curate.features.registry import ensure_features
from curate.progress import Progress
from curate.safepickle import UnsafePickle, safe_loads
from curate.subset import NPY_MAGIC

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
#: float32 score cells per assignment step (64 MB): batch rows = SCORE_CELLS // K
SCORE_CELLS = 1 << 24
#: embedding rows read per step while assigning a file (768-d float32: 48 MB)
ASSIGN_ROWS = 16384
#: DataComp's caption_filter as SQL over the text_features view (fastText tokens, code points, LID)
CAPTION_FILTER_SQL = "n_tokens_fasttext > 1 AND n_chars > 5 AND lang_fasttext = 'en'"


class ClusterError(CurateError):
    """A cluster set, centroid file or target file that cannot be used."""


# -- loading DataComp's asset files without executing code ----------------------------------

def load_array_file(path, what: str, key: str | None = None) -> np.ndarray:
    """Read a 2-D float matrix from ``.npy``, a ``torch.save``'d numpy array, or a ``.pt`` dict.

    ``key`` picks an entry of a dict (``image_features`` in DataComp's ImageNet files). Pickled
    numpy arrays go through :func:`curate.safepickle.safe_loads` (``torch.load(weights_only=True)``
    refuses numpy arrays), tensor files through ``torch.load(weights_only=True)``; nothing is
    ever plainly unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"{path}: {what} file not found")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
        if magic == NPY_MAGIC:
            obj = np.load(path, allow_pickle=False)
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                pkl = [n for n in names if n.endswith("data.pkl")]
                if not pkl:
                    raise ClusterError(f"{path}: a zip without data.pkl is not a torch.save file")
                # tensors live in data/N entries next to data.pkl; a pickled numpy array has none
                has_tensors = any("/data/" in n for n in names)
                data = None if has_tensors else zf.read(pkl[0])
            obj = _torch_load(path) if has_tensors else safe_loads(data, str(path))
        else:
            try:
                obj = safe_loads(path.read_bytes(), str(path))
            except UnsafePickle as e:
                if "persistent reference" not in str(e):
                    raise
                obj = _torch_load(path)  # torch's legacy (pre-1.6) tensor format
    except CurateError:
        raise
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, KeyError) as e:
        raise ClusterError(f"{path}: cannot read {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(obj, dict):
        if key is None or key not in obj:
            raise ClusterError(f"{path}: {what} is a dict with keys {sorted(map(str, obj))}; "
                               f"expected an array{f' or key {key!r}' if key else ''}")
        obj = obj[key]
    if type(obj).__module__.startswith("torch"):
        obj = obj.detach().cpu().float().numpy() if obj.is_floating_point() else obj.numpy()
    if not isinstance(obj, np.ndarray):
        raise ClusterError(f"{path}: {what} holds a {type(obj).__name__}, expected a numeric array")
    if obj.ndim != 2 or obj.shape[0] == 0 or obj.shape[1] == 0:
        raise ClusterError(f"{path}: {what} has shape {obj.shape}, expected (rows, dim) with rows, dim > 0")
    if obj.dtype.kind != "f":
        raise ClusterError(f"{path}: {what} has dtype {obj.dtype}, expected float16, float32 or float64")
    if not np.isfinite(obj).all():
        bad = int(np.argwhere(~np.isfinite(obj))[0][0])
        raise ClusterError(f"{path}: {what} row {bad} is not finite (NaN or inf)")
    return obj


def _torch_load(path: Path):
    try:
        import torch  # lazy: optional extra [torch], only for files that hold tensors
    except ImportError:
        raise ClusterError(f"{path}: holds torch tensors; install torch to read it (pip install curate[torch])") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad or unsafe files
        raise ClusterError(f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]})") from None


# -- nearest centroid ---------------------------------------------------------------------

def nearest_centroid(x: np.ndarray, centroids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Index of the centroid with the largest inner product, per row (first index on ties).

    float32 BLAS in batches of ``SCORE_CELLS // K`` rows, so the score matrix stays ~64 MB.
    """
    x = np.asarray(x, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    n, k = len(x), len(c)
    out = np.empty(n, np.int32) if out is None else out
    step = max(1, SCORE_CELLS // k)
    ct = c.T  # (d, K) view; sgemm handles the transpose without a copy
    scores = np.empty((min(step, n), k), np.float32)
    for i in range(0, n, step):
        j = min(n, i + step)
        s = scores[: j - i]
        np.matmul(x[i:j], ct, out=s)
        out[i:j] = s.argmax(axis=1)
    return out


@functools.lru_cache(maxsize=1)
def _cuda_device_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _gpu_nearest(x: np.ndarray, centroids) -> np.ndarray | None:
    """torch on a CUDA device when one exists (DataComp's path); None on CPU-only machines."""
    if not _cuda_device_present():
        return None  # importing torch costs seconds; skip it on machines without an NVIDIA device
    try:
        import torch  # lazy: optional extra [torch], only on machines with an NVIDIA device
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).cuda()
    out = np.empty(len(x), np.int32)
    step = max(1, SCORE_CELLS // len(c))
    for i in range(0, len(x), step):
        s = torch.from_numpy(np.asarray(x[i:i + step], np.float32)).cuda() @ c.T
        out[i:i + step] = torch.argmax(s, dim=1).cpu().numpy()
    return out


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid by inner product (GPU when present, else BLAS)."""
    got = _gpu_nearest(x, centroids)
    return got if got is not None else nearest_centroid(x, centroids)


# -- cluster sets ---------------------------------------------------------------------------

@dataclass
class ClusterSet:
    name: str
    dir: Path
    meta: dict

    @property
    def centroids_path(self) -> Path:
        return self.dir / "centroids.npy"

    @property
    def targets_path(self) -> Path:
        return self.dir / "targets.parquet"

    @property
    def key(self) -> str:
        return self.meta["key"]

    def centroids(self) -> np.ndarray:
        return np.load(self.centroids_path, allow_pickle=False)


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ClusterError(f"cluster set name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def clusters_root(con, catalog) -> Path:
    return features_dir(con, catalog) / "clusters"


def assignments_root(con, catalog) -> Path:
    return features_dir(con, catalog) / "cluster_assignments"


def list_cluster_sets(catalog=None) -> list[ClusterSet]:
    catalog = Path(catalog) if catalog else default_catalog()
    con = connect(catalog)
    try:
        root = clusters_root(con, catalog)
    finally:
        con.close()
    out = []
    for d in sorted(root.glob("*/set.json")) if root.is_dir() else []:
        if not _NAME_RE.match(d.parent.name):
            continue  # .NAME.curate-new / -old: a set being replaced
        out.append(ClusterSet(d.parent.name, d.parent, json.loads(d.read_text())))
    return out


def get_cluster_set(catalog, name) -> ClusterSet:
    check_name(name)
    for cs in list_cluster_sets(catalog):
        if cs.name == name:
            return cs
    have = ", ".join(cs.name for cs in list_cluster_sets(catalog)) or "none"
    raise ClusterError(f"cluster set '{name}' not found in {catalog} (have: {have}); create it with "
                       f"`curate clusters import` or `curate clusters build`")


def _prepare_dir(catalog, name: str, overwrite: bool) -> tuple[Path, Path]:
    con = connect(catalog)
    try:
        set_dir = clusters_root(con, catalog) / name
        assign_dir = assignments_root(con, catalog) / name
    finally:
        con.close()
    if (set_dir / "set.json").exists() and not overwrite:
        raise ClusterError(f"cluster set '{name}' already exists in {catalog} (use --overwrite to replace it)")
    return set_dir, assign_dir


def _save_set(catalog, name: str, centroids: np.ndarray, key: str, source: dict,
              targets: np.ndarray | None, target_files: list[str], overwrite: bool) -> ClusterSet:
    """Write centroids, target clusters and set.json; drop stale assignments; register views."""
    set_dir, assign_dir = _prepare_dir(catalog, name, overwrite)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    # the new set is built beside the old one and replaces it only when complete: a failed run
    # leaves the old set (and its assignments) as they were
    with replace_dir(set_dir, _OWNED, what=f"curate clusters (cluster set '{name}')", error=ClusterError) as new:
        meta = _write_set(new, name, centroids, key, source, targets, target_files)
    # the old set's assignments no longer apply
    if assign_dir.exists():
        shutil.rmtree(assign_dir)
    _register_targets(catalog)
    _register_assignments(catalog)
    return ClusterSet(name, set_dir, meta)


# what a cluster set directory holds: only these are ever replaced by --overwrite
_OWNED = re.compile(r"centroids\.npy|targets\.parquet|set\.json|\..+\.tmp")


def _write_set(set_dir: Path, name: str, centroids: np.ndarray, key: str, source: dict,
               targets: np.ndarray | None, target_files: list[str]) -> dict:
    with atomic_path(set_dir / "centroids.npy", suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, centroids, allow_pickle=False)
    meta = {
        "name": name, "key": key, "k": int(centroids.shape[0]), "dim": int(centroids.shape[1]),
        "centroids_sha256": file_sha256(set_dir / "centroids.npy"),
        "centroid_norms": {"min": float(np.linalg.norm(centroids, axis=1).min()),
                           "max": float(np.linalg.norm(centroids, axis=1).max())},
        "source": source,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    target_ids = None
    if targets is not None:
        target_ids = np.unique(assign(targets, centroids))
        meta["targets"] = {"files": target_files, "rows": int(len(targets)),
                           "clusters": int(len(target_ids))}
        _write_targets(set_dir / "targets.parquet", name, target_ids)
    else:
        # an empty target table, so image-based filters run (and keep nothing) instead of failing
        # on a missing view; the run manifest shows targets: null
        _write_targets(set_dir / "targets.parquet", name, np.empty(0, np.int32))
    write_json(set_dir / "set.json", meta)
    return meta


def _write_targets(path: Path, name: str, ids: np.ndarray) -> None:
    table = pa.table({"cluster_set": pa.array([name] * len(ids), pa.string()),
                      "cluster": pa.array(ids.astype(np.int32))})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def _register_targets(catalog) -> None:
    files = [cs.targets_path for cs in list_cluster_sets(catalog) if cs.targets_path.is_file()]
    if files:
        register_parquet_view(catalog, "cluster_targets", files, "cluster_set, cluster")


def load_targets(target_files, dim: int) -> np.ndarray:
    """Concatenate target embedding files (DataComp: ``in1k_clip_vit_l14_{0..4}.pt``) as float32."""
    parts = []
    for f in target_files:
        arr = load_array_file(f, "target embeddings", key="image_features")
        if arr.shape[1] != dim:
            raise ClusterError(f"{f}: target embeddings have dimension {arr.shape[1]}, centroids have {dim}")
        parts.append(arr.astype(np.float32))
    return np.concatenate(parts) if parts else None


def import_cluster_set(catalog, name: str, centroids_file, target_files=(), key: str = "l14_img",
                       overwrite: bool = False) -> ClusterSet:
    """Import DataComp's centroid file (and ImageNet target embeddings) as cluster set ``name``.

    Example: ``import_cluster_set(cat, "xlarge", "xlarge_centroids.pt",
    [f"in1k_clip_vit_l14_{i}.pt" for i in range(5)])``.
    """
    catalog = Path(catalog) if catalog else default_catalog()
    check_name(name)
    centroids = load_array_file(centroids_file, "centroids")
    if centroids.dtype == np.float64:
        # DataComp's torch.einsum would refuse float64 centroids next to float32 features
        centroids = centroids.astype(np.float32)
    _check_pool_dim(catalog, key, centroids.shape[1], centroids_file)
    _prepare_dir(catalog, name, overwrite)
    targets = load_targets(target_files, centroids.shape[1]) if target_files else None
    source = {"imported_from": str(Path(centroids_file).resolve()),
              "imported_sha256": file_sha256(Path(centroids_file))}
    return _save_set(catalog, name, centroids, key, source, targets,
                     [str(Path(f).resolve()) for f in target_files], overwrite)


def set_targets(catalog, name: str, target_files) -> ClusterSet:
    """(Re)compute the target clusters of an existing set from target embedding files."""
    cs = get_cluster_set(catalog, name)
    c = cs.centroids()
    targets = load_targets(target_files, c.shape[1])
    ids = np.unique(assign(targets, c))
    _write_targets(cs.targets_path, name, ids)
    cs.meta["targets"] = {"files": [str(Path(f).resolve()) for f in target_files],
                          "rows": int(len(targets)), "clusters": int(len(ids))}
    write_json(cs.dir / "set.json", cs.meta)
    _register_targets(catalog)
    return cs


def _check_pool_dim(catalog, key: str, dim: int, what) -> None:
    """Centroids must have the pool's embedding width; the first file with embeddings decides
    (assignment checks every file before it starts)."""
    for ef in pool_embedding_files(catalog, key):
        if ef.npz is None and not ef.npy.is_file():
            continue
        try:
            pool = pool_dim([ef], key)
        except EmbeddingError:
            return  # reported precisely when the assignment reads the file
        if pool != dim:
            raise ClusterError(f"{what}: centroids have dimension {dim}, the pool's '{key}' embeddings have {pool}")
        return


# -- k-means ---------------------------------------------------------------------------------

def caption_rows(con, file: str) -> np.ndarray:
    """Rows of one pool file that pass DataComp's caption_filter (needs the text_features view)."""
    rows = con.execute(
        f'SELECT "row" FROM text_features WHERE file = ? AND {CAPTION_FILTER_SQL} ORDER BY "row"',
        [file]).fetchnumpy()["row"]
    return np.asarray(rows, dtype=np.int64)


def training_sample(catalog, key: str, sample_ratio: float = -1.0, seed: int = 0,
                    caption_filter: bool = True, progress: bool = True) -> np.ndarray:
    """DataComp's k-means input: per file, caption-filtered rows, optionally sampled with replacement.

    DataComp draws ``np.random.choice(n, int(n * ratio))`` in unseeded spawn workers; here one
    generator seeded with ``seed`` walks the files in order, so a build is reproducible.
    """
    catalog = Path(catalog) if catalog else default_catalog()
    files = pool_embedding_files(catalog, key)
    dim = pool_dim(files, key)
    if caption_filter:
        ensure_features(catalog, "SELECT * FROM text_features", {}, progress=progress)
    con = connect(catalog)
    rng = np.random.default_rng(seed)
    parts = []
    try:
        for ef in Progress(files, desc=f"k-means input {key}", unit="file", disable=not progress):
            emb = np.concatenate(list(iter_batches(ef, key, dim=dim))) if ef.num_rows else np.empty((0, dim), np.float32)
            if caption_filter:
                try:
                    emb = emb[caption_rows(con, ef.file)]
                except Exception as e:  # noqa: BLE001 - duckdb errors when the view is missing
                    if "text_features" in str(e):
                        raise ClusterError(f"{catalog}: the caption prefilter needs the text_features view "
                                           f"(build text features, or pass --no-caption-filter)") from None
                    raise
            if sample_ratio > 0:
                emb = emb[rng.choice(len(emb), size=int(len(emb) * sample_ratio))]
            if len(emb):
                parts.append(emb)
    finally:
        con.close()
    if not parts:
        raise ClusterError(f"{catalog}: no embeddings left to cluster (caption filter / sample ratio)")
    return np.concatenate(parts)


_ITERATION = re.compile(rb"\s*Iteration (\d+) \(")


@contextlib.contextmanager
def kmeans_progress(niter: int, desc: str, progress: bool = True):
    """Count faiss k-means iterations on a :class:`~curate.progress.Progress` bar (a line every
    interval when not at a terminal). Yields whether faiss should be verbose.

    faiss has no callback: in verbose mode its C++ code prints ``Iteration N (...)`` to file
    descriptor 1, each ended by a carriage return. While training, descriptor 1 is a pipe read by
    a thread that moves the bar on each iteration and passes faiss's other lines (the sample
    size, warnings) on to standard error. The centroids are the same either way."""
    if not progress:
        yield False
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        read_fd, write_fd = os.pipe()
    except OSError:  # no standard output to borrow (closed): train without the count
        yield False
        return
    os.dup2(write_fd, 1)
    os.close(write_fd)
    bar = Progress(total=niter, desc=desc, unit="iteration")

    def take(piece: bytes) -> None:
        m = _ITERATION.match(piece)
        if m:
            bar.update(max(0, int(m.group(1)) + 1 - bar.n))
        elif piece.strip():
            sys.stderr.write(f"{desc}: {piece.decode(errors='replace').strip()}\n")

    def pump():
        rest = b""
        with os.fdopen(read_fd, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                *pieces, rest = re.split(rb"[\r\n]", rest + chunk)
                for piece in pieces:
                    take(piece)
        take(rest)  # the last line, which no carriage return ends

    reader = threading.Thread(target=pump, daemon=True, name="faiss-progress")
    reader.start()
    try:
        yield True
    finally:
        sys.stdout.flush()
        _flush_c_stdout()
        os.dup2(saved, 1)  # the pipe's last writer closes: the reader sees its end
        os.close(saved)
        reader.join()
        bar.close()


def _flush_c_stdout() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no libc symbols here: faiss flushes its own lines anyway
        pass


def train_kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20, verbose: bool = False) -> np.ndarray:
    """faiss k-means with DataComp's settings: L2, ``niter`` 20, no subsampling below 10M/centroid."""
    try:
        import faiss  # lazy: optional extra [embed], only k-means needs it
    except ImportError:
        raise ClusterError("k-means needs faiss: pip install curate[embed]") from None
    n, d = x.shape
    if k < 1 or k > n:
        raise ClusterError(f"--k {k}: need 1 <= k <= number of training points ({n})")
    clus = faiss.Clustering(d, k)
    clus.verbose = verbose
    clus.niter = niter
    clus.seed = seed
    clus.max_points_per_centroid = 10_000_000
    if faiss.get_num_gpus() > 0:  # faiss-gpu with a device: DataComp's GpuIndexFlatL2
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    clus.train(np.ascontiguousarray(x, dtype=np.float32), index)
    return faiss.vector_float_to_array(clus.centroids).reshape(k, d)


def build_cluster_set(catalog, name: str, key: str = "l14_img", k: int = 100_000,
                      sample_ratio: float = -1.0, seed: int = 0, caption_filter: bool = True,
                      target_files=(), niter: int = 20, overwrite: bool = False,
                      progress: bool = True) -> ClusterSet:
    """k-means over the pool's ``key`` embeddings (DataComp's image_based_clustering.py)."""
    catalog = Path(catalog) if catalog else default_catalog()
    check_name(name)
    _prepare_dir(catalog, name, overwrite)
    x = training_sample(catalog, key, sample_ratio, seed, caption_filter, progress)
    t0 = time.perf_counter()
    with kmeans_progress(niter, f"{name}: k-means, k={k:,}, {len(x):,} points", progress) as verbose:
        centroids = train_kmeans(x, k, seed=seed, niter=niter, verbose=verbose)
    targets = load_targets(target_files, centroids.shape[1]) if target_files else None
    source = {"kmeans": {"key": key, "k": k, "niter": niter, "seed": seed, "sample_ratio": sample_ratio,
                         "caption_filter": caption_filter, "points": int(len(x)),
                         "seconds": round(time.perf_counter() - t0, 2), "metric": "L2"}}
    return _save_set(catalog, name, centroids, key, source, targets,
                     [str(Path(f).resolve()) for f in target_files], overwrite)


# -- assignments (the producer) -----------------------------------------------------------------

def _assignment_files(catalog, cs: ClusterSet) -> list[tuple]:
    con = connect(catalog)
    try:
        d = assignments_root(con, catalog) / cs.name
    finally:
        con.close()
    return d, [(ef, d / f"{ef.file}.parquet") for ef in pool_embedding_files(catalog, cs.key)]


def _assignments_valid(d: Path, cs: ClusterSet) -> bool:
    stamp = d / "_set.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("centroids_sha256") == cs.meta["centroids_sha256"]


def assign_pool(catalog, name: str, progress: bool = True, engine: Engine | None = None) -> dict:
    """Write every pool file's nearest-centroid table for cluster set ``name`` (skips files done).

    One task per pool file, run where ``engine`` says (None: one after another in this process;
    ``Engine(kind="ray", ...)``: Ray tasks); the bytes are the same whatever the engine.
    """
    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    cs = get_cluster_set(catalog, name)
    d, pairs = _assignment_files(catalog, cs)
    if d.exists() and not _assignments_valid(d, cs):
        shutil.rmtree(d)  # made with other centroids under the same name
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "_set.json", {"centroids_sha256": cs.meta["centroids_sha256"]})
    todo = [(ef, out) for ef, out in pairs if not out.is_file()]
    if todo:
        pool_dim([ef for ef, _ in todo], cs.key)  # headers first: fail before any work
    dim = int(cs.meta["dim"])
    t0, rows = time.perf_counter(), 0
    tasks = [(str(catalog), name, cs.key, ef, str(out), dim, cs.meta["centroids_sha256"]) for ef, out in todo]
    try:
        for n in map_tasks(_assign_file, tasks, engine, desc=f"clusters {name}", progress=progress, unit="file",
                           start="spawn"):
            rows += n
    finally:
        _CENTROIDS.clear()  # this process's copy (tasks that ran here) is not needed any more
    _register_assignments(catalog)
    return {"cluster_set": name, "files": len(pairs), "assigned_files": len(todo), "rows": rows,
            "seconds": round(time.perf_counter() - t0, 3), "dir": str(d)}


#: per process: (catalog, set name, centroids sha256) -> centroids, so a process running many
#: assignment tasks (this one, a local worker, a Ray worker) loads a set's centroids once
_CENTROIDS: dict[tuple, np.ndarray] = {}


def _centroids(catalog, name: str, sha256: str) -> np.ndarray:
    key = (str(catalog), name, sha256)
    if key not in _CENTROIDS:
        _CENTROIDS.clear()  # one set at a time (100k x 768 centroids are 300 MB)
        _CENTROIDS[key] = get_cluster_set(catalog, name).centroids()
    return _CENTROIDS[key]


def _assign_file(catalog, name: str, key: str, ef, out, dim: int, centroids_sha256: str) -> int:
    """Nearest centroids of one pool file's embeddings -> ``out`` (parquet, atomic); row count."""
    centroids = _centroids(catalog, name, centroids_sha256)
    con = connect(catalog)
    try:
        labels = np.empty(ef.num_rows, np.int32)
        pos = 0
        for batch in iter_batches(ef, key, batch_rows=ASSIGN_ROWS, dim=dim):
            if batch.shape[1] != dim:
                raise ClusterError(f"{ef.npz}: '{key}' has dimension {batch.shape[1]}, cluster set '{name}' has {dim}")
            labels[pos : pos + len(batch)] = assign(batch, centroids)
            pos += len(batch)
        uids = con.execute('SELECT uid FROM pool WHERE file = ? ORDER BY "row"', [ef.file]).to_arrow_table()
        uid_col = uids.column("uid").combine_chunks()
        if len(uid_col) != ef.num_rows:
            raise ClusterError(f"pool file {ef.file}: read {len(uid_col)} uids, expected {ef.num_rows}")
        table = pa.table({
            "cluster_set": _constant(name, ef.num_rows),
            "uid": uid_col,
            "file": _constant(ef.file, ef.num_rows),
            "row": pa.array(np.arange(ef.num_rows, dtype=np.int64)),
            "cluster": pa.array(labels),
        })
        with atomic_path(out, suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
    finally:
        con.close()
    return ef.num_rows


def _constant(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value])).cast(pa.string())


def _register_assignments(catalog) -> None:
    files = []
    for cs in list_cluster_sets(catalog):
        d, pairs = _assignment_files(catalog, cs)
        if d.exists() and _assignments_valid(d, cs):
            files += [out for _, out in pairs if out.is_file()]
    if files:
        register_parquet_view(catalog, "cluster_assignments", files,
                              'cluster_set, uid, file, "row", cluster')


class _AssignmentsProducer:
    """``cluster_assignments`` for the cluster set named by the filter's ``clusters`` parameter."""

    view = "cluster_assignments"

    def _name(self, params) -> str:
        if "clusters" not in params:
            raise ClusterError("a filter reading cluster_assignments must declare "
                               "`SET VARIABLE clusters = 'NAME';`")
        return check_name(params["clusters"])

    def is_current(self, catalog, params) -> bool:
        cs = get_cluster_set(catalog, self._name(params))
        d, pairs = _assignment_files(catalog, cs)
        if not (d.exists() and _assignments_valid(d, cs)) or not all(out.is_file() for _, out in pairs):
            return False
        con = connect(catalog)
        try:
            row = con.execute("SELECT paths FROM curate_views WHERE name = 'cluster_assignments'").fetchone()
        finally:
            con.close()
        base = Path(catalog).resolve().parent
        registered = {str((base / p).resolve()) for p in (row[0] if row else [])}
        return all(str(out.resolve()) in registered for _, out in pairs)

    def build(self, catalog, params, progress: bool = True) -> None:
        assign_pool(catalog, self._name(params), progress=progress)

    def describe(self, catalog, params) -> dict:
        cs = get_cluster_set(catalog, self._name(params))
        return {"cluster_set": cs.name, "key": cs.key, "k": cs.meta["k"],
                "centroids_sha256": cs.meta["centroids_sha256"], "targets": cs.meta.get("targets")}


#: the producer registered as PRODUCERS["cluster_assignments"]
ASSIGNMENTS = _AssignmentsProducer()


# -- SQL function -------------------------------------------------------------------------------

def attach_nearest_centroid(con, catalog, name: str, function: str | None = None) -> str:
    """Register ``nearest_centroid_NAME(FLOAT[d]) -> INTEGER`` (BLAS in Arrow batches) on ``con``.

    Example::

        attach_embeddings(con, cat, "l14_img"); attach_nearest_centroid(con, cat, "xlarge")
        con.sql("SELECT nearest_centroid_xlarge(embedding) FROM embeddings_l14_img")
    """
    cs = get_cluster_set(catalog, name)
    c = cs.centroids()
    d = c.shape[1]
    function = function or "nearest_centroid_" + re.sub(r"[^A-Za-z0-9_]", "_", name)

    def udf(col):
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), d)
        return pa.array(nearest_centroid(x, c))

    con.create_function(function, udf, [duckdb.array_type(FLOAT, d)], INTEGER, type="arrow")
    return function
