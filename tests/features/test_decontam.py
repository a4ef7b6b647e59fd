"""Eval-set decontamination: eval_neighbors on hand-made embeddings (pairs worked out by hand at
several thresholds, the boundary included), the decontaminate filter and per-task counts, a
pickle that would run code refused, and one end-to-end run where a tiny open_clip model encodes
the eval images (`curate decontam encode`) and, independently here, the pool images with planted
copies."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.catalog.connection import connect, init_catalog
from curate.cli.main import main
from curate.features import decontam as dc
from curate.features.registry import producer
from curate.features.tables import read_table_meta
from curate.pool.sample import write_npz
from curate.subset import write_subset
from tests.conftest import pool_table, read_uids, uid_of

REPO = Path(__file__).resolve().parents[2]
FILTER = REPO / "filters" / "decontaminate.sql"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _vec(**comp) -> np.ndarray:
    """A 768-d vector with components e_i = value (e.g. _vec(e0=0.6, e2=0.8))."""
    v = np.zeros(768, np.float32)
    for k, x in comp.items():
        v[int(k[1:])] = x
    return v


# eval rows: E0 = e0, E1 = e1 (task cifar10), E2 = e2 (task mnist)
EVAL = [_vec(e0=1), _vec(e1=3), _vec(e2=0.5)]  # imported rows are L2-normalised: e0, e1, e2
EVAL_KEYS = [("cifar10", "s0"), ("cifar10", "s1"), ("mnist", "m0")]
F16 = {x: float(np.float16(x)) for x in (0.96, 0.28, 0.6, 0.8)}  # stored as float16 in the npz
# pool files A (4 rows) and B (3 rows); their inner products with E0, E1, E2 worked by hand:
POOL = [
    [_vec(e0=1),                        # A0: E0 1
     _vec(e1=0.96, e3=0.28),            # A1: E1 .96
     _vec(e0=0.6, e2=0.8),              # A2: E0 .6, E2 .8
     _vec(e4=1)],                       # A3: none
    [_vec(e1=0.8, e2=0.6),              # B0: E1 .8, E2 .6
     _vec(e2=1),                        # B1: E2 1
     _vec(e0=0.5, e1=0.5, e3=0.5, e5=0.5)],  # B2: E0 .5, E1 .5 (exactly: the >= boundary)
]
# (file, row, eval_key, sim) of every pair with sim >= 0.5
PAIRS = [("A", 0, "s0", 1.0), ("A", 1, "s1", F16[0.96]), ("A", 2, "s0", F16[0.6]), ("A", 2, "m0", F16[0.8]),
         ("B", 0, "s1", F16[0.8]), ("B", 0, "m0", F16[0.6]), ("B", 1, "m0", 1.0),
         ("B", 2, "s0", 0.5), ("B", 2, "s1", 0.5)]
UIDS = {("A", r): uid_of(r) for r in range(4)} | {("B", r): uid_of(10 + r) for r in range(3)}


def expected(threshold):
    return [p for p in PAIRS if p[3] >= threshold]


@pytest.fixture
def hand(tmp_path):
    meta = tmp_path / "metadata"
    meta.mkdir()
    for name, rows in zip("AB", POOL):
        pq.write_table(pool_table([{"uid": UIDS[(name, r)]} for r in range(len(rows))]), meta / f"{name}.parquet")
        write_npz(meta / f"{name}.npz", {"l14_img": np.stack(rows).astype(np.float16)})
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path)
    np.save(tmp_path / "eval.npy", np.stack(EVAL))
    pq.write_table(pa.table({"task": [t for t, _ in EVAL_KEYS], "eval_key": [k for _, k in EVAL_KEYS]}),
                   tmp_path / "keys.parquet")
    return cat, tmp_path


def _table(cat):
    con = connect(cat)
    try:
        return con.execute('SELECT file, "row", eval_key, sim, uid, task, eval_set FROM eval_neighbors '
                           'ORDER BY file, "row", eval_key DESC').fetchall()
    finally:
        con.close()


def test_hand_table_premises():
    e = np.stack([v / np.linalg.norm(v) for v in EVAL])
    for (name, row, key, sim) in PAIRS:
        x = POOL["AB".index(name)][row].astype(np.float16).astype(np.float32)
        assert float(x @ e[[k for _, k in EVAL_KEYS].index(key)]) == pytest.approx(sim, abs=1e-6)
    assert np.linalg.norm(POOL[0][1]) == pytest.approx(1.0) and np.linalg.norm(POOL[1][2]) == pytest.approx(1.0)


@pytest.mark.parametrize("threshold", [0.95, 0.75, 0.5])
def test_eval_neighbors_by_hand(hand, threshold):
    cat, root = hand
    es = dc.import_eval_set(cat, "evals", root / "eval.npy", root / "keys.parquet")
    assert es.meta["tasks"] == {"cifar10": 2, "mnist": 1} and es.meta["key"] == "l14_img"
    res = dc.build_eval_neighbors(cat, "evals", threshold, progress=False)
    assert res.rows_computed == 7 and sorted(res.computed) == ["A", "B"]
    got = _table(cat)
    want = sorted(expected(threshold), key=lambda p: (p[0], p[1], [-ord(c) for c in p[2]]))
    assert [(f, r, k) for f, r, k, *_ in got] == [(f, r, k) for f, r, k, _ in want]
    for g, w in zip(got, want):
        assert g[3] == pytest.approx(w[3], abs=1e-6)
        assert g[4] == UIDS[(g[0], g[1])] and g[5] == dict((k, t) for t, k in EVAL_KEYS)[g[2]] and g[6] == "evals"


@pytest.mark.parametrize("threshold", [0.95, 0.75, 0.5])
def test_the_torch_path_finds_the_same_pairs(threshold):
    """The GPU path's maths (a torch matmul and `>=`), run with torch on the CPU, against the hand
    pairs: faiss and torch give the same (row, eval row) pairs."""
    pytest.importorskip("torch")
    x = np.stack([v for rows in POOL for v in rows]).astype(np.float16).astype(np.float32)
    e = np.stack([v / np.linalg.norm(v) for v in EVAL]).astype(np.float32)
    flat = [(f, r) for f, rows in zip("AB", POOL) for r in range(len(rows))]
    keys = [k for _, k in EVAL_KEYS]
    want = sorted((flat.index((f, r)), keys.index(k)) for f, r, k, _ in expected(threshold))
    for search in (dc.NeighborSearch(e, threshold, gpu=False), dc.NeighborSearch(e, threshold, torch_device="cpu")):
        q, ei, s = search.search(x)
        assert list(zip(q.tolist(), ei.tolist())) == want
        assert s == pytest.approx([float(x[a] @ e[b]) for a, b in want], abs=1e-6)
    assert dc.NeighborSearch(e, threshold, torch_device="cpu").torch is not None


def test_decontaminate_filter_and_report(hand, tmp_path):
    cat, root = hand
    dc.import_eval_set(cat, "evals", root / "eval.npy", root / "keys.parquet")
    # the subset to clean: every pool row, B0 twice (upsampled), and a uid the pool lacks (no eval
    # image's neighbour: kept), in uid order
    stranger = uid_of(99)
    sub = sorted([UIDS[k] for k in UIDS] + [UIDS[("B", 0)], stranger])
    write_subset(tmp_path / "all.npy", np.array([int(u[:16], 16) for u in sub], np.uint64),
                 np.array([int(u[16:], 16) for u in sub], np.uint64))
    for threshold, removed in ((0.95, {("A", 0), ("A", 1), ("B", 1)}),
                               (0.75, {("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1)}),
                               (0.99, {("A", 0), ("B", 1)}), (0.5, set(UIDS) - {("A", 3)})):
        out = tmp_path / f"clean_{threshold}.npy"
        r = invoke("run", FILTER, "-c", cat, "-o", out, "--set", f"subset={tmp_path / 'all.npy'}",
                   "--set", f"threshold={threshold}")
        assert r.exit_code == 0, r.output
        assert read_uids(out) == [u for u in sub if u not in {UIDS[k] for k in removed}], threshold
    # the table was built at 0.95, rebuilt at 0.75 and 0.5 (lower), not at 0.99 (served by 0.75's)
    p = dc.plan(cat, "evals", 0.5)
    assert not p.todo and read_table_meta(p.output(p.files[0]), dc.META_KEY)["settings"]["threshold"] == 0.5
    assert producer("eval_neighbors").is_current(cat, {"eval_set": "evals", "threshold": 0.6})
    assert not producer("eval_neighbors").is_current(cat, {"eval_set": "evals", "threshold": 0.4})
    # per task at 0.75 over the pool: cifar10 A0, A1, B0; mnist A2, B1; 5 distinct of 7
    rep = dc.report(cat, "evals", 0.75)
    assert rep["tasks"] == {"cifar10": 3, "mnist": 2} and (rep["removed"], rep["rows"], rep["kept"]) == (5, 7, 2)
    r = invoke("decontam", "report", cat, "--eval-set", "evals", "--threshold", "0.75", "--subset", tmp_path / "all.npy")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # within the subset B0 is there twice: cifar10 A0, A1, B0, B0; mnist A2, B1; removed 6 of 9
    # (the stranger is no eval image's neighbour: the report counts it as kept)
    assert lines[0] == "cifar10: 4 removed" and lines[1] == "mnist: 2 removed"
    assert lines[2].startswith("decontam[evals] at cosine >= 0.75: removed 6 of 9 rows of ") and "kept 3" in lines[2]


def test_import_refuses_a_pickle_that_would_run_code_and_bad_input(hand, tmp_path):
    cat, root = hand

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (root / "evil.pt").write_bytes(pickle.dumps({"image_features": Evil()}))
    r = invoke("decontam", "import", cat, "--name", "evil", "--embeddings", root / "evil.pt")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "evil.pt" in lines[0], r.output
    assert not (tmp_path / "pwned").exists() and dc.list_eval_sets(cat) == []
    np.save(root / "short.npy", np.ones((2, 768), np.float32))
    r = invoke("decontam", "import", cat, "--name", "x", "--embeddings", root / "short.npy", "--keys", root / "keys.parquet")
    assert r.exit_code == 1 and "keys.parquet: 3 keys for 2 embedding rows" in r.output
    r = invoke("decontam", "build", cat, "--eval-set", "nope")
    assert r.exit_code == 1 and "error: eval set 'nope' not found" in r.output
    r = invoke("decontam", "import", cat, "--name", "evals", "--embeddings", root / "eval.npy")
    assert r.exit_code == 0 and "eval set 'evals': 3 rows x 768" in r.output
    r = invoke("decontam", "build", cat, "--eval-set", "evals", "--threshold", "1.5")
    assert r.exit_code == 1 and "threshold 1.5: expected a number in [-1, 1]" in r.output
    r = invoke("decontam", "list", cat)
    assert "evals: 3 rows x 768, key l14_img, model None (evals 3)" in r.output
    r = invoke("decontam", "build", cat, "--eval-set", "evals", "--threshold", "0.9")
    assert r.exit_code == 0 and "searched 2 file(s) (7 rows against 3 eval images, for cosine >= 0.9), 0 already" in r.output
    r = invoke("decontam", "build", cat, "--eval-set", "evals", "--threshold", "0.95")  # served by the 0.9 tables
    assert r.exit_code == 0 and "searched 0 file(s) (0 rows against 3 eval images, for cosine >= 0.95), 2 already" in r.output


# -- end to end with a tiny open_clip model ----------------------------------------------------

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _images(n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):  # structured, unlike each other: blocks of random colours at random scales
        s = int(rng.choice([2, 4, 8, 16]))
        small = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((32, 32), Image.NEAREST))
    return out


def _tiny_world(root: Path) -> dict:
    """In ``root``: a tiny random-init open_clip model (``tiny-decontam.json``, ``tiny.pt``), two
    eval sets of 3 images (``eval_data/wds_{cars,pets}_test``, made by eval-export-folder's
    library) and ``pool.duckdb``: a 12-row pool with copies of eval images cars s0000001 (rows 2
    and 9) and pets s0000002 (row 5), its l14_img encoded here with open_clip directly."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")

    from curate.evaluate.export import export_folder

    cfg = root / "tiny-decontam.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("tiny-decontam")
    model.eval()
    torch.save({"state_dict": model.state_dict()}, root / "tiny.pt")
    evals = _images(6, 1)
    for task, imgs in (("cars", evals[:3]), ("pets", evals[3:])):
        for c, im in enumerate(imgs):
            (root / "folders" / task / f"c{c}").mkdir(parents=True)
            im.save(root / "folders" / task / f"c{c}" / "x.png")
        export_folder(root / "folders" / task, root / "eval_data" / f"wds_{task}_test")
    pool_imgs = _images(12, 2)
    pool_imgs[2] = pool_imgs[9] = evals[1]
    pool_imgs[5] = evals[5]
    with torch.no_grad():  # encoded here with open_clip itself, as byod score stores them
        x = model.encode_image(torch.stack([pre(im) for im in pool_imgs])).float()
        x = torch.nn.functional.normalize(x, dim=-1).numpy()
        e = model.encode_image(torch.stack([pre(im) for im in evals])).float()
        e = torch.nn.functional.normalize(e, dim=-1).numpy()
    meta = root / "pool" / "metadata"
    meta.mkdir(parents=True)
    pq.write_table(pool_table([{"uid": uid_of(i)} for i in range(12)]), meta / "p.parquet")
    write_npz(meta / "p.npz", {"l14_img": x.astype(np.float16)})
    cat = init_catalog(root / "pool.duckdb", pool=root / "pool")
    sims = x.astype(np.float16).astype(np.float32) @ e.T
    copies = {(2, 1), (9, 1), (5, 5)}
    others = max(sims[i, j] for i in range(12) for j in range(6) if (i, j) not in copies)
    # a random-init model maps all images close together, but a copy is closer still (float16
    # rounding moves a cosine by ~1e-4): the threshold goes in the gap
    low = min(sims[i, j] for i, j in copies)
    assert low > 0.9995 and others < low - 0.002, (low, others)
    return {"cat": cat, "e": e, "low": float(low), "others": float(others)}


def test_end_to_end_with_a_tiny_model(tmp_path):
    w = _tiny_world(tmp_path)
    cat = w["cat"]
    threshold = round((w["others"] + w["low"]) / 2, 5)
    r = invoke("decontam", "encode", cat, "--name", "evals", "--data-dir", tmp_path / "eval_data", "cars",
               tmp_path / "eval_data" / "wds_pets_test", "--model-config", tmp_path / "tiny-decontam.json",
               "--checkpoint", tmp_path / "tiny.pt", "--key", "l14_img")
    assert r.exit_code == 0, r.output
    assert "eval set 'evals': 6 images x 32 (cars 3, pets 3) encoded with tiny-decontam" in r.output
    es = dc.get_eval_set(cat, "evals")
    assert es.keys().to_pydict() == {"task": ["cars"] * 3 + ["pets"] * 3,
                                     "eval_key": ["s0000000", "s0000001", "s0000002"] * 2}
    assert np.abs(es.embeddings() - w["e"]).max() < 1e-5  # byod score's normalisation, same model
    invoke("run", REPO / "filters" / "no_filter.sql", "-c", cat, "-o", tmp_path / "all.npy")
    r = invoke("run", "decontaminate", "-c", cat, "-o", tmp_path / "clean.npy",
               "--set", f"subset={tmp_path / 'all.npy'}", "--set", f"threshold={threshold}")
    assert r.exit_code == 0, r.output
    assert set(read_uids(tmp_path / "clean.npy")) == {uid_of(i) for i in range(12) if i not in (2, 5, 9)}
    got = _table(cat)
    assert [(f, row, k) for f, row, k, *_ in got] == [("p", 2, "s0000001"), ("p", 5, "s0000002"),
                                                      ("p", 9, "s0000001")]
    assert [t for *_, t, _ in got] == ["cars", "pets", "cars"]
    r = invoke("decontam", "report", cat, "--eval-set", "evals", "--threshold", threshold)
    assert r.exit_code == 0 and r.output.splitlines()[:2] == ["cars: 2 removed", "pets: 1 removed"], r.output
    r = invoke("decontam", "encode", cat, "--name", "x", "--data-dir", tmp_path / "eval_data", "dogs",
               "--model-config", tmp_path / "tiny-decontam.json", "--checkpoint", tmp_path / "tiny.pt")
    assert r.exit_code == 1 and r.output.startswith("error: dogs: ") and "wds_dogs_test not found" in r.output
    # a BYOD pool records its model (byod score's .byod_model.json): another checkpoint is refused
    from curate.atomic import file_sha256

    rec = tmp_path / "pool" / "metadata" / ".byod_model.json"
    rec.write_text(json.dumps({"model": "other", "checkpoint_sha256": "0" * 64, "embedding": "l14"}))
    r = invoke("decontam", "build", cat, "--eval-set", "evals")
    assert r.exit_code == 1 and "the pool was scored with other (checkpoint sha256 000000000000...)" in r.output
    rec.write_text(json.dumps({"model": "tiny-decontam", "checkpoint_sha256": file_sha256(tmp_path / "tiny.pt"),
                               "embedding": "b32"}))
    r = invoke("decontam", "build", cat, "--eval-set", "evals")
    assert r.exit_code == 1 and "the pool holds 'b32_img' embeddings, eval set 'evals' is compared with 'l14_img'" in r.output
    rec.write_text(json.dumps({"model": "tiny-decontam", "checkpoint_sha256": file_sha256(tmp_path / "tiny.pt"),
                               "embedding": "l14"}))
    assert invoke("decontam", "build", cat, "--eval-set", "evals").exit_code == 0


def test_the_commands_of_this_page(tmp_path, monkeypatch):
    """docs/decontamination.md's quick start, run as written in a directory holding what it names."""
    import shlex

    w = _tiny_world(tmp_path)
    assert w["others"] < 0.995 < w["low"]  # the page's threshold falls in this world's gap
    monkeypatch.chdir(tmp_path)
    text = (REPO / "docs" / "decontamination.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = " ".join(ln.strip() for ln in block.splitlines() if not ln.strip().startswith("#"))
    commands = [c.strip() for c in commands.replace(" \\ ", " ").split("curate ") if c.strip()]
    assert len(commands) == 5
    outputs = []
    for c in commands:
        r = invoke(*shlex.split(c))
        assert r.exit_code == 0, f"`curate {c}`: {r.output}"
        outputs.append(r.output)
    assert "evals: 6 rows x 32, key l14_img, model tiny-decontam (cars 3, pets 3)" in outputs[1]
    assert outputs[3].splitlines()[:2] == ["cars: 2 removed", "pets: 1 removed"]
    assert "removed 3 of 12 rows of subsets/all.npy, kept 9" in outputs[3]
    assert sorted(read_uids(tmp_path / "subsets" / "clean.npy")) == sorted(uid_of(i) for i in range(12)
                                                                           if i not in (2, 5, 9))

def test_the_filter_cannot_run_per_pool_file():
    """An anti-join on eval_neighbors cannot run one pool file per task: the ray engine runs it
    whole, as one task (the filter says so; tests/run/test_ray_global.py)."""
    from curate.run.plan import row_local_problem
    from curate.run.query import load_filter

    flt = load_filter(FILTER)
    problem = row_local_problem(flt.query, ["pool", "eval_neighbors"])
    assert problem == "the driving table is used inside Exists"
    assert "the ray engine runs it whole, as one task" in FILTER.read_text()
