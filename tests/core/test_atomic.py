"""curate.atomic: write-then-rename, and temp files of killed writers cleaned by the next writer.

Temp names carry the writer's pid and host: ``.<name>.<pid>-<host>.<random><suffix>.tmp``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate import atomic
from curate.atomic import atomic_path, pid_alive, remove_stale_temps, stale_temps, write_json

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names no process now
    assert not pid_alive(p.pid)
    return p.pid


def _temp(d: Path, name: str, pid: int, host: str | None = None, rand: str = "abcd_123", suffix: str = "") -> Path:
    p = d / f".{name}.{pid}-{host or atomic._HOST}.{rand}{suffix}.tmp"
    p.write_bytes(b"half-written")
    return p


def test_temp_name_carries_pid_and_host(tmp_path):
    with atomic_path(tmp_path / "out.npy", suffix=".npy") as tmp:
        name = tmp.name
        tmp.write_bytes(b"x")
    assert name.startswith(f".out.npy.{os.getpid()}-{atomic._HOST}.") and name.endswith(".npy.tmp")
    assert (tmp_path / "out.npy").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


OTHER_HOST = "00000000" if atomic._HOST != "00000000" else "11111111"


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()  # pytest's parent outlives this test
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files = {
            "dead": _temp(tmp_path, "out.parquet", dead, suffix=".parquet"),
            "dead, other suffix": _temp(tmp_path, "out.parquet", dead, rand="zz9_zz9z"),
            "dead, other output": _temp(tmp_path, "other.npy", dead),
            "live parent": _temp(tmp_path, "out.parquet", live),
            "live child": _temp(tmp_path, "out.parquet", sleeper.pid),
            "dead pid, other host": _temp(tmp_path, "out.parquet", dead, host=OTHER_HOST),
        }
        user = {
            tmp_path / ".out.parquet.tmp": b"a user's file",
            tmp_path / ".out.parquet.12345.tmp": b"old-style name: owner unknown",
            tmp_path / "notes.txt": b"unrelated",
        }
        for p, b in user.items():
            p.write_bytes(b)
        assert stale_temps(tmp_path / "out.parquet") == sorted([files["dead"], files["dead, other suffix"]])
        with atomic_path(tmp_path / "out.parquet", suffix=".parquet") as tmp:
            tmp.write_bytes(b"complete")
        assert (tmp_path / "out.parquet").read_bytes() == b"complete"
        gone = {k for k, p in files.items() if not p.exists()}
        assert gone == {"dead", "dead, other suffix", "dead, other output"}
        for k in ("live parent", "live child", "dead pid, other host"):
            assert files[k].read_bytes() == b"half-written"
        for p, b in user.items():
            assert p.read_bytes() == b
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remove_stale_temps_reports_what_it_removed(tmp_path):
    dead = _dead_pid()
    a = _temp(tmp_path, "a.npy", dead)
    keep = _temp(tmp_path, "b.npy", os.getpid())  # our own: never stale
    assert remove_stale_temps(tmp_path) == [a]
    assert not a.exists() and keep.exists()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_failed_block_leaves_no_temp_and_keeps_the_old_output(tmp_path):
    dest = tmp_path / "m.json"
    write_json(dest, {"v": 1})
    before = dest.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0) and not pid_alive(-1)


# --------------------------------------------------------------------------- kill -9 during `curate run`

POOL_FILES, POOL_ROWS = 6, 40_000
VOLATILE = {"elapsed_seconds", "subset", "catalog", "built_now", "parts_now", "dir", "command"}  # paths, times, work done now


def _stable(manifest: dict):
    if isinstance(manifest, dict):
        return {k: _stable(v) for k, v in manifest.items() if k not in VOLATILE}
    return manifest


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from curate.pool.sample import generate_pool

    root = tmp_path_factory.mktemp("killpool")
    generate_pool(root / "pool", files=POOL_FILES, rows_per_file=POOL_ROWS, npz=False, shards=False, fast=True)
    env = dict(os.environ, CURATE_CACHE=str(root / "cache"))
    return root / "pool", env


def _run_cmd(cat: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "curate.cli.main", "run", "text_based", "-c", str(cat), "-o", str(out)]


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory) -> tuple[bytes, dict]:
    """The subset and manifest of one uninterrupted run on its own catalog."""
    from curate.catalog.connection import init_catalog

    root, env = pool
    tmp_path = tmp_path_factory.mktemp("killref")
    cat = init_catalog(tmp_path / "ref" / "cat.duckdb", pool=root)
    out = tmp_path / "ref" / "out.npy"
    subprocess.run(_run_cmd(cat, out), env=env, cwd=REPO, check=True, capture_output=True)
    return out.read_bytes(), _stable(json.loads(out.with_suffix(".json").read_text()))


@pytest.mark.parametrize("point", ["first feature file", "half the feature files"])
def test_kill_during_run_then_rerun_is_identical_and_leaves_no_temp(pool, reference, tmp_path, point):
    from curate.catalog.connection import init_catalog

    ref_npy, ref_manifest = reference
    root, env = pool
    cat = init_catalog(tmp_path / "k" / "cat.duckdb", pool=root)
    out = tmp_path / "k" / "out.npy"
    fdir = tmp_path / "k" / "cat.duckdb.features" / "text_features"
    want = 1 if point == "first feature file" else POOL_FILES // 2
    proc = subprocess.Popen(_run_cmd(cat, out), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(fdir.glob("*.parquet"))) < want:
            time.sleep(0.005)
        assert proc.poll() is None, "finished before it could be killed"
    finally:
        proc.kill()  # the main process only: its workers must go by themselves
        proc.wait()
    time.sleep(0.5)
    assert not out.exists()
    r = subprocess.run(_run_cmd(cat, out), env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref_npy
    assert _stable(json.loads(out.with_suffix(".json").read_text())) == ref_manifest
    temps = [p for p in (tmp_path / "k").rglob("*") if p.name.endswith(".tmp")]
    assert temps == []
    assert _group_members(proc.pid) == []  # no worker of the killed run is left


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = raw[raw.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            out.append(int(d.name))
    return out
