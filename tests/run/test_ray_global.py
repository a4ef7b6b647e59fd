"""The two bundled filters that need more than one pool file at a time, on the Ray engine, against
answers worked out by hand here (and byte-identical to the local engine):

* ``negcliploss_normsim.sql``: its second threshold, a rank over the NormSim values of the rows
  the first step kept, is a whole-pool scalar subquery; the ray engine evaluates it once on the
  driver (``curate.run.ray.global_scalars``) and passes it as a typed variable.
* ``decontaminate.sql``: a subset minus ``eval_neighbors``; it reads no pool rows, so it runs
  whole, as one task.

Ties, NaN, a row missing from a feature table, an empty step and the threshold edge are in the
tables. The pools have three files, so every answer crosses partition boundaries.
"""

from __future__ import annotations

import filecmp
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import init_catalog, register_parquet_view
from curate.errors import CurateError
from curate.pool.sample import write_npz
from curate.run.runner import run_filter
from curate.subset import write_subset
from curate.uids import sort_pairs
from tests.conftest import REPO, pool_table, read_uids, uid_of

pytest.importorskip("ray")

NAN = float("nan")
FILTERS = REPO / "filters"

# -- negcliploss_normsim ----------------------------------------------------------------------------
# 12 rows in three pool files (rows 0-4, 5-8, 9-11).
# negCLIPLoss: ties at .5 (rows 1 3 6), NaN (2, 7), row 11 missing from the table (NULL).
NEGCLIP = [0.9, 0.5, NAN, 0.5, 0.3, 0.1, 0.5, NAN, 0.3, 0.7, 0.2, None]
# NormSim_inf: the highest values sit on rows the first step drops (2, 11), a NaN on row 3 (kept
# by the first step), a tie at .8 (rows 1 9)
NORMSIM = [0.1, 0.8, 0.9, NAN, 0.2, 0.3, 0.05, 0.4, 0.6, 0.8, 0.7, 0.9]
# Worked by hand. N = 12 at both steps (DataComp: NaN and NULL rows count in N).
# Step 1, negCLIPLoss sorted: .9 .7 .5 .5 .5 .3 .3 .2 .1 (9 numbers).
#   f1 = .3: n = 3 -> t1 = .5: rows 0 1 3 6 9; their NormSim .1 .8 NaN .05 .8 -> sorted .8 .8 .1 .05
#   f1 = .5: n = 6 -> t1 = .3: rows 0 1 3 4 6 8 9; NormSim sorted .8 .8 .6 .2 .1 .05
#   f1 = .75: n = 9, only 9 numbers -> no t1, nothing kept (and no NormSim to rank: t2 NULL)
CASES = [
    # f1, f2, t2 (None: nothing kept), kept rows
    (0.3, 0.0, 0.8, [1, 9]),          # n2 = 0 -> .8; the tie at .8 both kept
    (0.3, 0.1, 0.8, [1, 9]),          # n2 = int(1.2) = 1 -> the second .8
    (0.3, 0.2, 0.1, [0, 1, 9]),       # n2 = int(2.4) = 2 -> .1
    (0.3, 0.25, 0.05, [0, 1, 6, 9]),  # n2 = 3 -> .05, the last number; NaN row 3 never kept
    (0.3, 0.34, None, []),            # n2 = int(4.08) = 4: only 4 numbers -> nothing (the edge)
    (0.5, 0.2, 0.6, [1, 8, 9]),       # n2 = 2 of .8 .8 .6 ... -> .6
    (0.75, 0.1, None, []),            # the first step keeps nothing: the second ranks nothing
]


@pytest.fixture(scope="module")
def hand_nl(tmp_path_factory):
    """The pool and hand-written negcliploss / normsim tables (one parquet per pool file)."""
    root = tmp_path_factory.mktemp("nlns")
    meta = root / "metadata"
    meta.mkdir()
    files = [range(0, 5), range(5, 9), range(9, 12)]
    for k, rows in enumerate(files):
        pq.write_table(pool_table([{"uid": uid_of(i)} for i in rows]), meta / f"{k:04d}.parquet")
    cat = init_catalog(root / "cat.duckdb", pool=root)
    nl_paths, ns_paths = [], []
    for k, rows in enumerate(files):
        have = [i for i in rows if NEGCLIP[i] is not None]
        common = {"file": lambda ids: [f"{k:04d}"] * len(ids),
                  "row": lambda ids: pa.array([i - rows.start for i in ids], pa.int64())}
        pq.write_table(pa.table({"uid": [uid_of(i) for i in have], "file": common["file"](have),
                                 "row": common["row"](have), "arch": ["l14"] * len(have),
                                 "value": pa.array([NEGCLIP[i] for i in have], pa.float32())}),
                       root / f"nl{k}.parquet")
        ids = list(rows)
        pq.write_table(pa.table({"uid": [uid_of(i) for i in ids], "file": common["file"](ids),
                                 "row": common["row"](ids), "target_set": ["in1k"] * len(ids),
                                 "normsim_inf": pa.array([NORMSIM[i] for i in ids], pa.float32()),
                                 "normsim_2": pa.array([0.0] * len(ids), pa.float32())}),
                       root / f"ns{k}.parquet")
        nl_paths.append(root / f"nl{k}.parquet")
        ns_paths.append(root / f"ns{k}.parquet")
    register_parquet_view(cat, "negcliploss", nl_paths)
    register_parquet_view(cat, "normsim", ns_paths)
    from curate.features.targets import import_target_set

    np.save(root / "targets.npy", np.eye(2, 768, dtype=np.float32))
    import_target_set(cat, "in1k", [root / "targets.npy"])  # the manifest describes the target set
    return cat


@pytest.fixture
def hand_tables_are_current(monkeypatch):
    """The hand tables stand in for the producers' outputs: `curate run` must not rebuild them."""
    from curate.features import negcliploss, normsim

    monkeypatch.setattr(negcliploss.PRODUCER, "is_current", lambda catalog, params: True)
    monkeypatch.setattr(normsim.PRODUCER, "is_current", lambda catalog, params: True)


def test_negcliploss_normsim_table_premises():
    """The CASES comments, re-derived with numpy from DataComp's get_threshold."""
    def threshold(x, f):
        v = -np.sort(-np.array([s for s in x if s is not None and s == s], np.float32))
        n = int(12 * f)
        return float(v[n]) if n < len(v) else None

    for f1, f2, t2, rows in CASES:
        t1 = threshold(NEGCLIP, f1)
        first = [i for i, s in enumerate(NEGCLIP) if t1 is not None and s is not None and np.float32(s) >= t1]
        got_t2 = threshold([NORMSIM[i] if i in first else None for i in range(12)], f2)
        assert got_t2 == (None if t2 is None else pytest.approx(t2)), (f1, f2)
        assert [i for i in first if got_t2 is not None and np.float32(NORMSIM[i]) >= got_t2] == rows


@pytest.mark.parametrize("f1, f2, t2, rows", CASES, ids=[f"{a}-{b}" for a, b, _, _ in CASES])
def test_negcliploss_normsim_on_ray(ray_session, hand_nl, hand_tables_are_current, tmp_path, f1, f2, t2, rows):
    from curate.run.ray import run_filter_ray

    flt = FILTERS / "negcliploss_normsim.sql"
    sets = {"fraction": f1, "normsim_fraction": f2}
    local = run_filter(flt, catalog=hand_nl, out=tmp_path / "local.npy", sets=sets)
    res = run_filter_ray(flt, catalog=hand_nl, out=tmp_path / "ray.npy", sets=sets, bucket_records=2)
    assert read_uids(tmp_path / "ray.npy") == sorted(uid_of(i) for i in rows)
    assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "ray.npy", shallow=False)
    assert res.count == local.count == len(rows)
    engine = json.loads((tmp_path / "ray.json").read_text())["engine"]
    assert engine["partitions"] == 3 and engine["single_task"] is None
    (scalar,) = engine["scalars"].values()  # the second threshold, evaluated once on the driver
    assert scalar["type"] == "FLOAT"
    assert scalar["value"] == (None if t2 is None else str(np.float32(t2)))


def test_negcliploss_normsim_checks_its_second_fraction_on_ray(ray_session, hand_nl, hand_tables_are_current,
                                                                tmp_path):
    from curate.run.ray import run_filter_ray

    for bad in (1.0, -0.1):
        with pytest.raises(CurateError, match=rf"negcliploss_normsim.sql: .*normsim_fraction must be in \[0, 1\), "
                                              rf"got {bad}"):
            run_filter_ray(FILTERS / "negcliploss_normsim.sql", catalog=hand_nl, out=tmp_path / "x.npy",
                           sets={"normsim_fraction": bad})
        assert not (tmp_path / "x.npy").exists()


def test_a_restarted_run_reuses_the_scalar(ray_session, hand_nl, hand_tables_are_current, tmp_path):
    from curate.run.ray import run_filter_ray

    flt = FILTERS / "negcliploss_normsim.sql"
    work = tmp_path / "work"
    run_filter_ray(flt, catalog=hand_nl, out=tmp_path / "a.npy", work_dir=str(work), keep_work=True)
    (run_dir,) = work.iterdir()
    cached = json.loads((run_dir / "scalars.json").read_text())
    # defaults .3 / .2: the (0.3, 0.2) row of CASES, t2 = .1
    assert [v["value"] for v in cached.values()] == [str(np.float32(0.1))]
    run_filter_ray(flt, catalog=hand_nl, out=tmp_path / "b.npy", work_dir=str(work))
    engine = json.loads((tmp_path / "b.json").read_text())["engine"]
    assert engine["partitions_resumed"] == 3 and engine["scalars"] == cached
    assert filecmp.cmp(tmp_path / "a.npy", tmp_path / "b.npy", shallow=False)
    assert read_uids(tmp_path / "b.npy") == sorted(uid_of(i) for i in (0, 1, 9))


# -- any whole-pool scalar subquery ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    meta = root / "metadata"
    meta.mkdir()
    scores = [[0.1, 0.5, 0.3], [0.9, NAN], [0.2, None]]
    n = 0
    for k, part in enumerate(scores):
        pq.write_table(pool_table([{"uid": uid_of(n + j), "clip_b32_similarity_score": s} for j, s in enumerate(part)]),
                       meta / f"{k:04d}.parquet")
        n += len(part)
    return init_catalog(root / "cat.duckdb", pool=root)


# rows: 0 .1 | 1 .5 | 2 .3 | 3 .9 | 4 NaN | 5 .2 | 6 NULL (DuckDB orders NaN above every number)
SCALAR_CASES = [
    # avg over the numbers (NaN excluded by the WHERE, NULL by avg): (.1+.5+.3+.9+.2)/5 = .4
    # -> rows 1 3, and 4 (NaN >= .4 in DuckDB)
    ("x >= (SELECT avg(clip_b32_similarity_score) FROM pool WHERE NOT isnan(clip_b32_similarity_score))",
     [1, 3, 4]),
    # the largest number: .9, row 3 only
    ("x = (SELECT max(clip_b32_similarity_score) FROM pool WHERE NOT isnan(clip_b32_similarity_score))", [3]),
    # no row matches: NULL, nothing kept
    ("x >= (SELECT min(clip_b32_similarity_score) FROM pool WHERE clip_b32_similarity_score > 5)", []),
    # the second smallest number through ORDER BY / OFFSET: .1 .2 .3 .5 .9 -> .2; x <= .2: rows 0 5
    ("x <= (SELECT clip_b32_similarity_score FROM pool WHERE NOT isnan(clip_b32_similarity_score) "
     "ORDER BY 1 LIMIT 1 OFFSET 1)", [0, 5]),
    # two scalars, one inside a CASE: above the average and below the max number (.9)
    ("x > (SELECT avg(clip_b32_similarity_score) FROM pool WHERE NOT isnan(clip_b32_similarity_score)) "
     "AND x < CASE WHEN true THEN (SELECT max(clip_b32_similarity_score) FROM pool "
     "WHERE NOT isnan(clip_b32_similarity_score)) END", [1]),
]


@pytest.mark.parametrize("where, rows", SCALAR_CASES, ids=range(len(SCALAR_CASES)))
def test_whole_pool_scalar_subqueries(ray_session, small, tmp_path, where, rows):
    from curate.run.ray import run_filter_ray

    flt = tmp_path / "f.sql"
    flt.write_text("SELECT uid FROM (SELECT uid, clip_b32_similarity_score AS x FROM pool) AS p\nWHERE " + where + "\n")
    local = run_filter(flt, catalog=small, out=tmp_path / "local.npy")
    run_filter_ray(flt, catalog=small, out=tmp_path / "ray.npy")
    assert read_uids(tmp_path / "ray.npy") == sorted(uid_of(i) for i in rows)
    assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "ray.npy", shallow=False)
    assert local.count == len(rows)


def test_which_subqueries_are_global_scalars():
    """Pure query analysis: only uncorrelated scalar subqueries over a partitioned table are cut."""
    from curate.run.ray import global_scalars

    con = duckdb.connect()
    con.execute("CREATE TABLE pool (uid VARCHAR, file VARCHAR, x FLOAT)")
    con.execute("CREATE TABLE other (uid VARCHAR, y FLOAT)")
    cases = [
        ("SELECT uid FROM pool WHERE x > (SELECT avg(x) FROM pool)",
         "SELECT uid FROM pool WHERE x > (SELECT getvariable('__curate_global_scalar_0'))"),
        # correlated to the outer row: stays (the row-local check decides)
        ("SELECT uid FROM pool AS p WHERE x > (SELECT max(q.x) FROM pool AS q WHERE q.file = p.file)", None),
        # over a table that is not partitioned: the same in every partition, stays
        ("SELECT uid FROM pool WHERE x > (SELECT max(y) FROM other)", None),
        # IN / EXISTS / FROM subqueries are not scalars
        ("SELECT uid FROM pool WHERE uid IN (SELECT uid FROM pool WHERE x > 0)", None),
        ("SELECT uid FROM other AS o WHERE EXISTS (SELECT 1 FROM pool)", None),
        ("SELECT uid FROM (SELECT uid FROM pool) AS t", None),
        # a global scalar inside a correlated subquery is found
        ("SELECT uid FROM other AS o WHERE o.y > (SELECT min(p.x) FROM pool AS p WHERE p.uid = o.uid "
         "AND p.x > (SELECT avg(x) FROM pool))",
         "SELECT uid FROM other AS o WHERE o.y > (SELECT min(p.x) FROM pool AS p WHERE p.uid = o.uid "
         "AND p.x > (SELECT getvariable('__curate_global_scalar_0')))"),
    ]
    for sql, want in cases:
        driver, worker, scalars = global_scalars(con, sql, sql, ["pool"])
        assert driver == worker == (want or sql), sql
        assert len(scalars) == (1 if want else 0)
    # the variable is declared with the subquery's type, so the rewritten query binds
    assert con.execute("SELECT type FROM duckdb_variables() WHERE name = '__curate_global_scalar_0'").fetchone() \
        == ("DOUBLE",)


# -- decontaminate ---------------------------------------------------------------------------------

def _vec(**comp) -> np.ndarray:
    v = np.zeros(768, np.float32)
    for k, x in comp.items():
        v[int(k[1:])] = x
    return v


# eval images: c0 = e0 (task cars), p0 = 2 e1 (task pets; stored L2-normalised: e1).
# Pool rows (components exact in float16); their similarity to c0 / p0 is the e0 / e1 component.
DECON_POOL = {
    "A": [_vec(e0=1), _vec(e0=0.75, e2=0.5)],                       # A0: c0 1; A1: c0 .75
    "B": [_vec(e1=0.5), _vec(e3=1), _vec(e1=0.875)],                # B0: p0 .5; B1: none; B2: p0 .875
    "C": [_vec(e1=0.75, e0=0.25)],                                  # C0: p0 .75, c0 .25
}
ROWS = {f"{f}{r}": (f, r) for f, rows in DECON_POOL.items() for r in range(len(rows))}
UID = {name: uid_of(100 + k) for k, name in enumerate(ROWS)}
# the subset to clean: every pool row, C0 twice (upsampled), and a uid the pool lacks
SUBSET = ["A0", "A1", "B0", "B1", "B2", "C0", "C0", "X"]
UID["X"] = uid_of(999)
DECON_CASES = [
    # threshold, subset rows kept (a row goes when some eval image has cosine >= threshold)
    (1.0, ["A1", "B0", "B1", "B2", "C0", "C0", "X"]),    # only A0 (exactly 1)
    (0.875, ["A1", "B0", "B1", "C0", "C0", "X"]),        # B2 at the edge: .875 >= .875
    (0.8, ["A1", "B0", "B1", "C0", "C0", "X"]),
    (0.75, ["B0", "B1", "X"]),                           # A1 (c0 .75) and both copies of C0 (p0 .75)
    (0.5, ["B1", "X"]),                                  # B0 (p0 .5) too; C0's c0 .25 never counted
]


@pytest.fixture(scope="module")
def hand_decon(tmp_path_factory):
    root = tmp_path_factory.mktemp("decon")
    meta = root / "metadata"
    meta.mkdir()
    for f, rows in DECON_POOL.items():
        names = [n for n, (g, _) in ROWS.items() if g == f]
        pq.write_table(pool_table([{"uid": UID[n]} for n in names]), meta / f"{f}.parquet")
        write_npz(meta / f"{f}.npz", {"l14_img": np.stack(rows).astype(np.float16)})
    cat = init_catalog(root / "cat.duckdb", pool=root)
    from curate.features.decontam import import_eval_set

    np.save(root / "eval.npy", np.stack([_vec(e0=1), _vec(e1=2)]))
    pq.write_table(pa.table({"task": ["cars", "pets"], "eval_key": ["c0", "p0"]}), root / "keys.parquet")
    import_eval_set(cat, "evals", root / "eval.npy", root / "keys.parquet")
    _subset(root / "subsets" / "all.npy", SUBSET)
    _subset(root / "subsets" / "empty.npy", [])
    return cat


def _subset(path, names):
    path.parent.mkdir(parents=True, exist_ok=True)
    hi = np.array([int(UID[n][:16], 16) for n in names], np.uint64)
    lo = np.array([int(UID[n][16:], 16) for n in names], np.uint64)
    write_subset(path, *sort_pairs(hi, lo))


def test_decontam_table_premises():
    e = {"c0": _vec(e0=1), "p0": _vec(e1=1)}
    for threshold, kept in DECON_CASES:
        near = {n for n, (f, r) in ROWS.items()
                if any(float(DECON_POOL[f][r].astype(np.float16).astype(np.float32) @ v) >= threshold
                       for v in e.values())}
        assert [n for n in SUBSET if n not in near] == kept, threshold


@pytest.mark.parametrize("threshold, kept", DECON_CASES, ids=[str(t) for t, _ in DECON_CASES])
def test_decontaminate_on_ray(ray_session, hand_decon, tmp_path, threshold, kept, monkeypatch):
    from curate.run.ray import run_filter_ray

    monkeypatch.chdir(hand_decon.parent)  # the subset path is relative, as users write it
    flt = FILTERS / "decontaminate.sql"
    for subset, want in (("subsets/all.npy", kept), ("subsets/empty.npy", [])):
        sets = {"subset": subset, "threshold": threshold}
        local = run_filter(flt, catalog=hand_decon, out=tmp_path / "local.npy", sets=sets)
        res = run_filter_ray(flt, catalog=hand_decon, out=tmp_path / "ray.npy", sets=sets, bucket_records=3)
        assert read_uids(tmp_path / "ray.npy") == sorted(UID[n] for n in want), subset
        assert filecmp.cmp(tmp_path / "local.npy", tmp_path / "ray.npy", shallow=False)
        assert (res.count, res.distinct) == (local.count, local.distinct) == (len(want), len(set(want)))
        engine = json.loads((tmp_path / "ray.json").read_text())["engine"]
        assert engine["partitions"] == 1 and "reads no pool rows" in engine["single_task"]


def test_a_global_query_over_the_pool_is_still_refused(ray_session, small, tmp_path):
    """Running whole is only for queries that read no pool rows."""
    from curate.run.ray import run_filter_ray

    flt = tmp_path / "f.sql"
    flt.write_text("SELECT DISTINCT uid FROM pool\n")
    with pytest.raises(CurateError, match="DISTINCT needs the whole pool; use --engine local"):
        run_filter_ray(flt, catalog=small, out=tmp_path / "x.npy")
