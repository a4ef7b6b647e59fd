"""Feature producers on Ray: per-pool-file work as Ray tasks, same outputs as the local build.

``text_features`` (:mod:`curate.textfeatures`) already computes one pool file at a time with a
pure function that writes its output atomically (``compute_file``); here each file is a Ray task
and the driver only decides what is stale and registers the view, exactly as
:func:`curate.textfeatures.build_text_features` does. Outputs go to the catalog's features dir,
which must be a filesystem every worker sees (a shared mount on a cluster).
"""

from __future__ import annotations

import time
from pathlib import Path

from curate.catalog import default_catalog, register_parquet_view
from curate.distributed.engine import connect_ray, ray_map


def _text_file(src: str, file: str, out: str, settings: dict, source: dict) -> tuple[str, int]:
    from curate.textfeatures import compute_file

    return file, compute_file(Path(src), file, Path(out), settings, source)


def build_text_features_ray(catalog=None, lid_model=None, progress: bool = True, force: bool = False, *,
                            address: str | None = None, num_cpus: int | None = None,
                            max_in_flight: int | None = None):
    """:func:`curate.textfeatures.build_text_features` with one Ray task per stale pool file."""
    from curate import textfeatures as T

    t0 = time.perf_counter()
    catalog = Path(catalog) if catalog else default_catalog()
    files, out_dir, _ = T._pool(catalog)
    settings = T.settings_identity(T._choose_model(lid_model, out_dir, files))
    todo, done = T._status(files, out_dir, settings)
    if force:
        todo, done = files, []
    res = T.BuildResult(out_dir=out_dir, settings=settings, skipped=[f.file for f in done],
                        rows_total=sum(f.num_rows for f in files))
    if todo:
        T._models(Path(settings["lid_model"]["path"]))  # a bad model fails here, before any task
        connect_ray(address, num_cpus)
        args = [(str(f.path), f.file, str(out_dir / f"{f.file}.parquet"), settings, T.source_identity(f.path))
                for f in todo]
        for file, n in ray_map(_text_file, args, desc=T.VIEW, progress=progress, max_in_flight=max_in_flight):
            res.computed.append(file)
            res.rows_computed += n
    register_parquet_view(catalog, T.VIEW, [out_dir / f"{f.file}.parquet" for f in files])
    res.elapsed = time.perf_counter() - t0
    return res
