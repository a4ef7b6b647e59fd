"""TiC-YFCC15M and TiC-RedCaps recipes, time views and the reproducible train/test split."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import connect, init_catalog
from curate.errors import CurateError
from curate.pool.build import build_pool
from curate.pool.recipes import redcaps, yfcc15m
from curate.pool.recipes.periods import (YFCC15M_GROUPS, create_time_views, parse_groups,
                                    holdout_size)
from curate.run.runner import run_filter
from tests.conftest import REPO, uid_of
from tests.cli.test_main import invoke
from tests.pool.test_build import PNG_1x1, jpeg


def hash_rank(uids, seed="0"):
    """The documented split key, computed here with hashlib: sha256_hex(f"{seed}:{uid}")."""
    return sorted(uids, key=lambda u: (hashlib.sha256(f"{seed}:{u}".encode()).hexdigest(), u))


# --- YFCC15M caption and groups ----------------------------------------------------------------

@pytest.mark.parametrize("title, description, usertags, expected", [
    ("Hello+World", "a+b", "tag1,tag2", "Hello World. a b. tag1,tag2"),
    (None, None, None, ". . "),  # missing fields are "" (TiC: NaN -> "")
    ("Caf%C3%A9", "<a href=\"x\">link</a> text", "", "Café. link text. "),
    ("cafÃ©", "", "", "café. . "),  # ftfy repairs the mojibake
    ("1+%2B+1", "100%25", "", "1 + 1. 100%. "),  # %2B is a literal plus
    ("<b>bold</b>", "a < b > c", "y", "bold. a  c. y"),  # non-greedy '<.*?>', also on non-tags
    ("東京", "猫" * 600, "", "東京. " + "猫" * 496),  # 500 code points, not bytes
])
def test_yfcc_caption(title, description, usertags, expected):
    assert yfcc15m.caption(title, description, usertags) == expected


@pytest.mark.parametrize("year, group", [
    (2003, None), (2004, "2004-2008"), (2008, "2004-2008"), (2009, "2009-2010"), (2010, "2009-2010"),
    (2011, "2011-2012"), (2012, "2011-2012"), (2013, "2013-2014"), (2014, "2013-2014"), (2015, None),
])
def test_yfcc_year_group(year, group):
    assert yfcc15m.year_group(year) == group


def test_yfcc_image_path():
    assert yfcc15m.image_path("d29e7c6a3028418c64eb15e3cf577c2") == "d29/e7c/d29e7c6a3028418c64eb15e3cf577c2.jpg"


@pytest.mark.parametrize("spec, groups", [
    ("2004-2008,2009-2010,2011-2012,2013-2014", YFCC15M_GROUPS),
    ("2017, 2018", [("2017", 2017, 2017), ("2018", 2018, 2018)]),
])
def test_parse_groups(spec, groups):
    assert parse_groups(spec) == groups


@pytest.mark.parametrize("spec", ["2004-2008,2008-2010", "2010-2009", "20x4", "2012,2011"])
def test_parse_groups_rejects(spec):
    with pytest.raises(CurateError):
        parse_groups(spec)


# --- the split: sizes and membership ------------------------------------------------------------

@pytest.mark.parametrize("n, expected", [(1, 1), (99, 1), (100, 1), (101, 2), (199, 2), (250, 3), (700, 7)])
def test_holdout_size_is_sklearn_rule(n, expected):
    assert holdout_size(n) == expected == math.ceil(0.01 * n)


def time_catalog(tmp_path, periods: dict[int, int]):
    """A catalog whose pool has `time_utc`: periods maps year -> number of samples (mid-year)."""
    uids, times, i = [], [], 0
    for year, n in periods.items():
        for _ in range(n):
            uids.append(uid_of(i))
            times.append(dt.datetime(year, 6, 1) + dt.timedelta(hours=i))
            i += 1
    n = len(uids)
    meta = tmp_path / "pool" / "metadata"
    meta.mkdir(parents=True)
    pq.write_table(pa.table({
        "uid": uids, "url": ["x"] * n, "text": ["t"] * n,
        "original_width": pa.array([1] * n, pa.int64()), "original_height": pa.array([1] * n, pa.int64()),
        "clip_b32_similarity_score": pa.array([None] * n, pa.float32()),
        "clip_l14_similarity_score": pa.array([None] * n, pa.float32()),
        "face_bboxes": pa.array([None] * n, pa.list_(pa.list_(pa.float64()))),
        "sha256": ["0" * 64] * n, "time_utc": pa.array(times, pa.timestamp("us")),
    }), meta / "00000000.parquet")
    cat = tmp_path / "c.duckdb"
    init_catalog(cat, pool=tmp_path / "pool")
    return cat, uids


def test_split_sizes_and_members_per_period(tmp_path):
    sizes = {2015: 1, 2016: 99, 2017: 100, 2018: 101, 2019: 250}
    cat, uids = time_catalog(tmp_path, sizes)
    counts = create_time_views(cat)  # default: every year is its own period
    assert counts == [("2015", 0, 1), ("2016", 98, 1), ("2017", 99, 1), ("2018", 99, 2), ("2019", 247, 3)]
    con = connect(cat)
    start = 0
    for year, n in sizes.items():
        members = uids[start:start + n]
        start += n
        got = {u for (u,) in con.execute(
            "SELECT uid FROM period_split WHERE period = ? AND split = 'test'", [str(year)]).fetchall()}
        assert got == set(hash_rank(members)[:math.ceil(0.01 * n)])
    con.close()
    # another seed, another (equally sized) test set
    create_time_views(cat, seed=7)
    con = connect(cat)
    got = {u for (u,) in con.execute("SELECT uid FROM period_split WHERE period = '2019' AND split = 'test'").fetchall()}
    assert got == set(hash_rank(uids[300:550], "7")[:3]) and got != set(hash_rank(uids[300:550])[:3])
    con.close()


def test_pinned_test_uids_from_a_built_pool(tmp_path):
    """150 samples of one fixed PNG with captions 'photo 0'..'photo 149', all uploaded in 2010.
    Expected uids worked out with hashlib from the documented definitions (see docs)."""
    img = tmp_path / "one.png"
    img.write_bytes(PNG_1x1)
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "dateuploaded"])
        w.writerows([("one.png", f"photo {i}", 1262304000 + i) for i in range(150)])
    results = []
    for run in ("a", "b"):  # two independent builds: same test uids
        build_pool(table, tmp_path / run, "path", "caption", time_col="dateuploaded", progress=False)
        init_catalog(tmp_path / f"{run}.duckdb", pool=tmp_path / run)
        assert create_time_views(tmp_path / f"{run}.duckdb", groups=YFCC15M_GROUPS) == [("2009-2010", 148, 2)]
        con = connect(tmp_path / f"{run}.duckdb")
        results.append(sorted(u for (u,) in con.execute("SELECT uid FROM period_split WHERE split = 'test'").fetchall()))
        con.close()
    # 'photo 48' -> 0da1710c..., 'photo 92' -> 1474454e...: the two smallest sha256("0:" + uid)
    assert results[0] == results[1] == ["0da1710cfdc9c2fb1d04b9077b43e224", "1474454e13f68a5c7fcfce1f5c4f0b30"]


def test_time_view_errors(tmp_path):
    cat, _ = time_catalog(tmp_path, {2015: 3})
    with pytest.raises(CurateError, match="no time column 'taken'"):
        create_time_views(cat, time_col="taken")
    with pytest.raises(CurateError, match="type VARCHAR, not TIMESTAMP"):
        create_time_views(cat, time_col="text")
    with pytest.raises(CurateError, match="not both"):
        create_time_views(cat, groups=YFCC15M_GROUPS, period_col="text")


# --- TiC-YFCC15M end to end ---------------------------------------------------------------------

YFCC_ROWS = [
    # key, title, description, usertags, dateuploaded (UTC), what happens
    ("aaa000photo1", "Sunset+over+the+sea", "taken+from+the+pier", "sea,sunset", 1072915200),  # 2004-01-01 00:00:00
    ("aaa000photo2", "Caf%C3%A9+in+Paris", "<i>lovely</i>", "paris", 1230767999),  # 2008-12-31 23:59:59
    ("aaa001photo3", "東京の夜", "", "tokyo,night", 1230768000),  # 2009-01-01 00:00:00
    ("aaa001photo4", "Snow", "deep+snow", "", 1293839999),  # 2010-12-31 23:59:59
    ("aab000photo5", "Dog", "", "dog", 1293840000),  # 2011-01-01 00:00:00
    ("aab000photo6", "Cat", "", "", 1356998399),  # 2012-12-31 23:59:59
    ("aab000photo7", "Bike", "", "", 1356998400),  # 2013-01-01 00:00:00
    ("aab001photo8", "Boat", "", "", 1420070399),  # 2014-12-31 23:59:59
    ("aab001photo9", "Too+new", "", "", 1420070400),  # 2015-01-01: no group, left out
    ("aab001photoA", "Too+old", "", "", 1072915199),  # 2003-12-31 23:59:59: no group
    ("aac000photoB", "Missing+file", "", "", 1300000000),  # image not on disk
    ("aac000photoC", "Corrupt+file", "", "", 1300000000),  # image not decodable
]


@pytest.fixture
def yfcc_dir(tmp_path):
    root = tmp_path / "yfcc"
    images = root / "images"
    for i, (key, *_rest) in enumerate(YFCC_ROWS):
        if key == "aac000photoB":
            continue
        p = images / yfcc15m.image_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8 not really" if key == "aac000photoC" else jpeg((i * 20, 100, 50)))
    with open(root / "yfcc15m.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["photoid", "uid", "key", "title", "description", "usertags", "dateuploaded"])
        for i, (key, title, desc, tags, up) in enumerate(YFCC_ROWS):
            w.writerow([str(1000 + i), f"user{i}@N00", key, title, desc, tags, up])
    return root


def test_yfcc15m_recipe_end_to_end(yfcc_dir, tmp_path):
    out, cat = tmp_path / "pool", tmp_path / "yfcc.duckdb"
    res = invoke("pool", "recipe", "yfcc15m", "--csv", yfcc_dir / "yfcc15m.csv", "--images",
                 yfcc_dir / "images", "--out", out, "--catalog", cat)
    assert res.exit_code == 0, res.output
    assert "12 rows, 10 uploaded in 2004-2014, 2 not mapped" in res.output
    assert "8 samples from 10 table rows" in res.output
    con = connect(cat)
    got = dict(con.execute("SELECT p.photoid, t.period FROM timesplit t JOIN pool p USING (uid)").fetchall())
    assert got == {"1000": "2004-2008", "1001": "2004-2008", "1002": "2009-2010", "1003": "2009-2010",
                   "1004": "2011-2012", "1005": "2011-2012", "1006": "2013-2014", "1007": "2013-2014"}
    texts = dict(con.execute("SELECT photoid, text FROM pool").fetchall())
    assert texts["1001"] == "Café in Paris. lovely. paris"
    assert texts["1002"] == "東京の夜. . tokyo,night"
    assert con.execute("SELECT DISTINCT source_uid FROM pool WHERE photoid = '1000'").fetchone() == ("user0@N00",)
    # two samples per group: 1 test (ceil(0.02)), 1 train, the smaller hash key is the test one
    for period in ("2004-2008", "2009-2010", "2011-2012", "2013-2014"):
        rows = dict(con.execute("SELECT uid, split FROM period_split WHERE period = ?", [period]).fetchall())
        assert sorted(rows.values()) == ["test", "train"]
        assert rows[hash_rank(rows)[0]] == "test"
    test_uids = {u for (u,) in con.execute("SELECT uid FROM tic_eval").fetchall()}
    con.close()
    assert len(test_uids) == 4
    # TiC's split filter runs on this catalog: the year's training data, test uids removed
    r = run_filter(REPO / "filters" / "tic" / "year.sql", cat, tmp_path / "y2008.npy", {"year": 2008})
    assert r.count == len(_uids_of_year(cat, 2008) - test_uids)
    # export: subset files per period and split
    res = invoke("pool", "export-splits", cat, "--out", tmp_path / "splits")
    assert res.exit_code == 0, res.output
    sizes = json.loads((tmp_path / "splits" / "sizes.json").read_text())
    assert sizes == {p: {"train": 1, "test": 1} for p in ("2004-2008", "2009-2010", "2011-2012", "2013-2014")}
    assert np.load(tmp_path / "splits" / "2004-2008" / "test.npy").dtype == np.dtype("u8,u8")
    # TiC-DataComp's one-pass export works on this catalog through its time column
    from curate.tic.export import export_splits

    exp = export_splits(cat, tmp_path / "tic")
    assert sum(exp.yearly.values()) == 4
    assert exp.retrieval == {"2008": 1, "2010": 1, "2012": 1, "2014": 1}  # one eval set per group
    # every year from the first to the last, 0 where no training sample (tic plan skips those)
    assert exp.yearly == {str(y): len(_uids_of_year(cat, y) - test_uids) for y in range(2004, 2015)}
    assert exp.yearly["2005"] == 0 and exp.yearly["2004"] > 0
    # rerun: nothing to do
    res = invoke("pool", "recipe", "yfcc15m", "--csv", yfcc_dir / "yfcc15m.csv", "--images",
                 yfcc_dir / "images", "--out", out)
    assert res.exit_code == 0 and "already complete (8 samples" in res.output


def _uids_of_year(cat, year):
    con = connect(cat)
    try:
        return {u for (u,) in con.execute("SELECT uid FROM timesplit WHERE year = ?", [year]).fetchall()}
    finally:
        con.close()


def test_yfcc15m_bad_table(tmp_path):
    bad = tmp_path / "y.csv"
    bad.write_text("key,title,dateuploaded\nabc,x,1\n")
    res = invoke("pool", "recipe", "yfcc15m", "--csv", bad, "--images", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "missing column(s) description, usertags" in res.output
    bad.write_text("key,title,description,usertags,dateuploaded\nabc,x,,,yesterday\n")
    res = invoke("pool", "recipe", "yfcc15m", "--csv", bad, "--images", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "row 0, column 'dateuploaded': 'yesterday' is not Unix seconds" in res.output


# --- TiC-RedCaps end to end ---------------------------------------------------------------------

def redcaps_ann(image_id, subreddit, caption, created):
    return {"image_id": image_id, "author": "someone", "url": f"https://i.redd.it/{image_id}.jpg",
            "raw_caption": caption.upper(), "caption": caption, "subreddit": subreddit, "score": 12,
            "created_utc": created, "permalink": f"/r/{subreddit}/comments/{image_id}/",
            "crosspost_parents": None}


def test_redcaps_recipe_end_to_end(tmp_path):
    ann, images = tmp_path / "annotations", tmp_path / "images"
    ann.mkdir()
    files = {
        "pics_2017.json": [redcaps_ann("a1", "pics", "a dog on a beach", 1483228800),  # 2017-01-01 00:00
                           redcaps_ann("a2", "pics", "ein Hund 🐕", 1514764799)],  # 2017-12-31 23:59:59
        "pics_2018.json": [redcaps_ann("b1", "pics", "my cat", 1514764800)],
        "earth_porn_2019.json": [redcaps_ann("c1", "earth_porn", "mountains at dawn", 1561939200),  # 2019-07-01
                                 redcaps_ann("c2", "earth_porn", "no image here", 1561939200)],
        "pics_2021.json": [redcaps_ann("d1", "pics", "not a TiC year", 1625097600)],
    }
    for name, anns in files.items():
        (ann / name).write_text(json.dumps({"info": {}, "annotations": anns}))
        for a in anns:
            if a["image_id"] != "c2":
                p = images / a["subreddit"] / f"{a['image_id']}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(jpeg((len(a["caption"]) * 9 % 255, 0, 0)))
    out, cat = tmp_path / "pool", tmp_path / "r.duckdb"
    res = invoke("pool", "recipe", "redcaps", "--annotations", ann, "--images", images, "--out", out,
                 "--catalog", cat)
    assert res.exit_code == 0, res.output
    assert "2017: 2, 2018: 1, 2019: 2 annotations" in res.output
    assert "4 samples from 5 table rows" in res.output
    con = connect(cat)
    rows = con.execute("SELECT p.image_id, p.url, p.subreddit, t.year, t.month, t.period FROM pool p "
                       "JOIN timesplit t USING (uid) ORDER BY p.image_id").fetchall()
    assert rows == [("a1", "https://i.redd.it/a1.jpg", "pics", 2017, 1, "2017"),
                    ("a2", "https://i.redd.it/a2.jpg", "pics", 2017, 12, "2017"),
                    ("b1", "https://i.redd.it/b1.jpg", "pics", 2018, 1, "2018"),
                    ("c1", "https://i.redd.it/c1.jpg", "earth_porn", 2019, 7, "2019")]
    counts = con.execute("SELECT period, split, count(*) FROM period_split GROUP BY ALL ORDER BY ALL").fetchall()
    assert counts == [("2017", "test", 1), ("2017", "train", 1), ("2018", "test", 1), ("2019", "test", 1)]
    con.close()


def test_redcaps_bad_annotations(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "pics_2018.json").write_text(json.dumps({"annotations": [{"image_id": "x", "caption": "c"}]}))
    with pytest.raises(CurateError, match=r"pics_2018.json: annotation 0: field 'subreddit' is None"):
        redcaps.prepare_table(ann, tmp_path / "t.parquet", progress=False)
    (ann / "pics_2018.json").write_text("{not json")
    with pytest.raises(CurateError, match=r"pics_2018.json: not a RedCaps annotation file"):
        redcaps.prepare_table(ann, tmp_path / "t.parquet", progress=False)
    with pytest.raises(CurateError, match=r"no annotation files"):
        redcaps.prepare_table(ann, tmp_path / "t.parquet", years=(2017,), progress=False)


def test_existing_catalog_is_refused_before_building(yfcc_dir, tmp_path):
    cat = tmp_path / "taken.duckdb"
    cat.write_text("not mine")
    res = invoke("pool", "recipe", "yfcc15m", "--csv", yfcc_dir / "yfcc15m.csv", "--images",
                 yfcc_dir / "images", "--out", tmp_path / "pool", "--catalog", cat)
    assert res.exit_code == 1 and "already exists (use --overwrite" in res.output
    assert not (tmp_path / "pool").exists()


def test_tic_plan_on_a_timestamped_pool_with_first_year(tmp_path):
    """docs/timestamped-pools.md: `curate tic plan --first-year 2004 --steps 2008,2010,2012,2014`
    on a pool with a time column grouped as TiC-YFCC15M (three samples in every year 2004-2014),
    after `curate tic export`. Expected sizes by hand: each group holds 3 x its years samples,
    one of them (ceil(1% of n)) is the group's test sample, removed from the yearly training data."""
    cat, uids = time_catalog(tmp_path, {y: 3 for y in range(2004, 2015)})
    create_time_views(cat, time_col="time_utc", groups=YFCC15M_GROUPS)
    res = invoke("tic", "export", cat, "--out", tmp_path / "tic")
    assert res.exit_code == 0, res.output
    yearly = json.loads((tmp_path / "tic" / "yearly" / "sizes.json").read_text())
    assert sum(yearly.values()) == 33 - 4  # one test sample per group
    res = invoke("tic", "plan", "--strategy", "cumulative-all", "--first-year", "2004", "--steps",
                 "2008,2010,2012,2014", "--budget", "8", "--sizes", tmp_path / "tic", "--out", tmp_path / "plan.json")
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'plan.json'} (cumulative-all, 4 steps)" in res.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == ["2008", "2010", "2012", "2014"]
    # cumulative-all: a step trains on every year up to its own; the first covers 2004-2008
    assert [sorted({y for d in s["data"] for y in d["years"]}) for s in plan["steps"]] == [
        list(range(2004, 2009)), list(range(2004, 2011)), list(range(2004, 2013)), list(range(2004, 2015))]
    # without --first-year the plan keeps TiC-DataComp's range (2014-) and says so
    res = invoke("tic", "plan", "--strategy", "cumulative-all", "--steps", "2008,2010", "--sizes", tmp_path / "tic",
                 "--out", tmp_path / "p2.json")
    assert res.exit_code == 1 and res.output.startswith("error: ") and not (tmp_path / "p2.json").exists()
