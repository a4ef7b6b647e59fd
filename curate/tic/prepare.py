"""Materialise a plan's training data: replay-buffer subsets, then every data dir in one reshard.

A plan (:mod:`curate.tic.plan`) names, per step, the data dirs to train on: exported year
splits (``{export_dir}/yearly/{YYYY}.npy`` -> ``tic/train/{YYYY}``) and replay buffers (a
``make`` rule: ``filters/tic/replay.sql`` with parameters -> a subset file -> a dir). This runs
the ``make`` filters (skipping subset files whose manifest records the same filter and
parameters) and hands every distinct dir to
:func:`curate.shards.reshard.reshard_many` as one multi-output job, so the pool's shards are planned
once for the whole plan and a year dir shared by several steps is written once. Directories
are resolved against ``root`` (default: the working directory), like ``curate tic train``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from curate import resources
from curate.catalog.connection import shards_dir
from curate.engine import Engine
from curate.run.runner import run_filter
from curate.shards.reshard import Output, reshard_many
from curate.tic import TicError
from curate.tic.plan import read_plan


@dataclass
class PrepareResult:
    """What :func:`prepare_plan` made: replay subsets written or kept, samples per data dir."""

    subsets_made: list[str] = field(default_factory=list)
    subsets_kept: list[str] = field(default_factory=list)
    dirs: dict[str, int] = field(default_factory=dict)  # data dir -> samples written
    elapsed: float = 0.0


def _resolve(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


def _filter_file(root: Path, name: str) -> Path:
    p = _resolve(root, name)
    if not p.is_file() and not Path(name).is_absolute():
        p = resources.bundled_filter(name) or p  # the filters shipped with curate
    if not p.is_file():
        raise TicError(f"{name}: replay filter not found (looked under {root} and {resources.filters_dir()})")
    return p


def _made_with(subset: Path, make: dict) -> bool:
    """True when ``subset``'s manifest (written by curate run) records the same parameters."""
    manifest = subset.with_suffix(".json")
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return Path(m.get("filter", "")).name == Path(make["filter"]).name and m.get("params") == dict(make.get("set") or {})


def prepare_plan(plan_path, catalog, shards=None, root=None, only: list[str] | None = None,
                 engine: Engine | None = None, overwrite: bool = False, progress: bool = False) -> PrepareResult:
    """Make the replay subsets of ``plan_path`` and reshard all its data dirs from ``shards``
    (default: the catalog's shard directory); the reshard's tasks run where ``engine`` says."""
    if shards is None:
        shards = shards_dir(catalog)
        if shards is None:
            raise TicError(f"{catalog}: no shards dir recorded; pass --shards DIR")
    t0 = time.perf_counter()
    plan = read_plan(plan_path)
    root = Path(root) if root is not None else Path.cwd()
    if not plan.get("export_dir"):
        raise TicError(f"{plan_path}: the plan has no export_dir (make it with `curate tic plan --sizes EXPORT_DIR`)")
    export = _resolve(root, plan["export_dir"])
    res = PrepareResult()
    wanted: dict[Path, Path] = {}
    for step in plan["steps"]:
        if only and str(step["name"]) not in only:
            continue
        for d in step["data"]:
            subset = export / d["subset"]
            make = d.get("make")
            if make:
                if subset.is_file() and _made_with(subset, make):
                    res.subsets_kept.append(str(subset))
                else:
                    run_filter(_filter_file(root, make["filter"]), catalog=catalog, out=subset,
                               sets=dict(make.get("set") or {}))
                    res.subsets_made.append(str(subset))
            elif not subset.is_file():
                raise TicError(f"{subset}: split subset not found (write it with `curate tic export`)")
            out_dir = _resolve(root, d["dir"])
            if wanted.get(out_dir, subset) != subset:
                raise TicError(f"{out_dir}: two plan entries use this dir with different subsets")
            wanted[out_dir] = subset
    if not wanted:
        raise TicError(f"{plan_path}: no data entries to prepare" + (f" for steps {only}" if only else ""))
    results = reshard_many([Path(shards)], [Output(o, s, None) for o, s in wanted.items()],
                           catalog=catalog, engine=engine, overwrite=overwrite, progress=progress)
    for o, r in zip(wanted, results):
        res.dirs[str(o)] = r.output_count
    res.elapsed = time.perf_counter() - t0
    return res
