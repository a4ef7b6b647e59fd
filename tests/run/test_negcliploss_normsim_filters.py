"""The negCLIPLoss / NormSim filters: DataComp's fraction semantics (NaN, ties) exactly as
clip_score_l14_30pct.sql, the paper's sequential recipe, composition with read_subset /
INTERSECT, and the same subset on the local and ray engines."""

from __future__ import annotations

import filecmp

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import connect, init_catalog, register_parquet_view
from curate.engine import Engine
from curate.errors import CurateError
from curate.features.targets import import_target_set
from curate.pool.sample import generate_pool
from curate.run import run_filter as run_any
from curate.run.runner import run_filter
from tests.conftest import REPO, read_uids, uid_of

NAN = float("nan")
FILTERS = REPO / "filters"
# 12 rows in two files: ties at .5 and .3, NaN scores, a NULL (a row the feature table lacks)
SCORES = [0.9, 0.5, NAN, 0.5, 0.3, 0.1, 0.5, NAN, 0.3, 0.7, 0.2, None]
SECOND = [0.1, 0.8, 0.9, 0.8, 0.2, 0.3, 0.05, 0.4, 0.6, 0.2, 0.7, 0.9]
FRACTIONS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.65, 0.75, 0.9, 0.95]


def get_threshold(scores, n_all, fraction):
    """DataComp's get_threshold, re-written: n = int(N * fraction) over all rows; the n-th of the
    non-NaN scores sorted descending (float32); None (keep nothing) when there are too few."""
    x = np.array([s for s in scores if s is not None and s == s], np.float32)
    n = int(n_all * fraction)
    return float(-np.sort(-x)[n]) if n < len(x) else None


def kept(scores, t):
    return [i for i, s in enumerate(scores) if t is not None and s is not None and s == s
            and np.float32(s) >= np.float32(t)]


@pytest.fixture
def hand(make_catalog, tmp_path):
    """A pool with clip_l14_similarity_score = SCORES and hand-written negcliploss / normsim views
    holding the same numbers (negcliploss has no row for the NULL)."""
    rows = [{"uid": uid_of(i), "clip_l14_similarity_score": s} for i, s in enumerate(SCORES)]
    cat = make_catalog([rows[:7], rows[7:]])
    con = connect(cat)
    pos = con.execute('SELECT uid, file, "row" FROM pool').fetchall()
    con.close()
    at = {u: (f, r) for u, f, r in pos}
    ids = [i for i, s in enumerate(SCORES) if s is not None]
    nl = pa.table({"uid": [uid_of(i) for i in ids], "file": [at[uid_of(i)][0] for i in ids],
                   "row": pa.array([at[uid_of(i)][1] for i in ids], pa.int64()),
                   "arch": ["l14"] * len(ids), "value": pa.array([SCORES[i] for i in ids], pa.float32())})
    pq.write_table(nl, tmp_path / "nl.parquet")
    register_parquet_view(cat, "negcliploss", [tmp_path / "nl.parquet"])
    n = len(SCORES)
    sim = pa.table({"uid": [uid_of(i) for i in range(n)], "file": [at[uid_of(i)][0] for i in range(n)],
                    "row": pa.array([at[uid_of(i)][1] for i in range(n)], pa.int64()),
                    "target_set": ["in1k"] * n,
                    "normsim_inf": pa.array(SCORES, pa.float32()), "normsim_2": pa.array(SECOND, pa.float32())})
    pq.write_table(sim, tmp_path / "ns.parquet")
    register_parquet_view(cat, "normsim", [tmp_path / "ns.parquet"])
    return cat


def shell(cat, name, **sets) -> list[str]:
    """Run a filter file as the DuckDB shell would (its SET VARIABLE lines, then the query) on a
    plain connection to the catalog, with some variables set afterwards."""
    text = (FILTERS / f"{name}.sql").read_text()
    setup, query = text.rsplit(";", 1)
    con = connect(cat)
    try:
        con.execute(setup)
        for k, v in sets.items():
            con.execute(f"SET VARIABLE {k} = ?", [v])
        return sorted(r[0] for r in con.execute(query).fetchall())
    finally:
        con.close()


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_fraction_semantics_are_clip_score_l14_30pct(hand, tmp_path, fraction):
    run_filter(FILTERS / "clip_score_l14_30pct.sql", catalog=hand, out=tmp_path / "c.npy", sets={"fraction": fraction})
    want = read_uids(tmp_path / "c.npy")
    assert want == sorted(uid_of(i) for i in kept(SCORES, get_threshold(SCORES, 12, fraction)))
    assert shell(hand, "negcliploss_30pct", fraction=fraction) == want
    assert shell(hand, "normsim_inf", fraction=fraction) == want


def test_by_hand():
    # N = 12 (NaN and NULL count); non-NaN sorted: .9 .7 .5 .5 .5 .3 .3 .2 .1
    assert get_threshold(SCORES, 12, 0.3) == pytest.approx(0.5)   # n = 3 -> .5: the three tied .5 kept
    assert kept(SCORES, 0.5) == [0, 1, 3, 6, 9]
    assert get_threshold(SCORES, 12, 0.75) is None               # n = 9 > 8: nothing kept
    assert get_threshold(SCORES, 12, 0.65) == pytest.approx(0.2)  # n = int(7.8) = 7


def sequential(first, second, n_all, f1, f2):
    """The paper's code: top f1 of the pool by the first score, then among those the top
    int(N * f2) by the second (here with DataComp's ties-kept, NaN-never rule at both steps)."""
    k1 = kept(first, get_threshold(first, n_all, f1))
    t2 = get_threshold([second[i] if i in k1 else None for i in range(n_all)], n_all, f2)
    return [i for i in k1 if t2 is not None and np.float32(second[i]) >= np.float32(t2)]


@pytest.mark.parametrize("f1,f2,expected", [
    # t1 = .5: rows 0 1 3 6 9, second scores .1 .8 .8 .05 .2 (sorted .8 .8 .2 .1 .05); n2 = int(12 * .2) = 2 -> .2
    (0.3, 0.2, [1, 3, 9]),
    # t1 = .3 (n1 = 6): rows 0 1 3 4 6 8 9, second sorted .8 .8 .6 .2 .2 .1 .05; n2 = int(1.2) = 1 -> .8
    (0.5, 0.1, [1, 3]),
    # t1 = .5; n2 = int(3.6) = 3 of .8 .8 .2 .1 .05 -> .1: rows 0 1 3 9 (ties and N over the whole pool)
    (0.3, 0.3, [0, 1, 3, 9]),
    # n2 = 6 but only 5 rows passed the first step: DataComp's NaN threshold, nothing kept
    (0.3, 0.5, []),
])
def test_combined_recipe_by_hand(hand, f1, f2, expected):
    # the second filter step ranks NormSim_inf = SECOND here (normsim_inf = SCORES in the view would
    # make both steps the same), so read it from normsim_2 by a variant of the file's query
    assert sequential(SCORES, SECOND, 12, f1, f2) == expected
    text = (FILTERS / "negcliploss_normsim.sql").read_text().replace("normsim_inf", "normsim_2")
    setup, query = text.rsplit(";", 1)
    con = connect(hand)
    try:
        con.execute(setup)
        con.execute("SET VARIABLE fraction = ?", [f1])
        con.execute("SET VARIABLE normsim_fraction = ?", [f2])
        got = sorted(r[0] for r in con.execute(query).fetchall())
    finally:
        con.close()
    assert got == sorted(uid_of(i) for i in expected)


# -- end to end on a generated pool: producers built by `curate run`, local and ray -----------------

SMALL = {"batch_size": 64, "k": 2, "seed": 1}


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    generate_pool(root / "pool", files=3, rows_per_file=60, seed=9, shards=False)
    cat = init_catalog(root / "cat.duckdb", pool=root / "pool")
    rng = np.random.default_rng(2)
    np.save(root / "t.npy", rng.normal(size=(6, 768)).astype(np.float32))
    import_target_set(cat, "in1k", [root / "t.npy"])
    return cat


def _table(cat):
    con = connect(cat)
    try:
        return con.execute('SELECT p.uid, n.value, s.normsim_inf FROM pool p JOIN negcliploss n USING (file, "row") '
                           'JOIN normsim s USING (file, "row") WHERE n.arch = \'l14\' ORDER BY p.uid').fetchall()
    finally:
        con.close()


def test_run_builds_the_tables_and_keeps_what_numpy_keeps(gen, tmp_path, ray_session):
    out = {}
    for name in ("negcliploss_30pct", "normsim_inf", "negcliploss_normsim"):
        out[name] = run_filter(FILTERS / f"{name}.sql", catalog=gen, out=tmp_path / f"{name}.npy", sets=SMALL
                               if name != "normsim_inf" else None)
        ray = run_any(FILTERS / f"{name}.sql", catalog=gen, out=tmp_path / f"{name}-ray.npy",
                      sets=SMALL if name != "normsim_inf" else None, engine=Engine("ray", address=ray_session))
        assert filecmp.cmp(tmp_path / f"{name}.npy", tmp_path / f"{name}-ray.npy", shallow=False), name
        assert ray.count == out[name].count
    rows = _table(gen)
    assert len(rows) == 180
    uids, nl, ns = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    assert read_uids(tmp_path / "negcliploss_30pct.npy") == sorted(uids[i] for i in kept(nl, get_threshold(nl, 180, 0.3)))
    assert read_uids(tmp_path / "normsim_inf.npy") == sorted(uids[i] for i in kept(ns, get_threshold(ns, 180, 0.3)))
    both = sequential(nl, ns, 180, 0.3, 0.2)
    assert len(both) >= 36 and read_uids(tmp_path / "negcliploss_normsim.npy") == sorted(uids[i] for i in both)


def test_compose_with_read_subset_and_intersect(gen, tmp_path):
    run_filter(FILTERS / "negcliploss_30pct.sql", catalog=gen, out=tmp_path / "nl.npy", sets=SMALL)
    run_filter(FILTERS / "clip_score_l14_30pct.sql", catalog=gen, out=tmp_path / "cs.npy")
    flt = tmp_path / "both.sql"
    flt.write_text(f"SELECT uid FROM read_subset('{tmp_path / 'nl.npy'}')\n"
                   f"INTERSECT\nSELECT uid FROM read_subset('{tmp_path / 'cs.npy'}')\n")
    run_filter(flt, catalog=gen, out=tmp_path / "both.npy")
    a, b = set(read_uids(tmp_path / "nl.npy")), set(read_uids(tmp_path / "cs.npy"))
    assert read_uids(tmp_path / "both.npy") == sorted(a & b) and 0 < len(a & b) < len(a)
    # and inline: the negCLIPLoss subset INTERSECT DataComp's CLIP-score query
    text = (FILTERS / "negcliploss_30pct.sql").read_text()
    inline = tmp_path / "inline.sql"
    inline.write_text(text.rstrip() + "\nINTERSECT\nSELECT uid FROM pool WHERE datacomp_ge(clip_l14_similarity_score, "
                      "fraction_threshold(clip_l14_similarity_score, 0.3))\n")
    run_filter(inline, catalog=gen, out=tmp_path / "inline.npy", sets=SMALL)
    assert read_uids(tmp_path / "inline.npy") == sorted(a & b)


def test_combined_recipe_checks_its_second_fraction(gen, tmp_path):
    for bad in (1.0, -0.1):
        with pytest.raises(CurateError, match=rf"normsim_fraction must be in \[0, 1\), got {bad}"):
            run_filter(FILTERS / "negcliploss_normsim.sql", catalog=gen, out=tmp_path / "x.npy",
                       sets={**SMALL, "normsim_fraction": bad})
