"""negCLIPLoss (Wang et al., NeurIPS 2024): hand-computed values on a 6-sample pool in 2 batches,
the seeded batch partition, determinism across worker counts and engines, resume."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import connect, init_catalog
from curate.engine import Engine
from curate.errors import CurateError
from curate.features import negcliploss as nl
from curate.features.registry import PRODUCERS, producer
from curate.pool.sample import generate_pool, write_npz
from tests.conftest import pool_table, uid_of


def _pad(v, d=768):
    out = np.zeros(d, np.float32)
    out[: len(v)] = v
    return out


def _hand_pool(root, img, txt, split=4):
    """6 samples in two pool files (rows 0-3 and 4-5), embeddings as given (float16 in the npz)."""
    meta = root / "metadata"
    meta.mkdir(parents=True)
    for f, rows in enumerate((range(0, split), range(split, len(img)))):
        pq.write_table(pool_table([{"uid": uid_of(i)} for i in rows]), meta / f"{f:04d}.parquet")
        write_npz(meta / f"{f:04d}.npz", {
            "l14_img": np.stack([_pad(img[i]) for i in rows]).astype(np.float16),
            "l14_txt": np.stack([_pad(txt[i]) for i in rows]).astype(np.float16),
        })
    return init_catalog(root / "cat.duckdb", pool=root)


def _values(cat, arch="l14"):
    con = connect(cat)
    try:
        return con.execute('SELECT p.row_start + n."row", n.value FROM negcliploss n JOIN pool_files p USING (file) '
                           "WHERE n.arch = ? ORDER BY 1", [arch]).fetchall()
    finally:
        con.close()


# Samples 0-2 are concept A (image = text = e0), 3-5 concept B (e1). With batches of 3 and tau = 1,
# s_ij = 1 for same-concept pairs, 0 otherwise, so for a sample with m same-concept members in its
# batch (itself included) both log-sum-exps are log(m*e + (3 - m)) and
#   negCLIPLoss = s_ii - tau/2 * (2 * log(m*e + 3 - m)) = 1 - log(m*e + 3 - m):
HAND = {1: 1 - math.log(math.e + 2),          # -0.551444...
        2: 1 - math.log(2 * math.e + 1),      # -0.861995...
        3: 1 - math.log(3 * math.e)}          # = -log(3) = -1.098612...
CONCEPT = [0, 0, 0, 1, 1, 1]


def test_hand_constants():
    assert HAND[1] == pytest.approx(-0.551444, abs=1e-6)
    assert HAND[2] == pytest.approx(-0.861995, abs=1e-6)
    assert HAND[3] == pytest.approx(-math.log(3))


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_six_samples_two_batches_by_hand(tmp_path, seed):
    emb = [[1, 0] if c == 0 else [0, 1] for c in CONCEPT]
    cat = _hand_pool(tmp_path, emb, emb)
    res = nl.build_negcliploss(cat, progress=False, tau=1.0, batch_size=3, k=1, seed=seed)
    assert res.rows_total == 6 and res.batches == 2
    batch = nl.batch_of(np.arange(6, dtype=np.uint64), 6, 3, seed, 0)
    assert sorted(np.bincount(batch).tolist()) == [3, 3]  # two batches of three
    got = dict(_values(cat))
    for i in range(6):
        m = sum(1 for j in range(6) if batch[j] == batch[i] and CONCEPT[j] == CONCEPT[i])
        assert got[i] == pytest.approx(HAND[m], abs=1e-6), (i, m)


def _formula(img, txt, members_of, tau):
    """negCLIPLoss from the paper's formula, plain numpy in float64: s_ii minus, averaged over the
    rounds, tau/2 * (log sum_j exp(s_ij/tau) + log sum_j exp(s_ji/tau)) over i's batch."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    out = []
    for i in range(len(img)):
        r = []
        for members in members_of(i):
            row = sum(math.exp(float(img[i] @ txt[j]) / tau) for j in members)
            col = sum(math.exp(float(img[j] @ txt[i]) / tau) for j in members)
            r.append(tau / 2 * (math.log(row) + math.log(col)))
        out.append(float(img[i] @ txt[i]) - sum(r) / len(r))
    return out


def test_six_samples_general_embeddings_two_rounds(tmp_path):
    # float16-exact values, image and text different, not unit length
    img = [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0.25], [0.75, 0, 0.5], [0, 0, 1], [0.25, 0.75, 0]]
    txt = [[0.5, 0.25, 0], [0, 1, 0], [0.25, 0.5, 0.5], [1, 0, 0], [0, 0.5, 0.75], [0.5, 0.5, 0.5]]
    cat = _hand_pool(tmp_path, img, txt, split=2)
    tau, k, seed = 0.25, 2, 7
    nl.build_negcliploss(cat, progress=False, tau=tau, batch_size=3, k=k, seed=seed)
    batches = [nl.batch_of(np.arange(6, dtype=np.uint64), 6, 3, seed, r) for r in range(k)]
    for b in batches:
        assert sorted(np.bincount(b).tolist()) == [3, 3]
    expected = _formula(img, txt, lambda i: [np.flatnonzero(b == b[i]) for b in batches], tau)
    got = [v for _, v in _values(cat)]
    assert got == pytest.approx(expected, abs=2e-6)


def test_last_batch_is_smaller_and_every_row_in_one_batch():
    n, b = 10, 4
    for seed in range(3):
        for r in range(3):
            batch = nl.batch_of(np.arange(n, dtype=np.uint64), n, b, seed, r)
            assert sorted(np.bincount(batch).tolist()) == [2, 4, 4]


def test_partition_is_a_seeded_permutation():
    for n in (1, 2, 3, 6, 97, 1000, 65537):
        for seed, r in ((0, 0), (3, 1)):
            rows = nl.rows_at(np.arange(n, dtype=np.uint64), n, seed, r)
            assert sorted(rows.tolist()) == list(range(n))
            assert nl.positions_of(rows.astype(np.uint64), n, seed, r).tolist() == list(range(n))
    a = nl.rows_at(np.arange(1000, dtype=np.uint64), 1000, 0, 0)
    assert (a != nl.rows_at(np.arange(1000, dtype=np.uint64), 1000, 1, 0)).mean() > 0.9  # another seed
    assert (a != nl.rows_at(np.arange(1000, dtype=np.uint64), 1000, 0, 1)).mean() > 0.9  # another round
    assert (a != np.arange(1000)).mean() > 0.9  # not the identity


def test_batch_normalisers_match_a_direct_logsumexp():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(37, 16)).astype(np.float32)
    txt = rng.normal(size=(37, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    old = nl.SCORE_CELLS
    try:
        nl.SCORE_CELLS = 37 * 5  # several row chunks: the column log-sum-exp is carried across them
        got = nl.batch_normalisers(img, txt, 0.01)
    finally:
        nl.SCORE_CELLS = old
    s = img.astype(np.float64) @ txt.T.astype(np.float64) / 0.01
    row = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    col = np.log(np.exp(s - s.max(0, keepdims=True)).sum(0)) + s.max(0)
    assert got == pytest.approx(0.005 * (row + col), abs=1e-5)


@pytest.fixture(scope="module")
def gen_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    generate_pool(root / "pool", files=3, rows_per_file=40, seed=4, shards=False)
    return root


def _fresh(gen_pool, tmp_path, name):
    return init_catalog(tmp_path / f"{name}.duckdb", pool=gen_pool / "pool", features_dir=tmp_path / f"{name}-features")


def _outputs(cat, arch="l14"):
    con = connect(cat)
    try:
        d = nl._out_dir(cat, arch)
    finally:
        con.close()
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.parquet"))}


SETTINGS = {"batch_size": 16, "k": 3, "tau": 0.01, "seed": 3}


def test_same_bytes_whatever_the_workers_and_engine(gen_pool, tmp_path, ray_session):
    one = _fresh(gen_pool, tmp_path, "one")
    nl.build_negcliploss(one, progress=False, engine=Engine(workers=1), **SETTINGS)
    want = _outputs(one)
    assert len(want) == 3
    two = _fresh(gen_pool, tmp_path, "two")
    nl.build_negcliploss(two, progress=False, engine=Engine(workers=2), **SETTINGS)
    assert _outputs(two) == want
    ray = _fresh(gen_pool, tmp_path, "ray")
    nl.build_negcliploss(ray, progress=False, engine=Engine("ray", address=ray_session), **SETTINGS)
    assert _outputs(ray) == want
    # against the formula, every row: the table is what the paper defines
    con = connect(one)
    files = con.execute("SELECT file, row_start FROM pool_files ORDER BY row_start").fetchall()
    con.close()
    meta = gen_pool / "pool" / "metadata"
    img = np.concatenate([np.load(meta / f"{f}.npz")["l14_img"].astype(np.float32) for f, _ in files])
    txt = np.concatenate([np.load(meta / f"{f}.npz")["l14_txt"].astype(np.float32) for f, _ in files])
    n = len(img)
    batches = [nl.batch_of(np.arange(n, dtype=np.uint64), n, 16, 3, r) for r in range(3)]
    expected = _formula(img, txt, lambda i: [np.flatnonzero(b == b[i]) for b in batches], 0.01)
    assert [v for _, v in _values(one)] == pytest.approx(expected, abs=1e-5)


def test_resume_after_a_partial_build(gen_pool, tmp_path, monkeypatch):
    ref = _fresh(gen_pool, tmp_path, "ref")
    nl.build_negcliploss(ref, progress=False, **SETTINGS)
    want = _outputs(ref)
    cat = _fresh(gen_pool, tmp_path, "cat")
    real, real1, calls = nl._pass2_task, nl._pass1_task, []

    def dies_after_one(*args):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(nl, "_pass2_task", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        nl.build_negcliploss(cat, progress=False, **SETTINGS)
    monkeypatch.setattr(nl, "_pass2_task", real)
    assert len(_outputs(cat)) == 1  # one file done, its pass-1 work kept
    work = list(nl._out_dir(cat, "l14").glob("_work-*/r*.npy"))
    assert len(work) == 3  # k = 3 rounds x one batch group

    def not_again(*args):
        raise AssertionError("pass 1 redone although its work files were there")

    monkeypatch.setattr(nl, "_pass1_task", not_again)
    res = nl.build_negcliploss(cat, progress=False, **SETTINGS)
    monkeypatch.setattr(nl, "_pass1_task", real1)
    assert len(res.computed) == 2  # the two files not done
    assert _outputs(cat) == want
    assert not list(nl._out_dir(cat, "l14").glob("_work-*"))  # work removed once complete
    again = nl.build_negcliploss(cat, progress=False, **SETTINGS)
    assert again.computed == [] and _outputs(cat) == want
    # other settings: recomputed, and the producer says the table is not current for them
    assert nl.PRODUCER.is_current(cat, SETTINGS)
    assert not nl.PRODUCER.is_current(cat, {**SETTINGS, "seed": 4})


def test_registered_and_bad_settings(gen_pool, tmp_path):
    assert PRODUCERS["negcliploss"] == "curate.features.negcliploss:PRODUCER"
    assert producer("negcliploss") is nl.PRODUCER
    cat = _fresh(gen_pool, tmp_path, "bad")
    for bad, msg in (({"arch": "h14"}, "arch: 'h14' is not one of l14, b32"), ({"tau": 0}, "tau: 0.0 must be"),
                     ({"batch_size": 1}, "batch_size: 1 must be at least 2"), ({"k": 0}, "k: 0 must be at least 1")):
        with pytest.raises(CurateError, match=msg):
            nl.build_negcliploss(cat, progress=False, **bad)


def test_cli_builds_and_names_the_catalog(gen_pool, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from curate.cli.main import main

    cat = _fresh(gen_pool, tmp_path, "cli")
    args = ["--batch-size", "16", "--k", "3", "--seed", "3"]
    r = CliRunner().invoke(main, ["features", "negcliploss", str(cat), *args])
    assert r.exit_code == 0, r.output
    assert "negcliploss[l14]: computed 3 file(s) (120 rows, 24 batches), 0 already current; 120 rows" in r.output
    assert f"tau=0.01, batch_size=16, k=3, seed=3; view negcliploss registered in {cat}," in r.output
    ref = _fresh(gen_pool, tmp_path, "lib")
    nl.build_negcliploss(ref, progress=False, **SETTINGS)
    assert _outputs(cat) == _outputs(ref)
    monkeypatch.setenv("CURATE_CATALOG", str(cat))
    r = CliRunner().invoke(main, ["features", "negcliploss", *args])
    assert r.exit_code == 0 and "computed 0 file(s)" in r.output and "3 already current" in r.output
    assert f"registered in {cat} ($CURATE_CATALOG)" in r.output
    r = CliRunner().invoke(main, ["features", "negcliploss", str(cat), "--arch", "h14"])
    assert r.exit_code == 2 and "'h14' is not one of 'l14', 'b32'" in r.output


def test_resume_inside_pass_one(gen_pool, tmp_path, monkeypatch):
    ref = _fresh(gen_pool, tmp_path, "ref1")
    nl.build_negcliploss(ref, progress=False, **SETTINGS)
    cat = _fresh(gen_pool, tmp_path, "cat1")
    real, calls = nl._pass1_task, []

    def counted(*args, die_after=None):
        calls.append(args[4])  # the round
        if die_after is not None and len(calls) > die_after:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(nl, "_pass1_task", lambda *a: counted(*a, die_after=1))
    with pytest.raises(KeyboardInterrupt):
        nl.build_negcliploss(cat, progress=False, **SETTINGS)
    assert len(list(nl._out_dir(cat, "l14").glob("_work-*/r*.npy"))) == 1 and _outputs(cat) == {}
    calls.clear()
    monkeypatch.setattr(nl, "_pass1_task", lambda *a: counted(*a))
    nl.build_negcliploss(cat, progress=False, **SETTINGS)
    assert calls == [1, 2]  # round 0 was done before the kill
    assert _outputs(cat) == _outputs(ref)
