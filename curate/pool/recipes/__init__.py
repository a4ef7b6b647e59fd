"""Recipes: TiC-CLIP's time-continual benchmarks from collections other than DataComp.

A recipe turns a published collection's metadata into the table ``curate pool from-table``
reads (an image path, a caption, a time, ids), builds the pool with
:func:`curate.pool.build.build_pool`, and gives the catalog the time views of
:mod:`curate.pool.recipes.periods` (``timesplit``, the recipe's periods and a reproducible
train/test split by uid). ``yfcc15m`` and ``redcaps`` follow TiC-CLIP's
``dataset_creation/tic-{yfcc15m,redcaps}/create_splits.py``; where they differ it is said in
their docstrings and in docs/timestamped-pools.md.
"""
