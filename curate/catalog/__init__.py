"""The catalog: one DuckDB file whose views expose a pool (local or remote) to SQL.

``schema`` holds the CommonPool parquet schema and its one check; ``connection`` creates and
opens catalogs over local pools; ``remote`` creates catalogs over ``s3://`` and other fsspec URLs.
"""
