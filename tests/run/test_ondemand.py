"""Caption features built on demand (curate.run.ondemand, issue 21): a filter computes only the
parts of text_features / text_lang_cld3 it reads, only for the rows that can still pass it, and
its subset is byte-identical to the one from fully built tables whatever ran before.

Expected row sets are worked out here from the pool's own columns with pandas/numpy (Python's
str.split / len, float32 comparison), not from the code under test."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.catalog.connection import init_catalog
from curate.cli.main import main
from curate.features.cld3 import build_text_lang_cld3
from curate.features.text import build_text_features
from curate.pool.sample import generate_pool
from curate.run.ondemand import needed_parts, restriction_sql, row_plan
from curate.run.runner import run_filter
from tests.conftest import REPO

FILTERS = REPO / "filters"
TEXT_FILTERS = ("basic_filter", "text_based", "laion2b")

pytestmark = pytest.mark.usefixtures("model_cache")  # tests/conftest.py


# -- which parts (columns) a filter needs ----------------------------------------------------

@pytest.mark.parametrize("sql, want", [
    ((FILTERS / "basic_filter.sql").read_text(), [("text_features", "counts"), ("text_features", "lang")]),
    ((FILTERS / "text_based.sql").read_text(), [("text_features", "entity"), ("text_features", "lang")]),
    ((FILTERS / "laion2b.sql").read_text(), [("text_lang_cld3", "cld3")]),
    ("SELECT p.uid FROM pool p JOIN text_features t USING (file, \"row\") WHERE t.n_chars > 3",
     [("text_features", "counts")]),
    ("SELECT p.uid FROM pool p JOIN text_features t USING (file, \"row\") WHERE t.in21k_entity",
     [("text_features", "entity")]),
    ("SELECT * FROM text_features", [("text_features", "counts"), ("text_features", "entity"),
                                     ("text_features", "lang")]),
    ("SELECT t.* FROM text_lang_cld3 t", [("text_lang_cld3", "cld3")]),
    # count(*) and a product select no columns
    ("SELECT p.uid FROM pool p JOIN text_features t USING (uid) WHERE t.n_words * 2 > (SELECT count(*) FROM pool)",
     [("text_features", "counts")]),
    ("SELECT uid FROM pool WHERE clip_b32_similarity_score > 0.3", []),
    # a column name alone, without its table, needs nothing built
    ("SELECT uid FROM pool WHERE text <> 'lang_fasttext'", []),
    ("SELECT t.uid FROM text_features t JOIN text_lang_cld3 c USING (uid) WHERE t.lang_fasttext = c.lang_cld3",
     [("text_features", "lang"), ("text_lang_cld3", "cld3")]),
])
def test_needed_parts(sql, want):
    assert [(n.view, n.part) for n in needed_parts(sql)] == want


BASIC_Q = (FILTERS / "basic_filter.sql").read_text()


@pytest.mark.parametrize("query, reason", [
    ("SELECT p.uid FROM pool p JOIN text_features t ON t.file = p.file AND t.\"row\" = p.\"row\" "
     "WHERE t.n_words > (SELECT avg(n_words) FROM text_features)", "subquery"),
    ("SELECT p.uid FROM pool p JOIN text_features t ON t.file = p.file AND t.lang_fasttext = 'en'",
     "FROM clause reads the caption column"),
    ("SELECT p.uid FROM pool p JOIN (SELECT * FROM text_features) t USING (uid) WHERE t.n_words > 2",
     "more than once or inside a subquery"),
    ("WITH t AS (SELECT * FROM text_features) SELECT uid FROM t WHERE n_words > 2", "WITH"),
    ("SELECT uid FROM text_features WHERE n_words > 2 UNION SELECT uid FROM pool", "UNION"),
    ("SELECT p.uid FROM pool p WHERE p.uid IN (SELECT uid FROM text_features WHERE n_words > 2)",
     "subquery"),
])
def test_row_plan_refuses_shapes_it_cannot_restrict(query, reason):
    got = row_plan([], query)
    assert isinstance(got, str) and reason.lower() in got.lower(), got


def test_row_plan_refuses_a_setup_statement_reading_a_caption_table():
    got = row_plan(["SET VARIABLE m = (SELECT max(n_words) FROM text_features)"],
                   "SELECT p.uid FROM pool p JOIN text_features t USING (uid) WHERE t.n_words > 2")
    assert isinstance(got, str) and "setup" in got


def test_restriction_of_basic_filter_keeps_the_cheaper_conjuncts_only():
    query = BASIC_Q[BASIC_Q.index("SELECT"):]
    plan = row_plan([], query)
    assert not isinstance(plan, str), plan
    assert plan.aliases == {"text_features": "t"}
    parts = {n.part: n for n in needed_parts(query)}
    counts_sql = restriction_sql(plan, parts["counts"], set())
    # counts: only the image-size conjuncts; lang: those and the two count conjuncts
    assert "least(p.original_width" in counts_sql and "n_words > 2" not in counts_sql
    assert counts_sql.rstrip().endswith("<= 3.0)")
    lang_sql = restriction_sql(plan, parts["lang"], set(parts["counts"].columns))
    assert "t.n_words > 2" in lang_sql and "t.n_chars > 5" in lang_sql and "= 'en'" not in lang_sql
    assert "lang_fasttext" not in lang_sql


# -- a generated pool whose captions are all distinct ----------------------------------------

@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("distinct_pool")
    generate_pool(root, files=2, rows_per_file=3000, seed=5, npz=False, shards=False)
    for path in sorted((root / "metadata").glob("*.parquet")):
        t = pq.read_table(path)
        suffix = pa.array(np.char.add(" #", np.arange(t.num_rows).astype(str)).astype(object))
        t = t.set_column(t.schema.get_field_index("text"), "text",
                         pc.binary_join_element_wise(t.column("text"), suffix, ""))
        pq.write_table(t, path)
    return root


def fresh_catalog(pool, where):
    where.mkdir(parents=True, exist_ok=True)
    return init_catalog(where / "catalog.duckdb", pool=pool, features_dir=where / "features")


def subset_bytes(cat, name, out):
    run_filter(FILTERS / f"{name}.sql", catalog=cat, out=out)
    return out.read_bytes()


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory):
    """The subsets from fully built tables (`curate features text` + `features cld3` first)."""
    where = tmp_path_factory.mktemp("reference")
    cat = fresh_catalog(pool, where)
    build_text_features(cat, progress=False)
    build_text_lang_cld3(cat, progress=False)
    con = duckdb.connect(str(cat), read_only=True)
    full = {v: con.execute(f"SELECT * FROM {v} ORDER BY file, \"row\"").df()
            for v in ("text_features", "text_lang_cld3")}
    con.close()
    return {"cat": cat, "subsets": {n: subset_bytes(cat, n, where / f"{n}.npy") for n in TEXT_FILTERS},
            "tables": full}


def pool_frame(pool):
    frames = []
    for path in sorted((pool / "metadata").glob("*.parquet")):
        df = pd.read_parquet(path, columns=["text", "original_width", "original_height",
                                            "clip_b32_similarity_score"])
        df["file"], df["row"] = path.stem, np.arange(len(df))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def table(cat, view):
    con = duckdb.connect(str(cat), read_only=True)
    try:
        return con.execute(f"SELECT * FROM {view} ORDER BY file, \"row\"").df()
    finally:
        con.close()


def computed_rows(df, column):
    return set(zip(df.file[df[column].notna()], df.row[df[column].notna()]))


def size_ok(df):
    mn = np.minimum(df.original_width, df.original_height)
    mx = np.maximum(df.original_width, df.original_height)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (mn >= 200) & (mx / mn <= 3.0)


@pytest.mark.parametrize("first, second", list(itertools.permutations(TEXT_FILTERS, 2)))
def test_every_order_of_two_filters_gives_the_subsets_of_a_full_build(pool, reference, tmp_path, first, second):
    cat = fresh_catalog(pool, tmp_path)
    assert subset_bytes(cat, first, tmp_path / "a.npy") == reference["subsets"][first]
    assert subset_bytes(cat, second, tmp_path / "b.npy") == reference["subsets"][second]
    # and the first again, now over what the second added
    assert subset_bytes(cat, first, tmp_path / "c.npy") == reference["subsets"][first]
    # every value present equals the full build's (none stale, none wrong); the rest are NULL
    for view, full in reference["tables"].items():
        if not (tmp_path / "features" / view).is_dir():
            continue
        got = table(cat, view)
        assert len(got) == len(full)
        for column in full.columns:
            have = got[column].notna()
            assert (got[column][have] == full[column][have]).all(), (view, column)


def test_the_workers_of_the_first_process_part_start_before_the_restrictions(pool, reference, tmp_path, monkeypatch):
    from curate.engine import WarmPool
    from curate.features import parts

    started = []

    class Spy(WarmPool):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            started.append(self)

    monkeypatch.setattr(parts, "WarmPool", Spy)
    monkeypatch.setattr(parts, "AUTO_PARALLEL_ROWS", 10)  # this pool's 6,000 rows count as large work
    cat = fresh_catalog(pool, tmp_path)
    assert subset_bytes(cat, "basic_filter", tmp_path / "a.npy") == reference["subsets"]["basic_filter"]
    if (os.cpu_count() or 1) == 1:
        assert not started  # one core: no worker processes at all
        return
    # one pool, for lang (the counts run in threads meanwhile), whose workers computed it
    assert len(started) == 1 and started[0].workers == min(os.cpu_count(), 2) and started[0].used  # 2 pool files
    # a warm run starts none (lang is computed for some rows only, and none more is needed)
    assert subset_bytes(cat, "basic_filter", tmp_path / "b.npy") == reference["subsets"]["basic_filter"]
    assert len(started) == 1
    # a filter needing lang for other rows starts them once its restriction has found those rows
    small = tmp_path / "small_images_en.sql"
    small.write_text("SELECT p.uid FROM pool AS p JOIN text_features AS t ON t.file = p.file AND t.\"row\" = p.\"row\"\n"
                     "WHERE p.original_width < 200 AND t.lang_fasttext = 'en'\n")
    run_filter(small, catalog=cat, out=tmp_path / "c.npy")
    assert len(started) == 2 and started[1].used
    df, full = pool_frame(pool), reference["tables"]["text_features"]
    want = set(zip(df.file[df.original_width < 200], df.row[df.original_width < 200]))
    got = table(cat, "text_features")
    en = full.lang_fasttext == "en"
    kept = set(zip(full.file[en], full.row[en])) & want
    assert len(np.load(tmp_path / "c.npy")) == len(kept)
    assert want <= computed_rows(got, "lang_fasttext")


def test_a_filter_computes_exactly_the_rows_that_can_pass_it(pool, tmp_path):
    df = pool_frame(pool)
    cat = fresh_catalog(pool, tmp_path)
    run_filter(FILTERS / "basic_filter.sql", catalog=cat, out=tmp_path / "b.npy")
    got = table(cat, "text_features")
    sized = size_ok(df)
    words = df.text.map(lambda s: len(s.split()))
    chars = df.text.map(len)
    want_counts = set(zip(df.file[sized], df.row[sized]))
    want_lang = set(zip(df.file[sized & (words > 2) & (chars > 5)], df.row[sized & (words > 2) & (chars > 5)]))
    assert 0 < len(want_lang) < len(want_counts) < len(df)
    assert computed_rows(got, "n_words") == want_counts
    assert computed_rows(got, "lang_fasttext") == want_lang
    assert got.in21k_entity.isna().all()  # basic_filter never reads the WordNet match
    assert not (tmp_path / "features" / "text_lang_cld3").exists()
    manifest = json.loads((tmp_path / "b.json").read_text())
    now = manifest["features"]["text_features"]["parts_now"]
    assert now["counts"]["rows_computed_now"] == len(want_counts)
    assert now["lang"]["rows_computed_now"] == len(want_lang)

    # laion2b: CLD3 only where float32(B/32 score) >= float32(0.28) (NaN and NULL never)
    run_filter(FILTERS / "laion2b.sql", catalog=cat, out=tmp_path / "l.npy")
    score = df.clip_b32_similarity_score.astype("float32")
    passing = (score >= np.float32(0.28)).fillna(False).astype(bool)
    assert computed_rows(table(cat, "text_lang_cld3"), "lang_cld3") == set(zip(df.file[passing], df.row[passing]))
    assert 0 < passing.sum() < len(df)

    # text_based next: the WordNet match for every row, fastText only for the matching rows it
    # lacks (basic_filter's rows already have theirs)
    run_filter(FILTERS / "text_based.sql", catalog=cat, out=tmp_path / "t.npy")
    got = table(cat, "text_features")
    assert got.in21k_entity.notna().all()
    entity = got.in21k_entity.astype(bool)
    want_now = set(zip(got.file[entity], got.row[entity])) - want_lang
    assert computed_rows(got, "lang_fasttext") == want_lang | set(zip(got.file[entity], got.row[entity]))
    now = json.loads((tmp_path / "t.json").read_text())["features"]["text_features"]["parts_now"]
    assert now["lang"]["rows_computed_now"] == len(want_now) > 0
    # a warm re-run computes nothing
    run_filter(FILTERS / "text_based.sql", catalog=cat, out=tmp_path / "t2.npy")
    now = json.loads((tmp_path / "t2.json").read_text())["features"]["text_features"]["parts_now"]
    assert all(p["rows_computed_now"] == 0 for p in now.values())
    assert (tmp_path / "t2.npy").read_bytes() == (tmp_path / "t.npy").read_bytes()


def test_a_stale_part_is_recomputed_for_every_row_the_filter_needs(pool, reference, tmp_path, monkeypatch):
    from curate.features.langid import bundled_lid_model

    df = pool_frame(pool)
    cat = fresh_catalog(pool, tmp_path)
    run_filter(FILTERS / "basic_filter.sql", catalog=cat, out=tmp_path / "a.npy")
    # another model file (another sha256, the same labels): every lang value present is stale
    other = tmp_path / "other.ftz"
    other.write_bytes(bundled_lid_model().read_bytes() + b"\0")
    monkeypatch.setenv("CURATE_LID_MODEL", str(other))
    run_filter(FILTERS / "basic_filter.sql", catalog=cat, out=tmp_path / "b.npy")
    assert (tmp_path / "b.npy").read_bytes() == reference["subsets"]["basic_filter"]
    sized = size_ok(df) & (df.text.map(lambda t: len(t.split())) > 2) & (df.text.map(len) > 5)
    now = json.loads((tmp_path / "b.json").read_text())["features"]["text_features"]
    assert now["parts_now"]["lang"]["rows_computed_now"] == int(sized.sum())  # all of them again
    assert now["parts_now"]["counts"]["rows_computed_now"] == 0  # counts do not depend on the model
    assert computed_rows(table(cat, "text_features"), "lang_fasttext") == set(zip(df.file[sized], df.row[sized]))


def test_a_pool_larger_than_a_chunk_is_computed_a_chunk_of_files_at_a_time(pool, reference, tmp_path, monkeypatch):
    import curate.run.ondemand as ondemand
    from curate.features import parts

    calls = []
    real = parts.build_parts
    monkeypatch.setattr(ondemand, "CHUNK_ROWS", 3000)  # the pool: 2 files x 3,000 rows
    monkeypatch.setattr(parts, "build_parts", lambda *a, **k: calls.append(sorted(k["rows"])) or real(*a, **k))
    df = pool_frame(pool)
    cat = fresh_catalog(pool, tmp_path)
    run_filter(FILTERS / "basic_filter.sql", catalog=cat, out=tmp_path / "b.npy")
    assert (tmp_path / "b.npy").read_bytes() == reference["subsets"]["basic_filter"]
    files = sorted(df.file.unique())
    assert calls == [[files[0]], [files[1]]] * 2  # counts then lang, one file each
    sized = size_ok(df)
    assert computed_rows(table(cat, "text_features"), "n_words") == set(zip(df.file[sized], df.row[sized]))


def test_two_filters_building_one_table_at_once_both_get_their_subsets(pool, reference, tmp_path):
    """basic_filter and text_based, started together on one fresh catalog, each compute parts of
    text_features and merge them into the same files: neither may lose the other's values
    (parts.build_lock serialises the read-merge-write of the outputs)."""
    cat = fresh_catalog(pool, tmp_path)
    procs = {name: subprocess.Popen([sys.executable, "-m", "curate", "run", str(FILTERS / f"{name}.sql"), "-c", str(cat),
                                     "-o", str(tmp_path / f"{name}.npy")], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name in ("basic_filter", "text_based")}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert (tmp_path / f"{name}.npy").read_bytes() == reference["subsets"][name], name


def test_the_shell_sees_null_for_rows_not_computed(pool, tmp_path):
    cat = fresh_catalog(pool, tmp_path)
    run_filter(FILTERS / "laion2b.sql", catalog=cat, out=tmp_path / "l.npy")
    # the real DuckDB shell (`curate shell` execs it), from another directory
    r = subprocess.run([sys.executable, "-m", "curate", "shell", str(cat), "-c",
                        "SELECT count(*) AS n, count(lang_cld3) AS c FROM text_lang_cld3"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    df = pool_frame(pool)
    passing = int((df.clip_b32_similarity_score.astype("float32") >= np.float32(0.28)).sum())
    numbers = [int(w) for w in r.stdout.replace("│", " ").split() if w.isdigit()]
    assert numbers == [len(df), passing] and passing < len(df)


def test_features_text_still_builds_everything(pool, reference, tmp_path):
    cat = fresh_catalog(pool, tmp_path)
    run_filter(FILTERS / "text_based.sql", catalog=cat, out=tmp_path / "t.npy")
    r = CliRunner().invoke(main, ["features", "text", "-c", str(cat)])
    assert r.exit_code == 0, r.output
    got = table(cat, "text_features")
    full = reference["tables"]["text_features"]
    assert got.notna().all().all()
    pd.testing.assert_frame_equal(got, full)


def test_explain_counts_over_whole_columns(pool, reference, tmp_path):
    cat = fresh_catalog(pool, tmp_path)
    r = CliRunner().invoke(main, ["run", str(FILTERS / "basic_filter.sql"), "-c", str(cat), "--explain",
                                  "-o", str(tmp_path / "b.npy")])
    assert r.exit_code == 0, r.output
    assert table(cat, "text_features")[["lang_fasttext", "n_words"]].notna().all().all()
    ref = CliRunner().invoke(main, ["run", str(FILTERS / "basic_filter.sql"), "-c", str(reference["cat"]),
                                    "--explain", "-o", str(tmp_path / "r.npy")])
    assert ref.exit_code == 0, ref.output

    def funnel(out):
        return [line for line in out.splitlines() if line.lstrip()[:1].isdigit()]

    assert funnel(r.output) == funnel(ref.output) and len(funnel(r.output)) == 5


# -- kill -9 during an on-demand partial build ------------------------------------------------

def _parts_rows(path):
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - being renamed into place
        return None
    for key, value in meta.items():
        if key.startswith(b"curate."):
            return json.loads(value).get("parts", {})
    return None


def test_kill_during_an_on_demand_build_then_rerun(tmp_path):
    root = tmp_path / "pool"
    generate_pool(root, files=4, rows_per_file=40_000, seed=11, npz=False, shards=False, fast=True)
    for path in sorted((root / "metadata").glob("*.parquet")):
        t = pq.read_table(path)
        suffix = pa.array(np.char.add(" #", np.arange(t.num_rows).astype(str)).astype(object))
        pq.write_table(t.set_column(t.schema.get_field_index("text"), "text",
                                    pc.binary_join_element_wise(t.column("text"), suffix, "")), path)
    ref_cat = fresh_catalog(root, tmp_path / "ref")
    build_text_features(ref_cat, progress=False)
    ref = subset_bytes(ref_cat, "text_based", tmp_path / "ref.npy")
    full = table(ref_cat, "text_features")

    cat = fresh_catalog(root, tmp_path / "cold")
    out_dir = tmp_path / "cold" / "features" / "text_features"
    cmd = [sys.executable, "-m", "curate", "run", str(FILTERS / "text_based.sql"), "-c", str(cat),
           "-o", str(tmp_path / "cold.npy")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_mid_lang = False
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        done = [(_parts_rows(p) or {}).get("lang", {}).get("rows", 0) for p in sorted(out_dir.glob("*.parquet"))]
        if len(done) == 4 and any(done) and not all(done):
            os.killpg(proc.pid, signal.SIGKILL)
            killed_mid_lang = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_mid_lang, "the run finished before it could be killed mid-way"
    assert not (tmp_path / "cold.npy").exists()
    # what survived is consistent: every value present is the full build's value
    part = table(cat, "text_features")
    for column in ("lang_fasttext", "in21k_entity"):
        have = part[column].notna()
        assert (part[column][have] == full[column][have]).all()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cold.npy").read_bytes() == ref
    assert not list(out_dir.glob(".*.tmp"))  # the killed writer's temporary files are gone
