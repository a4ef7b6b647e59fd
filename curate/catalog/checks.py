"""What ``curate catalog init`` checks in a pool's files beyond their schema, so that a bad pool
fails at init, naming the file (and row, uid or key), rather than later in ``curate run``:

* every ``uid`` is 32 hex digits (:func:`check_uids`);
* no uid is in two pool files, or twice in one (:func:`check_duplicate_uids`; a duplicate
  selects the same sample twice and doubles it in every subset);
* every ``.npz`` beside a parquet is a readable zip of float ``(rows, dim)`` arrays whose row
  count is the parquet's, whose sizes agree with their headers, and whose keys and dimensions
  agree across the pool (:func:`check_npz`). A key's width is not checked against DataComp's
  (a pool scored with another model, ``curate byod score``, has other widths); ``run`` checks
  it for the key a filter uses.

The uid checks are DuckDB queries over the parquet files (streamed; nothing is loaded into
Python memory); the npz check reads only the zip directory and each member's ``.npy`` header.
Each check takes the caller's error type (like :mod:`curate.catalog.schema`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np

from curate.atomic import file_in_the_way
from curate.errors import CurateError
from curate.sqltokens import sql_list, sql_literal
from curate.subset import read_array_header

#: what a pool uid is: 32 hex digits (``is_uid`` in ``sql/catalog/10_macros.sql``)
UID_REGEX = "[0-9a-fA-F]{32}"


def _scan_connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions = false")
    return con


def check_uids(paths: Sequence[Path], error: type[Exception] = CurateError) -> None:
    """Every row's ``uid`` is 32 hex digits; else ``error`` naming the file, row and value."""
    con = _scan_connection()
    try:
        for path in paths:
            try:
                bad = con.execute(
                    f"SELECT file_row_number, uid FROM read_parquet({sql_literal(str(path))}, file_row_number = true) "
                    f"WHERE uid IS NULL OR NOT regexp_full_match(uid, '{UID_REGEX}') "
                    "ORDER BY file_row_number LIMIT 1").fetchone()
            except duckdb.Error as e:
                raise error(f"{path}: cannot read the uid column ({str(e).splitlines()[0]})") from None
            if bad is not None:
                row, uid = bad
                value = "NULL" if uid is None else repr(uid if len(uid) <= 80 else uid[:80] + "...")
                raise error(f"{path}: row {row}: uid {value} is not 32 hex digits")
    finally:
        con.close()


def check_duplicate_uids(paths: Sequence[Path], error: type[Exception] = CurateError,
                         option: str = "--allow-duplicate-uids") -> None:
    """No uid (case-insensitive) is in two pool files or twice in one; else ``error`` naming
    both files (or the file and both rows) and the uid. One DuckDB aggregation over all files,
    spilled to disk by DuckDB when it does not fit in memory."""
    if not paths:
        return
    files = sql_list(paths)
    con = _scan_connection()
    try:
        try:
            dup = con.execute(
                f"SELECT lower(uid) AS u, min(filename) AS a, max(filename) AS b "
                f"FROM read_parquet({files}, filename = true) "
                "GROUP BY u HAVING count(*) > 1 ORDER BY a, b, u LIMIT 1").fetchone()
        except duckdb.Error as e:
            raise error(f"cannot read the pool's uid columns ({str(e).splitlines()[0]})") from None
        if dup is None:
            return
        uid, a, b = dup
        if a != b:
            raise error(f"{a} and {b}: both hold uid {uid} (the same sample twice doubles it in every "
                        f"subset; pass {option} to accept)")
        rows = [r for (r,) in con.execute(
            f"SELECT file_row_number FROM read_parquet({sql_literal(a)}, file_row_number = true) "
            "WHERE lower(uid) = ? ORDER BY file_row_number LIMIT 2", [uid]).fetchall()]
        raise error(f"{a}: rows {rows[0]} and {rows[1]} both hold uid {uid} (the same sample twice doubles "
                    f"it in every subset; pass {option} to accept)")
    finally:
        con.close()


def _npz_members(npz: Path, num_rows: int, error) -> dict[str, int]:
    """``{key: dim}`` of one npz, each member checked against ``num_rows`` and its own size."""
    try:
        zf = zipfile.ZipFile(npz)
    except FileNotFoundError:
        raise error(f"{npz}: npz file not found") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise error(f"{npz}: not a readable .npz file ({e})") from None
    out: dict[str, int] = {}
    with zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not members:
            raise error(f"{npz}: holds no arrays (an .npz beside a pool parquet holds its embeddings)")
        for info in members:
            key = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as stream:
                    shape, fortran, dtype = read_array_header(stream)
                    header_len = stream.tell()
            except Exception as e:  # noqa: BLE001 - any unreadable member is the user's file
                raise error(f"{npz}: key '{key}' is not a readable array ({e})") from None
            if dtype.hasobject or dtype.kind != "f":
                raise error(f"{npz}: key '{key}' has dtype {dtype}, expected float16 or float32")
            if len(shape) != 2:
                raise error(f"{npz}: key '{key}' has shape {shape}, expected (rows, dim)")
            if fortran and shape[1] > 1:
                raise error(f"{npz}: key '{key}' is stored in Fortran order; rows cannot be streamed")
            if shape[0] != num_rows:
                raise error(f"{npz}: key '{key}' has {shape[0]} rows but the parquet has {num_rows}")
            size = header_len + int(np.prod(shape)) * dtype.itemsize
            if info.file_size != size:
                raise error(f"{npz}: key '{key}' holds {info.file_size} bytes but its header "
                            f"{shape} {dtype} needs {size} (truncated or corrupt)")
            out[key] = int(shape[1])
    return out


def check_npz(files: Sequence[tuple[Path, int]], error: type[Exception] = CurateError) -> None:
    """Check every ``(npz, parquet rows)`` pair (see the module docstring); keys and dimensions
    must agree with the first npz's."""
    first: tuple[Path, dict[str, int]] | None = None
    for npz, num_rows in files:
        keys = _npz_members(npz, num_rows, error)
        if first is None:
            first = (npz, keys)
            continue
        ref_path, ref = first
        if sorted(keys) != sorted(ref):
            raise error(f"{npz}: keys {', '.join(sorted(keys))} differ from {ref_path.name}'s "
                        f"{', '.join(sorted(ref))}; every npz of a pool must have the same keys")
        for key, dim in keys.items():
            if dim != ref[key]:
                raise error(f"{npz}: key '{key}' has dimension {dim}, expected {ref[key]} (as in {ref_path.name})")


# -- output locations -------------------------------------------------------------------------

def _why_not(path: Path, e: OSError) -> str:
    """Why ``path`` cannot be a directory we write in, in a few words."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        return f"{blocker} is a file, not a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or str(e)


def make_dir(path: str | os.PathLike, error: type[Exception] = CurateError, what: str = "directory") -> Path:
    """Create directory ``path`` (and missing parents) and check that it is writable; else
    ``error``: ``"{path}: cannot create the {what} ({why})"`` or ``"{path}: the {what} is not
    writable"``. Returns ``path``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{path}: cannot create the {what} ({_why_not(path, e)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise error(f"{path}: the {what} is not writable (permission denied)")
    return path


def check_output_file(path: str | os.PathLike, error: type[Exception] = CurateError, what: str = "output") -> Path:
    """Create the directory of output file ``path`` if missing and check it is writable and that
    ``path`` is not a directory (see :func:`make_dir`). Returns ``path``."""
    path = Path(path)
    make_dir(path.parent, error, f"{what}'s directory")
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what} file")
    return path


def check_can_create(path: str | os.PathLike, error: type[Exception] = CurateError, what: str = "output") -> Path:
    """Without writing anything: could ``path`` (a file or directory, with missing parents) be
    created? Its first existing ancestor must be a writable directory and ``path`` must not be
    a directory when a file is meant (``what`` names it in the one-line ``error``)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{path}: cannot create the {what} ({file_in_the_way(parent) or parent} is a file, not a directory)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise error(f"{path}: cannot create the {what} ({parent} is not writable: permission denied)")
            break
    return path

