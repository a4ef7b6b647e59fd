"""What the embedding producers share: the per-pool-file feature table (``uid, file, row`` plus
the producer's columns, one parquet file per pool file, settings in its metadata, written
atomically), where a producer's tables live, the identity of a pool file's npz, and named sets
of embeddings kept under the features dir (NormSim target sets, decontamination eval sets)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path
from curate.catalog.connection import connect, default_catalog, features_dir, register_parquet_view
from curate.errors import CurateError
from curate.features.embeddings import EmbeddingError, EmbeddingFile


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


def feature_root(catalog, view: str) -> Path:
    """``FEATURES_DIR/view``: where a producer keeps its tables (or a kind of named set)."""
    con = connect(catalog)
    try:
        return features_dir(con, catalog) / view
    finally:
        con.close()


@dataclass
class SetPlan:
    """Which pool files lack a current table of a producer keyed by a named set (NormSim's target
    set, decontamination's eval set): one ``OUT_DIR/{file}.parquet`` per pool file."""

    name: str  # the set
    settings: dict
    out_dir: Path
    files: list[EmbeddingFile]
    sources: dict  # file -> npz identity
    todo: list[EmbeddingFile] = field(default_factory=list)

    def output(self, ef: EmbeddingFile) -> Path:
        return self.out_dir / f"{ef.file}.parquet"

    def find_stale(self, meta_key: str, force: bool, current: Callable[[dict], bool]) -> "SetPlan":
        """Put in ``todo`` every file whose output is missing, built from another npz or row count,
        or whose recorded settings ``current`` rejects (all of them with ``force``)."""
        for ef in self.files:
            meta = None if force else read_table_meta(self.output(ef), meta_key)
            if not (meta is not None and current(meta.get("settings") or {}) and meta.get("rows") == ef.num_rows
                    and meta.get("source") == self.sources[ef.file]):
                self.todo.append(ef)
        return self


def read_table_meta(path: Path, meta_key: str) -> dict | None:
    """The settings a producer stored in a table's parquet metadata (None: unreadable or absent)."""
    try:
        return json.loads((pq.read_schema(path).metadata or {})[meta_key])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def npz_identity(ef: EmbeddingFile, needed_for: str, error: type[CurateError] = EmbeddingError) -> dict:
    """Size and hash of the npz's last 4 KiB: its zip central directory, which holds every
    member's CRC-32 (cheap enough to check on every ``curate run``)."""
    if ef.npz is None or not ef.npz.is_file():
        raise error(f"pool file {ef.file}: no .npz beside the parquet ({needed_for})")
    size = ef.npz.stat().st_size
    with open(ef.npz, "rb") as fh:
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    return {"npz_bytes": size, "npz_tail_sha256": hashlib.sha256(tail).hexdigest()}


# -- named sets of embeddings (NormSim target sets, decontamination eval sets) -----------------

SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass
class NamedSet:
    """``FEATURES_DIR/KIND/NAME/``: ``embeddings.npy`` (float32 rows) and ``set.json`` (``meta``)."""
    name: str
    dir: Path
    meta: dict

    @property
    def embeddings_path(self) -> Path:
        return self.dir / "embeddings.npy"

    def embeddings(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.embeddings_path, mmap_mode="r" if mmap else None, allow_pickle=False)


def check_set_name(name, what: str, error: type[CurateError]) -> str:
    if not isinstance(name, str) or not SET_NAME.match(name):
        raise error(f"{what} name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def list_named_sets(catalog, kind: str, make) -> list:
    """``make(name, dir, meta)`` for every ``FEATURES_DIR/kind/NAME/set.json``, by name."""
    catalog = Path(catalog) if catalog else default_catalog()
    root = feature_root(catalog, kind)
    return [make(meta.parent.name, meta.parent, json.loads(meta.read_text()))
            for meta in (sorted(root.glob("*/set.json")) if root.is_dir() else [])
            if SET_NAME.match(meta.parent.name)]


def find_named_set(catalog, kind: str, name, make, what: str, error: type[CurateError], hint: str):
    """The set ``name`` of ``kind``; a one-line ``error`` naming the sets there are and ``hint``."""
    check_set_name(name, what, error)
    sets = list_named_sets(catalog, kind, make)
    for s in sets:
        if s.name == name:
            return s
    have = ", ".join(s.name for s in sets) or "none"
    raise error(f"{what} '{name}' not found in {catalog} (have: {have}); {hint}")


def register_file_tables(catalog, view: str, root: Path, parts, columns: str) -> None:
    """Register ``view`` over ``root/PART/FILE.parquet`` for every part (an arch, a target set,
    an eval set) and every current pool file that has one, parts first, files in pool order."""
    con = connect(catalog)
    try:
        names = [r[0] for r in con.execute("SELECT file FROM pool_files ORDER BY file_id").fetchall()]
    finally:
        con.close()
    files = [root / part / f"{name}.parquet" for part in parts for name in names
             if (root / part / f"{name}.parquet").is_file()]
    if files:
        register_parquet_view(catalog, view, files, columns)
