"""SemDeDup (Abbas et al. 2023): planted duplicate groups worked out by hand, the paper code's
rule (order farthest from the centroid first, drop a member within 1 - eps of an earlier one),
eps as a filter parameter, determinism across worker counts, resume, the filter and read_subset."""

from __future__ import annotations

import filecmp
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import connect, init_catalog
from curate.engine import Engine
from curate.features import semdedup as sd
from curate.features.clusters import import_cluster_set
from curate.features.registry import PRODUCERS, producer
from curate.pool.sample import write_npz
from curate.resources import filters_dir
from curate.run.runner import run_filter
from tests.conftest import pool_table, read_uids, uid_of

D = 768


def e(*pairs):
    v = np.zeros(D, np.float32)
    for axis, w in pairs:
        v[axis] = w
    return v


# cluster 0 (centroid e0) and cluster 1 (centroid e1); the name is the sample's uid index
EMB = {
    "a": e((0, 1)),                        # on the centroid
    "b": e((0, 1), (2, 0.1)),              # cos(a, b) = 0.995
    "c": e((0, 1), (2, 0.1)),              # = b exactly
    "d": e((0, 1), (3, 0.5)),              # farther out
    "e": e((0, 1), (3, 0.5), (4, 0.02)),   # cos(d, e) = 0.99984, a hair farther than d
    "f": e((1, 1)),
    "g": e((1, 1)),                        # = f, in the other pool file
    "h": e((1, 1), (5, 1)),                # cos(f, h) = 0.7071
}
FILES = (["a", "b", "d", "f"], ["c", "e", "g", "h"])
UID = {name: uid_of(i) for i, name in enumerate(n for f in FILES for n in f)}
NAME = {u: n for n, u in UID.items()}


def make_pool(root):
    meta = root / "metadata"
    meta.mkdir(parents=True)
    for fi, names in enumerate(FILES):
        pq.write_table(pool_table([{"uid": UID[n]} for n in names]), meta / f"{fi:04d}.parquet")
        write_npz(meta / f"{fi:04d}.npz", {"l14_img": np.stack([EMB[n] for n in names]).astype(np.float16)})
    cat = init_catalog(root / "cat.duckdb", pool=root)
    np.save(root / "centroids.npy", np.stack([e((0, 1)), e((1, 1))]))
    import_cluster_set(cat, "hand", root / "centroids.npy")
    return cat


@pytest.fixture
def cat(tmp_path):
    return make_pool(tmp_path / "p")


def table(cat):
    con = connect(cat)
    try:
        rows = con.execute('SELECT uid, cluster, "rank", dist_to_centroid, max_sim, dup_of FROM semdedup '
                           "WHERE clusters = 'hand'").fetchall()
    finally:
        con.close()
    return {NAME[u]: (c, r, d, m, NAME.get(dup)) for u, c, r, d, m, dup in rows}


def cos(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_planted_groups_by_hand(cat):
    res = sd.build_semdedup(cat, "hand", progress=False)
    assert res.computed == ["0000", "0001"] and res.rows_computed == 8
    t = table(cat)
    # farthest from the centroid first; b before c (same distance): file 0000 before 0001
    assert sorted(t, key=lambda n: (t[n][0], t[n][1])) == ["e", "d", "b", "c", "a", "h", "f", "g"]
    # the most similar earlier member of each (by hand from the planted vectors above)
    assert {n: t[n][4] for n in t} == {"e": None, "d": "e", "b": "d", "c": "b", "a": "b",
                                       "h": None, "f": "h", "g": "f"}
    assert t["e"][3] is None and t["h"][3] is None
    h = {n: v.astype(np.float16).astype(np.float64) for n, v in EMB.items()}  # as stored in the npz
    cent = {0: e((0, 1)), 1: e((1, 1))}
    for n, (c, _, d, m, dup) in t.items():
        assert d == pytest.approx(1 - cos(h[n], cent[c]), abs=1e-6), n
        if dup is not None:
            assert m == pytest.approx(cos(h[n], h[dup]), abs=1e-6), n
    assert t["c"][3] == pytest.approx(1.0, abs=1e-6) and t["g"][3] == pytest.approx(1.0, abs=1e-6)
    assert t["d"][3] == pytest.approx(0.99984, abs=1e-5) and t["b"][3] == pytest.approx(0.8900, abs=1e-4)
    assert t["a"][3] == pytest.approx(0.99504, abs=1e-5) and t["f"][3] == pytest.approx(0.70711, abs=1e-5)


# eps -> survivors, by hand from the similarities above (kept when max_sim <= 1 - eps)
SURVIVORS = {
    0.07: {"e", "b", "h", "f"},               # the paper's LAION setting: d, c, a, g dropped
    0.2: {"e", "h", "f"},                     # 1 - eps = 0.8 < 0.8900: b goes too
    0.0001: {"a", "b", "d", "e", "f", "h"},   # only the exact copies c and g
    0.35: {"e", "h"},                         # 0.65 < 0.7071: f goes
}


@pytest.mark.parametrize("eps", sorted(SURVIVORS))
def test_filter_keeps_one_per_group(cat, tmp_path, eps):
    res = run_filter(filters_dir() / "semdedup.sql", catalog=cat, out=tmp_path / "s.npy",
                     sets={"clusters": "hand", "eps": eps})
    assert {NAME[u] for u in read_uids(tmp_path / "s.npy")} == SURVIVORS[eps]
    assert res.count == len(SURVIVORS[eps]) and res.pool_rows == 8


def test_producer_is_registered_and_built_on_first_use(cat, tmp_path):
    assert PRODUCERS["semdedup"] == "curate.features.semdedup:PRODUCER"
    p = producer("semdedup")
    assert not p.is_current(cat, {"clusters": "hand"})
    run_filter(filters_dir() / "semdedup.sql", catalog=cat, out=tmp_path / "s.npy", sets={"clusters": "hand"})
    assert p.is_current(cat, {"clusters": "hand"})
    with pytest.raises(sd.SemDeDupError, match="SET VARIABLE clusters"):
        p.is_current(cat, {})


def test_same_bytes_whatever_the_workers_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "STEP_ROWS", 3)  # one step per cluster
    one, two = make_pool(tmp_path / "one"), make_pool(tmp_path / "two")
    r1 = sd.build_semdedup(one, "hand", progress=False, engine=Engine(workers=1))
    r2 = sd.build_semdedup(two, "hand", progress=False, engine=Engine(workers=2))
    assert r1.steps == r2.steps == 2
    for f in ("0000", "0001"):
        assert filecmp.cmp(r1.out_dir / f"{f}.parquet", r2.out_dir / f"{f}.parquet", shallow=False)
    # resume: a lost table is recomputed alone, to the same bytes; nothing else is redone
    keep = tmp_path / "keep.parquet"
    shutil.copy(r1.out_dir / "0001.parquet", keep)
    (r1.out_dir / "0001.parquet").unlink()
    again = sd.build_semdedup(one, "hand", progress=False)
    assert again.computed == ["0001"] and filecmp.cmp(keep, r1.out_dir / "0001.parquet", shallow=False)
    assert sd.build_semdedup(one, "hand", progress=False).computed == []
    assert not list(r1.out_dir.glob("_work-*"))  # work removed after success


def test_a_killed_build_reuses_finished_steps(cat, monkeypatch):
    monkeypatch.setattr(sd, "STEP_ROWS", 3)
    p = sd.plan(cat, "hand")
    calls = []
    real = sd._pass2_task

    def boom(*args):
        calls.append(args[3])
        raise KeyboardInterrupt  # killed after pass 1, in the first file of pass 2

    monkeypatch.setattr(sd, "_pass2_task", boom)
    with pytest.raises(KeyboardInterrupt):
        sd.build_semdedup(cat, "hand", progress=False)
    steps = sorted(p.work_dir.glob("step-*.parquet"))
    assert len(steps) == 2 and calls == ["0000"]
    stamp = [s.stat().st_mtime_ns for s in steps]
    seen = []
    monkeypatch.setattr(sd, "_pass1_task", lambda *a: seen.append(a) or 0)  # must not run again
    monkeypatch.setattr(sd, "_pass2_task", real)
    res = sd.build_semdedup(cat, "hand", progress=False)
    assert seen == [] and res.computed == ["0000", "0001"] and len(stamp) == 2
    assert table(cat)["c"][4] == "b"


def test_composes_with_read_subset(cat, tmp_path):
    run_filter(filters_dir() / "semdedup.sql", catalog=cat, out=tmp_path / "sd.npy", sets={"clusters": "hand"})
    flt = tmp_path / "both.sql"
    flt.write_text(f"SELECT uid FROM read_subset('{tmp_path / 'sd.npy'}')\nINTERSECT\n"
                   f"SELECT uid FROM pool WHERE uid IN ('{UID['a']}', '{UID['b']}', '{UID['h']}')\n")
    run_filter(flt, catalog=cat, out=tmp_path / "both.npy")
    assert {NAME[u] for u in read_uids(tmp_path / "both.npy")} == {"b", "h"}


def test_unknown_cluster_set_is_one_line(cat, tmp_path):
    from curate.errors import CurateError

    with pytest.raises(CurateError, match="cluster set 'nope' not found"):
        run_filter(filters_dir() / "semdedup.sql", catalog=cat, out=tmp_path / "x.npy", sets={"clusters": "nope"})


def test_cli_builds_the_table_and_names_the_catalog(cat):
    from click.testing import CliRunner

    from curate.cli.main import main

    r = CliRunner().invoke(main, ["features", "semdedup", str(cat), "--clusters", "hand", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("semdedup[hand]: computed 2 file(s) (8 rows, 1 step(s)), 0 already current")
    assert f"view semdedup registered in {cat}" in r.output
    assert table(cat)["g"][4] == "f"
    r = CliRunner().invoke(main, ["features", "semdedup", str(cat), "--clusters", "nope"])
    assert r.exit_code == 1 and r.output.startswith("error: cluster set 'nope' not found") and len(r.output.splitlines()) == 1


def test_ray_engine_gives_the_same_bytes(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(sd, "STEP_ROWS", 3)
    local, ray = make_pool(tmp_path / "local"), make_pool(tmp_path / "ray")
    r1 = sd.build_semdedup(local, "hand", progress=False)
    r2 = sd.build_semdedup(ray, "hand", progress=False, engine=Engine("ray", address=ray_session))
    for f in ("0000", "0001"):
        assert filecmp.cmp(r1.out_dir / f"{f}.parquet", r2.out_dir / f"{f}.parquet", shallow=False)


def test_the_commands_of_this_page(tmp_path, monkeypatch):
    """docs/semdedup-dbp.md: the quick-start commands run as written on a generated pool."""
    import re
    import shlex

    from click.testing import CliRunner

    from curate.cli.main import main
    from curate.pool.sample import generate_pool
    from tests.conftest import REPO

    text = (REPO / "docs" / "semdedup-dbp.md").read_text()
    block = re.findall(r"```sh\n(.*?)```", text, re.S)[0]
    commands = [ln for ln in block.splitlines() if ln.startswith("curate ")]
    assert len(commands) == 5
    generate_pool(tmp_path / "pool", files=2, rows_per_file=150, seed=3, npz=True, shards=False)
    init_catalog(tmp_path / "pool.duckdb", pool=tmp_path / "pool")
    np.save(tmp_path / "xlarge_centroids.npy", np.random.default_rng(0).normal(size=(8, D)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    for c in commands:
        r = CliRunner().invoke(main, shlex.split(c)[1:])
        assert r.exit_code == 0, (c, r.output)
    sd_uids, dbp_uids = read_uids("subsets/semdedup.npy"), read_uids("subsets/dbp.npy")
    assert set(dbp_uids) <= set(sd_uids) and len(sd_uids) <= 300
    from curate.features.dbp import quotas_path

    q = pq.read_table(quotas_path(tmp_path / "pool.duckdb", "xlarge"))
    assert len(dbp_uids) == sum(q.column("quota").to_pylist()) and abs(len(dbp_uids) - 150) <= 4
