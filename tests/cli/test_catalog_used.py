"""Every command that reads or writes a catalog names the catalog it used in its summary line
(issue 17), via :func:`curate.cli.options.catalog_used`: without ``-c``, the bundled example
("(the bundled example; pass -c FILE or set CURATE_CATALOG)") or ``$CURATE_CATALOG``.

Read-only commands run on the bundled example itself, without ``-c``. Commands that write
next to their catalog (cluster sets, converted embeddings, feature tables, shard indexes) run
on a copy of it named by ``$CURATE_CATALOG`` (never ``-c``), so the checkout is never written;
commands whose catalog is required or optional (``--catalog`` of download, reshard, pool
builds) name the one they were given. The expected lines are written out here by hand.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli.main import main
from tests.conftest import REPO, uid_of

EXAMPLE = REPO / "catalog.duckdb.example"
BUNDLED = f"{EXAMPLE} (the bundled example; pass -c FILE or set CURATE_CATALOG)"
FIRST_UID = "4c64484c1b4e39aab533b0d3eada6693"  # row 0 of the bundled pool's first file


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The bundled example catalog and its pool, copied with the same relative layout."""
    root = tmp_path_factory.mktemp("example-copy")
    shutil.copytree(REPO / "data" / "sample_pool", root / "data" / "sample_pool")
    shutil.copy(EXAMPLE, root / "catalog.duckdb.example")
    return root / "catalog.duckdb.example"


def _invoke(args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert r.exit_code == 0, r.output
    return r.output


#: (command line without -c, the line that names the bundled example)
BUNDLED_CASES = [
    (["catalog", "info"], f"catalog: {BUNDLED}\n"),
    (["clusters", "list"], f"1 cluster set(s) in catalog {BUNDLED}\n"),  # the stand-in sample_k16
    (["embeddings", "neighbors", "--uid", FIRST_UID, "-k", "2", "--key", "b32_img"],
     f"2 neighbours in @s on catalog {BUNDLED}\n"),
]


def _matches(output: str, expected: str) -> bool:
    """``expected`` in ``output``, where ``@s`` stands for a number of seconds (``0.12s``)."""
    import re

    pattern = re.escape(expected).replace("@s", r"[0-9]+\.[0-9]+s")
    return re.search(pattern, output) is not None


@pytest.mark.parametrize("args, expected", BUNDLED_CASES, ids=[" ".join(a[:2]) for a, _ in BUNDLED_CASES])
def test_bundled_example_is_named(monkeypatch, args, expected):
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    out = _invoke(args)
    assert _matches(out, expected), out


def test_ray_run_names_the_bundled_example(ray_session, monkeypatch, tmp_path):
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    out = _invoke(["ray", "run", "no_filter", "-o", tmp_path / "a.npy"])
    assert f"on catalog {BUNDLED}\n" in out


def test_writing_commands_name_the_environment_catalog(copy, tmp_path, ray_session):
    """Cluster sets, converted embeddings, near-duplicates and text features on the copy of the
    example named by $CURATE_CATALOG, in the order a user runs them."""
    env = {"CURATE_CATALOG": str(copy)}
    named = f"{copy} ($CURATE_CATALOG)"
    targets = tmp_path / "targets.npy"
    np.save(targets, np.eye(4, 512, dtype=np.float32))
    cases = [
        (["embeddings", "convert", "--key", "b32_img"], f"on catalog {named}\n"),
        (["embeddings", "neighbors", "--uid", FIRST_UID, "-k", "2", "--key", "b32_img"],
         f"2 neighbours in @s on catalog {named}\n"),
        (["clusters", "build", "--name", "t", "--key", "b32_img", "--k", "4", "--niter", "2"],
         f"in @s on catalog {named}\n"),
        (["clusters", "targets", "--name", "t", "--targets", targets], f"in @s on catalog {named}\n"),
        (["clusters", "list"], f"2 cluster set(s) in catalog {named}\n"),  # sample_k16 and t
        (["embeddings", "dedup", "--clusters", "t", "--threshold", "0.99"], f"on catalog {named}\n"),
        (["ray", "features-text", "--force"], f"on catalog {named}\n"),
        (["catalog", "info"], f"catalog: {named}\n"),
    ]
    for args, expected in cases:
        out = _invoke(args, env)
        assert _matches(out, expected), (args, out)


def test_required_and_optional_catalogs_are_named(copy, tmp_path, monkeypatch):
    """Commands whose catalog is their subject (given positionally, as the docs write it), or
    an optional --catalog; without one, reshard says it used none."""
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    pool = copy.parent / "data" / "sample_pool"
    cat = tmp_path / "c.duckdb"
    out = _invoke(["catalog", "init", cat, "--pool", pool])
    assert out.startswith(f"wrote {cat}: 2,000 samples in 2 parquet files")
    out = _invoke(["shards", "index", cat])
    assert _matches(out, f"indexed in catalog {cat} in @s\n"), out
    subset = tmp_path / "s.npy"
    _invoke(["run", "no_filter", "-c", cat, "-o", subset])
    out = _invoke(["reshard", "-i", pool / "shards", "-o", tmp_path / "r1", "-s", subset, "--catalog", cat, "-j", "1"])
    assert out.rstrip().endswith(f"with catalog {cat}"), out
    out = _invoke(["reshard", "-i", pool / "shards", "-o", tmp_path / "r2", "-s", subset, "-j", "1"])
    assert out.rstrip().endswith("(no catalog)"), out
    out = _invoke(["shards", "verify", tmp_path / "r1", "-i", pool / "shards", "--catalog", cat])
    assert out.rstrip().endswith(f"s, catalog {cat})"), out


def test_pool_build_and_time_views_name_the_catalog(tmp_path, monkeypatch):
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)).save(images / f"{i}.png")
        rows.append({"file": f"{i}.png", "title": f"picture number {i}", "taken_at": f"{2010 + i}-06-01T00:00:00Z"})
    table = tmp_path / "photos.csv"
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cat = tmp_path / "mine.duckdb"
    out = _invoke(["pool", "from-table", table, "--image-col", "file", "--caption-col", "title", "--time-col",
                   "taken_at", "--image-root", images, "--out", tmp_path / "pool", "--catalog", cat,
                   "--groups", "2010-2011,2012-2013", "--workers", "1"])
    assert f"wrote catalog {cat}\n" in out and f"{cat}: views timesplit, period_split, tic_eval\n" in out
    out = _invoke(["pool", "timesplit", cat, "--groups", "2010-2011,2012-2013"])
    assert f"{cat}: views timesplit, period_split, tic_eval\n" in out
    out = _invoke(["pool", "export-splits", cat, "--out", tmp_path / "splits"])
    assert _matches(out, f"wrote {tmp_path / 'splits'}: 4 subset files from catalog {cat} in @s\n"), out


def test_download_status_names_the_catalog(tmp_path, monkeypatch):
    """`curate download-status --catalog` over img2dataset-layout files written here (no network):
    bring-your-own metadata (uid, url, text) becomes DATA_DIR/pool_metadata and the catalog."""
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    data, meta = tmp_path / "data", tmp_path / "meta"
    meta.mkdir()
    uids = [uid_of(i) for i in range(3)]
    pq.write_table(pa.table({"uid": uids, "url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(3)],
                             "text": ["a", "b", "c"]}), meta / "a.parquet")
    (data / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"uid": uids, "key": [f"{i:012d}" for i in range(3)], "status": ["failed_to_download"] * 3,
                             "error_message": ["x"] * 3, "sha256": pa.nulls(3, pa.string()),
                             "original_width": pa.nulls(3, pa.int64()), "original_height": pa.nulls(3, pa.int64())}),
                   data / "shards" / "00000000.parquet")
    (data / "shards" / "00000000_stats.json").write_text(json.dumps({"count": 3}))
    cat = tmp_path / "d.duckdb"
    out = _invoke(["download-status", "--data-dir", data, "--metadata-dir", meta, "--catalog", cat])
    assert "failed_to_download           3  100.00%" in out
    assert f"wrote catalog {cat}: view download_status\n" in out
    out = _invoke(["download-status", "--data-dir", data, "--metadata-dir", meta, "--catalog", cat])
    assert f"updated catalog {cat}: view download_status (replaced)\n" in out
