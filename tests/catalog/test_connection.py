"""Catalog creation, bad pools, working-directory independence, the DuckDB shell, the example."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import CatalogError, connect, init_catalog
from curate.demo.example import CATALOG_NAME, SAMPLE_POOL_DIR, build_example, catalog_fingerprint
from tests.conftest import REPO, pool_table, uid_of


def write_pool(root, tables):
    meta = root / "metadata"
    meta.mkdir(parents=True)
    for i, t in enumerate(tables):
        pq.write_table(t, meta / f"{i:04d}.parquet")
    return root


def rows(n, start=0):
    return [{"uid": uid_of(start + i)} for i in range(n)]


def test_pool_view_columns_file_and_row(tmp_path):
    root = write_pool(tmp_path / "p", [pool_table(rows(3)), pool_table(rows(2, 3))])
    cat = init_catalog(tmp_path / "c.duckdb", pool=root)
    con = connect(cat)
    cols = [r[0] for r in con.execute("DESCRIBE pool").fetchall()]
    assert cols == ["uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                    "clip_l14_similarity_score", "face_bboxes", "sha256", "file", "row"]
    got = con.execute('SELECT file, "row", uid FROM pool ORDER BY file, "row"').fetchall()
    assert got == [("0000", 0, uid_of(0)), ("0000", 1, uid_of(1)), ("0000", 2, uid_of(2)),
                   ("0001", 0, uid_of(3)), ("0001", 1, uid_of(4))]
    files = con.execute("SELECT file, num_rows, row_start, first_shard FROM pool_files ORDER BY file_id").fetchall()
    assert files == [("0000", 3, 0, 0), ("0001", 2, 3, 1)]


def test_uid_macros_match_python(tmp_path):
    root = write_pool(tmp_path / "p", [pool_table(rows(1))])
    con = connect(init_catalog(tmp_path / "c.duckdb", pool=root))
    u = "0123456789abcdeffedcba9876543210"
    hi, lo, back, ok, bad = con.execute(
        "SELECT uid_hi(?), uid_lo(?), uid_hex(uid_hi(?), uid_lo(?)), is_uid(?), uid_hi('0x12_4')",
        [u, u, u, u, u]).fetchone()
    assert (hi, lo, back, ok, bad) == (int(u[:16], 16), int(u[16:], 16), u, True, None)


def test_extra_columns_are_kept_and_index_dropped(tmp_path):
    t = pool_table(rows(2)).append_column("timestamp", pa.array([1, 2], pa.int64()))
    t = t.append_column("__index_level_0__", pa.array([0, 1], pa.int64()))
    root = write_pool(tmp_path / "p", [t])
    con = connect(init_catalog(tmp_path / "c.duckdb", pool=root))
    cols = [r[0] for r in con.execute("DESCRIBE pool").fetchall()]
    assert "timestamp" in cols and "__index_level_0__" not in cols


@pytest.mark.parametrize("mutate,msg", [
    (lambda t: t.drop_columns(["text"]), "missing column 'text'"),
    (lambda t: t.rename_columns([("caption" if c == "text" else c) for c in t.column_names]), "missing column 'text'"),
    (lambda t: t.set_column(3, "original_width", pa.array(["1"] * t.num_rows)), "column 'original_width' has type string"),
])
def test_bad_schema(tmp_path, mutate, msg):
    root = write_pool(tmp_path / "p", [mutate(pool_table(rows(2)))])
    with pytest.raises(CatalogError) as e:
        init_catalog(tmp_path / "c.duckdb", pool=root)
    assert msg in str(e.value) and "0000.parquet" in str(e.value)
    assert not (tmp_path / "c.duckdb").exists() and not list(tmp_path.glob(".c.duckdb*"))


def test_bad_metadata_dirs(tmp_path):
    root = write_pool(tmp_path / "p", [pool_table(rows(2))])
    (root / "metadata" / "notes.txt").write_text("hi")
    with pytest.raises(CatalogError, match="notes.txt: not a .parquet or .npz file"):
        init_catalog(tmp_path / "c.duckdb", pool=root)
    (root / "metadata" / "notes.txt").unlink()
    (root / "metadata" / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(CatalogError, match="broken.parquet: not a readable parquet file"):
        init_catalog(tmp_path / "c.duckdb", pool=root)
    (tmp_path / "empty" / "metadata").mkdir(parents=True)
    with pytest.raises(CatalogError, match="no .parquet files"):
        init_catalog(tmp_path / "c.duckdb", pool=tmp_path / "empty")
    zero = write_pool(tmp_path / "zero", [pool_table([])])
    with pytest.raises(CatalogError, match="hold no rows"):
        init_catalog(tmp_path / "c.duckdb", pool=zero)
    mixed = write_pool(tmp_path / "mixed", [pool_table(rows(1)),
                                           pool_table(rows(1, 5)).append_column("x", pa.array([1]))])
    with pytest.raises(CatalogError, match="0001.parquet: extra columns"):
        init_catalog(tmp_path / "c.duckdb", pool=mixed)
    with pytest.raises(CatalogError, match="already exists"):
        init_catalog(tmp_path / "c2.duckdb", pool=root.parent / "zero") if False else None
        (tmp_path / "c3.duckdb").write_bytes(b"")
        init_catalog(tmp_path / "c3.duckdb", pool=root)


def test_relative_catalog_reads_its_own_files_from_any_cwd(tmp_path):
    """DuckDB resolves relative view paths against the CWD first; a decoy pool with the same
    relative path in the CWD must not be read."""
    a = write_pool(tmp_path / "a" / "data", [pool_table(rows(3))])
    init_catalog(tmp_path / "a" / "cat.duckdb", pool=a, relative=True)
    write_pool(tmp_path / "b" / "data", [pool_table(rows(7, 100))])  # decoy
    old = os.getcwd()
    try:
        for cwd in (tmp_path / "b", tmp_path, Path("/")):
            os.chdir(cwd)
            con = connect(tmp_path / "a" / "cat.duckdb")
            assert con.execute("SELECT count(*), min(uid) FROM pool").fetchone() == (3, min(uid_of(i) for i in range(3)))
            con.close()
    finally:
        os.chdir(old)
    # and a relative catalog moved together with its data keeps working
    shutil.move(str(tmp_path / "a"), str(tmp_path / "moved"))
    assert connect(tmp_path / "moved" / "cat.duckdb").execute("SELECT count(*) FROM pool").fetchone() == (3,)


def test_duckdb_shell_opens_the_catalog(tmp_path):
    shell = Path(sys.executable).with_name("duckdb")
    assert shell.exists(), "duckdb-cli is a dependency"
    root = write_pool(tmp_path / "p", [pool_table(rows(4))])
    cat = init_catalog(tmp_path / "c.duckdb", pool=root)
    out = subprocess.run([str(shell), "-readonly", "-csv", str(cat), "-c", "SELECT count(*) FROM pool"],
                         capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4"
    # the bundled example, from its own directory (relative paths)
    out = subprocess.run([str(shell), "-readonly", "-csv", CATALOG_NAME, "-c",
                          "SELECT count(*), count(DISTINCT file) FROM pool"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "2000,2"


def test_example_catalog_is_up_to_date(tmp_path):
    build_example(tmp_path)
    fresh, committed = catalog_fingerprint(tmp_path / CATALOG_NAME), catalog_fingerprint(REPO / CATALOG_NAME)
    for key in ("meta", "pool_files", "views", "macros", "tables"):
        assert fresh[key] == committed[key], f"catalog.duckdb.example is stale ({key}); run `curate catalog example`"
    new, old = tmp_path / SAMPLE_POOL_DIR, REPO / SAMPLE_POOL_DIR
    for sub in ("metadata", "shards", "features/text_features", "features/text_lang_cld3"):
        names = sorted(p.name for p in (new / sub).iterdir() if p.name != ".build.lock")  # parts.build_lock
        assert names == sorted(p.name for p in (old / sub).iterdir() if p.is_file()), sub
        for name in names:
            a, b = new / sub / name, old / sub / name
            if name.endswith(".parquet"):
                assert pq.read_table(a).to_pandas().equals(pq.read_table(b).to_pandas()), name  # NaN-aware
            elif name.endswith(".npz"):
                with np.load(a) as x, np.load(b) as y:
                    assert sorted(x.files) == sorted(y.files)
                    assert all(np.array_equal(x[k], y[k]) for k in x.files), name
            else:
                assert a.read_bytes() == b.read_bytes(), name


def test_sample_pool_shards_follow_img2datasets_file_order():
    """img2dataset reads metadata files in sorted name order and numbers shards on: row r of the
    i-th file (sorted) is sample key S*10**4 + r % 10**4 of shard S = first_shard(i) + r // 10**4.
    The catalog (pool_files.first_shard), `download status` and `byod score` rely on it. Checked
    here from the files alone, not with curate's own mapping."""
    pool = REPO / SAMPLE_POOL_DIR
    shard = 0
    for path in sorted((pool / "metadata").glob("*.parquet")):
        uids = pq.read_table(path, columns=["uid"]).column("uid").to_pylist()
        for s0 in range(0, len(uids), 10_000):
            t = pq.read_table(pool / "shards" / f"{shard:08d}.parquet").sort_by("key")
            keys = [int(k) for k in t.column("key").to_pylist()]
            assert keys == [shard * 10_000 + r for r in range(len(keys))], path.name
            assert t.column("uid").to_pylist() == uids[s0:s0 + 10_000], f"shard {shard:08d} vs {path.name}"
            shard += 1
    assert not (pool / "shards" / f"{shard:08d}.parquet").exists()
