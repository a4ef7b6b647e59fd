"""NormSim: how close each pool image is to a target set (Wang et al., NeurIPS 2024).

For a target set T (:mod:`curate.features.targets`, rows L2-normalised) and the pool's L/14
image embedding f(i) (the npz's ``l14_img``, float16 read as float32, used as stored: DataComp's
embeddings are already unit vectors and the paper's code does not renormalise them)::

    normsim_inf(i) = max_t <f(t), f(i)>
    normsim_2(i)   = sqrt( mean_t <f(t), f(i)>^2 )

One task of :func:`curate.engine.map_tasks` per pool file streams its embeddings (the converted
``.npy`` if present, else straight from the npz) against the target rows in blocks (memory
``rows x target block``, whatever the pool or target size; BLAS float32 products, or torch on a
CUDA device when one is present) and writes ``normsim/{target_set}/{file}.parquet``
(``uid, file, row, target_set, normsim_inf, normsim_2``) atomically, with the target set's
sha256 and the npz identity in its metadata: a re-run skips current files, so a killed build
resumes. The view ``normsim`` covers every target set built.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.catalog.connection import connect, default_catalog
from curate.engine import Engine, map_tasks
from curate.errors import CurateError
from curate.features.embeddings import EmbeddingFile, iter_batches, pool_embedding_files
from curate.features.tables import SetPlan, feature_root, npz_identity, register_file_tables, write_file_table
from curate.features.targets import check_name, get_target_set, list_target_sets

VIEW = "normsim"
META_KEY = b"curate.normsim"
SCHEMA_VERSION = 1
KEY = "l14_img"
#: pool rows per step, and target rows per block (4096 x 16384 float32 scores = 256 MiB at most)
ROWS = 4096
TARGET_BLOCK = 16384

OUTPUT_SCHEMA = pa.schema([("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                           ("target_set", pa.string()), ("normsim_inf", pa.float32()),
                           ("normsim_2", pa.float32())])


class NormSimError(CurateError):
    """A pool or target set NormSim cannot use."""


def _cuda() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def normsim(x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normsim_inf, normsim_2) of rows ``x`` against ``targets`` (float32 products, the max and
    the mean of squares accumulated over target blocks in float64)."""
    got = _gpu_normsim(x, targets)
    if got is not None:
        return got
    x = np.ascontiguousarray(x, np.float32)
    n, m = len(x), len(targets)
    best = np.full(n, -np.inf, np.float64)
    sq = np.zeros(n, np.float64)
    for j in range(0, m, TARGET_BLOCK):
        t = np.ascontiguousarray(targets[j:j + TARGET_BLOCK], np.float32)
        s = x @ t.T
        best = np.maximum(best, s.max(axis=1))
        sq += np.einsum("ij,ij->i", s, s, dtype=np.float64)
    return best, np.sqrt(sq / m)


def _gpu_normsim(x, targets):
    if not _cuda():
        return None
    try:
        import torch  # lazy: optional extra [torch], only on machines with an NVIDIA device
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    with torch.no_grad():
        xg = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
        best = torch.full((len(x),), -float("inf"), dtype=torch.float64, device="cuda")
        sq = torch.zeros(len(x), dtype=torch.float64, device="cuda")
        for j in range(0, len(targets), TARGET_BLOCK):
            t = torch.from_numpy(np.ascontiguousarray(targets[j:j + TARGET_BLOCK], np.float32)).cuda()
            s = xg @ t.T
            best = torch.maximum(best, s.max(dim=1).values.double())
            sq += (s.double() ** 2).sum(dim=1)
        return best.cpu().numpy(), torch.sqrt(sq / len(targets)).cpu().numpy()


def plan(catalog, target_set: str, force: bool = False) -> SetPlan:
    catalog = Path(catalog) if catalog else default_catalog()
    ts = get_target_set(catalog, target_set)
    settings = {"schema": SCHEMA_VERSION, "key": KEY, "target_set": ts.name, "target_sha256": ts.meta["sha256"],
                "target_rows": ts.meta["rows"]}
    files = pool_embedding_files(catalog, KEY)
    sources = {ef.file: npz_identity(ef, f"key '{KEY}' needed for normsim") for ef in files}
    return SetPlan(ts.name, settings, feature_root(catalog, VIEW) / ts.name, files, sources).find_stale(
        META_KEY, force, lambda got: got == settings)


def _file_task(catalog: str, target_set: str, ef: EmbeddingFile, out: str, settings: dict, source: dict) -> int:
    """NormSim of one pool file against the target set -> ``out`` (parquet, atomic); its rows."""
    ts = get_target_set(catalog, target_set)
    if ts.meta["sha256"] != settings["target_sha256"]:
        raise NormSimError(f"target set '{target_set}' changed during the build; run it again")
    targets = ts.embeddings(mmap=True)
    inf = np.empty(ef.num_rows, np.float32)
    two = np.empty(ef.num_rows, np.float32)
    pos = 0
    for batch in iter_batches(ef, KEY, batch_rows=ROWS):
        if batch.shape[1] != targets.shape[1]:
            raise NormSimError(f"{ef.npz}: '{KEY}' has dimension {batch.shape[1]}, target set "
                               f"'{target_set}' has {targets.shape[1]}")
        a, b = normsim(batch, targets)
        inf[pos:pos + len(batch)] = a
        two[pos:pos + len(batch)] = b
        pos += len(batch)
    con = connect(catalog)
    try:
        uids = con.execute('SELECT uid FROM pool WHERE file = ? ORDER BY "row"', [ef.file]).to_arrow_table()
    finally:
        con.close()
    uid = uids.column("uid").combine_chunks()
    if len(uid) != ef.num_rows:
        raise NormSimError(f"pool file {ef.file}: read {len(uid)} uids, expected {ef.num_rows}")
    meta = {"file": ef.file, "rows": ef.num_rows, "settings": settings, "source": source}
    return write_file_table(out, uid, ef.file, {"target_set": target_set, "normsim_inf": inf, "normsim_2": two},
                            OUTPUT_SCHEMA, META_KEY, meta)


@dataclass
class BuildResult:
    target_set: str
    files: int = 0
    computed: list[str] = field(default_factory=list)
    rows_computed: int = 0
    rows_total: int = 0
    target_rows: int = 0
    out_dir: Path | None = None
    elapsed: float = 0.0


def _register(catalog: Path) -> None:
    register_file_tables(catalog, VIEW, feature_root(catalog, VIEW), [ts.name for ts in list_target_sets(catalog)],
                         'uid, file, "row", target_set, normsim_inf, normsim_2')


def build_normsim(catalog=None, target_set: str = "", progress: bool = True, force: bool = False,
                  engine: Engine | None = None) -> BuildResult:
    """NormSim of every pool file lacking a current table for ``target_set``; register the view."""
    t0 = time.perf_counter()
    catalog = (Path(catalog) if catalog else default_catalog()).resolve()
    p = plan(catalog, target_set, force)
    res = BuildResult(p.name, files=len(p.files), rows_total=sum(f.num_rows for f in p.files),
                      target_rows=p.settings["target_rows"], out_dir=p.out_dir)
    tasks = [(str(catalog), p.name, ef, str(p.output(ef)), p.settings, p.sources[ef.file]) for ef in p.todo]
    for ef, rows in zip(p.todo, map_tasks(_file_task, tasks, engine, desc=f"normsim {p.name}", progress=progress,
                                          unit="row", sizes=[ef.num_rows for ef in p.todo], start="spawn")):
        res.computed.append(ef.file)
        res.rows_computed += rows
    _register(catalog)
    res.elapsed = time.perf_counter() - t0
    return res


class _Producer:
    """``normsim`` for the target set named by the filter's ``targets`` parameter."""

    view = VIEW

    def _name(self, params) -> str:
        if not params or "targets" not in params:
            raise NormSimError("a filter reading normsim must declare `SET VARIABLE targets = 'NAME';`")
        return check_name(params["targets"])

    def is_current(self, catalog, params) -> bool:
        catalog = (Path(catalog) if catalog else default_catalog()).resolve()
        p = plan(catalog, self._name(params))  # a missing target set is reported, not rebuilt
        if p.todo:
            return False
        con = connect(catalog)
        try:
            row = con.execute("SELECT paths FROM curate_views WHERE name = ?", [VIEW]).fetchone()
        finally:
            con.close()
        registered = {str((catalog.parent / q).resolve()) for q in (row[0] if row else [])}
        return all(str(p.output(ef).resolve()) in registered for ef in p.files)

    def build(self, catalog, params, progress: bool = True) -> None:
        res = build_normsim(catalog, self._name(params), progress=progress)
        if progress:
            print(f"normsim[{res.target_set}]: computed {len(res.computed)} file(s) ({res.rows_computed:,} rows) "
                  f"against {res.target_rows:,} targets, in {res.elapsed:.1f}s", file=sys.stderr, flush=True)

    def describe(self, catalog, params) -> dict:
        ts = get_target_set(catalog, self._name(params))
        return {"target_set": ts.name, "rows": ts.meta["rows"], "sha256": ts.meta["sha256"]}


PRODUCER = _Producer()
