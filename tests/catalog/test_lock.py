"""A catalog another process holds open: commands wait for it (bounded), then fail with one line
naming the catalog and the process; two `curate run` that build the same features at once both
succeed with the same output."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from curate.catalog.connection import init_catalog
from tests.conftest import REPO

HOLD = ("import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
        "time.sleep(float(sys.argv[2]))")


def copy_example(tmp_path):
    """A new catalog over a copy of the bundled sample pool's metadata (no feature tables yet)."""
    shutil.copytree(REPO / "data" / "sample_pool" / "metadata", tmp_path / "pool" / "metadata")
    return init_catalog(tmp_path / "catalog.duckdb", pool=tmp_path / "pool")


def hold_lock(cat, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(cat), str(seconds)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    return p


def curate(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "curate.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("args", [
    ["catalog", "info", "{cat}"],
    ["run", "no_filter", "--catalog", "{cat}", "--out", "{tmp}/o.npy"],
], ids=["catalog-info", "run"])
def test_locked_catalog_is_one_line_naming_the_process(tmp_path, args):
    cat = copy_example(tmp_path)
    before = cat.read_bytes()
    holder = hold_lock(cat, 60)
    try:
        t0 = time.monotonic()
        r = curate(*[a.format(cat=cat, tmp=tmp_path) for a in args], env={"CURATE_LOCK_WAIT": "1"})
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: {cat}: locked by another process ({errors[0].split('(')[1].split(',')[0]}, "
                      f"PID {holder.pid}); wait for it to finish, or close it if it is a DuckDB shell or "
                      f"notebook holding the catalog open, then re-run"], r.stderr
    assert "Traceback" not in r.stderr and f"waiting for process {holder.pid}" in r.stderr
    assert waited >= 1
    assert not (tmp_path / "o.npy").exists() and not list(tmp_path.glob(".o.npy*"))
    assert cat.read_bytes() == before


def test_command_waits_for_a_lock_released_in_time(tmp_path):
    cat = copy_example(tmp_path)
    holder = hold_lock(cat, 1.5)
    try:
        r = curate("catalog", "info", cat, env={"CURATE_LOCK_WAIT": "60"})
    finally:
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert "pool:    2,000 samples in 2 files" in r.stdout


def test_two_runs_building_features_at_once_both_succeed(tmp_path):
    cat = copy_example(tmp_path)
    runs = [subprocess.Popen([sys.executable, "-m", "curate.cli.main", "run", "text_based", "--catalog", str(cat),
                              "--out", str(tmp_path / f"o{i}.npy")], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in runs]
    for rc, err in results:
        assert rc == 0, err
        assert "Traceback" not in err
    alone = curate("run", "text_based", "--catalog", cat, "--out", tmp_path / "alone.npy")
    assert alone.returncode == 0, alone.stderr
    assert (tmp_path / "o0.npy").read_bytes() == (tmp_path / "o1.npy").read_bytes() == (tmp_path / "alone.npy").read_bytes()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
