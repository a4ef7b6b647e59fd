"""CLIP-score baselines: DataComp's fraction -> threshold rule, ties, NaN/NULL and float32
comparison, pinned with hand-worked tables over real parquet files (DuckDB's parquet scan
pushes predicates down, where NaN handling differs from in-memory tables)."""

import json
import math

import numpy as np
import pytest

from curate.run.query import FilterError
from curate.run.runner import run_filter
from tests.conftest import REPO, read_uids, uid_of

L14 = REPO / "filters" / "clip_score_l14_30pct.sql"
B32 = REPO / "filters" / "clip_score_b32_threshold.sql"
NAN = float("nan")


def rows(scores, key="clip_l14_similarity_score"):
    return [{"uid": uid_of(i), key: s} for i, s in enumerate(scores)]


def kept(make_catalog, tmp_path, files, flt, **sets):
    cat = make_catalog(files)
    out = tmp_path / "out.npy"
    run_filter(flt, catalog=cat, out=out, sets=sets)
    return read_uids(out)


def uids(*idx):
    return sorted(uid_of(i) for i in idx)


# Each case: scores (split over two parquet files), fraction, the indices DataComp keeps --
# worked out by hand: n = int(N * fraction) over ALL rows; sort non-NaN descending; the
# threshold is the value at position n; keep score >= threshold.
CASES = [
    # N=10, n=int(3.0)=3 -> sorted desc .9 .8 .8 .7 ... -> t=.7 -> keep 0,1,2,3
    ([.9, .8, .8, .7, .6, .5, .4, .3, .2, .1], 0.3, [0, 1, 2, 3]),
    # ties straddling the threshold: n=3 -> sorted .9 .7 .7 .7 .7 -> t=.7 -> all four .7 kept
    ([.9, .7, .7, .7, .7, .1, .1, .1, .1, .1], 0.3, [0, 1, 2, 3, 4]),
    # NaN counts in N but is never kept: N=10, n=3; non-NaN desc .9 .8 .6 .5 .4 .3 .2 .1 -> t=.5
    ([NAN, .9, NAN, .8, .6, .5, .4, .3, .2, .1], 0.3, [1, 3, 4, 5]),
    # NULL behaves like NaN (pandas reads a null float as NaN)
    ([None, .9, None, .8, .6, .5, .4, .3, .2, .1], 0.3, [1, 3, 4, 5]),
    # fraction 0 -> n=0 -> t = max -> every row tied at the max
    ([.5, .9, .9, .1], 0.0, [1, 2]),
    # n beyond the numbers: N=4 (2 NaN), fraction .75 -> n=3 -> position 3 is NaN -> nothing kept
    ([.5, NAN, .9, NAN], 0.75, []),
    # infinities and signed zeros: N=6, n=3 -> desc inf .5 0 -0 -inf -> t = -0.0 == 0 -> keep 4
    ([math.inf, .5, 0.0, -0.0, -math.inf, NAN], 0.5, [0, 1, 2, 3]),
    # int() truncation of a float64 product: 10 * 0.7 = 7.000000000000001 -> n = 7
    ([i / 10 for i in range(10)], 0.7, [2, 3, 4, 5, 6, 7, 8, 9]),
]


@pytest.mark.parametrize("scores,fraction,expected", CASES)
def test_fraction_threshold_hand_worked(make_catalog, tmp_path, scores, fraction, expected):
    half = len(scores) // 2
    files = [rows(scores)[:half], rows(scores)[half:]]
    for i, r in enumerate(files[1]):
        r["uid"] = uid_of(half + i)
    assert kept(make_catalog, tmp_path, files, L14, fraction=fraction) == uids(*expected)


def test_float_product_truncation_29_percent(make_catalog, tmp_path):
    # int(100 * 0.29) == 28 in Python (100*0.29 = 28.999999999999996), so the threshold is the
    # 29th largest value and exactly 29 distinct scores are kept -- not 30.
    assert int(100 * 0.29) == 28
    scores = [i / 1000 for i in range(100)]
    got = kept(make_catalog, tmp_path, [rows(scores)], L14, fraction=0.29)
    assert got == uids(*range(71, 100))


def test_matches_reference_get_threshold_on_random_pool(make_catalog, tmp_path):
    rng = np.random.default_rng(7)
    scores = rng.normal(0.2, 0.05, 3000).astype(np.float32)
    scores[rng.random(3000) < 0.05] = np.nan
    scores[:200] = np.round(scores[:200], 2)  # plenty of ties
    # DataComp's get_threshold, from the reference definition
    n = int(len(scores) * 0.3)
    t = (-np.sort(-scores))[n]
    expected = [i for i in range(3000) if scores[i] >= t]
    files = [rows(scores[:1500].tolist()), rows(scores[1500:].tolist())]
    for i, r in enumerate(files[1]):
        r["uid"] = uid_of(1500 + i)
    assert kept(make_catalog, tmp_path, files, L14, fraction=0.3) == uids(*expected)


def test_fraction_out_of_range_is_an_error(make_catalog, tmp_path):
    cat = make_catalog([rows([.1, .2])])
    for bad in (1.0, -0.1):
        with pytest.raises(FilterError, match="fraction must be in"):
            run_filter(L14, catalog=cat, out=tmp_path / "x.npy", sets={"fraction": bad})
    assert not (tmp_path / "x.npy").exists()


def test_threshold_compares_in_float32(make_catalog, tmp_path):
    f32_07 = float(np.float32(0.7))  # 0.699999988..., below 0.7 as a double
    assert f32_07 < 0.7
    scores = [f32_07, 0.69, 0.71, NAN, None]
    got = kept(make_catalog, tmp_path, [rows(scores, "clip_b32_similarity_score")], B32, threshold=0.7)
    # numpy compares the float32 column with float32(0.7): the score equal to it is kept
    assert got == uids(0, 2)


def test_threshold_default_and_nan(make_catalog, tmp_path):
    scores = [0.25, 0.2499, NAN, math.inf, -math.inf]
    got = kept(make_catalog, tmp_path, [rows(scores, "clip_b32_similarity_score")], B32)
    assert got == uids(0, 3)  # default threshold 0.25; +inf passes, NaN never


@pytest.mark.parametrize("scores,fraction,expected", CASES)
def test_filter_query_as_written_in_duckdb_agrees(make_catalog, scores, fraction, expected):
    # `curate run` evaluates fraction_threshold() up front into a variable (so DuckDB can push the
    # comparison into the parquet scan); the query as written -- the DuckDB shell's way, the
    # threshold a scalar subquery -- must keep exactly the same rows.
    from curate.catalog.connection import connect

    cat = make_catalog([rows(scores)])
    con = connect(cat)
    con.execute("SET VARIABLE fraction = ?", [fraction])
    query = L14.read_text().split(";")[-1]
    assert "fraction_threshold(" in query
    got = sorted(u for (u,) in con.execute(query).fetchall())
    con.close()
    assert got == uids(*expected)


def test_threshold_values_reported(make_catalog, tmp_path):
    scores = np.random.default_rng(3).normal(0.2, 0.05, 500).astype(np.float32)
    cat = make_catalog([rows(scores.tolist())])
    res = run_filter(L14, catalog=cat, out=tmp_path / "t.npy", sets={"fraction": 0.25})
    want = float((-np.sort(-scores))[int(500 * 0.25)])  # DataComp's get_threshold
    assert [t["threshold"] for t in res.thresholds] == [want]
    manifest = json.loads(res.manifest.read_text())
    assert manifest["thresholds"] == [{"score": "clip_l14_similarity_score",
                                       "fraction": "getvariable('fraction')", "threshold": want}]
    # NaN threshold (fewer numbers than the rank): reported as null, nothing kept
    cat2 = make_catalog([rows([0.5, NAN, NAN, NAN])])
    res2 = run_filter(L14, catalog=cat2, out=tmp_path / "n.npy", sets={"fraction": 0.5})
    assert res2.count == 0 and [t["threshold"] for t in res2.thresholds] == [None]


def test_threshold_call_that_needs_the_query_is_left_to_duckdb(make_catalog, tmp_path):
    # the score names an alias of the outer query: it cannot be evaluated on its own, so the
    # query goes to DuckDB untouched and DuckDB's own error comes back
    flt = tmp_path / "alias.sql"
    flt.write_text("SELECT uid FROM pool p WHERE p.clip_l14_similarity_score >= "
                   "fraction_threshold(p.clip_l14_similarity_score, 0.5)")
    cat = make_catalog([rows([.1, .2, .3])])
    with pytest.raises(FilterError, match="correlated subquery"):
        run_filter(flt, catalog=cat, out=tmp_path / "a.npy")
    assert not (tmp_path / "a.npy").exists()


def test_l14_threshold_filter(make_catalog, tmp_path):
    flt = REPO / "filters" / "clip_score_l14_threshold.sql"
    scores = [float(np.float32(0.3)), 0.2999, 0.5, NAN, None, math.inf]
    assert kept(make_catalog, tmp_path, [rows(scores)], flt) == uids(0, 2, 5)  # default 0.3
    assert kept(make_catalog, tmp_path, [rows(scores)], flt, threshold=0.5) == uids(2, 5)
