"""Density-based pruning (Abbas et al. 2024): quotas on 3 planted clusters worked out in the test
from the paper's formula (plain numpy, the quadratic program solved by enumerating its active
sets), the farthest samples kept per cluster, determinism across worker counts, rebuilds, the
filter and read_subset."""

from __future__ import annotations

import filecmp
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import init_catalog
from curate.engine import Engine
from curate.features import dbp
from curate.features.clusters import import_cluster_set
from curate.features.registry import PRODUCERS, producer
from curate.pool.sample import write_npz
from curate.resources import filters_dir
from curate.run.runner import run_filter
from tests.conftest import pool_table, read_uids, uid_of

D = 768
# centroids: c0 = e0, c1 = e1, c2 = 0.6 e1 + 0.8 e2 (unit norm; cos(c1, c2) = 0.6, the rest 0)
CENT = np.zeros((3, D), np.float32)
CENT[0, 0] = 1
CENT[1, 1] = 1
CENT[2, 1], CENT[2, 2] = 0.6, 0.8
# sample = centroid + t * (a private axis orthogonal to every centroid): cos to its centroid is
# 1 / sqrt(1 + t^2), to the other centroids at most 0.6 of that, so it lands in its own cluster
SPREAD = {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1: [0.3, 0.6, 0.9, 1.2, 1.5, 1.8], 2: [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]}
SAMPLES = [(c, t) for c in SPREAD for t in SPREAD[c]]  # 18 samples; uid index = position here
# d_inter with neighbors = 2 (both other centroids), by hand: c0: 1 - 0 = 1 to both;
# c1: (1 - 0 + 1 - 0.6) / 2 = 0.7; c2: the same
D_INTER = [1.0, 0.7, 0.7]


def embedding(i):
    c, t = SAMPLES[i]
    v = CENT[c].copy()
    v[10 + i] = t
    return v


def make_pool(root):
    meta = root / "metadata"
    meta.mkdir(parents=True)
    files = (range(0, 7), range(7, 13), range(13, 18))  # clusters cut across files
    for fi, rows in enumerate(files):
        pq.write_table(pool_table([{"uid": uid_of(i)} for i in rows]), meta / f"{fi:04d}.parquet")
        write_npz(meta / f"{fi:04d}.npz", {"l14_img": np.stack([embedding(i) for i in rows]).astype(np.float16)})
    cat = init_catalog(root / "cat.duckdb", pool=root)
    np.save(root / "centroids.npy", CENT)
    import_cluster_set(cat, "three", root / "centroids.npy")
    return cat


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("dbp"))


def expected(fraction, temperature, balance=0.5):
    """The paper's quotas and kept samples, from its formula (independent of curate's code)."""
    x = np.stack([embedding(i) for i in range(len(SAMPLES))]).astype(np.float16).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = CENT.astype(np.float64)
    label = np.array([s[0] for s in SAMPLES])
    assert (np.argmax(x @ c.T, axis=1) == label).all()  # planted as meant
    dist = 1 - np.einsum("ij,ij->i", x, c[label])
    d_intra = np.array([dist[label == j].mean() for j in range(3)])
    cx = d_intra * np.array(D_INTER)
    p = np.exp(cx / temperature) / np.exp(cx / temperature).sum()
    n = np.array([6, 6, 6], float)
    budget = int(18 * fraction)
    m = int(budget / 3 * balance) if balance > 0 else 1
    lb, ub, t = np.minimum(m, n - 1), n, p * budget
    # the QP argmin ||q - t||^2, sum q = budget, lb <= q <= ub: try every active set (KKT)
    sols = []
    for state in itertools.product("lfu", repeat=3):
        free = [j for j in range(3) if state[j] == "f"]
        fixed = sum(lb[j] if state[j] == "l" else ub[j] for j in range(3) if state[j] != "f")
        if not free:
            if abs(fixed - budget) < 1e-9:
                sols.append(np.where(np.array(state) == "l", lb, ub))
            continue
        lam = (budget - fixed - t[free].sum()) / len(free)
        q = np.array([lb[j] if s == "l" else ub[j] if s == "u" else t[j] + lam for j, s in enumerate(state)])
        ok = all(lb[j] - 1e-9 <= q[j] <= ub[j] + 1e-9 for j in free)
        ok &= all(t[j] + lam <= lb[j] + 1e-9 for j in range(3) if state[j] == "l")
        ok &= all(t[j] + lam >= ub[j] - 1e-9 for j in range(3) if state[j] == "u")
        if ok:
            sols.append(q)
    assert sols and all(np.allclose(s, sols[0]) for s in sols)
    quota = np.rint(sols[0]).astype(int)
    kept = set()
    for j in range(3):  # the farthest from the centroid (largest spread) first
        members = sorted(np.flatnonzero(label == j), key=lambda i: -dist[i])
        kept |= {uid_of(int(i)) for i in members[: quota[j]]}
    return d_intra, p, quota, kept


CASES = [(0.5, 0.1, 0.5), (0.9, 0.05, 0.5), (0.2, 1.0, 0.5), (0.5, 0.02, 1.0)]


def test_the_hand_cases():
    """The quotas of CASES worked out on paper from the printed d_intra (mean 1 - 1/sqrt(1 + t^2))."""
    d_intra, p, _, _ = expected(0.5, 0.1, 0.5)
    assert d_intra == pytest.approx([0.0644, 0.2935, 0.0181], abs=5e-5)
    # C = d_inter * d_intra = [0.0644, 0.2055, 0.0127]; softmax(C / 0.1) = [0.1756, 0.7197, 0.1047]
    assert p == pytest.approx([0.1756, 0.7197, 0.1047], abs=5e-4)
    got = {case: tuple(int(v) for v in expected(*case)[2]) for case in CASES}
    # B = 9, lb = min(int(9/3 * 0.5), 5) = 1: P*B = [1.58, 6.48, 0.94]; cluster 1 capped at 6, the other
    # two share 3 shifted equally: lam = (3 - 1.58 - 0.94) / 2 = 0.24 -> [1.82, 1.18] -> rint [2, 1]
    assert got[(0.5, 0.1, 0.5)] == (2, 6, 1)
    # B = 16, lb = int(16/3 * 0.5) = 2: P*B = [0.88, 14.8, 0.31]; 6 for cluster 1, lam = 4.40 -> [5, 5]
    assert got[(0.9, 0.05, 0.5)] == (5, 6, 5)
    # B = 3, lb = 0: almost uniform P*B = [0.97, 1.11, 0.92] -> [1, 1, 1]
    assert got[(0.2, 1.0, 0.5)] == (1, 1, 1)
    # balance 1: lb = int(9/3) = 3 binds clusters 0 and 2 (P*B = [0.008, 8.99, 0.001]): [3, 3, 3]
    assert got[(0.5, 0.02, 1.0)] == (3, 3, 3)


@pytest.mark.parametrize("fraction, temperature, balance", CASES)
def test_quotas_and_kept_samples_match_the_formula(cat, tmp_path, fraction, temperature, balance):
    d_intra, p, quota, kept = expected(fraction, temperature, balance)
    res = run_filter(filters_dir() / "dbp.sql", catalog=cat, out=tmp_path / "dbp.npy",
                     sets={"clusters": "three", "fraction": fraction, "temperature": temperature,
                           "eps": 0.001, "neighbors": 2, "balance": balance})
    assert set(read_uids(tmp_path / "dbp.npy")) == kept and res.count == quota.sum()
    q = pq.read_table(dbp.quotas_path(cat, "three")).to_pydict()
    assert q["cluster"] == [0, 1, 2] and q["survivors"] == [6, 6, 6] and q["members"] == [6, 6, 6]
    assert q["d_inter"] == pytest.approx(D_INTER, abs=1e-6)
    assert q["d_intra"] == pytest.approx(list(d_intra), abs=1e-6)
    assert q["prob"] == pytest.approx(list(p), abs=1e-6)
    assert q["quota"] == quota.tolist()


def test_no_semdedup_removals_at_this_eps():
    x = np.stack([embedding(i) for i in range(18)]).astype(np.float16).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, 0)
    assert s.max() < 1 - 0.001  # so survivors = members above


def test_inter_distances_and_qp_helpers():
    assert dbp.inter_distances(CENT, 2) == pytest.approx(D_INTER, abs=1e-6)
    assert dbp.inter_distances(CENT, 1) == pytest.approx([1.0, 0.4, 0.4], abs=1e-6)  # nearest only
    assert np.isnan(dbp.inter_distances(CENT[:1], 20)).all()
    # uniform probabilities, room everywhere: budget / K each
    assert dbp.qp_quotas(np.full(3, 1 / 3), np.array([10, 10, 10]), 9, 0.0).tolist() == [3, 3, 3]
    # a small cluster is capped at its size, the rest shared equally (shift, not scale)
    assert dbp.qp_quotas(np.array([0.8, 0.1, 0.1]), np.array([2, 10, 10]), 10, 0.0).tolist() == [2, 4, 4]


def test_settings_are_checked():
    with pytest.raises(dbp.DBPError, match="temperature"):
        dbp.settings_from({"temperature": 0})
    with pytest.raises(dbp.DBPError, match="fraction"):
        dbp.settings_from({"fraction": 1.5})
    assert dbp.settings_from({})["temperature"] == 0.5 and dbp.settings_from({})["neighbors"] == 20


def test_same_bytes_whatever_the_workers_and_rebuilds(tmp_path):
    one, two = make_pool(tmp_path / "one"), make_pool(tmp_path / "two")
    sets = {"fraction": 0.5, "temperature": 0.1, "eps": 0.001, "neighbors": 2}
    r1 = dbp.build_dbp(one, "three", sets, progress=False, engine=Engine(workers=1))
    r2 = dbp.build_dbp(two, "three", sets, progress=False, engine=Engine(workers=2))
    assert r1.budget == 9 and r1.kept == 9 and len(r1.computed) == 3
    for f in ("0000", "0001", "0002", "_quotas"):
        assert filecmp.cmp(r1.out_dir / f"{f}.parquet", r2.out_dir / f"{f}.parquet", shallow=False), f
    assert dbp.build_dbp(one, "three", sets, progress=False).computed == []  # current: nothing redone
    p = producer("dbp")
    assert PRODUCERS["dbp"] == "curate.features.dbp:PRODUCER"
    assert p.is_current(one, {"clusters": "three", **sets})
    assert not p.is_current(one, {"clusters": "three", **sets, "temperature": 1.0})
    (r1.out_dir / "0001.parquet").unlink()
    assert not p.is_current(one, {"clusters": "three", **sets})
    assert len(dbp.build_dbp(one, "three", sets, progress=False).computed) == 3


def test_composes_with_semdedup_and_read_subset(cat, tmp_path):
    sets = {"clusters": "three", "eps": 0.001}
    run_filter(filters_dir() / "semdedup.sql", catalog=cat, out=tmp_path / "sd.npy", sets=sets)
    run_filter(filters_dir() / "dbp.sql", catalog=cat, out=tmp_path / "dbp.npy",
               sets={**sets, "neighbors": 2, "temperature": 0.1})
    flt = tmp_path / "both.sql"
    flt.write_text(f"SELECT uid FROM read_subset('{tmp_path / 'sd.npy'}')\nINTERSECT\n"
                   f"SELECT uid FROM read_subset('{tmp_path / 'dbp.npy'}')\n")
    run_filter(flt, catalog=cat, out=tmp_path / "both.npy")
    assert read_uids(tmp_path / "both.npy") == read_uids(tmp_path / "dbp.npy")
    assert set(read_uids(tmp_path / "dbp.npy")) == expected(0.5, 0.1)[3]
    assert len(read_uids(tmp_path / "sd.npy")) == 18


def test_cli_and_ray_engine(tmp_path, ray_session):
    from click.testing import CliRunner

    from curate.cli.main import main

    local, ray = make_pool(tmp_path / "local"), make_pool(tmp_path / "ray")
    args = ["--clusters", "three", "--fraction", "0.5", "--temperature", "0.1", "--eps", "0.001", "--neighbors", "2"]
    r = CliRunner().invoke(main, ["features", "dbp", str(local), *args, "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("dbp[three]: budget 9 rows, quotas sum 9; computed 3 file(s) (18 rows)")
    assert f"view dbp registered in {local}" in r.output
    res = dbp.build_dbp(ray, "three", {"fraction": 0.5, "temperature": 0.1, "eps": 0.001, "neighbors": 2},
                        progress=False, engine=Engine("ray", address=ray_session))
    for f in ("0000", "0001", "0002", "_quotas"):
        assert filecmp.cmp(local.parent / res.out_dir.relative_to(ray.parent) / f"{f}.parquet",
                           res.out_dir / f"{f}.parquet", shallow=False), f
    r = CliRunner().invoke(main, ["features", "dbp", str(local), "--clusters", "three", "--temperature", "0"])
    assert r.exit_code == 1 and r.output == "error: dbp parameter temperature: 0.0 must be a positive number\n"
