"""Local worker processes die with their parent: a kill -9 of the main process leaves no worker.

Children are found in /proc (no psutil); a worker counts as gone when its /proc entry is gone
or it is a zombie (in a container, PID 1 may never reap it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

REPO = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return rest[0], int(rest[1])


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[1] == pid and st[0] != "Z":
                out.add(int(d.name))
    return out


def _at_least(pid: int, n: int) -> set[int] | None:
    c = _children(pid)
    return c if len(c) >= n else None


def _alive(pids) -> set[int]:
    return {p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"}


def _wait_for(cond, timeout: float, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


MAP_TASKS = """
import time
from curate.engine import Engine, map_tasks
for _ in map_tasks(time.sleep, [(60,)] * 4, Engine(workers=2), start={start!r}):
    pass
"""

PLAIN_POOL = """
import time
from concurrent.futures import ProcessPoolExecutor
with ProcessPoolExecutor(2) as ex:
    list(ex.map(time.sleep, [60] * 4))
"""


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_map_tasks_workers_die_with_a_killed_parent(start):
    proc = _spawn(MAP_TASKS.format(start=start))
    try:
        workers = _wait_for(lambda: _at_least(proc.pid, 2), 60)
        assert workers and len(workers) >= 2, "workers never started"
        time.sleep(1.0)  # let them run their initializer and pick up a task
        assert _alive(workers) == workers
    finally:
        proc.kill()
        proc.wait()
    left = _wait_for(lambda: not _alive(workers), 5)
    survivors = _alive(workers)
    for p in survivors:  # never leave them behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert left and not survivors, f"workers {sorted(survivors)} outlived their parent"


def test_control_plain_process_pool_workers_do_outlive_their_parent():
    # shows the check above can see a survivor: a pool without curate's initializer keeps its
    # workers blocked on their queue after the parent's kill -9
    proc = _spawn(PLAIN_POOL)
    try:
        workers = _wait_for(lambda: _at_least(proc.pid, 2), 60)
        assert workers and len(workers) >= 2
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(2.0)
    survivors = _alive(workers)
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert survivors, "expected the control's workers to survive"


def test_features_text_kill_leaves_no_worker_and_rerun_is_identical(tmp_path):
    from curate.catalog.connection import init_catalog
    from curate.pool.sample import generate_pool

    files = 8
    generate_pool(tmp_path / "pool", files=files, rows_per_file=40_000, npz=False, shards=False, fast=True)
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    fdir = tmp_path / "cat.duckdb.features" / "text_features"
    env = dict(os.environ, CURATE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "curate.cli.main", "features", "text", str(cat), "-j", "2", "--force"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = _wait_for(lambda: _at_least(proc.pid, 2), 120)
        assert workers, "no worker processes started"
        _wait_for(lambda: list(fdir.glob("*.parquet")) or proc.poll() is not None, 120, 0.01)
        assert proc.poll() is None, "finished before it could be killed"
        workers = _children(proc.pid) | workers
    finally:
        proc.kill()
        proc.wait()
    gone = _wait_for(lambda: not _alive(workers), 5)
    survivors = _alive(workers)
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert gone and not survivors, f"workers {sorted(survivors)} outlived the killed command"
    done = sorted(p.name for p in fdir.glob("*.parquet"))
    assert 1 <= len(done) < files

    rerun = cmd[:-1]  # resume: no --force
    r = subprocess.run(rerun, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"computed {files - len(done)} file(s)" in r.stdout
    assert not [p for p in fdir.iterdir() if p.name.endswith(".tmp")]
    resumed = {p.name: p.read_bytes() for p in sorted(fdir.glob("*.parquet"))}
    assert len(resumed) == files
    # the same outputs computed in one uninterrupted run (one process) are the same bytes
    r = subprocess.run(cmd[:-3] + ["-j", "1", "--force"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in sorted(fdir.glob("*.parquet"))} == resumed
