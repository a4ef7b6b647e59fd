"""Looking at a catalog: ``curate explore`` (a local web app) and ``curate shell`` (DuckDB's shell).

* :mod:`.shell`: the ``duckdb`` shell on a catalog, views working from any directory;
* :mod:`.samples`: sample bytes straight from the pool's tars through the shard index (one
  ``pread`` of the sample's byte range per sample: no tar scan, no extraction);
* :mod:`.session`: the explorer's state: filter results (run through :func:`curate.run.run_filter`,
  the same path and bytes as ``curate run``), their parts (kept, dropped, A only / B only /
  both), pages of metadata, sample details, histograms and exports; read-only on the catalog
  and the pool;
* :mod:`.app`: the Starlette app over a session, serving the plain HTML/JS/CSS in ``static/``.
"""
