"""The issue-19 methods on the bundled example, as a fresh clone has it (issue 19: "every method
runs from a fresh clone on the bundled ... pool").

The bundled catalog ships with the negcliploss table, stand-in target / cluster / eval sets and
their tables (``curate.demo.example.build_method_examples``). Here the repository's files for the
example are copied (tracked and new files, as a clone after a commit has them), the commands of
each docs page's "On the bundled pool" section and of the README run there with the ``curate``
executable, and then:

* every command exits 0 and no file of the copy changed (the shipped tables are current, nothing
  is rebuilt);
* every subset is what numpy gives from the pool's own npz embeddings and the stand-in files,
  with the definitions written out here (negCLIPLoss with one batch, NormSim, SemDeDup's rule,
  DBP's quotas, decontamination at cosine 0.95) and DataComp's fraction rule;
* the shipped stand-ins are what the code makes (rebuilt on a copy and compared).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

CURATE = Path(sys.executable).with_name("curate")
EXAMPLE = ["catalog.duckdb.example", "data/sample_pool", "data/sample_targets", "data/sample_evals"]
PAGES = ["docs/negcliploss-normsim.md", "docs/semdedup-dbp.md", "docs/decontamination.md"]
NEW_FEATURES = ["negcliploss", "normsim", "targets", "clusters", "cluster_assignments", "semdedup", "dbp",
                "eval_sets", "eval_neighbors"]
N = 2000  # 2 pool files x 1,000 rows


# -- the copy and the documented commands --------------------------------------------------------

def clone_files() -> list[str]:
    """The example's files as a clone has them: tracked, plus new files git does not ignore."""
    out = []
    for extra in ([], ["--others", "--exclude-standard"]):
        r = subprocess.run(["git", "ls-files", "-z", *extra, "--", *EXAMPLE], cwd=REPO, capture_output=True,
                           check=True)
        out += [p for p in r.stdout.decode().split("\0") if p]
    # not what a clone has: the float32 copies a local rebuild leaves (a cache, not committed)
    return sorted(p for p in set(out) if not p.startswith("data/sample_pool/features/embeddings/"))


def digests(root: Path, files) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}


def section_commands(page: str, heading: str) -> list[str]:
    """The `curate ...` lines of the first code block after ``heading`` (continuations joined)."""
    text = (REPO / page).read_text()
    start = text.index(heading)
    block = re.search(r"```(?:sh|bash)\n(.*?)```", text[start:], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [ln.strip() for ln in lines if ln.strip().startswith("curate ")]


README_HEADING = "The newer methods (negCLIPLoss, NormSim, SemDeDup, DBP, decontamination) run on the bundled pool"


def documented() -> list[tuple[str, str]]:
    cmds = [(page, c) for page in PAGES for c in section_commands(page, "## On the bundled pool")]
    return cmds + [("README.md", c) for c in section_commands("README.md", README_HEADING)]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("clone")
    files = clone_files()
    assert "catalog.duckdb.example" in files and "data/sample_targets/l14_img.npy" in files
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / f, root / f)  # new mtimes, as a checkout writes them
    return root, files


@pytest.fixture(scope="module")
def ran(clone):
    """Run every documented command in the copy; returns (root, {command: stdout+stderr}, files
    changed)."""
    root, files = clone
    env = {"PATH": str(CURATE.parent) + ":/usr/bin:/bin", "HOME": str(root),
           "CURATE_CATALOG": str(root / "catalog.duckdb.example")}  # never the repository's catalog
    before = digests(root, files)
    outputs = {}
    (root / "readme").mkdir()
    for page, cmd in documented():  # the README's outputs go to readme/subsets/, the pages' to subsets/
        cwd = root / "readme" if page == "README.md" else root
        r = subprocess.run([str(CURATE), *shlex.split(cmd)[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"{page}: {cmd}\n{r.stdout}\n{r.stderr}"
        outputs[(page, cmd)] = r.stdout + r.stderr
    after = digests(root, files)
    changed = sorted(f for f in files if before[f] != after[f])
    return root, outputs, changed


def test_the_documented_commands_run_and_change_no_file(ran):
    root, outputs, changed = ran
    assert len(outputs) >= 12
    assert changed == []
    # and nothing was built: no float32 embedding copies, no work files
    assert not (root / "data/sample_pool/features/embeddings").exists()
    assert not list((root / "data/sample_pool/features").rglob("_work*"))
    for name in ("negcliploss_30pct", "normsim_inf", "dbp"):  # the README's commands, the pages' results
        assert (root / "readme/subsets" / f"{name}.npy").read_bytes() == (root / "subsets" / f"{name}.npy").read_bytes()


def test_without_the_stand_in_names_the_filters_name_what_is_there(clone, tmp_path):
    root, _ = clone
    env = {"PATH": str(CURATE.parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    for flt, words in (("normsim_inf", ["target set 'in1k' not found", "(have: in1k_standin)"]),
                       ("semdedup", ["cluster set 'xlarge' not found", "sample_k16"])):
        r = subprocess.run([str(CURATE), "run", flt, "-c", str(root / "catalog.duckdb.example"),
                            "-o", str(tmp_path / "x.npy")], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and all(w in r.stderr for w in words), r.stderr


# -- independent expectations ----------------------------------------------------------------

class Pool:
    """The copy's pool read straight from its files: uids, captions and l14 embeddings in
    catalog order (pool_files.file_id), and the npz text embeddings."""

    def __init__(self, root: Path):
        import duckdb

        con = duckdb.connect(str(root / "catalog.duckdb.example"), read_only=True)
        self.files = [r[0] for r in con.execute("SELECT file FROM pool_files ORDER BY file_id").fetchall()]
        con.close()
        meta = root / "data/sample_pool/metadata"
        img, txt, self.uids, self.texts = [], [], [], []
        for f in self.files:
            with np.load(meta / f"{f}.npz") as z:
                img.append(z["l14_img"].astype(np.float32))
                txt.append(z["l14_txt"].astype(np.float32))
            t = pq.read_table(meta / f"{f}.parquet", columns=["uid", "text"])
            self.uids += t.column("uid").to_pylist()
            self.texts += t.column("text").to_pylist()
        self.img, self.txt = np.concatenate(img), np.concatenate(txt)
        self.uids = np.array(self.uids)
        assert len(self.uids) == N

    def table(self, root: Path, rel: str) -> pd.DataFrame:
        """A feature table of the copy in pool order."""
        d = root / "data/sample_pool/features" / rel
        return pd.concat([pq.read_table(d / f"{f}.parquet").to_pandas() for f in self.files], ignore_index=True)


@pytest.fixture(scope="module")
def pool(clone):
    return Pool(clone[0])


def subset_uids(path: Path) -> list[str]:
    rec = np.load(path)
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(rec["f0"], rec["f1"])]


def datacomp_keep(values: np.ndarray, fraction: float, n_all: int = N) -> np.ndarray:
    """DataComp's rule: n = int(N * fraction) over all N rows; the threshold is the n-th (0-based)
    of the non-NaN values sorted descending; rows >= it are kept (ties kept, NaN never)."""
    n = int(n_all * fraction)
    ranked = np.sort(values[~np.isnan(values)])[::-1]
    if n >= len(ranked):
        return np.zeros(len(values), bool)
    with np.errstate(invalid="ignore"):
        return values >= ranked[n]


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_negcliploss_30pct(ran, pool):
    root = ran[0]
    # the defaults: tau 0.01, batches of 32768 >= N, so each of the K partitions is one batch of
    # the whole pool and every round gives the same normaliser
    s = pool.img.astype(np.float64) @ pool.txt.astype(np.float64).T
    tau = 0.01
    want = np.diag(s) - tau / 2 * (logsumexp(s / tau, 1) + logsumexp(s / tau, 0))
    t = pool.table(root, "negcliploss/l14")
    assert (t["uid"].to_numpy() == pool.uids).all() and set(t["arch"]) == {"l14"}
    got = t["value"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    keep = datacomp_keep(got, 0.3)
    assert keep.sum() == 601  # 600 above the threshold, and the row at it
    assert sorted(subset_uids(root / "subsets/negcliploss_30pct.npy")) == sorted(pool.uids[keep])
    assert (datacomp_keep(want, 0.3) == keep).all()  # the float64 values select the same rows


TARGET_NOUNS = ["dog", "cat", "car", "bicycle", "mice", "geese", "bird", "boat"]


def test_normsim_inf_and_the_combined_recipe(ran, pool):
    root = ran[0]
    targets = unit(np.load(root / "data/sample_targets/l14_img.npy").astype(np.float32))
    assert targets.shape == (64, 768)
    sims = pool.img.astype(np.float64) @ targets.T
    t = pool.table(root, "normsim/in1k_standin")
    assert (t["uid"].to_numpy() == pool.uids).all() and set(t["target_set"]) == {"in1k_standin"}
    ns = t["normsim_inf"].to_numpy()
    np.testing.assert_allclose(ns, sims.max(1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(t["normsim_2"].to_numpy(), np.sqrt((sims ** 2).mean(1)), rtol=0, atol=1e-5)
    keep = datacomp_keep(ns, 0.3)
    kept = subset_uids(root / "subsets/normsim_inf.npy")
    assert len(kept) == 601 and sorted(kept) == sorted(pool.uids[keep])
    # the stand-in targets are 8 of the pool's concepts: the kept captions name them
    names = re.compile(r"\b(" + "|".join(TARGET_NOUNS) + r")\b")
    assert sum(bool(names.search(pool.texts[i])) for i in np.flatnonzero(keep)) == 560
    assert sum(bool(names.search(x)) for x in pool.texts) == 717
    # the combination: the top 30% by negCLIPLoss, then int(N * 0.2) of the pool by NormSim_inf
    # among those (position 400 of their values, descending; >= kept)
    first = datacomp_keep(pool.table(root, "negcliploss/l14")["value"].to_numpy(), 0.3)
    inner = np.sort(ns[first])[::-1]
    both = first & (ns >= inner[int(N * 0.2)])
    kept = subset_uids(root / "subsets/negcliploss_normsim.npy")
    assert len(kept) == 401 and sorted(kept) == sorted(pool.uids[both])


def clusters_of(root: Path, pool: Pool):
    """The cluster set's centroids, and each sample's nearest centroid by inner product
    (DataComp's assignment), checked against the shipped cluster_assignments."""
    cents = np.load(root / "data/sample_pool/features/clusters/sample_k16/centroids.npy")
    assert cents.shape == (16, 768)
    assign = np.argmax(pool.img @ cents.T, axis=1)
    t = pool.table(root, "cluster_assignments/sample_k16")
    assert (t["uid"].to_numpy() == pool.uids).all() and (t["cluster"].to_numpy() == assign).all()
    return cents.astype(np.float64), assign


def semdedup_by_hand(pool: Pool, cents, assign, eps: float):
    """Per cluster: members farthest from the centroid first (ties: file, row = pool order); a
    member goes when an earlier one has cosine > 1 - eps (float32) with it. Returns (kept mask,
    order within each cluster, distance to centroid, the largest cosine inside any cluster)."""
    x = unit(pool.img)
    c = unit(cents)
    dist = 1 - np.einsum("ij,ij->i", x, c[assign])
    keep = np.ones(N, bool)
    order = {}
    top = -1.0
    for k in np.unique(assign):
        idx = np.flatnonzero(assign == k)
        idx = idx[np.lexsort((idx, -dist[idx]))]  # farthest first, then pool order
        order[k] = idx
        s = x[idx] @ x[idx].T
        earlier = np.triu(s, 1)  # s[i, j] for i before j
        earlier[np.tril_indices(len(idx))] = -np.inf
        m = earlier.max(0)
        keep[idx[m > np.float32(1 - eps)]] = False
        if len(idx) > 1:
            top = max(top, float(m[1:].max()))
    return keep, order, dist, top


def test_semdedup(ran, pool):
    root = ran[0]
    cents, assign = clusters_of(root, pool)
    assert sorted(np.bincount(assign, minlength=16)) == [0, 5, 54, 125, 127, 133, 135, 137, 137, 138, 140, 145,
                                                          157, 160, 182, 225]
    keep, _, _, top = semdedup_by_hand(pool, cents, assign, 0.07)
    assert round(top, 3) == 0.695 and keep.all()  # no near duplicates: the default keeps everything
    assert sorted(subset_uids(root / "subsets/semdedup.npy")) == sorted(pool.uids)
    keep, _, _, _ = semdedup_by_hand(pool, cents, assign, 0.35)
    kept = subset_uids(root / "subsets/semdedup_eps035.npy")
    assert len(kept) == keep.sum() == 1802 and sorted(kept) == sorted(pool.uids[keep])
    assert subset_uids(root / "readme/subsets/semdedup.npy") == kept  # the README's command: eps 0.35


def qp_by_bisection(p: np.ndarray, n: np.ndarray, lb: np.ndarray, budget: int) -> np.ndarray:
    """x = clip(p * budget + lam, lb, n) with sum(x) = budget (the box-and-plane projection)."""
    lo, hi = -float(budget) - n.max(), float(budget) + n.max()
    for _ in range(200):
        lam = (lo + hi) / 2
        if np.clip(p * budget + lam, lb, n).sum() < budget:
            lo = lam
        else:
            hi = lam
    return np.clip(p * budget + (lo + hi) / 2, lb, n)


def test_dbp(ran, pool):
    root = ran[0]
    cents, assign = clusters_of(root, pool)
    survivors, order, dist, _ = semdedup_by_hand(pool, cents, assign, 0.07)
    assert survivors.all()
    c = unit(cents)
    present = [k for k in range(16) if (assign == k).any()]
    n = np.array([(assign == k).sum() for k in present])
    d_intra = np.array([dist[assign == k].mean() for k in present])
    cc = 1 - c @ c.T  # every other centroid is among the 20 nearest: there are 15
    d_inter = np.array([np.delete(cc[k], k).mean() for k in present])
    z = d_inter * d_intra / 0.5
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    budget = min(int(N * 0.5), int(n.sum()))
    lb = np.minimum(int(budget / len(present) * 0.5), n - 1)
    quota = np.rint(qp_by_bisection(p, n.astype(float), lb.astype(float), budget)).astype(int)
    q = pq.read_table(root / "data/sample_pool/features/dbp/sample_k16/_quotas.parquet").to_pandas()
    assert list(q["cluster"]) == present and list(q["quota"]) == list(quota)
    np.testing.assert_allclose(q["prob"], p, rtol=1e-5)
    keep = np.zeros(N, bool)
    for k, qk in zip(present, quota):
        keep[order[k][:qk]] = True  # the least prototypical: farthest from the centroid
    kept = subset_uids(root / "subsets/dbp.npy")
    assert len(kept) == quota.sum() == 999 and sorted(kept) == sorted(pool.uids[keep])


def test_decontaminate(ran, pool):
    root, outputs, _ = ran
    ev = np.load(root / "data/sample_evals/l14_img.npy")
    keys = pq.read_table(root / "data/sample_evals/keys.parquet").to_pandas()
    assert ev.shape == (19, 768) and keys["task"].value_counts().to_dict() == {"standin_a": 10, "standin_b": 9}
    sim = pool.img.astype(np.float64) @ unit(ev.astype(np.float32)).T
    near = sim >= 0.95
    # the planted copies and 0.97 near copies, nothing else (the 0.90 ones and fresh rows not)
    planted = set(keys.loc[keys["kind"].isin(["copy", "near 0.97"]), "pool_uid"])
    assert set(pool.uids[near.any(1)]) == planted and len(planted) == 8
    subset = subset_uids(root / "subsets/l14_30pct.npy")
    clean = subset_uids(root / "subsets/l14_30pct_clean.npy")
    assert len(subset) == 601 and sorted(clean) == sorted(u for u in subset if u not in planted)
    assert len(clean) == 597
    # per task, as the report prints it
    in_subset = np.isin(pool.uids, subset)
    for task in ("standin_a", "standin_b"):
        cols = (keys["task"] == task).to_numpy()
        removed = int((near[:, cols].any(1) & in_subset).sum())
        report = outputs[("docs/decontamination.md",
                          "curate decontam report --eval-set evals --subset subsets/l14_30pct.npy")]
        assert f"{task}: {removed} removed" in report
    assert "removed 4 of 601 rows" in report
    whole = outputs[("docs/decontamination.md", "curate decontam report --eval-set evals")]
    assert "removed 8 of 2,000 rows of the pool" in whole
    # the README's command: decontaminating the negCLIPLoss subset
    ncl = subset_uids(root / "readme/subsets/negcliploss_30pct.npy")
    assert sorted(subset_uids(root / "readme/subsets/negcliploss_30pct_clean.npy")) == sorted(
        u for u in ncl if u not in planted)


# -- the shipped stand-ins are what the code makes -------------------------------------------

def _set_json(path: Path) -> dict:
    meta = json.loads(path.read_text())
    meta.pop("created_at", None)
    meta.get("source", {}).get("kmeans", {}).pop("seconds", None)
    return meta


def test_the_shipped_stand_ins_are_what_the_code_makes(clone, tmp_path):
    """The pool and text feature tables of the example copied, a new catalog over them as
    ``build_example`` makes it, then ``build_method_examples``: the same files as shipped.
    (``tests/catalog/test_connection.py`` compares a whole fresh example's catalog.)"""
    from curate.catalog.connection import init_catalog, register_parquet_view
    from curate.demo.example import build_method_examples

    root, files = clone
    new = tmp_path / "fresh"
    for f in files:  # the example without the issue-19 files
        parts = Path(f).parts
        if f == "catalog.duckdb.example" or parts[1] in ("sample_targets", "sample_evals") or (
                len(parts) > 3 and parts[3] in NEW_FEATURES):
            continue
        (new / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / f, new / f)
    pool = new / "data/sample_pool"
    cat = init_catalog(new / "catalog.duckdb.example", pool=pool, relative=True, features_dir=pool / "features")
    for view in ("text_features", "text_lang_cld3"):  # their tables as shipped (the k-means caption prefilter)
        register_parquet_view(cat, view, sorted((pool / "features" / view).glob("*.parquet")), "*")
    build_method_examples(new, cat)
    made = sorted(p.relative_to(new).as_posix() for p in (new / "data").rglob("*") if p.is_file())
    assert made == sorted(f for f in files if f.startswith("data/"))
    for f in made:
        if f.endswith("set.json"):
            assert _set_json(new / f) == _set_json(REPO / f), f
        elif f.endswith(".parquet"):
            # float columns (similarities, centroids) to float32 rounding: BLAS/faiss sums in an
            # order that depends on the threads the machine gives them
            import pandas as pd

            pd.testing.assert_frame_equal(pq.read_table(new / f).to_pandas(), pq.read_table(REPO / f).to_pandas(),
                                          check_exact=False, rtol=1e-5, atol=1e-6, obj=f)
        elif f.endswith(".npy"):
            got, want = np.load(new / f), np.load(REPO / f)
            if got.dtype.kind == "f":
                assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6), f
            else:
                assert np.array_equal(got, want), f
        else:
            assert (new / f).read_bytes() == (REPO / f).read_bytes(), f


def test_shipped_tables_stay_current_whatever_their_mtimes(clone, tmp_path):
    """A checkout writes files in any order: a semdedup table newer than the dbp table built from
    it (or any other order) must not make dbp stale (it compared mtimes before)."""
    import os

    from curate.features.registry import producer
    from curate.features.tables import read_table_meta

    root, files = clone
    copy = tmp_path / "c"
    for f in files:
        (copy / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / f, copy / f)
    feats = copy / "data/sample_pool/features"
    for i, p in enumerate(sorted(feats.rglob("*"), reverse=True)):  # dbp oldest, semdedup newer, ...
        if p.is_file():
            os.utime(p, (1_000_000 + i, 1_000_000 + i))
    cat = copy / "catalog.duckdb.example"
    assert producer("dbp").is_current(cat, {"clusters": "sample_k16"})
    assert producer("semdedup").is_current(cat, {"clusters": "sample_k16"})
    assert producer("negcliploss").is_current(cat, {})
    assert producer("normsim").is_current(cat, {"targets": "in1k_standin"})
    assert producer("eval_neighbors").is_current(cat, {"eval_set": "evals", "threshold": 0.95})
    assert producer("cluster_assignments").is_current(cat, {"clusters": "sample_k16"})
    # but a semdedup table with other contents (same settings) makes dbp stale
    sd = sorted((feats / "semdedup/sample_k16").glob("*.parquet"))[0]
    t = pq.read_table(sd)
    ms = t.column("max_sim").to_numpy(zero_copy_only=False).copy()
    ms[np.nanargmax(ms)] = 0.999
    t = t.set_column(t.schema.get_field_index("max_sim"), t.schema.field("max_sim"),
                     pa.array(ms, pa.float32()))
    pq.write_table(t, sd, compression="zstd")
    assert read_table_meta(sd, b"curate.semdedup") is not None  # still a current-looking semdedup table
    assert producer("semdedup").is_current(cat, {"clusters": "sample_k16"})
    assert not producer("dbp").is_current(cat, {"clusters": "sample_k16"})
