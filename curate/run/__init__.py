"""Running a filter file: a SQL file over the catalog becomes a DataComp subset file and its
manifest, here or on a Ray cluster.

* :mod:`.query`: the filter made ready to run (parameters, feature tables, thresholds, the
  single-``uid`` result check): one path for both engines, lint and TiC export;
* :mod:`.runner`: the local engine, one DuckDB query;
* :mod:`.ray`: the Ray engine, the query per pool file (:mod:`.plan`, :mod:`.partition`,
  :mod:`.ray_threshold`, :mod:`.assemble`);
* :mod:`.lint`: a filter checked against a catalog without running it.

:func:`run_filter` is where the engine is chosen, once.
"""

from __future__ import annotations

from curate.engine import Engine
from curate.run import runner
from curate.run.runner import RunResult


def run_filter(filter_path, catalog=None, out=None, sets=None, progress=False, engine: Engine | None = None,
               **ray_options) -> RunResult:
    """Run ``filter_path`` on ``catalog`` and write the sorted subset ``out`` plus its manifest,
    locally (``engine`` None or local: :func:`curate.run.runner.run_filter`) or per pool file on
    Ray (``Engine(kind="ray", ...)``: :func:`curate.run.ray.run_filter_ray`, which also takes
    ``ray_options`` such as ``layout``, ``work_dir``, ``storage_options``). Same subset bytes.
    """
    if engine is not None and engine.distributed:
        from curate.run.ray import run_filter_ray  # lazy: sqlglot and Ray stay off the local start-up path

        return run_filter_ray(filter_path, catalog, out, sets, progress, engine=engine, **ray_options)
    if ray_options:
        raise TypeError(f"run_filter: {', '.join(sorted(ray_options))} apply to the ray engine only")
    return runner.run_filter(filter_path, catalog, out, sets, progress)


__all__ = ["run_filter", "RunResult"]
