"""The CommonPool parquet schema, and the one check that a parquet file has it.

A CommonPool metadata parquet has nine columns (:data:`POOL_COLUMNS`), each of an Arrow type
*family* rather than one exact type (``string`` or ``large_string``, any integer width, any
float width, any list kind), because the hub's files and their derivatives differ in exact
types. Every reader of pool parquet files checks them here: ``curate catalog init``
(:func:`curate.catalog.connection.scan_metadata`), catalogs over object storage
(:mod:`curate.catalog.remote`) and ``curate download`` (:func:`curate.pool.download.check_metadata`,
which needs only the columns img2dataset reads). Each caller keeps its own error type and says
in its own words what a missing column means (:func:`check_columns`). Columns beyond the nine
are the pool's extra columns (:func:`extra_columns`). What curate itself writes (pools built from
a table, scored shards) has the exact types of :data:`POOL_SCHEMA`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError

#: The nine CommonPool columns and the Arrow type family each must have.
POOL_COLUMNS = {
    "uid": "string",
    "url": "string",
    "text": "string",
    "original_width": "integer",
    "original_height": "integer",
    "clip_b32_similarity_score": "floating",
    "clip_l14_similarity_score": "floating",
    "face_bboxes": "list",
    "sha256": "string",
}
#: The Arrow types curate writes the nine columns with (a pool built from a table, scored shards).
POOL_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
    ("original_width", pa.int64()), ("original_height", pa.int64()),
    ("clip_b32_similarity_score", pa.float32()), ("clip_l14_similarity_score", pa.float32()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))), ("sha256", pa.string()),
])
#: Columns that are neither pool columns nor extra columns (a pandas index some hub derivatives carry).
IGNORED_COLUMNS = {"__index_level_0__"}
#: Files a metadata directory may hold beside its parquet and npz files.
IGNORED_FILES = {".DS_Store"}


def type_family(t: pa.DataType) -> str:
    """The family of an Arrow type as :data:`POOL_COLUMNS` names it (``string``, ``integer``,
    ``floating``, ``list``); any other type is its own family (``str(t)``)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "floating"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list"
    return str(t)


def read_footer(source, where, error: type[Exception] = CurateError) -> tuple[pq.FileMetaData, dict[str, pa.DataType]]:
    """A parquet file's metadata and its columns' Arrow types, read from the footer only.

    ``source`` is a path or an open binary file; an unreadable file raises ``error`` naming
    ``where`` ("not a readable parquet file").
    """
    try:
        meta = pq.read_metadata(source)
        schema = meta.schema.to_arrow_schema()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise error(f"{where}: not a readable parquet file ({e})") from None
    return meta, {f.name: f.type for f in schema}


def check_columns(where, types: Mapping[str, pa.DataType], required: Mapping[str, str] = POOL_COLUMNS,
                  error: type[Exception] = CurateError, missing: Callable[[str], str] | None = None) -> None:
    """Check that ``types`` (column -> Arrow type) has every ``required`` column in its family.

    Raises ``error``: ``"{where}: missing column '{col}'"`` followed by ``missing(col)`` (the
    caller's explanation, e.g. which columns it needs), or ``"{where}: column '{col}' has type
    {type}, expected {family}"``. Columns are checked in ``required``'s order.
    """
    for col, family in required.items():
        if col not in types:
            raise error(f"{where}: missing column '{col}'" + (missing(col) if missing else ""))
        if type_family(types[col]) != family:
            raise error(f"{where}: column '{col}' has type {types[col]}, expected {family}")


def extra_columns(names: Iterable[str]) -> list[str]:
    """The columns a pool file has beyond the nine (in file order), ignoring :data:`IGNORED_COLUMNS`."""
    return [c for c in names if c not in POOL_COLUMNS and c not in IGNORED_COLUMNS]
