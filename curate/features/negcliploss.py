"""negCLIPLoss: the CLIP score minus the CLIP-loss normalisation over K random batches of the pool.

Wang et al., "CLIPLoss and Norm-Based Data Selection Methods for Multimodal Contrastive
Learning" (NeurIPS 2024, arXiv:2405.19547), define for sample i with image embedding f_i and
text embedding g_i (the teacher's, here the pool's npz ``{arch}_img`` / ``{arch}_txt``)::

    s_ij = <f_i, g_j>
    R_B(i) = tau/2 * ( log sum_{j in B} exp(s_ij / tau) + log sum_{j in B} exp(s_ji / tau) )
    negCLIPLoss(i) = s_ii - 1/K * sum_{k=1..K} R_{B_k(i)}(i)

where B_k(i) is the batch that holds i in the k-th random partition of the pool into batches of
``batch_size`` (the last one smaller). This is ``-tau`` times the CLIP loss of i averaged over the
K batches, and ranks samples like it.

The batches span the whole pool, so the work is two passes of tasks of
:func:`curate.engine.map_tasks`, neither of which holds more than one batch of embeddings:

1. **per batch group**: round k's partition is a keyed pseudo-random *permutation* of the global
   row ids 0..N-1 (a Feistel network over the next power of four, cycle-walked into [0, N),
   keys from SHA-256 of ``(seed, k)``), so any position's row id, and any row's position, is
   computed on the spot from ``(seed, k, N)``: no list of N ids is ever built. Batch b is
   positions ``[b*B, (b+1)*B)``. A task gathers its batches' embeddings from the converted
   float32 ``.npy`` files (memory maps: ``curate embeddings convert`` is run first for the two
   keys), computes the row and column log-sum-exps of ``S / tau`` in row chunks (memory
   ``chunk x B``, never ``B x B``), and writes ``R`` in position order to a work file;
2. **per pool file**: each row's position in each round (the inverse permutation) locates its
   ``R`` values; with ``s_ii`` from the file's own embeddings this gives the file's table
   ``negcliploss/{arch}/{file}.parquet`` (``uid, file, row, arch, value``), written atomically
   with its settings and source identity in the parquet metadata.

Every value depends only on ``(seed, k, N, batch_size, tau)`` and the embeddings, never on which
worker or engine ran what, so local, ``--workers`` and ``--engine ray`` give the same bytes.
Both passes skip finished work, so a killed build resumes. The view ``negcliploss`` covers
every arch built (one setting per arch; asking for other settings rebuilds that arch).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.atomic import atomic_path, write_json
from curate.catalog.connection import connect, default_catalog, features_dir
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.features.embeddings import EmbeddingFile, convert_embeddings, open_npy, pool_embedding_files
from curate.features.tables import npz_identity, read_table_meta, register_file_tables, write_file_table

VIEW = "negcliploss"
META_KEY = b"curate.negcliploss"
SCHEMA_VERSION = 1
ARCHS = ("l14", "b32")
#: the paper's settings (its code: tau 0.01 = OpenAI CLIP's learned temperature, batch 32768, K 10)
DEFAULTS = {"arch": "l14", "tau": 0.01, "batch_size": 32768, "k": 10, "seed": 0}
#: score-matrix rows per step inside a batch (chunk x batch_size float32 cells)
SCORE_CELLS = 1 << 24
#: positions per pass-1 task (whole batches; at least one batch)
TASK_POSITIONS = 1 << 21
FEISTEL_ROUNDS = 6

OUTPUT_SCHEMA = pa.schema([("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                           ("arch", pa.string()), ("value", pa.float32())])


class NegCLIPLossError(CurateError):
    """Bad negCLIPLoss settings or inputs."""


# -- settings ------------------------------------------------------------------------------------

def settings_from(params: dict | None = None, **overrides) -> dict:
    """Checked settings from a filter's parameters (``arch``, ``tau``, ``batch_size``, ``k``,
    ``seed``) and keyword overrides; missing ones take :data:`DEFAULTS`."""
    s = dict(DEFAULTS)
    for src in (params or {}, overrides):
        for name in DEFAULTS:
            if src.get(name) is not None:
                s[name] = src[name]
    arch = str(s["arch"])
    if arch not in ARCHS:
        raise NegCLIPLossError(f"negcliploss parameter arch: {arch!r} is not one of {', '.join(ARCHS)}")
    try:
        tau = float(s["tau"])
        batch, k, seed = int(s["batch_size"]), int(s["k"]), int(s["seed"])
    except (TypeError, ValueError) as e:
        raise NegCLIPLossError(f"negcliploss parameters: {e}") from None
    if not (tau > 0 and np.isfinite(tau)):
        raise NegCLIPLossError(f"negcliploss parameter tau: {tau} must be a positive number")
    if batch < 2:
        raise NegCLIPLossError(f"negcliploss parameter batch_size: {batch} must be at least 2")
    if k < 1:
        raise NegCLIPLossError(f"negcliploss parameter k: {k} must be at least 1")
    if seed < 0:
        raise NegCLIPLossError(f"negcliploss parameter seed: {seed} must be >= 0")
    return {"schema": SCHEMA_VERSION, "arch": arch, "tau": tau, "batch_size": batch, "k": k, "seed": seed}


# -- the keyed permutation of global row ids -----------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=256)
def _keys(seed: int, k: int) -> tuple[int, ...]:
    return tuple(int.from_bytes(hashlib.sha256(f"curate-negcliploss:{seed}:{k}:{r}".encode()).digest()[:8], "little")
                 for r in range(FEISTEL_ROUNDS))


def _half_bits(n: int) -> int:
    return max(1, ((max(1, n - 1)).bit_length() + 1) // 2)


def _feistel(x: np.ndarray, keys, h: int, inverse: bool) -> np.ndarray:
    mask = np.uint64((1 << h) - 1)
    left, right = x >> np.uint64(h), x & mask
    with np.errstate(over="ignore"):
        if not inverse:
            for key in keys:
                left, right = right, left ^ (_mix(right ^ np.uint64(key)) & mask)
        else:
            for key in reversed(keys):
                left, right = right ^ (_mix(left ^ np.uint64(key)) & mask), left
    return (left << np.uint64(h)) | right


def _walk(x: np.ndarray, n: int, seed: int, k: int, inverse: bool) -> np.ndarray:
    keys, h = _keys(seed, k), _half_bits(n)
    y = _feistel(np.asarray(x, np.uint64), keys, h, inverse)
    out = y >= np.uint64(n)
    while out.any():  # cycle-walking: the domain is < 4n, so a few steps at most on average
        y[out] = _feistel(y[out], keys, h, inverse)
        out = y >= np.uint64(n)
    return y.astype(np.int64)


def rows_at(positions, n: int, seed: int, k: int) -> np.ndarray:
    """Global row ids at ``positions`` of round ``k``'s permutation of ``0..n-1``."""
    return _walk(positions, n, seed, k, inverse=False)


def positions_of(rows, n: int, seed: int, k: int) -> np.ndarray:
    """Positions of global row ids ``rows`` in round ``k``'s permutation (inverse of :func:`rows_at`)."""
    return _walk(rows, n, seed, k, inverse=True)


def batch_of(rows, n: int, batch_size: int, seed: int, k: int) -> np.ndarray:
    """The batch (0-based) of each global row id in round ``k``: ``position // batch_size``."""
    return positions_of(rows, n, seed, k) // batch_size


# -- the normalisation term of one batch ---------------------------------------------------------

def _cuda() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def batch_normalisers(img: np.ndarray, txt: np.ndarray, tau: float) -> np.ndarray:
    """``R(i) = tau/2 * (LSE_j s_ij/tau + LSE_j s_ji/tau)`` for every member of one batch
    (``img``/``txt`` its members' embeddings, rows aligned), float64.

    float32 products (BLAS, the image rows pre-scaled by 1/tau), log-sum-exps stabilised by each
    row's and column's maximum (float32 exps and pairwise sums, carried across row chunks in
    float64); the score matrix is made ``SCORE_CELLS // B`` rows at a time into reused buffers.
    """
    got = _gpu_normalisers(img, txt, tau)
    if got is not None:
        return got
    x = np.ascontiguousarray(img, np.float32) * np.float32(1.0 / tau)  # S / tau straight from the product
    yt = np.ascontiguousarray(txt, np.float32).T  # (d, B) view; sgemm handles the transpose
    b = len(x)
    step = max(1, SCORE_CELLS // b)
    scores = np.empty((min(step, b), b), np.float32)
    work = np.empty_like(scores)
    row_lse = np.empty(b, np.float64)
    col_max = np.full(b, -np.inf, np.float32)
    col_sum = np.zeros(b, np.float64)
    for i in range(0, b, step):
        j = min(b, i + step)
        s, e = scores[: j - i], work[: j - i]
        np.matmul(x[i:j], yt, out=s)
        m = s.max(axis=1)
        np.subtract(s, m[:, None], out=e)
        np.exp(e, out=e)
        row_lse[i:j] = m.astype(np.float64) + np.log(e.sum(axis=1).astype(np.float64))
        new_max = np.maximum(col_max, s.max(axis=0))
        np.subtract(s, new_max[None, :], out=e)
        np.exp(e, out=e)
        col_sum = col_sum * np.exp((col_max - new_max).astype(np.float64)) + e.sum(axis=0)
        col_max = new_max
    col_lse = col_max.astype(np.float64) + np.log(col_sum)
    return 0.5 * tau * (row_lse + col_lse)


def _gpu_normalisers(img, txt, tau) -> np.ndarray | None:
    """The same on a CUDA device with torch, when one is present (None otherwise)."""
    if not _cuda():
        return None
    try:
        import torch  # lazy: optional extra [torch], only on machines with an NVIDIA device
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img, np.float32)).cuda()
        y = torch.from_numpy(np.ascontiguousarray(txt, np.float32)).cuda()
        s = (x * (1.0 / tau)) @ y.T
        r = torch.logsumexp(s, dim=1).double() + torch.logsumexp(s, dim=0).double()
        return (0.5 * tau * r).cpu().numpy()


# -- the pool ---------------------------------------------------------------------------------

@dataclass
class PoolFile:
    file: str
    num_rows: int
    row_start: int
    img: EmbeddingFile
    txt: EmbeddingFile


def _keys_of(arch: str) -> tuple[str, str]:
    return f"{arch}_img", f"{arch}_txt"


def pool_files(catalog, arch: str) -> list[PoolFile]:
    """The pool's files in global row order (``row_start``), with their embedding files."""
    ik, tk = _keys_of(arch)
    con = connect(catalog)
    try:
        starts = dict(con.execute("SELECT file, row_start FROM pool_files").fetchall())
        imgs = pool_embedding_files(catalog, ik, con)
        txts = pool_embedding_files(catalog, tk, con)
    finally:
        con.close()
    files = [PoolFile(i.file, i.num_rows, int(starts[i.file]), i, t) for i, t in zip(imgs, txts)]
    files.sort(key=lambda f: f.row_start)
    pos = 0
    for f in files:
        if f.row_start != pos:
            raise NegCLIPLossError(f"pool file {f.file}: row_start {f.row_start}, expected {pos} "
                                   f"(the catalog's global row numbering has a gap)")
        pos += f.num_rows
    return files


def _out_dir(catalog, arch: str) -> Path:
    con = connect(catalog)
    try:
        return features_dir(con, catalog) / VIEW / arch
    finally:
        con.close()


@dataclass
class Plan:
    catalog: Path
    settings: dict
    files: list[PoolFile]
    out_dir: Path
    sources: dict
    todo: list[PoolFile] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(f.num_rows for f in self.files)

    def output(self, f: PoolFile) -> Path:
        return self.out_dir / f"{f.file}.parquet"

    @property
    def work_dir(self) -> Path:
        ident = json.dumps({"settings": self.settings, "n": self.n,
                            "files": [[f.file, f.num_rows, self.sources[f.file]] for f in self.files]},
                           sort_keys=True)
        return self.out_dir / f"_work-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def plan(catalog, settings: dict, force: bool = False) -> Plan:
    catalog = Path(catalog) if catalog else default_catalog()
    files = pool_files(catalog, settings["arch"])
    if not files:
        raise NegCLIPLossError(f"{catalog}: the pool has no files")
    sources = {f.file: npz_identity(f.img, "key needed for negcliploss") for f in files}
    p = Plan(catalog, settings, files, _out_dir(catalog, settings["arch"]), sources)
    for f in files:
        meta = None if force else read_table_meta(p.output(f), META_KEY)
        ok = (meta is not None and meta.get("settings") == settings and meta.get("rows") == f.num_rows
              and meta.get("source") == sources[f.file] and meta.get("n") == p.n)
        if not ok:
            p.todo.append(f)
    return p


# -- pass 1: normalisers per batch group --------------------------------------------------------

def _group_size(batch: int) -> int:
    return max(1, TASK_POSITIONS // batch) * batch


def _work_file(work_dir: Path, k: int, group: int) -> Path:
    return Path(work_dir) / f"r{k:04d}_{group:08d}.npy"


#: per process: the open memory maps of a pool's embedding files (path -> array)
_MAPS: dict[str, np.ndarray] = {}


def _map(ef: EmbeddingFile, key: str, dim: int | None) -> np.ndarray:
    name = str(ef.npy)
    if name not in _MAPS:
        if len(_MAPS) > 8192:
            _MAPS.clear()
        _MAPS[name] = open_npy(ef, key, dim)
    return _MAPS[name]


def gather(files: list[PoolFile], rows: np.ndarray, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings (float32) of global row ids ``rows``, in that order.

    One sort groups the rows by pool file (O(B log B), whatever the number of files); each
    file's rows are read from its memory maps in row order.
    """
    ik, tk = _keys_of(arch)
    starts = np.array([f.row_start for f in files], np.int64)
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")  # by global row: by file, then by row inside it
    which = np.searchsorted(starts, rows[order], side="right") - 1
    cuts = np.flatnonzero(np.diff(which)) + 1
    img = txt = None
    for seg in np.split(np.arange(len(order)), cuts):
        if not len(seg):
            continue
        f = files[int(which[seg[0]])]
        sel = order[seg]
        local = rows[sel] - f.row_start
        a, b = _map(f.img, ik, None), _map(f.txt, tk, None)
        if img is None:
            img = np.empty((len(rows), a.shape[1]), np.float32)
            txt = np.empty((len(rows), b.shape[1]), np.float32)
        img[sel] = a[local]
        txt[sel] = b[local]
    return img, txt


def _pass1_task(catalog: str, settings: dict, files: list[PoolFile], n: int, k: int, group: int,
                out: str) -> int:
    """Round ``k``, batch group ``group``: write R of its positions (float64, position order)."""
    out = Path(out)
    if out.is_file():
        return 0
    b, size = settings["batch_size"], _group_size(settings["batch_size"])
    start, stop = group * size, min(n, (group + 1) * size)
    values = np.empty(stop - start, np.float64)
    for p0 in range(start, stop, b):
        p1 = min(stop, p0 + b)
        rows = rows_at(np.arange(p0, p1, dtype=np.uint64), n, settings["seed"], k)
        img, txt = gather(files, rows, settings["arch"])
        values[p0 - start:p1 - start] = batch_normalisers(img, txt, settings["tau"])
    with atomic_path(out, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, values, allow_pickle=False)
    return stop - start


# -- pass 2: one pool file's table ----------------------------------------------------------------

def _pass2_task(catalog: str, settings: dict, f: PoolFile, n: int, work_dir: str, out: str,
                source: dict) -> int:
    """The negCLIPLoss table of one pool file, from its own embeddings and pass 1's work files."""
    arch, b = settings["arch"], settings["batch_size"]
    ik, tk = _keys_of(arch)
    size = _group_size(b)
    img, txt = _map(f.img, ik, None), _map(f.txt, tk, None)
    rows = f.num_rows
    clip = np.empty(rows, np.float32)
    step = 65536
    for i in range(0, rows, step):
        x, y = np.asarray(img[i:i + step], np.float32), np.asarray(txt[i:i + step], np.float32)
        clip[i:i + step] = np.einsum("ij,ij->i", x, y)
    norm = np.zeros(rows, np.float64)
    global_rows = np.arange(f.row_start, f.row_start + rows, dtype=np.uint64)
    for k in range(settings["k"]):
        pos = positions_of(global_rows, n, settings["seed"], k)
        order = np.argsort(pos, kind="stable")  # by work file, then by offset inside it
        groups = pos[order] // size
        for seg in np.split(np.arange(rows), np.flatnonzero(np.diff(groups)) + 1):
            if not len(seg):
                continue
            g, sel = int(groups[seg[0]]), order[seg]
            path = _work_file(Path(work_dir), k, g)
            try:
                r = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise NegCLIPLossError(f"{path}: pass-1 work file unreadable ({e}); rebuild with --force") from None
            norm[sel] += r[pos[sel] - g * size]
    value = (clip.astype(np.float64) - norm / settings["k"]).astype(np.float32)
    con = connect(catalog)
    try:
        uids = con.execute('SELECT uid FROM pool WHERE file = ? ORDER BY "row"', [f.file]).to_arrow_table()
    finally:
        con.close()
    uid = uids.column("uid").combine_chunks()
    if len(uid) != rows:
        raise NegCLIPLossError(f"pool file {f.file}: read {len(uid)} uids, expected {rows}")
    meta = {"file": f.file, "rows": rows, "n": n, "settings": settings, "source": source}
    return write_file_table(out, uid, f.file, {"arch": arch, "value": value}, OUTPUT_SCHEMA, META_KEY, meta)


# -- build -------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    settings: dict
    files: int = 0
    computed: list[str] = field(default_factory=list)
    rows_computed: int = 0
    rows_total: int = 0
    batches: int = 0
    out_dir: Path | None = None
    elapsed: float = 0.0


def _register(catalog: Path) -> None:
    """The view over every arch's tables of the pool's current files."""
    register_file_tables(catalog, VIEW, _out_dir(catalog, "x").parent, ARCHS, 'uid, file, "row", arch, value')


def build_negcliploss(catalog=None, params: dict | None = None, progress: bool = True, force: bool = False,
                      engine: Engine | None = None, **overrides) -> BuildResult:
    """Compute negCLIPLoss for every pool file lacking a current table; register the view.

    ``params``/``overrides``: ``arch``, ``tau``, ``batch_size``, ``k``, ``seed``.
    """
    t0 = time.perf_counter()
    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    settings = settings_from(params, **overrides)
    ik, tk = _keys_of(settings["arch"])
    p = plan(catalog, settings, force)
    res = BuildResult(settings, files=len(p.files), rows_total=p.n, out_dir=p.out_dir)
    if p.todo:
        for key in (ik, tk):  # random access needs the float32 .npy (resumable, skips done files)
            convert_embeddings(catalog, key, progress=progress)
        p = plan(catalog, settings, force)
        dims = {open_npy(f.img, ik).shape[1] for f in p.files} | {open_npy(f.txt, tk).shape[1] for f in p.files}
        if len(dims) != 1:
            raise NegCLIPLossError(f"{ik}/{tk}: image and text embeddings differ in width ({sorted(dims)})")
        work = p.work_dir
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / "settings.json", {"settings": settings, "n": p.n})
        size = _group_size(settings["batch_size"])
        groups = -(-p.n // size)
        tasks = [(str(catalog), settings, p.files, p.n, k, g, str(_work_file(work, k, g)))
                 for k in range(settings["k"]) for g in range(groups) if not _work_file(work, k, g).is_file()]
        sizes = [min(p.n, (t[5] + 1) * size) - t[5] * size for t in tasks]
        for _ in map_tasks(_pass1_task, tasks, engine, desc=f"negcliploss {settings['arch']} batches",
                           progress=progress, unit="row", sizes=sizes, start="spawn"):
            pass
        res.batches = settings["k"] * -(-p.n // settings["batch_size"])
        tasks2 = [(str(catalog), settings, f, p.n, str(work), str(p.output(f)), p.sources[f.file]) for f in p.todo]
        for f, rows in zip(p.todo, map_tasks(_pass2_task, tasks2, engine, desc=f"negcliploss {settings['arch']} files",
                                             progress=progress, unit="row", sizes=[f.num_rows for f in p.todo],
                                             start="spawn")):
            res.computed.append(f.file)
            res.rows_computed += rows
        _MAPS.clear()
        shutil.rmtree(work, ignore_errors=True)
    for stale in p.out_dir.glob("_work-*") if p.out_dir.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # work of other settings, superseded
    _register(catalog)
    res.elapsed = time.perf_counter() - t0
    return res


class _Producer:
    """``negcliploss`` for :mod:`curate.features.registry`, with the filter's parameters."""

    view = VIEW

    def is_current(self, catalog, params) -> bool:
        catalog = (Path(catalog) if catalog else default_catalog()).resolve()
        try:
            settings = settings_from(params)
            p = plan(catalog, settings)
        except CurateError:
            return False
        if p.todo:
            return False
        con = connect(catalog)
        try:
            row = con.execute("SELECT paths FROM curate_views WHERE name = ?", [VIEW]).fetchone()
        finally:
            con.close()
        base = catalog.parent
        registered = {str((base / q).resolve()) for q in (row[0] if row else [])}
        return all(str(p.output(f).resolve()) in registered for f in p.files)

    def build(self, catalog, params, progress: bool = True) -> None:
        res = build_negcliploss(catalog, params, progress=progress)
        if progress:
            print(f"negcliploss[{res.settings['arch']}]: computed {len(res.computed)} file(s) "
                  f"({res.rows_computed:,} rows), in {res.elapsed:.1f}s", file=sys.stderr, flush=True)

    def describe(self, catalog, params) -> dict:
        return {"settings": settings_from(params)}


PRODUCER = _Producer()
