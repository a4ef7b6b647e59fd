"""Pool embeddings: the ``.npz`` files as memory-mapped float32 arrays that SQL and BLAS can read.

CommonPool ships one ``.npz`` per parquet (keys ``b32_img``, ``b32_txt``, ``l14_img``,
``l14_txt``, optional ``dedup``; float16; row i of every array is row i of the parquet). A
``.npz`` is a deflated zip, so nothing can seek into it. :func:`convert_embeddings` streams one
key of one file at a time, a few thousand rows per step, into
``FEATURES/embeddings/KEY/FILE.npy``: **float32**, because float16 -> float32 is exact, DuckDB
cannot read Arrow half floats (``Unsupported Internal Arrow Type e``), and a float32 memory map
becomes a zero-copy Arrow ``FixedSizeList`` that DuckDB sees as ``FLOAT[N]`` and that BLAS
multiplies without a conversion pass. The price is twice the disk of the float16 source.

:func:`iter_batches` is the one way the rest of curate reads embeddings: from the ``.npy`` when it
exists, else streamed straight from the ``.npz`` (so a one-off assignment needs no extra disk).
Memory is one batch, whatever the pool size. :func:`attach_embeddings` exposes a key to SQL
as a view ``embeddings_KEY(file, row, embedding FLOAT[N])`` on a Python connection, joinable to
``pool`` on ``(file, row)``.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from curate.atomic import atomic_path
from curate.catalog.connection import connect, features_dir, resolve_path
from curate.errors import CurateError
from curate.progress import Progress
from curate.subset import read_array_header

#: npz keys DataComp's pools carry, with their documented widths (``dedup``'s is not documented).
KNOWN_DIMS = {"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768, "dedup": None}
_KEY_RE = re.compile(r"[A-Za-z0-9_]+\Z")
#: rows decompressed per step when streaming an npz member (float16 768-d: 6 MB)
CHUNK_ROWS = 4096


class EmbeddingError(CurateError):
    """An npz file (or converted embedding file) that does not match its parquet."""


@dataclass
class EmbeddingFile:
    """One pool file's embeddings for one key."""

    file: str  # parquet stem (the `file` column of `pool`)
    num_rows: int
    npz: Path | None
    npy: Path  # converted float32 file (may not exist yet)


def check_key(key: str) -> str:
    if not _KEY_RE.match(key or ""):
        raise EmbeddingError(f"embedding key {key!r}: expected a name like l14_img")
    return key


def embeddings_dir(con, catalog, key: str) -> Path:
    return features_dir(con, catalog) / "embeddings" / check_key(key)


def pool_embedding_files(catalog, key: str, con=None) -> list[EmbeddingFile]:
    """The pool's files in catalog order with their npz and converted-npy paths for ``key``."""
    own = con is None
    con = con or connect(catalog)
    try:
        out_dir = embeddings_dir(con, catalog, key)
        rows = con.execute("SELECT file, num_rows, npz FROM pool_files ORDER BY file_id").fetchall()
        return [EmbeddingFile(f, int(n), resolve_path(con, npz, catalog), out_dir / f"{f}.npy")
                for f, n, npz in rows]
    finally:
        if own:
            con.close()


# -- reading one npz member without decompressing it whole ------------------------------------

def _open_member(npz: Path, key: str):
    """Open ``key`` inside ``npz``; return (zip, stream, shape, dtype). Validates format only."""
    try:
        zf = zipfile.ZipFile(npz)
    except FileNotFoundError:
        raise EmbeddingError(f"{npz}: npz file not found") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise EmbeddingError(f"{npz}: not a readable .npz file ({e})") from None
    names = [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    if key not in names:
        zf.close()
        raise EmbeddingError(f"{npz}: no key '{key}' (keys: {', '.join(names) or 'none'})")
    stream = zf.open(f"{key}.npy")
    try:
        shape, fortran, dtype = read_array_header(stream)
    except ValueError as e:
        zf.close()
        raise EmbeddingError(f"{npz}: key '{key}' is not a readable array ({e})") from None
    if dtype.hasobject or dtype.kind != "f":
        zf.close()
        raise EmbeddingError(f"{npz}: key '{key}' has dtype {dtype}, expected float16 or float32")
    if fortran and len(shape) == 2 and shape[1] > 1:
        zf.close()
        raise EmbeddingError(f"{npz}: key '{key}' is stored in Fortran order; rows cannot be streamed")
    return zf, stream, shape, dtype


def check_npz_member(ef: EmbeddingFile, key: str, dim: int | None = None) -> int:
    """Check that ``ef.npz`` has ``key`` as a (num_rows, d) float array; return d."""
    if ef.npz is None:
        raise EmbeddingError(f"pool file {ef.file}: no .npz beside the parquet (key '{key}' needed)")
    zf, _, shape, _ = _open_member(ef.npz, key)
    zf.close()
    return _check_shape(ef.npz, key, shape, ef.num_rows, dim)


def _check_shape(path, key, shape, num_rows, dim) -> int:
    if len(shape) != 2:
        raise EmbeddingError(f"{path}: key '{key}' has shape {shape}, expected (rows, dim)")
    if shape[0] != num_rows:
        raise EmbeddingError(f"{path}: key '{key}' has {shape[0]} rows but the parquet has {num_rows}")
    expected = dim if dim is not None else KNOWN_DIMS.get(key)
    if expected is not None and shape[1] != expected:
        raise EmbeddingError(f"{path}: key '{key}' has dimension {shape[1]}, expected {expected}")
    return int(shape[1])


def _npz_batches(ef: EmbeddingFile, key: str, batch_rows: int, dim: int | None) -> Iterator[np.ndarray]:
    zf, stream, shape, dtype = _open_member(ef.npz, key)
    try:
        d = _check_shape(ef.npz, key, shape, ef.num_rows, dim)
        row_bytes = d * dtype.itemsize
        for start in range(0, shape[0], batch_rows):
            n = min(batch_rows, shape[0] - start)
            buf = stream.read(n * row_bytes)
            if len(buf) != n * row_bytes:
                raise EmbeddingError(f"{ef.npz}: key '{key}' is truncated at row {start + len(buf) // row_bytes}")
            yield np.frombuffer(buf, dtype).reshape(n, d).astype(np.float32)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EmbeddingError(f"{ef.npz}: key '{key}' cannot be read ({e})") from None
    finally:
        zf.close()


def open_npy(ef: EmbeddingFile, key: str, dim: int | None = None) -> np.ndarray:
    """The converted file as a read-only float32 memory map, checked against the parquet."""
    try:
        arr = np.load(ef.npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EmbeddingError(f"{ef.npy}: not a readable .npy file ({e})") from None
    if arr.dtype != np.float32:
        raise EmbeddingError(f"{ef.npy}: dtype {arr.dtype}, expected float32")
    _check_shape(ef.npy, key, arr.shape, ef.num_rows, dim)
    return arr


def iter_batches(ef: EmbeddingFile, key: str, batch_rows: int = 65536,
                 dim: int | None = None) -> Iterator[np.ndarray]:
    """float32 row batches of one file's embeddings, in row order (converted npy if present)."""
    if ef.npy.is_file():
        arr = open_npy(ef, key, dim)
        for start in range(0, len(arr), batch_rows):
            yield np.asarray(arr[start : start + batch_rows])
        return
    if ef.npz is None:
        raise EmbeddingError(f"pool file {ef.file}: no .npz beside the parquet (key '{key}' needed)")
    yield from _npz_batches(ef, key, batch_rows, dim)


# -- conversion -----------------------------------------------------------------------------

def convert_file(ef: EmbeddingFile, key: str, dim: int | None = None) -> int:
    """Stream ``key`` of one npz into its float32 ``.npy`` (atomically); return the dimension."""
    d = check_npz_member(ef, key, dim)
    with atomic_path(ef.npy, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(ef.num_rows, d))
        pos = 0
        for batch in _npz_batches(ef, key, CHUNK_ROWS, d):
            out[pos : pos + len(batch)] = batch
            pos += len(batch)
        out.flush()
        del out
    return d


def convert_embeddings(catalog, key: str, progress: bool = True) -> dict:
    """Convert ``key`` of every pool file's npz to a float32 ``.npy`` (skips files already done).

    Every npz is checked first (key present, rows = parquet rows, one dimension for the whole
    pool) so a bad file fails before any work. Returns counts and the output directory.
    """
    check_key(key)
    files = pool_embedding_files(catalog, key)
    dim = None
    for ef in files:
        if ef.npy.is_file():
            dim = open_npy(ef, key, dim).shape[1]
        else:
            dim = check_npz_member(ef, key, dim)
    todo = [ef for ef in files if not ef.npy.is_file()]
    for ef in Progress(todo, desc=f"embeddings {key}", unit="file", disable=not progress):
        convert_file(ef, key, dim)
    return {"key": key, "dim": dim, "files": len(files), "converted": len(todo),
            "rows": sum(ef.num_rows for ef in files),
            "dir": str(files[0].npy.parent) if files else None}


def pool_dim(files: list[EmbeddingFile], key: str) -> int:
    """The embedding width for ``key``, checked to be the same in every file (headers only)."""
    dim = None
    for ef in files:
        dim = open_npy(ef, key, dim).shape[1] if ef.npy.is_file() else check_npz_member(ef, key, dim)
    if dim is None:
        raise EmbeddingError(f"key '{key}': the pool has no files")
    return dim


# -- SQL ------------------------------------------------------------------------------------

def embeddings_table(catalog, key: str, con=None) -> pa.Table:
    """An Arrow table ``(file, row, embedding FLOAT[N])`` over the converted files' memory maps.

    Zero-copy: each file is one chunk backed by its memory map, so nothing is read until a
    query touches it. Needs :func:`convert_embeddings` first.
    """
    files = pool_embedding_files(catalog, key, con)
    missing = [ef for ef in files if not ef.npy.is_file()]
    if missing:
        raise EmbeddingError(f"{missing[0].npy}: not converted yet (run `curate embeddings convert --key {key}`)")
    dim = None
    batches = []
    for ef in files:
        arr = open_npy(ef, key, dim)
        dim = arr.shape[1]
        flat = pa.array(arr.reshape(-1))  # zero-copy view of the memory map
        batches.append(pa.record_batch({
            # one dictionary entry per file, not one string per row
            "file": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(arr), np.int32)),
                                                   pa.array([ef.file], pa.string())),
            "row": pa.array(np.arange(len(arr), dtype=np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }))
    return pa.Table.from_batches(batches)


def attach_embeddings(con, catalog, key: str, name: str | None = None) -> str:
    """Register ``embeddings_KEY(file, row, embedding FLOAT[N])`` on ``con``; return its name.

    Example::

        con = connect(cat); attach_embeddings(con, cat, "l14_img")
        con.sql("SELECT p.uid, array_inner_product(e.embedding, e.embedding) FROM pool p "
                "JOIN embeddings_l14_img e USING (file, \\"row\\") LIMIT 3")
    """
    name = name or f"embeddings_{check_key(key)}"
    con.register(name, embeddings_table(catalog, key, con))
    return name


def row_embedding(catalog, key: str, file: str, row: int) -> np.ndarray:
    """One sample's embedding (float32), from the npy if converted else from the npz."""
    for ef in pool_embedding_files(catalog, key):
        if ef.file == file:
            if not 0 <= row < ef.num_rows:
                raise EmbeddingError(f"pool file {file}: row {row} out of range (0..{ef.num_rows - 1})")
            if ef.npy.is_file():
                return np.array(open_npy(ef, key)[row])
            for i, batch in enumerate(_npz_batches(ef, key, CHUNK_ROWS, None)):
                if row < (i + 1) * CHUNK_ROWS:
                    return batch[row - i * CHUNK_ROWS].copy()
    raise EmbeddingError(f"pool file {file!r}: not in the catalog")
