"""`curate shell`: the real duckdb shell on a catalog, from another directory (issue 20)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.catalog.connection import register_parquet_view
from curate.explore.shell import duckdb_executable
from tests.conftest import REPO, uid_of

CATALOG = REPO / "catalog.duckdb.example"


def shell(*args, cwd: Path):
    return subprocess.run([sys.executable, "-m", "curate", "shell", *args], cwd=cwd, capture_output=True, text=True)


def cells(out: str) -> list[str]:
    """The cell texts of duckdb's box-drawn result tables, in order."""
    return [c.strip() for line in out.splitlines() if line.startswith("│") for c in line.strip("│").split("│")]


def test_plain_duckdb_from_elsewhere_fails_on_the_relative_catalog(tmp_path):
    # what the issue reports; `curate shell` exists because of it
    r = subprocess.run([str(duckdb_executable()), "-readonly", str(CATALOG), "-c", "SELECT count(*) FROM pool"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No files found" in r.stdout + r.stderr


def test_bundled_catalog_views_and_macros_from_another_directory(tmp_path):
    r = shell(str(CATALOG), "-c", "SELECT count(*) AS n FROM pool; SELECT count(*) AS m FROM text_lang_cld3; "
              "SELECT uid_hex(uid_hi('00000000000000010000000000000002'), 2) AS u", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    c = cells(r.stdout)
    assert c == ["n", "int64", "2000", "m", "int64", "2000", "u", "varchar", "00000000000000010000000000000002"]


def test_default_catalog_and_the_users_own_directory(tmp_path):
    (tmp_path / "mine.csv").write_text("a\n1\n2\n3\n")
    r = shell("-c", "SELECT count(*) FROM pool; SELECT sum(a) AS total_of_mine FROM read_csv('mine.csv')", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cells(r.stdout)[2::3] == ["2000", "6"]


def test_read_only_by_default(tmp_path):
    before = hashlib.sha256(CATALOG.read_bytes()).hexdigest()
    r = shell(str(CATALOG), "-c", "CREATE TABLE t (a INTEGER)", cwd=tmp_path)
    assert r.returncode == 1 and "read-only" in (r.stdout + r.stderr).lower()
    assert hashlib.sha256(CATALOG.read_bytes()).hexdigest() == before


def test_catalog_with_a_feature_view(make_catalog, tmp_path):
    cat = make_catalog([[{"uid": uid_of(i)} for i in range(5)], [{"uid": uid_of(i)} for i in range(5, 8)]])
    feat = cat.parent / "features" / "my_feature"
    feat.mkdir(parents=True)
    pq.write_table(pa.table({"uid": [uid_of(i) for i in range(8)], "score": [float(i) for i in range(8)]}),
                   feat / "0000.parquet")
    register_parquet_view(cat, "my_feature", [feat / "0000.parquet"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = shell(str(cat), "-c", "SELECT count(*) AS n, sum(f.score) AS s FROM pool p JOIN my_feature f USING (uid)",
              cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert cells(r.stdout)[-2:] == ["8", "28.0"]


def test_missing_catalog_is_one_line(tmp_path):
    r = shell(str(tmp_path / "nope.duckdb"), "-c", "SELECT 1", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.duckdb'}: catalog not found "
                                             f"(create one with `curate catalog init`)"]


def test_readme_example(tmp_path):
    # README's "A first session": curate shell -c "SELECT count(*) FROM pool WHERE original_width >= 200"
    import pyarrow.compute as pc

    want = sum(int(pc.sum(pc.greater_equal(pq.read_table(f, columns=["original_width"]).column(0), 200)).as_py() or 0)
               for f in sorted((REPO / "data" / "sample_pool" / "metadata").glob("*.parquet")))
    r = shell("-c", "SELECT count(*) FROM pool WHERE original_width >= 200", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cells(r.stdout)[2:] == [str(want)] and 0 < want < 2000
