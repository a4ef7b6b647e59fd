"""NormSim (Wang et al., NeurIPS 2024) on 4 targets by hand; target sets (import, list, refusing
a pickle that would run code); determinism across engines; resume."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.catalog.connection import connect, init_catalog
from curate.cli.main import main
from curate.engine import Engine
from curate.errors import CurateError
from curate.features import normsim as ns
from curate.features.registry import producer
from curate.features.tables import feature_root
from curate.features.targets import get_target_set, import_target_set, list_target_sets
from curate.pool.sample import generate_pool, write_npz
from tests.conftest import pool_table, uid_of

torch = pytest.importorskip("torch")


def _pad(v, d=768):
    out = np.zeros(d, np.float32)
    out[: len(v)] = v
    return out


# Targets, not unit length: imported rows are L2-normalised to e0, e1, e2, (e0 + e1)/sqrt(2).
TARGETS = [[2, 0, 0], [0, 3, 0], [0, 0, 0.5], [1, 1, 0]]
R = 1 / math.sqrt(2)
# pool image embeddings (float16-exact), used as stored; <t, x> for the 4 targets worked by hand:
POOL = [
    ([1, 0, 0], [1, 0, 0, R]),                  # inf 1,       2: sqrt((1 + .5) / 4)
    ([0.75, 0.5, 0], [0.75, 0.5, 0, 1.25 * R]),  # inf .883883, 2: sqrt((.5625 + .25 + .78125) / 4)
    ([0, 0, -1], [0, 0, -1, 0]),                # inf 0,       2: sqrt(1 / 4) = .5
    ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5, R]),      # inf .707107, 2: sqrt((3 * .25 + .5) / 4)
    ([0, -0.5, 0], [0, -0.5, 0, -0.5 * R]),     # inf 0 (the max, not the absolute max)
]
HAND = [(1.0, math.sqrt(1.5 / 4)), (1.25 * R, math.sqrt(1.59375 / 4)), (0.0, 0.5), (R, math.sqrt(1.25 / 4)),
        (0.0, math.sqrt(0.375 / 4))]


def test_hand_table_premises():
    t = np.array([np.array(v) / np.linalg.norm(v) for v in TARGETS])
    for (x, sims), (inf, two) in zip(POOL, HAND):
        assert t @ np.array(x) == pytest.approx(sims)
        assert max(sims) == pytest.approx(inf) and math.sqrt(sum(s * s for s in sims) / 4) == pytest.approx(two)
    assert HAND[1][0] == pytest.approx(0.883883, abs=1e-6) and HAND[1][1] == pytest.approx(0.631219, abs=1e-6)


@pytest.fixture
def hand(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    for f, rows in enumerate((range(0, 3), range(3, 5))):
        pq.write_table(pool_table([{"uid": uid_of(i)} for i in rows]), meta / f"{f:04d}.parquet")
        write_npz(meta / f"{f:04d}.npz", {"l14_img": np.stack([_pad(POOL[i][0]) for i in rows]).astype(np.float16)})
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path)
    torch.save({"image_features": torch.tensor(np.stack([_pad(t) for t in TARGETS[:2]]))}, tmp_path / "in1k_0.pt")
    np.save(tmp_path / "in1k_1.npy", np.stack([_pad(t) for t in TARGETS[2:]]))
    return cat, tmp_path


def test_normsim_on_four_targets_by_hand(hand):
    cat, root = hand
    ts = import_target_set(cat, "hand", [root / "in1k_0.pt", root / "in1k_1.npy"])
    assert ts.meta["rows"] == 4 and ts.meta["dim"] == 768
    stored = ts.embeddings()
    assert np.linalg.norm(stored, axis=1) == pytest.approx([1, 1, 1, 1], abs=1e-6)
    res = ns.build_normsim(cat, "hand", progress=False)
    assert res.rows_computed == 5 and len(res.computed) == 2
    con = connect(cat)
    got = con.execute('SELECT target_set, normsim_inf, normsim_2 FROM normsim ORDER BY file, "row"').fetchall()
    con.close()
    assert [g[0] for g in got] == ["hand"] * 5
    for (_, inf, two), (want_inf, want_two) in zip(got, HAND):
        assert inf == pytest.approx(want_inf, abs=1e-6) and two == pytest.approx(want_two, abs=1e-6)


def test_target_import_refuses_a_pickle_that_would_run_code(hand, tmp_path):
    cat, root = hand

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (root / "evil.pt").write_bytes(pickle.dumps({"image_features": Evil()}))
    r = CliRunner().invoke(main, ["targets", "import", str(cat), "--name", "evil", "--embeddings", str(root / "evil.pt")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "evil.pt" in lines[0], r.output
    assert not (tmp_path / "pwned").exists()
    assert list_target_sets(cat) == []


def test_targets_cli_import_and_list(hand):
    cat, root = hand
    r = CliRunner().invoke(main, ["targets", "import", str(cat), "--name", "in1k", "--embeddings", str(root / "in1k_0.pt"),
                                  "--embeddings", str(root / "in1k_1.npy")])
    assert r.exit_code == 0, r.output
    assert "target set 'in1k': 4 rows x 768 (L2-normalised) from 2 file(s)" in r.output and f"on catalog {cat}" in r.output
    r = CliRunner().invoke(main, ["targets", "list", str(cat)])
    assert r.exit_code == 0 and "in1k: 4 rows x 768 (in1k_0.pt, in1k_1.npy)" in r.output
    assert "1 target set(s) on catalog" in r.output
    r = CliRunner().invoke(main, ["targets", "import", str(cat), "--name", "in1k", "--embeddings", str(root / "in1k_1.npy")])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(main, ["features", "normsim", str(cat), "--targets", "in1k"])
    assert r.exit_code == 0, r.output
    assert "normsim[in1k]: computed 2 file(s) (5 rows against 4 targets)" in r.output
    assert f"view normsim registered in {cat}" in r.output
    r = CliRunner().invoke(main, ["features", "normsim", str(cat), "--targets", "nope"])
    assert r.exit_code == 1 and "target set 'nope' not found" in r.output


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    generate_pool(root / "pool", files=3, rows_per_file=30, seed=5, shards=False)
    rng = np.random.default_rng(1)
    np.save(root / "t.npy", rng.normal(size=(9, 768)).astype(np.float32))
    return root


def _cat(gen, tmp_path, name):
    cat = init_catalog(tmp_path / f"{name}.duckdb", pool=gen / "pool", features_dir=tmp_path / f"{name}-f")
    import_target_set(cat, "t", [gen / "t.npy"])
    return cat


def _bytes(cat):
    d = feature_root(cat, ns.VIEW) / "t"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.parquet"))}


def test_same_bytes_on_every_engine_and_resume(gen, tmp_path, ray_session):
    a = _cat(gen, tmp_path, "a")
    ns.build_normsim(a, "t", progress=False)
    want = _bytes(a)
    assert len(want) == 3
    b = _cat(gen, tmp_path, "b")
    ns.build_normsim(b, "t", progress=False, engine=Engine(workers=2))
    assert _bytes(b) == want
    c = _cat(gen, tmp_path, "c")
    ns.build_normsim(c, "t", progress=False, engine=Engine("ray", address=ray_session))
    assert _bytes(c) == want
    # resume: a missing file is the only one computed
    victim = sorted((feature_root(a, ns.VIEW) / "t").glob("*.parquet"))[1]
    victim.unlink()
    assert not producer("normsim").is_current(a, {"targets": "t"})
    res = ns.build_normsim(a, "t", progress=False)
    assert res.computed == [victim.stem] and _bytes(a) == want
    assert producer("normsim").is_current(a, {"targets": "t"})
    # against numpy on the whole pool
    con = connect(a)
    got = con.execute('SELECT normsim_inf, normsim_2 FROM normsim ORDER BY file, "row"').fetchall()
    files = [r[0] for r in con.execute("SELECT file FROM pool_files ORDER BY file").fetchall()]
    con.close()
    x = np.concatenate([np.load(gen / "pool" / "metadata" / f"{f}.npz")["l14_img"].astype(np.float64) for f in files])
    t = np.load(gen / "t.npy").astype(np.float64)
    s = x @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    assert [g[0] for g in got] == pytest.approx(s.max(1), abs=1e-5)
    assert [g[1] for g in got] == pytest.approx(np.sqrt((s ** 2).mean(1)), abs=1e-5)


def test_a_changed_target_set_makes_the_table_stale(gen, tmp_path):
    a = _cat(gen, tmp_path, "s")
    ns.build_normsim(a, "t", progress=False)
    assert producer("normsim").is_current(a, {"targets": "t"})
    np.save(tmp_path / "t2.npy", np.ones((2, 768), np.float32))
    import_target_set(a, "t", [tmp_path / "t2.npy"], overwrite=True)
    assert get_target_set(a, "t").meta["rows"] == 2
    assert not producer("normsim").is_current(a, {"targets": "t"})
    with pytest.raises(CurateError, match="declare `SET VARIABLE targets"):
        producer("normsim").is_current(a, {})


def test_target_blocks_accumulate_like_one_product(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(11, 32)).astype(np.float32)
    t = rng.normal(size=(10, 32)).astype(np.float32)
    monkeypatch.setattr(ns, "TARGET_BLOCK", 3)  # blocks of 3, 3, 3 and 1 targets
    inf, two = ns.normsim(x, t)
    s = x.astype(np.float64) @ t.T.astype(np.float64)
    assert inf == pytest.approx(s.max(1), abs=1e-5)
    assert two == pytest.approx(np.sqrt((s ** 2).mean(1)), abs=1e-5)
