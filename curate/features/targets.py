"""Target sets: image embeddings of the data a curated pool should resemble (NormSim's targets).

A target set ``NAME`` lives in ``FEATURES/targets/NAME/``: ``embeddings.npy`` (float32, rows
L2-normalised, one per target image) and ``set.json`` (rows, dim, sha256, the files it came
from). :func:`import_target_set` reads DataComp's ``in1k_clip_vit_l14_{0..4}.pt`` (dicts with
``image_features``), ``torch.save``'d numpy arrays or ``.npy`` through
:func:`curate.features.clusters.load_array_file`, which never runs pickled code
(:mod:`curate.safepickle`'s restricted loader, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.atomic import atomic_path, file_sha256, replace_dir, write_json
from curate.catalog.connection import connect, default_catalog, features_dir
from curate.errors import CurateError
from curate.features.clusters import load_array_file

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_OWNED = re.compile(r"embeddings\.npy|set\.json|\..+\.tmp")


class TargetError(CurateError):
    """A target set or target embedding file that cannot be used."""


@dataclass
class TargetSet:
    name: str
    dir: Path
    meta: dict

    @property
    def embeddings_path(self) -> Path:
        return self.dir / "embeddings.npy"

    def embeddings(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.embeddings_path, mmap_mode="r" if mmap else None, allow_pickle=False)


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TargetError(f"target set name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def targets_root(catalog) -> Path:
    con = connect(catalog)
    try:
        return features_dir(con, catalog) / "targets"
    finally:
        con.close()


def list_target_sets(catalog=None) -> list[TargetSet]:
    catalog = Path(catalog) if catalog else default_catalog()
    root = targets_root(catalog)
    out = []
    for meta in sorted(root.glob("*/set.json")) if root.is_dir() else []:
        if _NAME_RE.match(meta.parent.name):
            out.append(TargetSet(meta.parent.name, meta.parent, json.loads(meta.read_text())))
    return out


def get_target_set(catalog, name) -> TargetSet:
    check_name(name)
    sets = list_target_sets(catalog)
    for ts in sets:
        if ts.name == name:
            return ts
    have = ", ".join(t.name for t in sets) or "none"
    raise TargetError(f"target set '{name}' not found in {catalog} (have: {have}); create it with "
                      f"`curate targets import CATALOG --name {name} --embeddings FILE...`")


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float32); a zero row is an error."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise TargetError(f"target row {int(np.flatnonzero(norms == 0)[0])} is all zeros (cannot be normalised)")
    return (x / norms[:, None]).astype(np.float32)


def import_target_set(catalog, name: str, files, overwrite: bool = False) -> TargetSet:
    """Read target image embeddings from ``files`` (concatenated in order), L2-normalise the
    rows, and store them as target set ``name``."""
    catalog = Path(catalog) if catalog else default_catalog()
    check_name(name)
    files = [Path(f) for f in files]
    if not files:
        raise TargetError("no --embeddings file given")
    set_dir = targets_root(catalog) / name
    if (set_dir / "set.json").exists() and not overwrite:
        raise TargetError(f"target set '{name}' already exists in {catalog} (use --overwrite to replace it)")
    parts, dim = [], None
    for f in files:
        arr = load_array_file(f, "target embeddings", key="image_features")
        if dim is not None and arr.shape[1] != dim:
            raise TargetError(f"{f}: target embeddings have dimension {arr.shape[1]}, {files[0]} has {dim}")
        dim = arr.shape[1]
        try:
            parts.append(normalise_rows(arr))
        except TargetError as e:
            raise TargetError(f"{f}: {e}") from None
    x = np.concatenate(parts)
    with replace_dir(set_dir, _OWNED, what=f"curate targets (target set '{name}')", error=TargetError) as new:
        with atomic_path(new / "embeddings.npy", suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:
                np.lib.format.write_array(fh, x, allow_pickle=False)
        meta = {"name": name, "rows": int(len(x)), "dim": int(dim), "normalised": "L2 rows",
                "sha256": file_sha256(new / "embeddings.npy"),
                "files": [{"path": str(f.resolve()), "sha256": file_sha256(f)} for f in files],
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_json(new / "set.json", meta)
    return TargetSet(name, set_dir, meta)
