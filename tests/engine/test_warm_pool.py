"""Worker processes started ahead of their tasks (``WarmPool``) and pandas kept out of command
processes (``curate.nopandas``)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curate import nopandas
from curate.engine import Engine, WarmPool, _drain, map_tasks, warm_workers

pytestmark = pytest.mark.usefixtures("model_cache")  # tests/conftest.py

_MARK = None


def _mark(value):
    """Run by each warm worker as it starts."""
    global _MARK
    _MARK = value


def _task(i):
    return i, os.getpid(), _MARK


def _units_task(i, progress=None):
    progress(i)
    return i


def _pandas_blocked(_):
    try:
        import pandas  # noqa: F401
    except ImportError:
        return True
    return False


def test_tasks_run_on_the_warm_workers_after_their_warm_up():
    with WarmPool(2, _mark, ("loaded",)) as pool:
        assert warm_workers() == 2
        got = list(map_tasks(_task, [(i,) for i in range(6)], Engine(workers=2)))
        started = set(pool.executor._processes)
    assert [g[0] for g in got] == list(range(6))  # in task order
    assert {g[2] for g in got} == {"loaded"}  # every task ran where the warm-up had run
    assert {g[1] for g in got} <= started and len(started) == 2
    assert warm_workers() is None


def test_more_workers_and_later_calls_start_their_own_workers():
    with WarmPool(2, _mark, ("loaded",)):
        got = list(map_tasks(_task, [(i,) for i in range(3)], Engine(workers=3)))
    assert {g[2] for g in got} == {None}
    with WarmPool(3, _mark, ("loaded",)):  # fewer tasks than warm workers: those run them
        got = list(map_tasks(_task, [(i,) for i in range(2)], Engine(workers=4)))
    assert {g[2] for g in got} == {"loaded"}
    got = list(map_tasks(_task, [(i,) for i in range(3)], Engine(workers=2)))
    assert {g[2] for g in got} == {None}


def test_another_thread_does_not_use_the_pool():
    got = []
    with WarmPool(2, _mark, ("loaded",)):
        t = threading.Thread(target=lambda: got.extend(map_tasks(_task, [(i,) for i in range(3)], Engine(workers=2))))
        t.start()
        t.join(120)
        assert warm_workers() == 2
    assert [g[0] for g in got] == [0, 1, 2] and {g[2] for g in got} == {None}


def test_unit_progress_goes_to_the_call_that_sent_it():
    class Bar:
        def __init__(self):
            self.n = 0

        def update(self, k):
            self.n += k

    q, bar = queue.Queue(), Bar()
    for msg in [(1, 5), (2, 7), (1, 1), (2, 3)]:  # call 1's late units, then call 2's
        q.put(msg)
    _drain(q, bar, 2)
    assert bar.n == 10
    with WarmPool(2) as pool:
        for _ in range(2):  # two calls on one pool: each yields its own results
            assert list(map_tasks(_units_task, [(1,), (2,), (3,)], Engine(workers=2), units=True)) == [1, 2, 3]
        assert pool.used


def test_an_unused_pool_is_let_go_without_waiting_for_its_warm_up():
    pool = WarmPool(2, __import__("time").sleep, (600,))
    pids = []

    def run():
        with pool:
            for _ in range(200):
                if len(pool.executor._processes) == 2:
                    break
                __import__("time").sleep(0.05)
            pids.extend(pool.executor._processes)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive(), "closing an unused pool waited for its warm-up (600 s)"
    assert len(pids) == 2
    for pid in pids:  # terminated and reaped
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_failing_caller_does_not_wait_for_busy_workers():
    import time

    pool = WarmPool(2)
    pids, errors = [], []

    def run():
        try:
            with pool:
                pool.used = True
                for _ in range(2):
                    pool.executor.submit(time.sleep, 600)  # tasks that would keep shutdown() waiting
                for f in pool.started:
                    f.result(60)
                pids.extend(pool.executor._processes)
                raise RuntimeError("the caller failed")
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive(), "closing after a failure waited for the running tasks (600 s)"
    assert errors == ["the caller failed"] and len(pids) == 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_warm_workers_ignore_ctrl_c_and_end_with_the_pool():
    import signal

    with WarmPool(2, _mark, ("loaded",)) as pool:  # started from the main thread (pytest's)
        for f in pool.started:
            f.result(60)
        for pid in list(pool.executor._processes):
            os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        got = list(map_tasks(_task, [(i,) for i in range(4)], Engine(workers=2)))
    assert {g[2] for g in got} == {"loaded"}  # the same workers, alive, ran them
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this process's handler is back


def test_caption_tables_can_warm_their_workers():
    # the table's loader reaches a spawned worker by reference (a lambda cannot)
    import pickle

    from curate.features import cld3, text

    for table in (text.TABLE, cld3.TABLE):
        assert pickle.loads(pickle.dumps(table.load)) is table.load


# -- pandas kept out --------------------------------------------------------------------------

def test_workers_keep_pandas_out_when_their_parent_does(monkeypatch):
    monkeypatch.setenv(nopandas.ENV, "1")
    assert list(map_tasks(_pandas_blocked, [(0,), (1,)], Engine(workers=2))) == [True, True]
    monkeypatch.delenv(nopandas.ENV)
    assert list(map_tasks(_pandas_blocked, [(0,), (1,)], Engine(workers=2))) == [False, False]


@pytest.fixture()
def cat(tmp_path):
    from curate.catalog.connection import init_catalog
    from curate.pool.sample import generate_pool

    generate_pool(tmp_path / "pool", files=2, rows_per_file=500, seed=3, npz=False, shards=False)
    return init_catalog(tmp_path / "c.duckdb", pool=tmp_path / "pool", features_dir=tmp_path / "features")


def test_the_curate_command_runs_a_filter_without_importing_pandas(cat, tmp_path):
    out = tmp_path / "kept.npy"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "curate", "run", "basic_filter", "-c", str(cat),
                           "-o", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    # an import that failed is listed too ("pandas", a few microseconds): a real one loads pandas.*
    assert "duckdb" in imported and not [m for m in imported if m.startswith("pandas.")]
    # the same subset as a process that has pandas (a library caller), on a fresh catalog
    from curate.catalog.connection import init_catalog
    from curate.run import run_filter

    other = init_catalog(tmp_path / "o.duckdb", pool=tmp_path / "pool", features_dir=tmp_path / "o_features")
    run_filter("basic_filter", catalog=other, out=tmp_path / "lib.npy", progress=False)
    assert len(np.load(out)) and np.array_equal(np.load(out), np.load(tmp_path / "lib.npy"))


def test_a_library_caller_keeps_its_pandas(cat, tmp_path):
    from curate.cli import main

    res = CliRunner().invoke(main, ["run", "basic_filter", "-c", str(cat), "-o", str(tmp_path / "k.npy")])
    assert res.exit_code == 0, res.output
    assert nopandas._FINDER not in sys.meta_path and os.environ.get(nopandas.ENV) is None
    import pandas

    assert pandas.DataFrame({"a": [1]}).shape == (1, 1)


def test_explain_dropped_and_plot_work_in_a_command_without_pandas(cat, tmp_path):
    import pyarrow.parquet as pq

    out, dropped, plot = tmp_path / "kept.npy", tmp_path / "dropped.parquet", tmp_path / "plot.png"
    proc = subprocess.run([sys.executable, "-m", "curate", "run", "laion2b", "-c", str(cat), "-o", str(out),
                           "--explain", "--dropped", str(dropped), "--plot", str(plot)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pq.read_metadata(dropped).num_rows == 1000 - len(np.load(out))  # every pool row kept or dropped
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "clip_b32_similarity_score" in proc.stdout  # the funnel names the conjunct


def test_a_caption_table_warms_one_worker_per_pool_file_at_most(cat, tmp_path, monkeypatch):
    from curate.catalog.connection import init_catalog
    from curate.features import parts
    from curate.features.text import TABLE
    from curate.pool.sample import generate_pool

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    with parts.warm_pool(TABLE, cat, ["counts", "lang"], 10**6) as pool:  # 2 pool files
        assert isinstance(pool, WarmPool) and pool.workers == 2
    with parts.warm_pool(TABLE, cat, ["counts"], 10**6) as pool:  # counts run in threads
        assert pool is None
    with parts.warm_pool(TABLE, cat, ["lang"], 10) as pool:  # small work runs in this process
        assert pool is None
    generate_pool(tmp_path / "one", files=1, rows_per_file=50, seed=4, npz=False, shards=False)
    one = init_catalog(tmp_path / "one.duckdb", pool=tmp_path / "one", features_dir=tmp_path / "one_features")
    with parts.warm_pool(TABLE, one, ["lang"], 10**6) as pool:  # one file: computed in this process
        assert pool is None
