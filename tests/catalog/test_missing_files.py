"""A relative catalog whose files went missing: a feature table's file is rebuilt by the next run
that needs it (same subset); a pool file is one line naming the catalog and the file, exit 1."""

import shutil
import subprocess
import sys

from curate.catalog.connection import init_catalog
from tests.conftest import REPO


def _catalog(tmp_path):
    shutil.copytree(REPO / "data" / "sample_pool" / "metadata", tmp_path / "pool" / "metadata")
    shutil.copytree(REPO / "data" / "sample_pool" / "features" / "text_features",
                    tmp_path / "pool" / "features" / "text_features")
    return init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool", relative=True,
                        features_dir=tmp_path / "pool" / "features")


def _run(cat, out, cwd):
    return subprocess.run([sys.executable, "-m", "curate", "run", "basic_filter", "-c", str(cat), "-o", str(out)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_a_deleted_feature_file_is_rebuilt_by_the_next_run(tmp_path):
    cat = _catalog(tmp_path)
    first = _run(cat, tmp_path / "a.npy", tmp_path)
    assert first.returncode == 0, first.stderr
    victim = sorted((tmp_path / "pool" / "features" / "text_features").glob("*.parquet"))[0]
    victim.unlink()
    again = _run(cat, tmp_path / "b.npy", tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()
    assert victim.is_file()  # computed again, for the rows basic_filter needs


def test_a_deleted_pool_file_is_one_line(tmp_path):
    cat = _catalog(tmp_path)
    victim = sorted((tmp_path / "pool" / "metadata").glob("*.parquet"))[0]
    victim.unlink()
    r = _run(cat, tmp_path / "a.npy", tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    assert str(cat.name) in lines[0] and victim.name in lines[0] and "missing" in lines[0]
    assert not (tmp_path / "a.npy").exists()
