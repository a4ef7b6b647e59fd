"""The text_features producer: one uid-keyed parquet per pool file, resumable, parallel, stale
detection (pool file or model changed), clear errors and no partial tables on bad input."""

import os
import signal
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.catalog.connection import connect, features_dir, init_catalog
from curate.cli.main import main
from curate.errors import CurateError
from curate.features.langid import bundled_lid_model
from curate.features.text import PRODUCER, build_text_features, read_output_meta
from curate.engine import Engine
from tests.conftest import pool_table, uid_of

pytestmark = pytest.mark.usefixtures("model_cache")  # tests/conftest.py


ROWS = [
    # text, n_words, n_chars, n_tokens_fasttext, in21k_entity -- by hand
    ("three white mice on a wooden table", 7, 34, 7, True),     # mice -> mouse
    ("geese\nflying over the lake", 5, 26, 6, True),             # newline: one more fastText token
    ("a\u3000dog", 2, 5, 1, True),
    ("", 0, 0, 0, False),
    ("   ", 0, 3, 0, False),
    ("we eat here", 3, 11, 3, False),                              # eat: verb, not a class
]


def files_of(rows):
    return [[{"uid": uid_of(i), "text": t} for i, (t, *_) in enumerate(rows[:3])],
            [{"uid": uid_of(10 + i), "text": t} for i, (t, *_) in enumerate(rows[3:])]]


def outputs(cat):
    con = connect(cat)
    fdir = features_dir(con, cat) / "text_features"
    con.close()
    return sorted(fdir.glob("*.parquet"))


def test_values_and_view(make_catalog):
    cat = make_catalog(files_of(ROWS))
    res = build_text_features(cat, engine=Engine(workers=1), progress=False)
    assert len(res.computed) == 2 and res.rows_computed == 6
    con = connect(cat)
    got = con.execute(
        "SELECT p.text, t.n_words, t.n_chars, t.n_tokens_fasttext, t.in21k_entity, t.file, t.\"row\", "
        "t.lang_fasttext FROM pool p JOIN text_features t USING (uid) ORDER BY p.file, p.\"row\"").fetchall()
    columns = [r[0] for r in con.execute("DESCRIBE text_features").fetchall()]
    cld3_views = con.execute("SELECT count(*) FROM curate_views WHERE name = 'text_lang_cld3'").fetchone()[0]
    con.close()
    assert [g[:5] for g in got] == [tuple(r) for r in ROWS]
    assert [(g[5], g[6]) for g in got] == [("0000", 0), ("0000", 1), ("0000", 2), ("0001", 0), ("0001", 1), ("0001", 2)]
    assert got[0][7] == "en"
    # CLD3 is its own table (text_lang_cld3), not computed here
    assert columns == ["uid", "file", "row", "lang_fasttext", "n_words", "n_chars", "n_tokens_fasttext", "in21k_entity"]
    assert cld3_views == 0
    assert PRODUCER.is_current(cat, {})
    d = PRODUCER.describe(cat, {})
    assert d["lid_model"]["name"] == "lid.176.ftz" and d["files"] == 2 and d["rows"] == 6
    assert "cld3" not in d and "cld3" not in read_output_meta(outputs(cat)[0])["settings"]


def test_resume_skips_current_files_and_detects_stale_pool_file(make_catalog):
    cat = make_catalog(files_of(ROWS))
    build_text_features(cat, engine=Engine(workers=1), progress=False)
    outs = outputs(cat)
    stamps = [p.stat().st_mtime_ns for p in outs]
    res = build_text_features(cat, engine=Engine(workers=1), progress=False)
    assert res.computed == [] and len(res.skipped) == 2
    assert [p.stat().st_mtime_ns for p in outs] == stamps
    # rewrite pool file 0001 with another caption: only it is recomputed
    src = cat.parent / "metadata" / "0001.parquet"
    pq.write_table(pool_table([{"uid": uid_of(10), "text": "a dog"}]), src)
    assert not PRODUCER.is_current(cat, {})
    init_catalog(cat, pool=cat.parent, overwrite=True)  # row count changed: the catalog is rebuilt
    res = build_text_features(cat, engine=Engine(workers=1), progress=False)
    assert res.computed == ["0001"] and res.skipped == ["0000"]
    con = connect(cat)
    assert con.execute("SELECT count(*), sum(in21k_entity::INT) FROM text_features").fetchone() == (4, 4)
    con.close()


def test_model_change_recomputes_and_is_recorded(make_catalog, tmp_path):
    cat = make_catalog(files_of(ROWS))
    build_text_features(cat, engine=Engine(workers=1), progress=False)
    other = tmp_path / "lid.other.ftz"
    other.write_bytes(bundled_lid_model().read_bytes() + b"\0")  # a different file (sha), same labels
    os.environ["CURATE_LID_MODEL"] = str(other)
    try:
        assert not PRODUCER.is_current(cat, {})
        res = build_text_features(cat, engine=Engine(workers=1), progress=False)
        assert len(res.computed) == 2
        assert PRODUCER.describe(cat, {})["lid_model"]["name"] == "lid.other.ftz"
    finally:
        del os.environ["CURATE_LID_MODEL"]
    # without an explicit model, features built with lid.other.ftz stay current
    assert PRODUCER.is_current(cat, {})


def test_outputs_from_before_the_cld3_split_are_stale(make_catalog):
    import json

    from curate.features.text import META_KEY

    cat = make_catalog(files_of(ROWS))
    build_text_features(cat, engine=Engine(workers=1), progress=False)
    out = outputs(cat)[0]
    t = pq.read_table(out)
    meta = json.loads(t.schema.metadata[META_KEY])
    meta["settings"]["schema"] = 1  # schema 1 held lang_cld3
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), out)
    assert not PRODUCER.is_current(cat, {})
    assert build_text_features(cat, engine=Engine(workers=1), progress=False).computed == ["0000"]


def test_parallel_equals_serial(make_catalog):
    a = make_catalog(files_of(ROWS))
    b = make_catalog(files_of(ROWS))
    build_text_features(a, engine=Engine(workers=1), progress=False)
    res = build_text_features(b, engine=Engine(workers=2), progress=False)
    assert sorted(res.computed) == ["0000", "0001"]
    for pa_, pb in zip(outputs(a), outputs(b)):
        assert pq.read_table(pa_).equals(pq.read_table(pb))


@pytest.mark.parametrize("bad,match", [
    (None, r"0001\.parquet: row 1: column text is NULL"),
    (b"caf\xe9 au lait", r"0001\.parquet: row 1: column text is not valid UTF-8"),
])
def test_bad_captions_fail_without_partial_tables(tmp_path, bad, match):
    meta = tmp_path / "pool" / "metadata"
    meta.mkdir(parents=True)
    pq.write_table(pool_table([{"uid": uid_of(0), "text": "a dog"}]), meta / "0000.parquet")
    t = pool_table([{"uid": uid_of(1), "text": "a cat"}, {"uid": uid_of(2), "text": "x"}])
    texts = pa.array([b"a cat", bad], pa.binary()).view(pa.string())
    t = t.set_column(t.schema.get_field_index("text"), "text", texts)
    pq.write_table(t, meta / "0001.parquet")
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    with pytest.raises(CurateError, match=match):
        build_text_features(cat, engine=Engine(workers=1), progress=False)
    fdir = tmp_path / "cat.duckdb.features" / "text_features"
    assert not (fdir / "0001.parquet").exists()
    assert not [p for p in fdir.iterdir() if p.name.endswith(".tmp")]
    con = duckdb.connect(str(cat), read_only=True)
    assert con.execute("SELECT count(*) FROM curate_views WHERE name = 'text_features'").fetchone()[0] == 0
    con.close()


def test_cli_reports_and_missing_model_is_one_line(make_catalog, tmp_path):
    cat = make_catalog(files_of(ROWS))
    r = CliRunner().invoke(main, ["features", "text", str(cat), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "computed 2 file(s) (6 captions" in r.output and "lid.176.ftz" in r.output
    r = CliRunner().invoke(main, ["features", "text", str(cat)])
    assert "computed 0 file(s)" in r.output and "2 already current" in r.output
    r = CliRunner().invoke(main, ["features", "text", str(cat), "--lid-model", str(tmp_path / "lid.176.bin")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("error: ")
    assert "lid.176.bin: fastText LID model not found; download" in r.output


def test_killed_run_resumes(tmp_path):
    # distinct captions, so every file costs real model time and the run can be caught midway
    files, rows = 8, 20_000
    meta = tmp_path / "pool" / "metadata"
    meta.mkdir(parents=True)
    for f in range(files):
        t = pool_table([{"uid": uid_of(f * rows + i), "text": f"photo {f * rows + i} of a dog in the park"}
                        for i in range(rows)])
        pq.write_table(t, meta / f"{f:04d}.parquet")
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    fdir = tmp_path / "cat.duckdb.features" / "text_features"
    cmd = [sys.executable, "-m", "curate.cli.main", "features", "text", str(cat), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not list(fdir.glob("*.parquet")) and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name for p in fdir.glob("*.parquet")}
    assert 1 <= len(done) < files
    for p in fdir.glob("*.parquet"):
        assert read_output_meta(p)["rows"] == rows  # every finished output is complete
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"computed {files - len(done)} file(s)" in out and f"{len(done)} already current" in out
    con = connect(cat)
    assert con.execute("SELECT count(*), count(DISTINCT uid) FROM text_features JOIN pool USING (uid)").fetchone() \
        == (files * rows, files * rows)
    con.close()
