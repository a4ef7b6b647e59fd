"""The per-pool-file feature table: ``uid, file, row`` plus the producer's columns, one parquet
file per pool file, with the producer's settings in its metadata, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path


def write_file_table(out: Path, uid: pa.Array, file: str, columns: dict, schema: pa.Schema,
                     meta_key: str, meta: dict) -> int:
    """Write one pool file's rows (``row`` = 0..n-1 in pool order) to ``out``; returns n.

    ``columns`` maps the producer's column names to arrays or scalars (a scalar is repeated),
    in ``schema``'s order after ``uid, file, row``.
    """
    n = len(uid)
    data = {"uid": uid.cast(pa.string()), "file": pa.array([file] * n, pa.string()),
            "row": pa.array(np.arange(n, dtype=np.int64))}
    for name, value in columns.items():
        data[name] = pa.array(value) if not isinstance(value, str) else pa.array([value] * n, pa.string())
    table = pa.table(data, schema=schema.with_metadata({meta_key: json.dumps(meta, sort_keys=True).encode()}))
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
        os.chmod(tmp, 0o644)
    return n
