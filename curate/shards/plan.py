"""The resharder's plan: which input bytes go to which output shard, decided before anything is written.

:func:`plan_reshard` validates a reshard request (outputs, subsets, class maps), gets the shard
index of the inputs (:func:`curate.shards.index.index_for`: the catalog's, else a scan of the
tar headers) and joins it with each output's subset in DuckDB. Each output's :class:`Plan` lists
its samples in output order, one row per copy: ordered by (input shard, position in the tar),
copies adjacent, cut into output shards of ``shard_size`` samples (or about ``max_shard_bytes``).
:func:`shard_tasks` turns one output's plan into :class:`ShardTask` s, one per output shard still
to write, each carrying only the rows, input paths and face boxes it needs. The writing is
:mod:`curate.shards.reshard`'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.catalog.connection import connect
from curate.errors import CurateError
from curate.safepickle import safe_load
from curate.shards.index import index_for
from curate.subset import open_subset
from curate.uids import hex_array_to_pairs, pairs_to_hex_array

OUTPUT_SHARD_FORMAT = "{:08d}.tar"
OUTPUT_STATS_FORMAT = "{:08d}_stats.json"
MAX_SHARD_BYTES = 3_000_000_000  # DataComp's hard-coded cap per output tar


class ReshardError(CurateError):
    """A reshard request that cannot be carried out as given."""


@dataclass
class Output:
    """One output of a reshard: a directory, the subset that selects its samples, optional classes."""

    out_dir: Path
    subset_file: Path
    cls: dict | str | os.PathLike | None = None


# ------------------------------------------------------------------------------------ cls maps

def load_cls_map(src) -> dict[str, int]:
    """uid -> class id from TiC's pickle (restricted unpickler), a parquet or a JSON file.

    A dict is accepted as is. Parquet needs columns ``uid`` and ``cls`` (or ``class_id``).
    """
    if src is None:
        return None
    if isinstance(src, dict):
        m = src
        origin = "cls map"
    else:
        path = Path(src)
        origin = str(path)
        if not path.is_file():
            raise ReshardError(f"{path}: cls file not found")
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PAR1":
            try:
                t = pq.read_table(path)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise ReshardError(f"{path}: not a readable parquet cls file (truncated or corrupt: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            col = "cls" if "cls" in t.column_names else "class_id" if "class_id" in t.column_names else None
            if "uid" not in t.column_names or col is None:
                raise ReshardError(f"{path}: a parquet cls file needs columns uid and cls (or class_id); "
                                   f"found {', '.join(t.column_names)}")
            m = dict(zip(t.column("uid").to_pylist(), t.column(col).to_pylist()))
        elif head[:1] == b"\x80":  # pickle protocol 2+ (what TiC ships)
            m = safe_load(path)
        else:
            try:
                m = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ReshardError(f"{path}: neither a pickle, a parquet nor a JSON object of uid -> class id "
                                   f"({e})") from None
    if not isinstance(m, dict):
        raise ReshardError(f"{origin}: expected a mapping uid -> class id, got a {type(m).__name__}")
    out = {}
    for k, v in m.items():
        if not isinstance(k, str) or len(k) != 32:
            raise ReshardError(f"{origin}: key {k!r} is not a 32-character uid")
        try:
            iv = int(v)
        except (TypeError, ValueError):
            raise ReshardError(f"{origin}: class id {v!r} of uid {k} is not an integer") from None
        if iv != v:
            raise ReshardError(f"{origin}: class id {v!r} of uid {k} is not an integer")
        out[k.lower()] = iv
    return out


# --------------------------------------------------------------------------- one output's plan

@dataclass
class Plan:
    """Selected samples of one output in output order, one row per copy."""

    shard: np.ndarray  # int32 plan shard id
    offset: np.ndarray  # int64 byte offset of the sample in its tar
    length: np.ndarray  # int64
    hi: np.ndarray
    lo: np.ndarray
    j: np.ndarray  # copy number
    cls: np.ndarray | None
    bounds: list  # output shard i = rows bounds[i]:bounds[i+1]
    counts: dict

    @property
    def shard_count(self) -> int:
        return len(self.bounds) - 1

    def sizes(self) -> dict[str, int]:
        """``sizes.json``: samples per output shard, by file name."""
        return {OUTPUT_SHARD_FORMAT.format(i): self.bounds[i + 1] - self.bounds[i] for i in range(self.shard_count)}


def _subset_table(path: Path) -> tuple[pa.Table, int]:
    arr = open_subset(path)
    n = len(arr)
    return pa.table({"hi": pa.array(np.asarray(arr["f0"]), pa.uint64()),
                     "lo": pa.array(np.asarray(arr["f1"]), pa.uint64())}), n


def _plan_output(con, out: Output, cls_map, shard_size: int, max_bytes: int) -> Plan:
    """The plan of one output from ``con``'s ``plan_index`` (see :func:`index_for`)."""
    sub, n = _subset_table(out.subset_file)
    con.register("_subset", sub)
    try:
        # one row per distinct selected uid, taken from its first input sample with a json
        # (DataComp's membership test needs the json's uid); k = copies wanted
        rows = con.execute("""
            WITH s AS (SELECT hi, lo, count(*)::BIGINT AS k FROM _subset GROUP BY hi, lo),
            m AS (
                SELECT i.shard_id, i."offset", i.length, s.hi, s.lo, s.k,
                       count(*) OVER (PARTITION BY s.hi, s.lo) AS n_in_input
                FROM s JOIN plan_index i ON i.uid_hi = s.hi AND i.uid_lo = s.lo AND i.has_json
                QUALIFY row_number() OVER (PARTITION BY s.hi, s.lo ORDER BY i.shard_id, i."offset") = 1
            )
            SELECT * FROM m ORDER BY shard_id, "offset"
        """).to_arrow_table()
        no_json = con.execute("""
            SELECT coalesce(sum(k), 0) FROM (SELECT hi, lo, count(*) AS k FROM _subset GROUP BY hi, lo) s
            WHERE EXISTS (SELECT 1 FROM plan_index i WHERE i.uid_hi = s.hi AND i.uid_lo = s.lo AND NOT i.has_json)
              AND NOT EXISTS (SELECT 1 FROM plan_index i WHERE i.uid_hi = s.hi AND i.uid_lo = s.lo AND i.has_json)
        """).fetchone()[0]
    finally:
        con.unregister("_subset")
    k = np.asarray(rows.column("k"), np.int64)
    present = int(k.sum())
    counts = {
        "subset_count": n,
        "subset_entries_present": present,
        "no_json_entries": int(no_json),
        "absent_uids": n - present - int(no_json),
        "input_duplicates": int((np.asarray(rows.column("n_in_input")) > 1).sum()),
    }
    rep = lambda name, dt: np.repeat(np.asarray(rows.column(name), dt), k)  # noqa: E731
    shard, offset, length = rep("shard_id", np.int32), rep("offset", np.int64), rep("length", np.int64)
    hi, lo = rep("hi", np.uint64), rep("lo", np.uint64)
    # copy number within each uid's run: position minus the run's start
    starts = np.repeat(np.cumsum(k) - k, k)
    j = np.arange(present, dtype=np.int64) - starts
    cls = None
    if cls_map is not None:
        cls = np.repeat(_classes(rows, cls_map, out), k)
    bounds = _cut(length, shard_size, max_bytes)
    return Plan(shard, offset, length, hi, lo, j, cls, bounds, counts)


def _classes(rows: pa.Table, cls_map: dict, out: Output) -> np.ndarray:
    """The class id of each distinct selected uid; every one must have one."""
    cls = np.empty(len(rows), np.int64)
    uids = pairs_to_hex_array(np.asarray(rows.column("hi"), np.uint64), np.asarray(rows.column("lo"), np.uint64))
    missing = []
    for i, u in enumerate(uids.to_pylist()):
        v = cls_map.get(u)
        if v is None:
            missing.append(u)
        else:
            cls[i] = v
    if missing:
        raise ReshardError(
            f"{out.subset_file}: {len(missing):,} selected uids have no class in the cls file "
            f"(first: {missing[0]}); nothing was written")
    return cls


def _cut(length: np.ndarray, shard_size: int, max_bytes: int) -> list[int]:
    """Output shard boundaries: at most ``shard_size`` samples and about ``max_bytes`` each."""
    n = len(length)
    csum = np.concatenate(([0], np.cumsum(length)))
    bounds, a = [0], 0
    while a < n:
        b = min(a + shard_size, n)
        by_bytes = int(np.searchsorted(csum, csum[a] + max_bytes, "right")) - 1
        b = max(a + 1, min(b, by_bytes))
        bounds.append(b)
        a = b
    return bounds


def present_count(inputs, subset_file, catalog=None) -> dict:
    """How many entries of a subset an input holds (the counts a reshard of it reports)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    con = duckdb.connect()  # a scratch database for the planning tables
    try:
        index_for(con, [Path(i) for i in inputs], catalog=catalog)
        return _plan_output(con, Output(Path("-"), Path(subset_file)), None, 1 << 62, MAX_SHARD_BYTES).counts
    finally:
        con.close()


# ---------------------------------------------------------------------------------- the job

@dataclass
class ReshardPlan:
    """A whole reshard job as planned: its inputs, and per output its directory, classes and plan."""

    inputs: list[Path]
    outputs: list[Output]
    dirs: list[Path]  # each output's directory, resolved
    cls_maps: list  # each output's uid -> class id, or None
    plans: list[Plan]
    files: list[tuple]  # the input tars: (shard_id, root, name, size, truncated, has_stats)
    input_files: list[tuple]  # the input tars as planned: (root, name, size, mtime_ns)
    index: dict  # what the shard index came from (index_for's counts)
    shard_size: int
    max_shard_bytes: int

    @property
    def paths(self) -> dict[int, str]:
        """Plan shard id -> input tar path."""
        return {sid: str(Path(root) / name) for sid, root, name, *_ in self.files}

    @property
    def bytes_total(self) -> int:
        return int(sum(size for _, _, _, size, *_ in self.files))

    @property
    def truncated_inputs(self) -> list[str]:
        return [n for _, _, n, _, tr, _ in self.files if tr]

    @property
    def inputs_without_stats(self) -> list[str]:
        return [n for _, _, n, _, _, hs in self.files if not hs]


def _as_outputs(outputs) -> list[Output]:
    """``Output`` s from ``Output`` s or ``(out_dir, subset_file[, cls])`` tuples."""
    return [o if isinstance(o, Output) else Output(Path(o[0]), Path(o[1]), o[2] if len(o) > 2 else None)
            for o in outputs]


def plan_reshard(inputs, outputs, *, shard_size: int, max_shard_bytes: int = MAX_SHARD_BYTES, catalog=None,
                 workers: int = 1, progress: bool = False) -> ReshardPlan:
    """Check a reshard request and plan every output in one pass over the inputs' shard index.

    Everything the user gave is validated before any output directory is touched. ``workers``
    local processes scan the input tars the catalog's index does not cover.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(i) for i in inputs]
    if shard_size < 1:
        raise ReshardError(f"--shard-size {shard_size}: must be at least 1")
    outs = _as_outputs(outputs)
    dirs = [Path(o.out_dir).resolve() for o in outs]
    if len(set(dirs)) != len(dirs):
        raise ReshardError("two outputs share one output directory")
    for a in dirs:
        for b in dirs:
            if a != b and a.is_relative_to(b):
                raise ReshardError(f"{a}: an output directory cannot be inside another output ({b})")
    for i in inputs:
        ri = Path(i).resolve()
        for d, o in zip(dirs, outs):
            if ri == d:
                raise ReshardError(f"{o.out_dir}: the output directory is also an input; choose another one")
            if ri.is_relative_to(d):
                raise ReshardError(f"{o.out_dir}: the output directory contains the input {i}; "
                                   f"choose one outside it")
            if d.is_relative_to(ri):
                raise ReshardError(f"{o.out_dir}: the output directory is inside the input {i}; "
                                   f"choose one outside it")
    cls_maps = [load_cls_map(o.cls) for o in outs]
    for o in outs:
        open_subset(o.subset_file)
    con = duckdb.connect()  # a scratch database for the planning tables
    try:
        info = index_for(con, inputs, catalog=catalog, workers=workers, progress=progress)
        files = con.execute(
            "SELECT shard_id, root, name, size, truncated, has_stats FROM plan_files ORDER BY shard_id").fetchall()
        input_files = con.execute("SELECT root, name, size, mtime_ns FROM plan_files ORDER BY shard_id").fetchall()
        plans = [_plan_output(con, o, m, shard_size, max_shard_bytes) for o, m in zip(outs, cls_maps)]
    finally:
        con.close()
    return ReshardPlan(inputs, outs, dirs, cls_maps, plans, files, input_files, info, shard_size, max_shard_bytes)


# --------------------------------------------------------------------------------- the tasks

@dataclass
class ShardTask:
    """Everything needed to write one output shard (sent to a worker process or Ray task)."""

    out_dir: str
    index: int  # output shard number
    paths: dict  # plan shard id -> tar path (only the ones this task needs)
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    j: np.ndarray
    cls: np.ndarray | None
    boxes: dict | None  # (hi, lo) -> face boxes from the catalog, when blurring from the pool
    apply_blur: bool
    inject_blur: bool


def shard_tasks(plan: Plan, out_dir: Path, paths: dict[int, str], boxes: dict | None, apply_blur: bool,
                inject_blur: bool, done: Callable[[int, int], bool] | None = None) -> list[ShardTask]:
    """One task per output shard of ``plan``, leaving out those ``done(i, samples)`` says are complete."""
    tasks = []
    for i in range(plan.shard_count):
        a, b = plan.bounds[i], plan.bounds[i + 1]
        if done is not None and done(i, b - a):
            continue
        sl = slice(a, b)
        need = {int(s): paths[int(s)] for s in np.unique(plan.shard[sl])}
        task_boxes = None
        if boxes is not None:  # only this shard's entries travel to its worker
            task_boxes = {k: boxes[k] for k in zip(plan.hi[sl].tolist(), plan.lo[sl].tolist()) if k in boxes}
        tasks.append(ShardTask(
            str(out_dir), i, need, plan.shard[sl], plan.offset[sl], plan.length[sl], plan.hi[sl],
            plan.lo[sl], plan.j[sl], None if plan.cls is None else plan.cls[sl], task_boxes,
            apply_blur, inject_blur))
    return tasks


def pool_boxes(catalog, hi: np.ndarray, lo: np.ndarray) -> dict:
    """face_bboxes from the catalog's pool view for the given uids."""
    con = connect(catalog, read_only=True)
    try:
        con.register("_sel", pa.table({"uid": pairs_to_hex_array(hi, lo)}))
        # only uids with faces are kept: the others need no entry (no boxes = nothing to blur)
        t = con.execute("SELECT p.uid, p.face_bboxes FROM pool p SEMI JOIN _sel s ON p.uid = s.uid "
                        "WHERE len(p.face_bboxes) > 0").to_arrow_table()
    finally:
        con.close()
    h, l_ = hex_array_to_pairs(t.column("uid"))
    return {(int(a), int(b)): v or [] for a, b, v in zip(h, l_, t.column("face_bboxes").to_pylist())}
