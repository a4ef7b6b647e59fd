"""Text feature outputs are the same bytes wherever the model file lives (issue 17: `curate
catalog example` in a fresh clone rewrote tracked parquet files whose metadata held the model's
absolute path). The outputs name the model by identity (name, sha256, bytes) only."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq

from curate.catalog.connection import init_catalog
from curate.features.langid import bundled_lid_model
from curate.features.text import META_KEY, build_text_features
from tests.conftest import REPO


def _build(root, lid_model=None):
    shutil.copytree(REPO / "data" / "sample_pool" / "metadata", root / "pool" / "metadata")
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool", features_dir=root / "feat")
    build_text_features(cat, lid_model=lid_model, progress=False)
    return sorted((root / "feat" / "text_features").glob("*.parquet"))


def test_same_bytes_with_the_model_elsewhere_and_no_path_recorded(tmp_path):
    a = _build(tmp_path / "a")
    moved = tmp_path / "models" / "lid.176.ftz"
    moved.parent.mkdir()
    shutil.copy(bundled_lid_model(), moved)
    b = _build(tmp_path / "b", lid_model=moved)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2
    for pa_, pb in zip(a, b):
        assert pa_.read_bytes() == pb.read_bytes()
        meta = pq.read_schema(pa_).metadata[META_KEY].decode()
        assert str(bundled_lid_model().parent) not in meta and str(tmp_path) not in meta
        assert json.loads(meta)["settings"]["lid_model"]["name"] == "lid.176.ftz"


def test_committed_example_features_carry_no_machine_path():
    for p in (REPO / "data" / "sample_pool" / "features").rglob("*.parquet"):
        meta = b" ".join(v for k, v in (pq.read_schema(p).metadata or {}).items() if k.startswith(b"curate"))
        assert b'"path"' not in meta and b"/site-packages/" not in meta, p
