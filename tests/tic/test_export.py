"""curate tic export and filters/tic/*.sql: every split equals the set TiC's files define.

Expected sets are computed from the generated TiC files with plain numpy / json (yearly: the
file itself; monthly: the monthly file minus the eval uids of both maps; eval: sorted unique
uids of each year's map), never from the exporter.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest

from curate.errors import CurateError
from curate.run.runner import run_filter
from curate.subset import npy_header, write_subset
from curate.tic import MONTHLY_DIR, YEARLY_DIR
from curate.tic.artifacts import make_tic_artifacts
from curate.tic.attach import attach
from curate.tic.export import SubsetStream, export_splits
from tests.conftest import REPO, uid_of
from tests.tic.test_attach import pairs, pool_uids

TIC = REPO / "filters" / "tic"


@pytest.fixture
def attached(make_catalog, tmp_path):
    rows = [{"uid": u} for u in pool_uids(300)]
    cat = make_catalog([rows[:180], rows[180:]])
    art = tmp_path / "art"
    make_tic_artifacts(cat, art)
    attach(cat, art)
    return cat, art


def eval_uids(art):
    r = json.loads((art / "tic-datacomp_retrieval_evals_year2uids.json").read_text())
    d = json.loads((art / "tic-datacompnet_year2uids.json").read_text())
    per = {("retrieval", y): set(v) for y, v in r.items()}
    for y, m in d.items():
        per[("datacompnet", y)] = {u for lst in m.values() for u in lst}
    return per


def test_export_equals_tic_files(attached, tmp_path):
    cat, art = attached
    out = tmp_path / "out"
    res = export_splits(cat, out)
    # yearly: byte-identical to TiC's yearly_noeval files
    years = sorted(p.stem for p in (art / YEARLY_DIR).glob("*.npy"))
    assert sorted(res.yearly) == years
    for y in years:
        assert (out / "yearly" / f"{y}.npy").read_bytes() == (art / YEARLY_DIR / f"{y}.npy").read_bytes()
    assert json.loads((out / "yearly" / "sizes.json").read_text()) == \
        json.loads((art / YEARLY_DIR / "sizes.json").read_text())
    # monthly: TiC's monthly file minus eval uids, sorted, DataComp subset format
    ev = eval_uids(art)
    all_eval = set().union(*ev.values())
    all_eval_pairs = pairs(all_eval)
    for f in sorted((art / MONTHLY_DIR).glob("*.npy")):
        want = np.setdiff1d(np.load(f), all_eval_pairs)
        got = np.load(out / "monthly" / f.name) if (out / "monthly" / f.name).exists() else want[:0]
        assert got.dtype == np.dtype("u8,u8") and (got == want).all() and len(got) == len(want), f.name
    # eval subsets: sorted unique per (task, year); alluids = their union
    for (task, y), uids in ev.items():
        got = np.load(out / "eval" / task / f"{y}.npy")
        assert (got == pairs(uids)).all() and len(got) == len(uids)
    assert (np.load(out / "eval" / "alluids.npy") == pairs(all_eval)).all()
    d = json.loads((art / "tic-datacompnet_year2uids.json").read_text())
    from tests.tic.test_attach import imagenet_wnids

    wn = imagenet_wnids()
    for y, m in d.items():
        want = {u: wn.index(w) for w, lst in m.items() for u in lst}
        assert json.loads((out / "eval" / "uid2classid" / f"{y}.json").read_text()) == want


def test_small_batches_give_the_same_files(attached, tmp_path, monkeypatch):
    """Splits spanning many Arrow batches (and batches spanning years) stream to the same bytes."""
    import curate.tic.export as ex

    cat, _ = attached
    export_splits(cat, tmp_path / "a")
    monkeypatch.setattr(ex, "BATCH", 7)
    export_splits(cat, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npy"))
    assert len(files) > 100
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert not [p for p in (tmp_path / "b").rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_streamed_npy_is_byte_identical_to_np_save(tmp_path, n):
    rec = np.sort(np.array([(i * 3, i) for i in range(n)], dtype="u8,u8"))
    s = SubsetStream(tmp_path / "a.npy")
    for start in range(0, n, 3):
        s.write(rec[start:start + 3])
    assert s.close() == n
    np.save(tmp_path / "b.npy", rec)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert len(npy_header(10**15)) == 128


def test_pool_duplicates_are_kept_like_the_resharder(make_catalog, tmp_path):
    uids = pool_uids(60)
    cat = make_catalog([[{"uid": u} for u in uids], [{"uid": uids[0]}]], allow_duplicate_uids=True)  # uid 0 twice in the pool
    make_tic_artifacts(cat, tmp_path / "a")
    attach(cat, tmp_path / "a")
    res = export_splits(cat, tmp_path / "o")
    from tests.tic.test_attach import expected

    yyyymm, task, _ = expected(uids[0])
    if task is None:
        got = np.load(tmp_path / "o" / "yearly" / f"{yyyymm // 100}.npy")
        assert (got == pairs([uids[0]])[0]).sum() == 2
    assert sum(res.yearly.values()) == sum(1 for u in uids if expected(u)[1] is None) + (task is None)


def test_filter_restricts_training_splits_only(attached, tmp_path):
    cat, art = attached
    keep = pool_uids(300)[::3]
    hi_lo = pairs(keep)
    write_subset(tmp_path / "keep.npy", hi_lo["f0"], hi_lo["f1"])
    full = export_splits(cat, tmp_path / "full")
    res = export_splits(cat, tmp_path / "f", tmp_path / "keep.npy")
    for y in full.yearly:
        want = np.intersect1d(np.load(tmp_path / "full" / "yearly" / f"{y}.npy"), hi_lo)
        got = np.load(tmp_path / "f" / "yearly" / f"{y}.npy") if y in res.yearly else want[:0]
        assert (got == want).all() and len(got) == len(want)
    assert res.retrieval == full.retrieval and res.datacompnet == full.datacompnet
    # a .sql filter with --set works the same way
    sql = tmp_path / "k.sql"
    sql.write_text("SET VARIABLE t = 0.5;\nSELECT uid FROM pool WHERE clip_b32_similarity_score >= getvariable('t')")
    res2 = export_splits(cat, tmp_path / "s", sql, {"t": 0.0})
    assert res2.yearly == full.yearly
    with pytest.raises(CurateError, match="--set applies to a .sql filter"):
        export_splits(cat, tmp_path / "x", tmp_path / "keep.npy", {"t": 1})


def test_split_filters_equal_the_export(attached, tmp_path, chdir_tmp):
    cat, art = attached
    export_splits(cat, tmp_path / "e")
    e = tmp_path / "e"
    run_filter(TIC / "year.sql", catalog=cat, out=tmp_path / "y.npy", sets={"year": 2017})
    assert (tmp_path / "y.npy").read_bytes() == (e / "yearly" / "2017.npy").read_bytes()
    run_filter(TIC / "month.sql", catalog=cat, out=tmp_path / "m.npy", sets={"month": 201803})
    assert (tmp_path / "m.npy").read_bytes() == (e / "monthly" / "201803.npy").read_bytes()
    run_filter(TIC / "cumulative.sql", catalog=cat, out=tmp_path / "c.npy")
    union = np.sort(np.concatenate([np.load(e / "yearly" / f"{y}.npy") for y in (2014, 2015, 2016)]))
    assert (np.load(tmp_path / "c.npy") == union).all()
    # year ∩ basic / bestpool: the subset file is a parameter (read_subset)
    basic = pool_uids(300)[::2]
    p = pairs(basic)
    (chdir_tmp / "subsets").mkdir()
    write_subset(chdir_tmp / "subsets" / "basic_filter.npy", p["f0"], p["f1"])
    run_filter(TIC / "year_basic.sql", catalog=cat, out=tmp_path / "yb.npy", sets={"year": 2017})
    assert (np.load(tmp_path / "yb.npy") == np.intersect1d(np.load(e / "yearly" / "2017.npy"), p)).all()
    shutil.copy(chdir_tmp / "subsets" / "basic_filter.npy", tmp_path / "bp.npy")
    run_filter(TIC / "year_bestpool.sql", catalog=cat, out=tmp_path / "ybp.npy",
               sets={"year": 2017, "bestpool": str(tmp_path / "bp.npy")})
    assert (tmp_path / "ybp.npy").read_bytes() == (tmp_path / "yb.npy").read_bytes()


def test_replay_buffers_are_exact_nested_and_the_lowest_md5(attached, tmp_path):
    # The rule, worked independently with hashlib: of the eligible uids (cumulative.sql: the
    # years' training data), the n whose md5(seed || uid) hex digest sorts first.
    cat, _ = attached
    run_filter(TIC / "cumulative.sql", catalog=cat, out=tmp_path / "all.npy", sets={"last_year": 2022})
    eligible = [f"{int(a):016x}{int(b):016x}" for a, b in np.load(tmp_path / "all.npy")]
    total = len(eligible)
    got = {}
    for n in (total + 5, total, 29, 14, 0):
        for seed in (0, 7):
            run_filter(TIC / "replay.sql", catalog=cat, out=tmp_path / f"r{n}_{seed}.npy",
                       sets={"first_year": 2014, "last_year": 2022, "samples": n, "seed": seed})
            got[n, seed] = {f"{int(a):016x}{int(b):016x}" for a, b in np.load(tmp_path / f"r{n}_{seed}.npy")}
            by_hash = sorted(eligible, key=lambda u: (hashlib.md5(f"{seed}{u}".encode()).hexdigest(), u))
            assert got[n, seed] == set(by_hash[:n]), (n, seed)
            assert len(got[n, seed]) == min(n, total)  # exact (capped at what exists)
    assert got[total + 5, 0] == set(eligible)
    assert got[14, 0] <= got[29, 0] <= got[total, 0]  # nested: halving keeps a subset
    assert got[29, 0] != got[29, 7]  # the seed picks another sample


def test_export_needs_attach(make_catalog, tmp_path):
    cat = make_catalog([[{"uid": uid_of(1)}]])
    with pytest.raises(CurateError, match="no timesplit view; run `curate tic attach"):
        export_splits(cat, tmp_path / "o")


def test_eval_sets_in_clip_benchmark_layout(tmp_path):
    """Real tars: the bundled sample pool's shards, resharded in one multi-output job."""
    import tarfile

    from curate.catalog.connection import init_catalog
    from curate.engine import Engine
    from curate.tic.evalsets import reshard_eval_sets

    cat = init_catalog(tmp_path / "c.duckdb", pool=REPO / "data" / "sample_pool")
    make_tic_artifacts(cat, tmp_path / "art")
    attach(cat, tmp_path / "art")
    out = tmp_path / "tic"
    export_splits(cat, out)
    res = reshard_eval_sets(out, REPO / "data" / "sample_pool" / "shards", engine=Engine(workers=1))
    ev = out / "eval"
    # a staging dir left by another export (other eval uids, another curate version) is replaced
    (ev / ".reshard" / "retrieval" / "2016" / ".curate_reshard.json").write_text('{"other": "job"}')
    again = reshard_eval_sets(out, REPO / "data" / "sample_pool" / "shards", engine=Engine(workers=1))
    assert again.dirs == res.dirs
    cls_all = {}
    for f in (ev / "uid2classid").glob("*.json"):
        cls_all.update(json.loads(f.read_text()))
    for task in ("retrieval", "datacompnet"):
        for npy in (ev / task).glob("*.npy"):
            d = ev / task / npy.stem
            n = int((d / "nshards.txt").read_text())
            count = int((d / "count.txt").read_text())
            assert sorted(p.name for p in d.glob("*.tar")) == [f"{i}.tar" for i in range(n)]
            assert (d / "dataset_type.txt").read_text().strip() == \
                {"retrieval": "retrieval", "datacompnet": "classification"}[task]
            want = {f"{int(a):016x}{int(b):016x}" for a, b in np.load(npy)}
            keys = {}
            for i in range(n):
                with tarfile.open(d / f"{i}.tar") as t:
                    for m in t.getmembers():
                        key, ext = m.name.split(".", 1)
                        keys.setdefault(key, {})[ext] = t.extractfile(m).read()
            assert len(keys) == count == res.dirs[str(d)]
            assert sum(json.loads((d / "sizes.json").read_text()).values()) == count
            assert {k.split("-")[0] for k in keys} <= want  # a few eval uids were never downloaded
            assert count >= len(want) - res.missing.get(str(d), 0)
            # what clip_benchmark's build_wds_dataset reads: {0..n-1}.tar with jpg + txt / cls
            import webdataset as wds

            urls = str(d / f"{{0..{n - 1}}}.tar")
            cols = ("jpg", "cls") if task == "datacompnet" else ("jpg", "txt")
            assert n and sum(1 for _ in wds.WebDataset(urls, shardshuffle=False).to_tuple(*cols)) == count
            if task == "datacompnet":
                for k, members in keys.items():
                    assert int(members["cls"]) == cls_all[k.split("-")[0]]
                assert len((d / "classnames.txt").read_text().splitlines()) == 1000
                assert (d / "classnames.txt").read_text().splitlines()[0] == "tench"
                tpl = (d / "zeroshot_classification_templates.txt").read_text().splitlines()
                assert len(tpl) == 80 and all("{c}" in t for t in tpl)
            else:
                assert all("cls" not in m for m in keys.values())
    # the task list curate eval reads: one task per eval dir, data found under the export dir
    from curate.evaluate.tasks import load_tasklist, task_dir

    tasks = load_tasklist(ev / "tasklist.yml")
    assert set(tasks) == {f"tic/datacomp/{t}/yearly/{p.stem}" for t in ("retrieval", "datacompnet")
                          for p in (ev / t).glob("*.npy")}
    for key, t in tasks.items():
        root, split = task_dir(out, key)
        assert split == "" and root == ev / key.split("/")[2] / key.split("/")[-1]
        assert t["size"] == int((root / "count.txt").read_text())
        assert t["main_metric"] == ("mean_recall@1" if "/retrieval/" in key else "acc1")


def test_year_intersect_real_basic_filter(make_catalog, tmp_path, chdir_tmp):
    """year_basic.sql and `export --filter filters/basic_filter.sql` against the real basic filter."""
    uids = pool_uids(80)
    rows = [{"uid": u, "text": "a photo of a dog on the grass" if i % 3 else "hi",
             "original_width": 256 if i % 5 else 100} for i, u in enumerate(uids)]
    cat = make_catalog([rows])
    make_tic_artifacts(cat, tmp_path / "a")
    attach(cat, tmp_path / "a")
    (chdir_tmp / "subsets").mkdir(exist_ok=True)
    run_filter(REPO / "filters" / "basic_filter.sql", catalog=cat, out=chdir_tmp / "subsets" / "basic_filter.npy")
    basic = np.load(chdir_tmp / "subsets" / "basic_filter.npy")
    assert len(basic) == sum(1 for i in range(80) if i % 3 and i % 5)
    res = export_splits(cat, tmp_path / "e", REPO / "filters" / "basic_filter.sql")
    full = export_splits(cat, tmp_path / "full")
    by_name = export_splits(cat, tmp_path / "n", "basic_filter")  # a bundled filter by name
    assert by_name.yearly == res.yearly
    assert all((tmp_path / "n" / "yearly" / f"{y}.npy").read_bytes() == (tmp_path / "e" / "yearly" / f"{y}.npy").read_bytes()
               for y in res.yearly)
    for y in full.yearly:
        want = np.intersect1d(np.load(tmp_path / "full" / "yearly" / f"{y}.npy"), basic)
        got = np.load(tmp_path / "e" / "yearly" / f"{y}.npy") if y in res.yearly else want[:0]
        assert (got == want).all() and len(got) == len(want)
        run_filter(TIC / "year_basic.sql", catalog=cat, out=tmp_path / "yb.npy", sets={"year": int(y)})
        assert (np.load(tmp_path / "yb.npy") == want).all()


def test_years_without_training_samples_get_size_zero_and_plan_skips_them(make_catalog, tmp_path):
    """A pool where 2015 holds only eval uids and 2017 nothing at all: export records both as 0
    (with an empty file, so the export stays attachable) and `tic plan` leaves them out."""
    from curate.tic.plan import make_plan
    from tests.tic.test_attach import expected

    role = {u: expected(u) for u in pool_uids(700)}
    uids = [u for u, (m, task, _) in role.items() if m // 100 != 2017 and (m // 100 != 2015 or task)]
    assert any(role[u][0] // 100 == 2015 for u in uids)  # 2015 is there, as eval uids only
    cat = make_catalog([[{"uid": u} for u in uids]])
    make_tic_artifacts(cat, tmp_path / "a")
    attach(cat, tmp_path / "a")
    export_splits(cat, tmp_path / "o")
    want = {str(y): sum(1 for u in uids if role[u][0] // 100 == y and role[u][1] is None) for y in range(2014, 2023)}
    assert want["2015"] == want["2017"] == 0 and all(want[str(y)] for y in (2014, 2016, 2018, 2022))
    sizes = json.loads((tmp_path / "o" / "yearly" / "sizes.json").read_text())
    assert sizes == want
    for y in ("2015", "2017"):
        empty = np.load(tmp_path / "o" / "yearly" / f"{y}.npy")
        assert empty.dtype == np.dtype("u8,u8") and len(empty) == 0
    # the export is a valid TiC yearly dir: attach reads it back (count = sizes.json entry)
    (tmp_path / "back" / YEARLY_DIR).mkdir(parents=True)
    for f in (tmp_path / "o" / "yearly").iterdir():
        shutil.copy(f, tmp_path / "back" / YEARLY_DIR / f.name)
    attach(make_catalog([[{"uid": u} for u in uids]]), tmp_path / "back")
    table = [  # (strategy, steps, the years each step trains on: new/old/replay entries)
        ("sequential", [2016, 2018], [[2014, 2016], [2018]]),
        ("cumulative-all", [2016, 2018], [[2014, 2016], [2014, 2016, 2018]]),
        ("cumulative-exp", [2015, 2017, 2018], [[2014], [2014, 2015, 2016], [2014, 2015, 2016, 2017, 2018]]),
        ("oracle", [2016, 2018], [[2014, 2016, 2018]]),
    ]
    for strategy, steps, years in table:
        p = make_plan(strategy, steps, 100, sizes)
        assert [sorted({y for d in s["data"] for y in d["years"]}) for s in p["steps"]] == years, strategy
        assert all(d["samples"] > 0 for s in p["steps"] for d in s["data"]), strategy
    with pytest.raises(CurateError, match=r"step 2017 \(years 2017..2017\): no training samples"):
        make_plan("sequential", [2016, 2017], 100, sizes)
