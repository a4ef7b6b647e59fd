"""`curate pool from-table` on bad input: one line naming the table, row and column, nothing
left behind that blocks the corrected re-run, sources untouched; kill -9 mid-build and re-run
gives the same pool as an uninterrupted build."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli import main
from curate.pool import build as poolbuild
from tests.conftest import REPO


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    (d / "images").mkdir(parents=True)
    for i in range(6):
        (d / "images" / f"{i}.jpg").write_bytes(jpeg((40 * i, 10, 10)))
    return d


GOOD = "path,caption,taken\n" + "".join(f"images/{i}.jpg,photo {i},{2000 + i}-01-01\n" for i in range(6))

CASES = [
    # (id, table text, message fragments)
    ("bad-time-late", GOOD.replace("2005-01-01", "soon"),
     ["t.csv: row 5, column 'taken': value 'soon' is not a time"]),
    ("bad-time-first", GOOD.replace("2000-01-01", "yesterday"),
     ["t.csv: row 0, column 'taken': value 'yesterday' is not a time"]),
    ("ragged-long", GOOD.replace("photo 4,2004-01-01", "photo 4,2004-01-01,extra"),
     ["t.csv: cannot parse the table at row 4 (line 6): 4 fields, the header has 3"]),
    ("ragged-short", GOOD.replace("photo 3,2003-01-01", "photo 3"),
     ["t.csv: cannot parse the table at row 3 (line 5): 2 fields, the header has 3"]),
    ("no-image", "path,caption,taken\nimages/missing.jpg,x,2001-01-01\n",
     ["t.csv: no image could be read (1 rows"]),
]


def from_table(src, out, *extra):
    return CliRunner().invoke(main, ["pool", "from-table", str(src / "t.csv"), "--image-col", "path",
                                     "--caption-col", "caption", "--time-col", "taken", "--out", str(out), *extra])


@pytest.mark.parametrize("out_exists", [False, True], ids=["new-out", "empty-out"])
@pytest.mark.parametrize("table,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_failed_build_leaves_nothing_that_blocks_the_rerun(src, tmp_path, monkeypatch, table, fragments, out_exists):
    monkeypatch.setattr(poolbuild, "SAMPLES_PER_SHARD", 2)  # the bad row comes after complete shards
    (src / "t.csv").write_text(table)
    out = tmp_path / "pool"
    if out_exists:
        out.mkdir()
    before = snapshot(tmp_path)
    r = from_table(src, out)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("pool: ")]  # tqdm's bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # no pool.json, shard or temp file; sources unchanged
    assert out.exists() == out_exists and (not out_exists or not any(out.iterdir()))
    # the corrected table builds in the same --out
    (src / "t.csv").write_text(GOOD)
    r = from_table(src, out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}: 6 samples from 6 table rows in 3 shards" in r.output
    assert json.loads((out / "pool.json").read_text())["complete"] is True


def test_out_and_catalog_in_impossible_places(src, tmp_path):
    (src / "t.csv").write_text(GOOD)
    (tmp_path / "afile").write_text("mine")
    before = snapshot(tmp_path)
    cases = [
        (["--out", str(tmp_path / "afile" / "pool")], f"{tmp_path / 'afile' / 'pool'}: cannot create the pool "
                                                      f"directory ({tmp_path / 'afile'} is a file, not a directory)"),
        (["--out", str(tmp_path / "p"), "--catalog", str(tmp_path / "afile" / "c.duckdb")],
         f"{tmp_path / 'afile' / 'c.duckdb'}: cannot create the catalog ({tmp_path / 'afile'} is a file, not a directory)"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, ["pool", "from-table", str(src / "t.csv"), "--image-col", "path",
                                      "--caption-col", "caption", *args])
        assert r.exit_code == 1, r.output
        assert r.output.strip() == f"error: {message}"
        assert snapshot(tmp_path) == before and not (tmp_path / "p").exists()


def test_out_in_missing_directories_is_created(src, tmp_path):
    (src / "t.csv").write_text(GOOD)
    out = tmp_path / "a" / "b" / "pool"
    r = from_table(src, out, "--catalog", str(tmp_path / "x" / "y" / "c.duckdb"))
    assert r.exit_code == 0, r.output
    assert (out / "pool.json").is_file() and (tmp_path / "x" / "y" / "c.duckdb").is_file()


# -- kill -9 mid-build ----------------------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import sys, time
    from curate.pool import build
    build.SAMPLES_PER_SHARD = 2
    slow = float(sys.argv[1])
    real = build.load_image
    def load(path):
        time.sleep(slow)
        return real(path)
    build.load_image = load
    from curate.cli.main import main
    main(sys.argv[2:])
""")


def run_build(src, out, slow, **kw):
    cmd = [sys.executable, "-c", RUNNER, str(slow), "pool", "from-table", str(src / "t.csv"), "--image-col", "path",
           "--caption-col", "caption", "--time-col", "taken", "--out", str(out), "--workers", "1"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def comparable(root):
    """Every file's bytes, with the wall-clock fields of img2dataset's stats files left out."""
    out = {}
    for rel, data in snapshot(root).items():
        if rel.name.endswith("_stats.json"):
            stats = json.loads(data)
            data = {k: v for k, v in stats.items() if k not in ("duration", "start_time", "end_time")}
        out[rel] = data
    return out


@pytest.mark.parametrize("kill_after", ["first-shard", "second-shard"])
def test_kill_9_mid_build_then_rerun_is_identical(src, tmp_path, kill_after):
    (src / "t.csv").write_text(GOOD)
    fresh = tmp_path / "fresh"
    p = run_build(src, fresh, 0)
    assert p.wait(120) == 0, p.stderr.read()
    killed = tmp_path / "killed"
    p = run_build(src, killed, 0.3)
    marker = killed / "shards" / ("00000000_stats.json" if kill_after == "first-shard" else "00000001_stats.json")
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    assert p.poll() is None, "the build finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    assert not (killed / "shards" / "00000002_stats.json").exists()  # killed mid-build
    p = run_build(src, killed, 0)
    assert p.wait(120) == 0, p.stderr.read()
    assert comparable(killed) == comparable(fresh)
    assert not [q for q in killed.rglob("*") if q.name.endswith(".tmp")]
