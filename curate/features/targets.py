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
from pathlib import Path

import numpy as np

from curate.atomic import atomic_path, file_sha256, replace_dir, write_json
from curate.catalog.connection import default_catalog
from curate.errors import CurateError
from curate.features.clusters import load_array_file
from curate.features.tables import NamedSet, check_set_name, feature_root, find_named_set, list_named_sets

_OWNED = re.compile(r"embeddings\.npy|set\.json|\..+\.tmp")


class TargetError(CurateError):
    """A target set or target embedding file that cannot be used."""


class TargetSet(NamedSet):
    """A NormSim target set: ``FEATURES_DIR/targets/NAME/``."""


def check_name(name) -> str:
    return check_set_name(name, "target set", TargetError)


def targets_root(catalog) -> Path:
    return feature_root(catalog, "targets")


def list_target_sets(catalog=None) -> list[TargetSet]:
    return list_named_sets(catalog, "targets", TargetSet)


def get_target_set(catalog, name) -> TargetSet:
    return find_named_set(catalog, "targets", name, TargetSet, "target set", TargetError,
                          f"create it with `curate targets import CATALOG --name {name} --embeddings FILE...`")


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
