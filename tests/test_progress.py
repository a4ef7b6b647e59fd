"""Progress when standard error is not a terminal: plain lines with done/total/unit/rate (and ETA),
at the start, every $CURATE_PROGRESS_INTERVAL seconds and at the end (curate.progress).

The line format is checked against values worked out by hand; the commands (features
negcliploss, run, reshard, embeddings convert, eval) run as real subprocesses with standard
error a pipe and the interval 0, and their lines must count up to the total.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.progress import Progress, duckdb_bar, interval, log_line
from tests.evaluate.test_run import eval_data  # noqa: F401 - the tiny eval set fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.delenv("CURATE_PROGRESS", raising=False)  # tests/conftest.py turns it off elsewhere

# "desc: done[/total] unit[ (pct%)][ rate/s][ elapsed T][ ETA T| done]"
LINE = re.compile(r"^(?P<desc>[^:]+): (?P<n>[\d,]+)(?:/(?P<total>[\d,]+))? (?P<unit>\S+)"
                  r"(?: \((?P<pct>\d+)%\))?(?: (?P<rate>[\d.,e+-]+)/s)?(?: elapsed \S+)?(?P<end> ETA \S+| done)?$")


# --------------------------------------------------------------------------- the line, by hand

@pytest.mark.parametrize("args, want", [
    # 400,000 of 1,000,000 in 5 s: 80,000/s; 600,000 left at that rate: 7.5 s
    (("text_features", 400_000, 1_000_000, "captions", 5.0),
     "text_features: 400,000/1,000,000 captions (40%) 80,000/s elapsed 5.0s ETA 7.5s"),
    # no total: count, rate, elapsed only; 3 files in 4 s = 0.75/s
    (("pool", 3, None, "file", 4.0), "pool: 3 file 0.75/s elapsed 4.0s"),
    # the start: nothing done, no rate, no elapsed time worth saying
    (("reshard", 0, 120, "sample", 0.0), "reshard: 0/120 sample (0%)"),
    # 150 s for 30 of 90: 0.2/s, 60 left = 300 s = 5m00s; elapsed 2m30s
    (("eval", 30, 90, "sample", 150.0), "eval: 30/90 sample (33%) 0.2/s elapsed 2m30s ETA 5m00s"),
    # 2 h 5 min for 7,500 rows: 1.0/s; a resumed bar counts the rate from where it started
    (("pool", 10_000, 20_000, "row", 7500.0, 2_500), "pool: 10,000/20,000 row (50%) 1.0/s elapsed 2h05m ETA 2h46m"),
])
def test_log_line_by_hand(args, want):
    assert log_line(*args) == want


def test_final_line_says_done_and_no_eta():
    assert log_line("x", 10, 10, "file", 2.0, final=True) == "x: 10/10 file (100%) 5.0/s elapsed 2.0s done"
    assert log_line("x", 0, 0, "file", 0.0, final=True) == "x: 0/0 file elapsed 0.0s done"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("CURATE_PROGRESS_INTERVAL", raising=False)
    assert interval() == 5.0
    monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", "0.5")
    assert interval() == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", bad)
        with pytest.raises(CurateError, match=f"CURATE_PROGRESS_INTERVAL={bad}: not a number of seconds"):
            interval()


def _lines(buf: io.StringIO) -> list[str]:
    text = buf.getvalue()
    assert "\r" not in text  # a log gets whole lines, never a redrawn bar
    return text.splitlines()


def test_every_update_with_interval_0(monkeypatch):
    monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", "0")
    buf = io.StringIO()  # not a terminal
    for _ in Progress(range(3), desc="files", unit="file", file=buf):
        pass
    got = [LINE.match(x) for x in _lines(buf)]
    assert all(got), _lines(buf)
    assert [int(m["n"]) for m in got] == [0, 1, 2, 3, 3]
    assert {m["total"] for m in got} == {"3"} and got[-1]["end"] == " done"
    assert all(m["rate"] for m in got[1:])


def test_start_and_end_only_within_the_interval(monkeypatch):
    monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", "3600")
    buf = io.StringIO()
    with Progress(total=1000, desc="rows", unit="row", file=buf) as bar:
        for _ in range(10):
            bar.update(100)
    lines = _lines(buf)
    assert lines[0] == "rows: 0/1,000 row (0%)"
    assert len(lines) == 2 and lines[1].startswith("rows: 1,000/1,000 row (100%) ") and lines[1].endswith(" done")


def test_off_and_disabled_write_nothing(monkeypatch):
    buf = io.StringIO()
    for _ in Progress(range(3), file=buf, disable=True):
        pass
    monkeypatch.setenv("CURATE_PROGRESS", "off")
    for _ in Progress(range(3), file=buf):
        pass
    assert buf.getvalue() == ""
    monkeypatch.setenv("CURATE_PROGRESS", "loud")
    with pytest.raises(CurateError, match="CURATE_PROGRESS=loud: not one of auto, log, off"):
        Progress(range(3), file=buf)


def test_duckdb_bar_only_at_a_terminal(monkeypatch):
    # DuckDB draws its bar on standard output: under pytest stderr is captured, not a terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert duckdb_bar(True) is False and duckdb_bar(False) is False


# --------------------------------------------------------------------------- commands, stderr a pipe

def curate(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "CURATE_PROGRESS_INTERVAL": "0", "PYTHONPATH": str(REPO)}
    env.pop("CURATE_PROGRESS", None)
    r = subprocess.run([sys.executable, "-m", "curate", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "\r" not in r.stdout  # no bar redrawn into a log, none on stdout
    return r


def progress_lines(stderr: str, desc: str, known_total: bool = True) -> list[re.Match]:
    """The progress lines of bar ``desc``, checked: done counts never go down, one total, a rate
    once work is done, and a last line with done == total (``known_total``; else no total and
    no ETA anywhere)."""
    got = [m for m in map(LINE.match, stderr.splitlines()) if m and m["desc"] == desc]
    assert len(got) >= 2, f"no progress lines for {desc!r} in:\n{stderr}"
    done = [int(m["n"].replace(",", "")) for m in got]
    assert done == sorted(done), done
    assert got[0]["end"] is None and done[0] == 0  # the start line
    assert all(m["rate"] for m, n in zip(got, done) if n > 0)
    last = got[-1]
    assert last["end"] == " done"
    totals = {m["total"] for m in got}
    if not known_total:
        assert totals == {None} and not any(m["end"] and "ETA" in m["end"] for m in got)
        return got
    assert len(totals) == 1 and None not in totals, totals
    total = int(totals.pop().replace(",", ""))
    assert done[-1] == total and last["pct"] == "100"
    assert all(m["end"] and m["end"].startswith(" ETA") for m, n in zip(got[:-1], done) if 0 < n < total)
    return got


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    from curate.catalog.connection import init_catalog
    from curate.pool.sample import generate_pool

    root = tmp_path_factory.mktemp("progress")
    generate_pool(root / "pool", files=3, rows_per_file=40, seed=4, shards=True, image_size=16)
    init_catalog(root / "cat.duckdb", pool=root / "pool")
    return root


def test_features_negcliploss_logs(small_pool):
    r = curate("features", "negcliploss", "-c", "cat.duckdb", "--batch-size", "16", "--k", "2", cwd=small_pool)
    batches = progress_lines(r.stderr, "negcliploss l14 batches")
    files = progress_lines(r.stderr, "negcliploss l14 files")
    assert files[-1]["n"] == "120" and files[-1]["unit"] == "row"  # 3 files x 40 rows
    assert batches[-1]["n"] == "240"  # every row once in each of the k = 2 partitions
    progress_lines(r.stderr, "embeddings l14_img")  # the npz -> npy conversion before it


def test_run_and_reshard_log(small_pool, tmp_path):
    r = curate("run", "clip_score_l14_30pct", "-c", "cat.duckdb", "-o", tmp_path / "s.npy", cwd=small_pool)
    assert "kept " in r.stdout  # and no DuckDB bar on stdout (checked by curate())
    query = progress_lines(r.stderr, "clip_score_l14_30pct query")  # DuckDB's progress, polled
    assert query[-1]["n"] == "100" and query[-1]["unit"] == "%"
    kept = json.loads((tmp_path / "s.json").read_text())["count"]
    assert 30 <= kept <= 40  # about 30% of 120
    r = curate("reshard", "-i", small_pool / "pool" / "shards", "-o", tmp_path / "out", "-s", tmp_path / "s.npy",
               "--shard-size", "10", "-j", "1", cwd=small_pool)
    written = int(re.search(r": (\d+) samples in \d+ shards", r.stdout)[1])  # the summary's count
    assert kept - 2 <= written <= kept  # the generated shards miss a sample or two (failed downloads)
    lines = progress_lines(r.stderr, "reshard")
    assert lines[-1]["n"] == str(written) and lines[-1]["unit"] == "sample"
    progress_lines(r.stderr, "index shards")  # the shard index the plan needs, built first


def test_eval_logs_each_task(run_dir, eval_data, tmp_path):  # noqa: F811 - the imported fixture
    data, tasks = eval_data
    (data / "wds_colours_test" / "count.txt").write_text("9\n")  # clip_benchmark's optional sample count
    r = curate("eval", "--train-output-dir", run_dir, "--tasks", tasks, "--data-dir", data,
               "--task", "colours", "--task", "shapes/retrieval", cwd=tmp_path)
    assert progress_lines(r.stderr, "colours")[-1]["n"] == "9"  # 6 + 3 images in two shards
    # no count.txt: the count and the rate, no total
    assert progress_lines(r.stderr, "shapes/retrieval", known_total=False)[-1]["n"] == "3"
    assert "2 evaluated" in r.stdout


def test_tic_attach_logs(small_pool, tmp_path):
    from curate.catalog.connection import init_catalog
    from curate.tic import MONTHLY_DIR
    from curate.tic.artifacts import make_tic_artifacts

    cat = init_catalog(tmp_path / "tic.duckdb", pool=small_pool / "pool", features_dir=tmp_path / "features")
    make_tic_artifacts(cat, tmp_path / "art")  # TiC's layout: one YYYYMM.npy of uids per month
    months = len(list((tmp_path / "art" / MONTHLY_DIR).glob("*.npy")))
    assert months > 1
    r = curate("tic", "attach", cat, "--tic-dir", tmp_path / "art", cwd=tmp_path)
    lines = progress_lines(r.stderr, "tic monthly")
    assert lines[-1]["n"] == str(months) and lines[-1]["unit"] == "month"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_bar_and_log_mode_gets_lines(monkeypatch):
    monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", "0")
    tty = _Terminal()
    for _ in Progress(range(3), desc="files", unit="file", file=tty):
        pass
    assert "\r" in tty.getvalue() and "it/s" not in tty.getvalue() and "file/s" in tty.getvalue()  # tqdm's bar
    monkeypatch.setenv("CURATE_PROGRESS", "log")
    tty = _Terminal()
    for _ in Progress(range(3), desc="files", unit="file", file=tty):
        pass
    assert [LINE.match(x)["n"] for x in _lines(tty)] == ["0", "1", "2", "3", "3"]
