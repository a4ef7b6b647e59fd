"""Feature producers: expensive per-sample work computed once into uid-keyed tables.

A producer (language ID, WordNet matches, cluster assignments, ...) writes parquet files under
the catalog's ``features_dir`` and registers a view over them with
:func:`curate.catalog.connection.register_parquet_view`. Filters just reference the view. When a filter
references a view whose producer is registered here and the view is missing or stale,
``curate run`` builds it first (with progress) and caches it.

A producer is an object with:

* ``view``: the name filters use (e.g. ``text_features``);
* ``is_current(catalog, params) -> bool``: the view exists and matches the pool and settings;
* ``build(catalog, params, progress=True) -> None``: compute what is missing (resumable) and
  register the view.

``params`` are the filter's parameters (after ``--set``), so a producer can depend on one
(e.g. the cluster set name ``clusters``). Producers are listed in ``PRODUCERS`` as
``"module:attribute"`` and imported only when a filter needs them: this module is on
``curate run``'s start-up path, and importing the producer modules there would add ~100 ms
(pyarrow.compute, the WordNet/fastText wrappers, the cluster and embedding code) to every run
of a filter that needs no feature table. (It also keeps :mod:`curate.features.clusters`, which
builds ``text_features`` through :func:`ensure_features`, free of an import cycle.)
"""

from __future__ import annotations

import importlib

from curate.sqltokens import tokenize

#: view name -> "module:attribute" of the producer object
PRODUCERS: dict[str, str] = {
    "cluster_assignments": "curate.features.clusters:ASSIGNMENTS",
    "dbp": "curate.features.dbp:PRODUCER",
    "eval_neighbors": "curate.features.decontam:PRODUCER",
    "negcliploss": "curate.features.negcliploss:PRODUCER",
    "normsim": "curate.features.normsim:PRODUCER",
    "semdedup": "curate.features.semdedup:PRODUCER",
    "text_features": "curate.features.text:PRODUCER",
    "text_lang_cld3": "curate.features.cld3:PRODUCER",
}


def producer(view: str):
    """The producer object of ``view``, its module imported now."""
    module, attr = PRODUCERS[view].split(":")
    return getattr(importlib.import_module(module), attr)  # lazy: off `curate run`'s start-up path


def part_of_column(view: str, column: str) -> str | None:
    """The part of caption table ``view`` that computes ``column`` (e.g. ``text_features``,
    ``lang_fasttext`` -> ``lang``); None for a column of no part (uid, file, row), or a view
    that is not a caption table built in parts."""
    if view not in PRODUCERS:
        return None
    table = getattr(producer(view), "table", None)
    return table.part_of(column) if table is not None and hasattr(table, "part_of") else None


def referenced_names(sql: str) -> set[str]:
    """Identifiers in a query (tables, views, functions), lower-cased; a cheap over-approximation."""
    return {t.value.lower() for t in tokenize(sql) if t.kind in ("identifier", "keyword") and t.value}


def needed_producers(sql: str) -> list[str]:
    names = referenced_names(sql)
    return [view for view in PRODUCERS if view.lower() in names]


def ensure_features(catalog, sql: str, params: dict, progress: bool = True, skip=()) -> list[str]:
    """Build every registered feature view ``sql`` references that is missing or stale (except
    those in ``skip``, e.g. the caption tables ``curate run`` builds per part and row).

    Returns the names of the views it built. Call with no open connection to ``catalog``
    (building opens it read-write).
    """
    built = []
    for view in needed_producers(sql):
        if view in skip:
            continue
        p = producer(view)
        if not p.is_current(catalog, params):
            p.build(catalog, params, progress=progress)
            built.append(view)
    return built
