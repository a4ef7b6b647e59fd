"""Past one machine: the same filters, feature producers and subset files on a Ray cluster.

A pool file is a partition: each Ray task runs the filter's SQL with DuckDB on one file
(:mod:`.partition`); the global steps are exact and never gather a column on one node —
``fraction_threshold`` by histogram passes (:mod:`.threshold`), the sorted subset by uid-prefix
buckets sorted in parallel (:mod:`.assemble`). :func:`curate.distributed.runner.run_filter_ray`
is ``curate run --engine ray``; paths may be local or ``s3://`` (:mod:`.storage`). See
``docs/distributed.md``.
"""
