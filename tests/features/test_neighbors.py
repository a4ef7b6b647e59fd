"""Nearest neighbours over pool embeddings and near-duplicate groups within clusters, plus the
command line of clusters/embeddings (click CliRunner over real catalogs)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from curate.catalog.connection import connect, init_catalog
from curate.cli.main import main
from curate.features.clusters import import_cluster_set
from curate.errors import CurateError
from curate.features.neighbors import near_duplicates, nearest
from tests.conftest import uid_of
from tests.features.test_embeddings import write_pool

torch = pytest.importorskip("torch")


def e(*v):
    out = np.zeros(768, np.float32)
    out[: len(v)] = v
    return out


# file 0: rows 0..3 ; file 1: rows 0..3 (uids 0..7), embeddings in the first 3 dimensions
EMB = [
    [e(1, 0, 0), e(0.6, 0.8, 0), e(0, 1, 0), e(0, 0, 1)],
    [e(1, 0, 0), e(0.8, 0.6, 0), e(0.98, 0.199, 0), e(0, 0, -1)],
]


@pytest.fixture
def cat(tmp_path):
    write_pool(tmp_path / "n", [4, 4], dims={"l14_img": 768},
               mutate=lambda i, a: {"l14_img": np.stack(EMB[i]).astype(np.float16)})
    return init_catalog(tmp_path / "n" / "cat.duckdb", pool=tmp_path / "n")


def test_nearest_to_vector_hand_worked(cat):
    # query [1, 0, 0]: products 1, .6, 0, 0 | 1, .8, .98, 0 -> uid0 (1, first in pool order),
    # uid4 (1), uid6 (.98), uid5 (.8)
    hits = nearest(cat, "l14_img", vector=e(1, 0, 0), k=4)
    assert [h.uid for h in hits] == [uid_of(i) for i in (0, 4, 6, 5)]
    assert [(h.file, h.row) for h in hits] == [("0000", 0), ("0001", 0), ("0001", 2), ("0001", 1)]
    assert [round(h.score, 2) for h in hits] == [1.0, 1.0, 0.98, 0.8]
    # k cuts through the tie at 1.0: the earlier sample in pool order wins
    assert [h.uid for h in nearest(cat, "l14_img", vector=e(1, 0, 0), k=1)] == [uid_of(0)]
    # a tie inside one file: query [0, 0, 0.5] scores rows 0,1,2 of file 0 and 0,1,2 of file 1 at 0
    assert [h.uid for h in nearest(cat, "l14_img", vector=e(0, 0, 0.5), k=3)] == [uid_of(i) for i in (3, 0, 1)]


def test_nearest_to_uid(cat):
    # uid 3 = [0, 0, 1]: itself (1), then the zeros-product rows in pool order, uid 7 (-1) last
    hits = nearest(cat, "l14_img", uid=uid_of(3), k=8)
    assert hits[0].uid == uid_of(3) and hits[-1].uid == uid_of(7)
    assert [h.uid for h in hits[1:-1]] == [uid_of(i) for i in (0, 1, 2, 4, 5, 6)]
    with pytest.raises(CurateError, match="not in the pool"):
        nearest(cat, "l14_img", uid="f" * 32)
    with pytest.raises(CurateError, match="dimension 3"):
        nearest(cat, "l14_img", vector=[1, 0, 0])


def test_near_duplicates_within_clusters(cat, tmp_path):
    # two centroids: x-ish and rest; rows with e_x > 0 go to c0 (uids 0,1,4,5,6), others to c1
    torch.save(np.stack([e(1, 0, 0), e(0, 0.5, 0.5)]), tmp_path / "c.pt", pickle_protocol=4)
    import_cluster_set(cat, "two", tmp_path / "c.pt")
    r = near_duplicates(cat, "two", threshold=0.95, progress=False)
    # c0 pairs >= .95: (0,4) = 1, (0,6) = .98, (4,6) = .98, (1,5) = .96 -> groups {0,4,6} {1,5}
    # c1 = {2: [0,1,0], 3: [0,0,1], 7: [0,0,-1]}: no pair >= .95 (uid 2 is in c1: .5 > 0)
    con = connect(cat)
    got = con.sql('SELECT uid, group_uid, keep FROM near_duplicates ORDER BY file, "row"').fetchall()
    con.close()
    assert got == [(uid_of(0), uid_of(0), True), (uid_of(1), uid_of(1), True),
                   (uid_of(4), uid_of(0), False), (uid_of(5), uid_of(1), False),
                   (uid_of(6), uid_of(0), False)]
    assert (r["in_groups"], r["drop"]) == (5, 3)
    # resumable: a second run reuses the step files
    again = near_duplicates(cat, "two", threshold=0.95, progress=False)
    assert (again["in_groups"], again["drop"]) == (5, 3)


def test_cli_import_features_list_and_neighbors(cat, tmp_path):
    torch.save(np.stack([e(1, 0, 0), e(0, 0.5, 0.5)]), tmp_path / "c.pt", pickle_protocol=4)
    np.save(tmp_path / "t0.npy", np.stack([e(0, 0, 1)]))
    np.save(tmp_path / "t1.npy", np.stack([e(0, 1, 0)]))
    run = CliRunner().invoke
    r = run(main, ["clusters", "import", str(cat), "--name", "two", "--centroids", str(tmp_path / "c.pt"),
                   "--targets", str(tmp_path / "t0.npy"), str(tmp_path / "t1.npy")])
    assert r.exit_code == 0, r.output
    assert "target clusters: 1 distinct of 2 (from 2 target embeddings in 2 files)" in r.output
    r = run(main, ["clusters", "list", str(cat)])
    assert "two: key l14_img, 2 x 768 centroids, 1 target clusters from 2 target rows" in r.output
    r = run(main, ["features", "clusters", str(cat), "--clusters", "two"])
    assert r.exit_code == 0 and "assigned 8 rows in 2 of 2 files" in r.output
    r = run(main, ["embeddings", "convert", str(cat), "--key", "l14_img"])
    assert r.exit_code == 0 and "8 rows x 768 in 2 files (2 converted now)" in r.output
    r = run(main, ["embeddings", "neighbors", str(cat), "--uid", uid_of(0), "-k", "2"])
    assert r.exit_code == 0 and r.output.splitlines()[:3] == [
        "score\tuid\tfile\trow", f"1.000000\t{uid_of(0)}\t0000\t0", f"1.000000\t{uid_of(4)}\t0001\t0"]
    r = run(main, ["embeddings", "neighbors", str(cat), "--uid", uid_of(0), "-k", "2", "--format", "csv"])
    assert r.exit_code == 0 and r.output.splitlines()[:2] == ["score,uid,file,row", f"1.000000,{uid_of(0)},0000,0"]
    r = run(main, ["embeddings", "neighbors", str(cat), "--uid", uid_of(0), "-k", "2", "--format", "json"])
    import json
    assert r.exit_code == 0 and json.loads(r.output.split("\n2 neighbours")[0])[:2] == [
        {"score": 1.0, "uid": uid_of(0), "file": "0000", "row": 0}, {"score": 1.0, "uid": uid_of(4), "file": "0001", "row": 0}]
    r = run(main, ["clusters", "import", str(cat), "--name", "two", "--centroids", str(tmp_path / "c.pt")])
    assert r.exit_code == 1 and "error: cluster set 'two' already exists" in r.output
    np.save(tmp_path / "bad.npy", np.ones((3, 512), np.float32))
    r = run(main, ["clusters", "import", str(cat), "--name", "bad", "--centroids", str(tmp_path / "bad.npy")])
    assert r.exit_code == 1 and "bad.npy: centroids have dimension 512" in r.output
