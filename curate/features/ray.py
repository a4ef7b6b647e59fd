"""Feature producers on Ray: per-pool-file work as Ray tasks, same outputs as the local build.

The caption tables ``text_features`` (:mod:`curate.features.text`) and ``text_lang_cld3``
(:mod:`curate.features.cld3`) compute one pool file at a time with a pure function that writes its
output atomically (``compute_file``); here each stale file is a Ray task and the driver only
decides what is stale and registers the view, exactly as
:func:`curate.features.text.build_table` does. Outputs go to the catalog's features dir, which
must be a filesystem every worker sees (a shared mount on a cluster).
"""

from __future__ import annotations

import time
from pathlib import Path

from curate.catalog.connection import default_catalog, register_parquet_view
from curate.engine.ray import connect_ray, ray_map


def _file_task(compute, src: str, file: str, out: str, settings: dict, source: dict) -> tuple[str, int]:
    return file, compute(Path(src), file, Path(out), settings, source)


def build_table_ray(table, catalog=None, progress: bool = True, force: bool = False, *,
                    address: str | None = None, num_cpus: int | None = None,
                    max_in_flight: int | None = None, **options):
    """:func:`curate.features.text.build_table` with one Ray task per stale pool file."""
    from curate.features.text import BuildResult, plan

    t0 = time.perf_counter()
    catalog = Path(catalog) if catalog else default_catalog()
    p = plan(table, catalog, force, **options)
    res = BuildResult(out_dir=p.out_dir, settings=p.settings, skipped=[f.file for f in p.done],
                      rows_total=sum(f.num_rows for f in p.files))
    if p.todo:
        table.load(p.settings)  # a bad model fails here, before any task
        connect_ray(address, num_cpus)
        args = [(table.compute, *task) for task in p.tasks()]
        for file, n in ray_map(_file_task, args, desc=table.view, progress=progress, max_in_flight=max_in_flight):
            res.computed.append(file)
            res.rows_computed += n
    register_parquet_view(catalog, table.view, p.outputs())
    res.elapsed = time.perf_counter() - t0
    return res


def build_text_features_ray(catalog=None, lid_model=None, progress: bool = True, force: bool = False, *,
                            address: str | None = None, num_cpus: int | None = None,
                            max_in_flight: int | None = None):
    """:func:`curate.features.text.build_text_features` with one Ray task per stale pool file."""
    from curate.features.text import TABLE

    return build_table_ray(TABLE, catalog, progress, force, address=address, num_cpus=num_cpus,
                           max_in_flight=max_in_flight, lid_model=lid_model)


def build_text_lang_cld3_ray(catalog=None, progress: bool = True, force: bool = False, *,
                             address: str | None = None, num_cpus: int | None = None,
                             max_in_flight: int | None = None):
    """:func:`curate.features.cld3.build_text_lang_cld3` with one Ray task per stale pool file."""
    from curate.features.cld3 import TABLE

    return build_table_ray(TABLE, catalog, progress, force, address=address, num_cpus=num_cpus,
                           max_in_flight=max_in_flight)
