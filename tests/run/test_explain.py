"""`curate run --explain` and `--dropped` (issue 19, "Why was it dropped"): funnels worked out by
hand on a ten-row pool (NULL, NaN, ties at the threshold), the split of every filter shape, and
every bundled filter's funnel checked against its own run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli.main import main
from curate.pool.sample import generate_pool
from curate.resources import filters_dir
from curate.run.explain import explain_filter, format_explanation, split_filter_query, split_query
from curate.run.query import load_filter
from curate.run.runner import run_filter
from curate.subset import write_subset
from tests.conftest import REPO, read_uids, uid_of

EXAMPLE = REPO / "catalog.duckdb.example"
NAN = float("nan")

# The hand-made pool: (clip_l14_similarity_score, original_width, text) of rows 0..9.
ROWS = [
    (0.9, 200, "a dog"),    # 0: kept
    (0.1, 200, "a dog"),    # 1: score too low                      -> conjunct 1
    (None, 200, "a dog"),   # 2: score NULL: NULL rejects             -> conjunct 1
    (0.65, 50, "a dog"),    # 3: too narrow                           -> conjunct 2
    (0.75, 200, "a cat"),   # 4: no dog                               -> conjunct 3
    (0.72, 200, None),      # 5: caption NULL: NULL rejects           -> conjunct 3
    (0.2, 400, "a cat"),    # 6: fails all three; the first is 1      -> conjunct 1
    (0.6, 300, "dog"),      # 7: kept (300: BETWEEN is inclusive)
    (0.5, 100, "hotdog"),   # 8: kept (a tie at the threshold is kept; 100 inclusive)
    (NAN, 200, "dog"),      # 9: NaN is never kept by datacomp_ge      -> conjunct 1
]
C1 = "datacomp_ge(clip_l14_similarity_score, getvariable('t'))"
C2 = "original_width BETWEEN 100 AND 300"
C3 = "text LIKE '%dog%'"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def small(make_catalog):
    rows = [{"uid": uid_of(i), "clip_l14_similarity_score": s, "original_width": w, "text": t}
            for i, (s, w, t) in enumerate(ROWS)]
    return make_catalog([rows[:6], rows[6:]])


def write_filter(tmp_path, name, where_lines, head="SET VARIABLE t = 0.5;\n\nSELECT uid\nFROM pool\n") -> Path:
    p = tmp_path / f"{name}.sql"
    p.write_text(head + "WHERE " + "\n  AND ".join(where_lines) + "\n")
    return p


def table(ex):
    return [(s.index, s.sql, s.alone, s.rows_in, s.rejected, s.rows_left) for s in ex.steps]


# -- funnels worked out by hand -----------------------------------------------------------------

def test_funnel_by_hand_with_nulls_nan_and_ties(small, tmp_path):
    ex = explain_filter(write_filter(tmp_path, "f", [C1, C2, C3]), small)
    # alone: C1 rejects rows 1, 2 (NULL), 6, 9 (NaN); C2 rows 3, 6; C3 rows 4, 5 (NULL), 6
    # in order: C1 leaves 0,3,4,5,7,8; C2 then rejects 3; C3 then rejects 4, 5
    assert table(ex) == [(1, C1, 4, 10, 4, 6), (2, C2, 2, 6, 1, 5), (3, C3, 3, 5, 2, 3)]
    assert (ex.pool_rows, ex.from_rows, ex.kept) == (10, 10, 3)


def test_funnel_order_is_the_file_order(small, tmp_path):
    ex = explain_filter(write_filter(tmp_path, "g", [C3, C2, C1]), small)
    # C3 rejects 4, 5, 6 -> 0,1,2,3,7,8,9 left; C2 then rejects 3; C1 then rejects 1, 2, 9
    assert table(ex) == [(1, C3, 3, 10, 3, 7), (2, C2, 2, 7, 1, 6), (3, C1, 4, 6, 3, 3)]


def test_funnel_uses_the_set_parameters(small, tmp_path):
    ex = explain_filter(write_filter(tmp_path, "f", [C1, C2, C3]), small, sets={"t": 0.7})
    # t = 0.7: C1 keeps 0 (0.9), 4 (0.75), 5 (0.72); C2 keeps all three; C3 rejects 4 and 5
    assert table(ex) == [(1, C1, 7, 10, 7, 3), (2, C2, 2, 3, 0, 3), (3, C3, 3, 3, 2, 1)]


def test_a_join_that_loses_rows_is_a_step_of_its_own(small, tmp_path):
    keep = sorted(uid_of(i) for i in (0, 1, 2, 3, 4, 5, 6))  # rows 7, 8, 9 are not in the joined subset
    write_subset(tmp_path / "seven.npy", np.array([int(u[:16], 16) for u in keep], np.uint64),
                 np.array([int(u[16:], 16) for u in keep], np.uint64))
    frm = f"FROM pool AS p JOIN read_subset('{tmp_path / 'seven.npy'}') AS s ON s.uid = p.uid"
    flt = write_filter(tmp_path, "j", ["p.text LIKE '%dog%'"], head=f"SELECT p.uid\n{frm}\n")
    ex = explain_filter(flt, small, dropped=tmp_path / "d.parquet")
    # the join keeps rows 0..6; of those the caption rejects 4, 5 (NULL), 6
    assert table(ex) == [(0, frm, 3, 10, 3, 7), (1, "p.text LIKE '%dog%'", 3, 7, 3, 4)]
    assert ex.kept == 4 and sum(s.rejected for s in ex.steps) == 10 - 4
    got = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert sorted((r["uid"], r["conjunct"], r["rejected_by"]) for r in got) == sorted(
        [(uid_of(i), 0, frm) for i in (7, 8, 9)] + [(uid_of(i), 1, "p.text LIKE '%dog%'") for i in (4, 5, 6)])
    # the subset file the filter reads is an input: --dropped may not overwrite it
    res = invoke("run", flt, "-c", small, "-o", tmp_path / "o.npy", "--dropped", tmp_path / "seven.npy")
    assert res.exit_code == 1 and "refusing to overwrite" in res.output and "seven.npy" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o.npy").exists()


def test_a_cte_chain_explains_its_final_where(small, tmp_path):
    flt = tmp_path / "cte.sql"
    flt.write_text("WITH wide AS (SELECT uid, original_width AS w, text FROM pool WHERE original_width >= 100)\n"
                   "SELECT uid FROM wide WHERE text LIKE '%dog%' AND w <= 300\n")
    ex = explain_filter(flt, small)
    # wide: every row but 3 (width 50); of the nine, the caption rejects 4, 5, 6; w <= 300 only 6
    assert table(ex) == [(0, "FROM wide", 1, 10, 1, 9), (1, "text LIKE '%dog%'", 3, 9, 3, 6),
                         (2, "w <= 300", 1, 6, 0, 6)]
    assert ex.kept == 6


def test_clauses_after_where_are_a_last_step(small, tmp_path):
    flt = tmp_path / "limit.sql"
    flt.write_text("SELECT uid FROM pool WHERE text LIKE '%dog%' ORDER BY uid LIMIT 2\n")
    ex = explain_filter(flt, small, dropped=tmp_path / "d.parquet")
    assert table(ex) == [(1, "text LIKE '%dog%'", 3, 10, 3, 7), (-1, "LIMIT 2", None, 7, 5, 2)]
    passing = sorted(uid_of(i) for i in (0, 1, 2, 3, 7, 8, 9))
    got = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert sorted((r["uid"], r["conjunct"]) for r in got) == sorted(
        [(uid_of(i), 1) for i in (4, 5, 6)] + [(u, 2) for u in passing[2:]])


def test_dropped_names_the_first_rejecting_conjunct_as_written(small, tmp_path):
    flt = write_filter(tmp_path, "f", [C1, C2, C3])
    out = tmp_path / "dropped.parquet"
    res = invoke("run", flt, "-c", small, "-o", tmp_path / "f.npy", "--dropped", out)
    assert res.exit_code == 0, res.output
    assert "wrote 7 dropped rows to" in res.output
    got = pq.read_table(out)
    assert got.schema.names == ["uid", "conjunct", "rejected_by"]
    rows = got.to_pylist()
    expected = {1: C1, 2: C1, 6: C1, 9: C1, 3: C2, 4: C3, 5: C3}  # by hand, from ROWS
    assert [r["uid"] for r in rows] == sorted(uid_of(i) for i in expected)  # sorted by uid
    assert {r["uid"]: (r["conjunct"], r["rejected_by"]) for r in rows} == {
        uid_of(i): ([C1, C2, C3].index(c) + 1, c) for i, c in expected.items()}
    assert set(read_uids(tmp_path / "f.npy")) == {uid_of(i) for i in (0, 7, 8)}


def test_conjunct_text_is_kept_as_written_multiline_and_quotes(small, tmp_path):
    # quotes and -- inside the literal, a comment and a line break inside the conjunct
    c = "text NOT LIKE -- no quoted cat\n      '%''cat''--%'"
    flt = write_filter(tmp_path, "q", [C1, c])
    ex = explain_filter(flt, small, dropped=tmp_path / "d.parquet")
    assert ex.steps[1].sql == c
    # rows 1, 2, 6, 9 fail C1; row 5's NULL caption fails the NOT LIKE (no caption holds 'cat' in quotes)
    got = {r["uid"]: r["rejected_by"] for r in pq.read_table(tmp_path / "d.parquet").to_pylist()}
    assert got == {**{uid_of(i): C1 for i in (1, 2, 6, 9)}, uid_of(5): c}
    assert format_explanation(ex)[3].endswith("  text NOT LIKE '%''cat''--%'")  # on one line, the comment dropped


def test_explain_in_the_cli_prints_the_funnel_then_the_run(small, tmp_path):
    res = invoke("run", write_filter(tmp_path, "f", [C1, C2, C3]), "-c", small, "-o", tmp_path / "f.npy",
                 "--explain", "--set", "t=0.7")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].endswith("f.sql: funnel over 10 pool rows (FROM pool: 10 rows)")
    assert lines[1].split() == ["#", "alone", "rejects", "rows", "in", "rejected", "rows", "left", "conjunct"]
    assert lines[2].split()[:5] == ["1", "7", "10", "7", "3"] and lines[2].endswith(C1)
    assert lines[3].split()[:5] == ["2", "2", "3", "0", "3"] and lines[3].endswith(C2)
    assert lines[4].split()[:5] == ["3", "3", "3", "2", "1"] and lines[4].endswith(C3)
    assert lines[5].strip() == "kept 1 of 10 pool rows (10.00%)"
    assert "kept 1 of 10 samples" in lines[6]
    assert read_uids(tmp_path / "f.npy") == [uid_of(0)]


def test_a_filter_that_cannot_be_split_says_so_and_still_runs(small, tmp_path):
    flt = tmp_path / "u.sql"
    flt.write_text("SELECT uid FROM pool WHERE original_width < 100\nUNION ALL\n"
                   "SELECT uid FROM pool WHERE original_width > 300\n")
    out = tmp_path / "u.npy"
    res = invoke("run", flt, "-c", small, "-o", out, "--explain", "--dropped", tmp_path / "d.parquet")
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert "--explain cannot split this filter into conjuncts (it combines queries with UNION)" in first
    assert first.endswith("kept 2 of 10 pool rows")
    assert sorted(read_uids(out)) == sorted([uid_of(3), uid_of(6)])
    got = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert sorted(r["uid"] for r in got) == sorted(uid_of(i) for i in range(10) if i not in (3, 6))
    assert {r["conjunct"] for r in got} == {0} and got[0]["rejected_by"].startswith("(the whole filter")


# -- the split ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sql, prefix, conjuncts, rest", [
    ("SELECT uid FROM pool", "", [], None),
    ("SELECT uid FROM pool WHERE a BETWEEN 1 AND 2 AND (b OR c AND d) AND CASE WHEN x AND y THEN 1 ELSE 0 END = 1",
     "", ["a BETWEEN 1 AND 2", "(b OR c AND d)", "CASE WHEN x AND y THEN 1 ELSE 0 END = 1"], None),
    ("SELECT uid FROM pool WHERE a NOT BETWEEN 1 AND 2 AND s[1:2] = 'x' AND f(a, b AND c)",
     "", ["a NOT BETWEEN 1 AND 2", "s[1:2] = 'x'", "f(a, b AND c)"], None),
    ("WITH s AS (SELECT uid, x FROM pool WHERE x > 1 AND y) SELECT uid FROM s WHERE x < 5 AND z",
     "WITH s AS (SELECT uid, x FROM pool WHERE x > 1 AND y)", ["x < 5", "z"], None),
    ("SELECT uid FROM pool WHERE a AND uid IN (SELECT uid FROM t WHERE b AND c) ORDER BY uid",
     "", ["a", "uid IN (SELECT uid FROM t WHERE b AND c)"], None),
    ("SELECT uid FROM pool WHERE a QUALIFY row_number() OVER (ORDER BY s DESC) <= 3",
     "", ["a"], "QUALIFY row_number() OVER (ORDER BY s DESC) <= 3"),
    ("SELECT DISTINCT uid FROM pool WHERE a", "", ["a"], "SELECT DISTINCT"),
])
def test_split_shapes(sql, prefix, conjuncts, rest):
    got = split_query(sql)
    assert (got.prefix, got.conjuncts, got.rest) == (prefix, conjuncts, rest)


@pytest.mark.parametrize("sql, why", [
    ("SELECT uid FROM a UNION SELECT uid FROM b", "UNION"),
    ("(SELECT uid FROM a)", "parentheses"),
    ("SELECT 'x' AS uid", "no FROM"),
    ("FROM pool SELECT uid", "before SELECT"),
])
def test_shapes_that_cannot_be_split(sql, why):
    got = split_query(sql)
    assert isinstance(got, str) and why in got


def test_every_filter_file_splits():
    """Every bundled filter (filters/*.sql, filters/tic/*.sql) splits, by the tokenizer and sqlglot alike."""
    files = sorted(filters_dir().rglob("*.sql"))
    assert len(files) >= 15
    for p in files:
        flt = load_filter(p)
        assert not isinstance(split_filter_query(flt, flt.query), str), p


# -- every bundled filter: its funnel against its run --------------------------------------------

def check_against_run(flt, catalog, tmp_path, sets=None):
    ex = explain_filter(flt, catalog, sets=sets)
    res = run_filter(flt, catalog=catalog, out=tmp_path / f"{Path(flt).stem}.npy", sets=sets)
    assert ex.split, (flt, ex.reason)
    assert ex.kept == res.count, flt  # the funnel ends where the run does
    assert ex.pool_rows == res.pool_rows
    assert sum(s.rejected for s in ex.steps) == res.pool_rows - res.count, flt
    left = ex.pool_rows
    for s in ex.steps:  # each step starts where the previous one ended
        assert s.rows_in == left and s.rows_left == s.rows_in - s.rejected
        left = s.rows_left
    return ex, res


EXAMPLE_FILTERS = ["basic_filter", "clip_score_b32_threshold", "clip_score_l14_30pct", "clip_score_l14_threshold",
                   "laion2b", "no_filter", "text_based"]


@pytest.mark.parametrize("name", EXAMPLE_FILTERS)
def test_bundled_filter_funnel_on_the_example_catalog(name, tmp_path):
    ex, res = check_against_run(filters_dir() / f"{name}.sql", EXAMPLE, tmp_path)
    assert len([s for s in ex.steps if s.index > 0]) == len(split_filter_query(*_query(name)).shown.conjuncts)


def _query(name):
    flt = load_filter(filters_dir() / f"{name}.sql")
    return flt, flt.query


def example_pool_uids() -> Counter:
    files = sorted((REPO / "data" / "sample_pool" / "metadata").glob("*.parquet"))
    return Counter(u for f in files for u in pq.read_table(f, columns=["uid"]).column("uid").to_pylist())


@pytest.mark.parametrize("name", ["laion2b", "basic_filter"])
def test_dropped_is_the_pool_minus_the_subset(name, tmp_path):
    out, dropped = tmp_path / f"{name}.npy", tmp_path / f"{name}_dropped.parquet"
    res = invoke("run", name, "-c", EXAMPLE, "-o", out, "--dropped", dropped)
    assert res.exit_code == 0, res.output
    expected = example_pool_uids() - Counter(read_uids(out))  # from the subset file, not from curate
    got = pq.read_table(dropped).to_pylist()
    assert Counter(r["uid"] for r in got) == expected
    conj = split_filter_query(*_query(name)).shown.conjuncts
    assert all(r["rejected_by"] == conj[r["conjunct"] - 1] for r in got)


def test_image_based_and_tic_filters_on_generated_pools(tmp_path, monkeypatch):
    from curate.catalog.connection import init_catalog
    from curate.features.clusters import import_cluster_set
    from curate.features.text import build_text_features
    from curate.tic.artifacts import make_tic_artifacts
    from curate.tic.attach import attach

    root = tmp_path / "gen"
    generate_pool(root / "pool", files=2, rows_per_file=150, seed=3, npz=True, shards=False)
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool")
    rng = np.random.default_rng(0)
    cents = rng.normal(size=(16, 768)).astype(np.float32)
    np.save(root / "centroids.npy", cents)
    np.save(root / "targets.npy", cents[[1, 3, 5, 7, 9]] * 2)
    import_cluster_set(cat, "xlarge", root / "centroids.npy", [root / "targets.npy"])
    build_text_features(cat, progress=False)
    for name in ("image_based", "image_based_clip_score_l14_30pct"):
        ex, res = check_against_run(filters_dir() / f"{name}.sql", cat, tmp_path)
        assert 0 < res.count < res.pool_rows and len(ex.steps) >= 5

    tic = tmp_path / "tic"
    generate_pool(tic / "pool", files=2, rows_per_file=150, seed=11, npz=False, shards=False)
    tcat = init_catalog(tic / "cat.duckdb", pool=tic / "pool")
    make_tic_artifacts(tcat, tic / "art")
    attach(tcat, tic / "art")
    monkeypatch.chdir(tic)  # year_basic / year_bestpool read subsets/*.npy relative to here
    for name, flt in (("basic_filter", "clip_score_b32_threshold"),
                      ("image_based_clip_score_l14_30pct", "clip_score_l14_30pct")):
        run_filter(filters_dir() / f"{flt}.sql", catalog=tcat, out=tic / "subsets" / f"{name}.npy")
    for p in sorted((filters_dir() / "tic").glob("*.sql")):
        check_against_run(p, tcat, tmp_path / "t")


def test_negcliploss_and_normsim_filters_on_a_generated_pool(tmp_path):
    """The issue-19 filters (their tables built on first use from the pool's npz embeddings)."""
    from PIL import Image

    from curate.catalog.connection import init_catalog
    from curate.features.targets import import_target_set

    generate_pool(tmp_path / "pool", files=2, rows_per_file=150, seed=3, npz=True, shards=False)
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    np.save(tmp_path / "targets.npy", np.random.default_rng(0).normal(size=(4, 768)).astype(np.float32))
    import_target_set(cat, "in1k", [tmp_path / "targets.npy"])
    for name, panels in (("negcliploss_30pct", 1), ("normsim_inf", 1), ("negcliploss_normsim", 2)):
        sets = {"batch_size": 64, "k": 2} if name.startswith("negcliploss") else {}
        ex, res = check_against_run(filters_dir() / f"{name}.sql", cat, tmp_path, sets=sets)
        assert 0 < res.count < res.pool_rows
        explain_filter(filters_dir() / f"{name}.sql", cat, sets=sets, plot=tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as im:  # every thresholded score gets a panel
            assert im.size == (800, 350 * panels)


def test_the_commands_of_docs_explain_md(tmp_path, monkeypatch):
    """docs/explain.md: its two commands run as written (bundled example catalog), the first
    prints the funnel the page shows, and the page's DuckDB query over --dropped agrees with it."""
    import re
    import shlex

    import duckdb
    from PIL import Image

    text = (REPO / "docs" / "explain.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    commands = [ln for ln in blocks[0][1].splitlines() if ln.startswith("curate ")]
    shown = blocks[1][1].splitlines()
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert len(commands) == 2
    first = invoke(*shlex.split(commands[0])[1:])
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[:len(shown)] == shown
    second = invoke(*shlex.split(commands[1])[1:])
    assert second.exit_code == 0, second.output
    with Image.open("plots/laion2b.png") as im:
        assert im.size == (800, 350)
    sql = next(body for lang, body in blocks if lang == "sql")
    got = duckdb.connect().execute(sql.strip().rstrip(";")).fetchall()
    assert got == [(1, "c.lang_cld3 = 'en'", 890),
                   (2, "datacomp_ge(p.clip_b32_similarity_score, getvariable('threshold'))", 621)]


def test_outputs_that_are_inputs_are_refused(small, tmp_path):
    flt = write_filter(tmp_path, "f", [C1])
    pool_file = next((tmp_path / "pool1" / "metadata").glob("*.parquet"))
    for dropped in (tmp_path / "f.npy", pool_file, small, tmp_path / "pool1" / "metadata" / "new.parquet"):
        res = invoke("run", flt, "-c", small, "-o", tmp_path / "f.npy", "--dropped", dropped)
        assert res.exit_code == 1, (dropped, res.output)
        assert res.output.startswith(f"error: {dropped}: refusing to ") and len(res.output.splitlines()) == 1
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "pool1" / "metadata" / "new.parquet").exists()


def test_the_ray_engine_explains_locally(ray_session, small, tmp_path):
    res = invoke("run", write_filter(tmp_path, "f", [C1, C2, C3]), "-c", small, "-o", tmp_path / "f.npy",
                 "--engine", "ray", "--ray-address", ray_session, "--explain")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "note: --explain, --dropped and --plot run locally, on this machine's DuckDB" in lines
    assert lines.index("  kept 3 of 10 pool rows (30.00%)") < next(
        i for i, ln in enumerate(lines) if "kept 3 of 10 samples" in ln)
    assert sorted(read_uids(tmp_path / "f.npy")) == sorted(uid_of(i) for i in (0, 7, 8))
