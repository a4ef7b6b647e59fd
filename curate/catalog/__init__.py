"""The catalog: one DuckDB file whose views expose a pool (local or remote) to SQL.

``connection`` opens and creates catalogs and holds the one CommonPool schema check; ``remote``
creates catalogs over ``s3://`` and other fsspec URLs.
"""
