"""Cluster sets: nearest centroid by inner product (ties, non-unit centroids), loading DataComp's
asset formats without running code, import/build/targets, resumable assignment tables."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

import curate.features.clusters as C
from curate.catalog.connection import connect, init_catalog
from curate.engine import Engine
from tests.features.test_embeddings import write_pool

torch = pytest.importorskip("torch")


# -- nearest centroid: hand-worked table -------------------------------------------------------

# (x, centroids, expected index) -- inner products worked by hand
NEAREST = [
    # ties: <x,c0> = <x,c1> = 1 -> first index, like torch.argmax / np.argmax
    ([1, 0], [[1, 5], [1, -5], [0, 1]], 0),
    ([0, 1], [[1, 0], [0, 2], [0, 2]], 1),
    # non-unit centroids: L2-nearest is c0 (distance 0.4) but <x,c0> = 0.6 < <x,c1> = 2
    ([1, 0], [[0.6, 0], [2, 1]], 1),
    # a long centroid wins at a worse angle (cos 0.45 vs 1): <x,c0> = 1, <x,c1> = 1.5
    ([1, 0], [[1, 0], [1.5, 3.0]], 1),
    # all negative: the largest (least negative) product wins: -1, -0.5, -2
    ([1, 1], [[-0.5, -0.5], [-0.25, -0.25], [-1, -1]], 1),
    # zero vector: every product is 0 -> first index
    ([0, 0], [[3, 1], [1, 3]], 0),
]


@pytest.mark.parametrize("x,cents,expected", NEAREST)
def test_nearest_centroid_hand_worked(x, cents, expected):
    x = np.array([x], np.float32)
    c = np.array(cents, np.float32)
    assert C.nearest_centroid(x, c).tolist() == [expected]
    # DataComp's own operation on the same numbers (torch.einsum + torch.argmax) agrees
    ref = torch.argmax(torch.einsum("ik, jk -> ij", torch.from_numpy(x), torch.from_numpy(c)), dim=1)
    assert ref.tolist() == [expected]


def test_nearest_centroid_batches_match_one_shot(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    c = rng.normal(size=(37, 16)).astype(np.float32)
    whole = np.argmax(x @ c.T, axis=1)
    monkeypatch.setattr(C, "SCORE_CELLS", 37 * 7)  # 7 rows per step, a ragged last step
    assert np.array_equal(C.nearest_centroid(x, c), whole)


# -- DataComp asset formats ---------------------------------------------------------------------

def test_load_torch_saved_numpy_array_protocols(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for proto in (2, 4):  # torch's default and DataComp's pickle_protocol=4
        p = tmp_path / f"c{proto}.pt"
        torch.save(arr, p, pickle_protocol=proto)
        got = C.load_array_file(p, "centroids")
        assert got.dtype == np.float32 and np.array_equal(got, arr)


def test_load_pt_dict_of_tensor_and_npy(tmp_path):
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    torch.save({"image_features": t, "labels": torch.tensor([1, 2])}, tmp_path / "in1k.pt")
    got = C.load_array_file(tmp_path / "in1k.pt", "targets", key="image_features")
    assert got.dtype == np.float32 and got.tolist() == [[0, 1, 2], [3, 4, 5]]
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float64))
    assert C.load_array_file(tmp_path / "a.npy", "centroids").dtype == np.float64


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_code_in_a_centroid_file_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil(), protocol=2))
    torch.save({"x": 1, "y": _Evil()}, tmp_path / "evil_zip.pt")  # torch zip format
    for name in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(C.CurateError, match="refusing"):
            C.load_array_file(tmp_path / name, "centroids")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("obj,message", [
    (np.zeros(5, np.float32), r"shape \(5,\)"),
    (np.zeros((3, 4), np.int64), "dtype int64"),
    (np.array([[1.0, np.nan]], np.float32), "row 0 is not finite"),
    ({"features": np.zeros((2, 2), np.float32)}, "dict with keys"),
    (np.zeros((0, 4), np.float32), r"shape \(0, 4\)"),
])
def test_bad_centroid_files(tmp_path, obj, message):
    p = tmp_path / "c.pt"
    torch.save(obj, p, pickle_protocol=4)
    with pytest.raises(C.ClusterError, match=message):
        C.load_array_file(p, "centroids")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(C.ClusterError, match="not found"):
        C.load_array_file(tmp_path / "nope.pt", "centroids")
    (tmp_path / "g.pt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(C.CurateError, match="g.pt"):
        C.load_array_file(tmp_path / "g.pt", "centroids")


# -- cluster sets over a pool --------------------------------------------------------------------

D = 8


@pytest.fixture
def pool(tmp_path):
    arrays = write_pool(tmp_path / "p", [6, 5], dims={"l14_img": 768})
    return init_catalog(tmp_path / "p" / "cat.duckdb", pool=tmp_path / "p"), arrays


def _save(tmp_path, name, arr):
    p = tmp_path / name
    torch.save(arr, p, pickle_protocol=4)
    return p


def test_import_targets_and_assignments(pool, tmp_path):
    cat, arrays = pool
    rng = np.random.default_rng(5)
    cents = rng.normal(size=(9, 768)).astype(np.float32) * rng.uniform(0.5, 2, (9, 1)).astype(np.float32)
    targets = np.stack([cents[2], cents[7] * 3, cents[2] * 0.5]).astype(np.float16)
    cpath = _save(tmp_path, "cent.pt", cents)
    torch.save({"image_features": torch.from_numpy(targets)}, tmp_path / "in1k_0.pt")
    cs = C.import_cluster_set(cat, "s9", cpath, [tmp_path / "in1k_0.pt"])
    assert (cs.meta["k"], cs.meta["dim"]) == (9, 768)
    expected_targets = sorted(set(np.argmax(targets.astype(np.float32) @ cents.T, axis=1).tolist()))
    con = connect(cat)
    assert [r[0] for r in con.sql("SELECT cluster FROM cluster_targets WHERE cluster_set = 's9' ORDER BY 1").fetchall()] \
        == expected_targets
    con.close()
    r = C.assign_pool(cat, "s9", progress=False)
    assert (r["files"], r["assigned_files"], r["rows"]) == (2, 2, 11)
    con = connect(cat)
    got = con.sql('SELECT file, "row", cluster, uid FROM cluster_assignments ORDER BY file, "row"').fetchall()
    pool_uids = con.sql('SELECT uid FROM pool ORDER BY file, "row"').fetchall()
    con.close()
    want = [(f"{i:04d}", r, int(np.argmax(arrays[i]["l14_img"][r].astype(np.float32) @ cents.T)))
            for i in range(2) for r in range(len(arrays[i]["l14_img"]))]
    assert [g[:3] for g in got] == want
    assert [g[3] for g in got] == [u[0] for u in pool_uids]


def test_assignment_resumes_per_file_and_reimport_invalidates(pool, tmp_path):
    cat, _ = pool
    cpath = _save(tmp_path, "c.pt", np.eye(4, 768, dtype=np.float32))
    C.import_cluster_set(cat, "e4", cpath)
    C.assign_pool(cat, "e4", progress=False)
    d, pairs = C._assignment_files(cat, C.get_cluster_set(cat, "e4"))
    keep = pairs[0][1].stat().st_mtime_ns
    pairs[1][1].unlink()
    assert C.ASSIGNMENTS.is_current(cat, {"clusters": "e4"}) is False
    r = C.assign_pool(cat, "e4", progress=False)
    assert r["assigned_files"] == 1 and pairs[0][1].stat().st_mtime_ns == keep
    assert C.ASSIGNMENTS.is_current(cat, {"clusters": "e4"}) is True
    with pytest.raises(C.ClusterError, match="already exists"):
        C.import_cluster_set(cat, "e4", cpath)
    C.import_cluster_set(cat, "e4", _save(tmp_path, "c2.pt", -np.eye(4, 768, dtype=np.float32)), overwrite=True)
    assert not d.exists()  # old assignments belonged to other centroids
    assert C.ASSIGNMENTS.is_current(cat, {"clusters": "e4"}) is False


def test_import_rejects_dimension_mismatch_and_writes_nothing(pool, tmp_path):
    cat, _ = pool
    with pytest.raises(C.ClusterError, match="dimension 512, the pool's 'l14_img' embeddings have 768"):
        C.import_cluster_set(cat, "bad", _save(tmp_path, "c.pt", np.ones((3, 512), np.float32)))
    cpath = _save(tmp_path, "ok.pt", np.ones((3, 768), np.float32))
    np.save(tmp_path / "t.npy", np.ones((2, 512), np.float32))
    with pytest.raises(C.ClusterError, match="t.npy: target embeddings have dimension 512, centroids have 768"):
        C.import_cluster_set(cat, "bad", cpath, [tmp_path / "t.npy"])
    assert C.list_cluster_sets(cat) == []
    with pytest.raises(C.ClusterError, match="cluster set name"):
        C.import_cluster_set(cat, "../x", cpath)
    with pytest.raises(C.ClusterError, match="cluster set 'nope' not found"):
        C.assign_pool(cat, "nope", progress=False)


def test_build_kmeans_recovers_blobs_and_is_seeded(tmp_path):
    """Four well separated blobs, k=4, no caption filter: one centroid per blob, same every run."""
    centers = np.zeros((4, 768), np.float32)
    for i in range(4):
        centers[i, i] = 10.0

    def blobs(i, a):
        rng = np.random.default_rng(i)
        n = len(a["l14_img"])
        x = centers[np.arange(n) % 4] + rng.normal(0, 0.05, (n, 768))
        return {"l14_img": x.astype(np.float16)}

    arrays = write_pool(tmp_path / "k", [40, 40], dims={"l14_img": 768}, mutate=blobs)
    cat = init_catalog(tmp_path / "k" / "cat.duckdb", pool=tmp_path / "k")
    cs = C.build_cluster_set(cat, "k4", k=4, caption_filter=False, seed=3, progress=False)
    got = cs.centroids()
    # converged k-means on separated blobs: each centroid is the mean of one blob's 20 points
    x = np.concatenate([a["l14_img"] for a in arrays]).astype(np.float32)
    blob_of_row = np.arange(80) % 40 % 4  # row r of each file was drawn around centre r % 4
    means = np.stack([x[blob_of_row == b].mean(0) for b in range(4)])
    dist = np.linalg.norm(got[:, None, :] - means[None], axis=2)
    assert sorted(dist.argmin(axis=1).tolist()) == [0, 1, 2, 3] and dist.min(axis=1).max() < 1e-3
    again = C.build_cluster_set(cat, "k4", k=4, caption_filter=False, seed=3, overwrite=True, progress=False)
    assert np.array_equal(again.centroids(), got)
    km = again.meta["source"]["kmeans"]
    assert (km["points"], km["niter"], km["metric"]) == (80, 20, "L2")
    # sampling with replacement: int(n * ratio) per file -> int(40 * 0.5) * 2 = 40 points
    x = C.training_sample(cat, "l14_img", sample_ratio=0.5, seed=0, caption_filter=False, progress=False)
    assert x.shape == (40, 768)
    with pytest.raises(C.ClusterError, match="--k 100"):
        C.build_cluster_set(cat, "k100", k=100, caption_filter=False, progress=False)


def test_kmeans_iterations_are_counted_on_the_progress_lines(tmp_path, capfd, monkeypatch):
    rng = np.random.default_rng(0)

    def points(i, a):
        return {"l14_img": rng.normal(0, 1, (len(a["l14_img"]), 768)).astype(np.float16)}

    write_pool(tmp_path / "k", [60, 60], dims={"l14_img": 768}, mutate=points)
    cat = init_catalog(tmp_path / "k" / "cat.duckdb", pool=tmp_path / "k")
    quiet = C.build_cluster_set(cat, "quiet", k=5, niter=7, caption_filter=False, progress=False).centroids()
    capfd.readouterr()
    monkeypatch.setenv("CURATE_PROGRESS", "log")
    monkeypatch.setenv("CURATE_PROGRESS_INTERVAL", "0")
    print("before")  # this process's own standard output is untouched around the training
    logged = C.build_cluster_set(cat, "logged", k=5, niter=7, caption_filter=False, progress=True).centroids()
    print("after")
    out, err = capfd.readouterr()
    assert np.array_equal(logged, quiet)  # counting changes nothing
    head = "logged: k-means, k=5, 120 points: "
    lines = [line[len(head):] for line in err.splitlines() if line.startswith(head)]
    counts = [int(line.split("/")[0]) for line in lines if "/7 iteration" in line]
    converged = re.search(r"Converged at iteration (\d+)", err)  # faiss stops when nothing moves
    assert counts[0] == 0 and counts == sorted(counts), err
    assert counts[-1] == (int(converged.group(1)) + 1 if converged else 7), err
    assert any("Clustering 120 points in 768D to 5 clusters" in line for line in lines)  # faiss's own line
    assert out.split() == ["before", "after"]  # nothing of faiss's on standard output


def test_sql_function_over_embedding_column(pool, tmp_path):
    from curate.features.embeddings import attach_embeddings, convert_embeddings

    cat, arrays = pool
    rng = np.random.default_rng(2)
    cents = rng.normal(size=(5, 768)).astype(np.float32)
    C.import_cluster_set(cat, "f5", _save(tmp_path, "c.pt", cents))
    convert_embeddings(cat, "l14_img", progress=False)
    con = connect(cat)
    attach_embeddings(con, cat, "l14_img")
    fn = C.attach_nearest_centroid(con, cat, "f5")
    got = con.sql(f'SELECT {fn}(embedding) FROM embeddings_l14_img ORDER BY file, "row"').fetchall()
    con.close()
    want = np.argmax(np.concatenate([a["l14_img"] for a in arrays]).astype(np.float32) @ cents.T, axis=1)
    assert [g[0] for g in got] == want.tolist()


def test_assignment_killed_mid_pool_leaves_no_partial_file_and_resumes(pool, tmp_path, monkeypatch):
    cat, arrays = pool
    cents = np.eye(3, 768, dtype=np.float32)
    C.import_cluster_set(cat, "k3", _save(tmp_path, "c.pt", cents))
    real, calls = C.assign, []

    def dies_on_second_file(x, c):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while assigning file 0001
        return real(x, c)

    monkeypatch.setattr(C, "assign", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        C.assign_pool(cat, "k3", progress=False)
    d, pairs = C._assignment_files(cat, C.get_cluster_set(cat, "k3"))
    assert pairs[0][1].is_file() and not pairs[1][1].exists()
    assert sorted(p.name for p in d.iterdir()) == ["0000.parquet", "_set.json"]  # no temp leftovers
    monkeypatch.setattr(C, "assign", real)
    r = C.assign_pool(cat, "k3", progress=False)
    assert (r["assigned_files"], r["rows"]) == (1, 5)
    con = connect(cat)
    got = [x[0] for x in con.sql('SELECT cluster FROM cluster_assignments ORDER BY file, "row"').fetchall()]
    con.close()
    x = np.concatenate([a["l14_img"] for a in arrays]).astype(np.float32)
    assert got == np.argmax(x @ cents.T, axis=1).tolist()


def test_assignment_engine_ray_writes_the_same_files(pool, tmp_path):
    cat, _ = pool
    rng = np.random.default_rng(3)
    C.import_cluster_set(cat, "r5", _save(tmp_path, "c.pt", rng.normal(size=(5, 768)).astype(np.float32)))
    C.assign_pool(cat, "r5", progress=False)
    d, pairs = C._assignment_files(cat, C.get_cluster_set(cat, "r5"))
    local = {out.name: pq.read_table(out) for _, out in pairs}
    for _, out in pairs:
        out.unlink()
    r = C.assign_pool(cat, "r5", progress=False, engine=Engine(kind="ray"))
    assert r["assigned_files"] == 2 and r["rows"] == 11
    assert all(pq.read_table(out).equals(local[out.name]) for _, out in pairs)
