"""Pools from a folder of real image files and a table: layout, uids, failures, resume, bad input."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pool import build as poolbuild
from curate.catalog.connection import connect, init_catalog
from curate.errors import CurateError
from curate.pool.build import build_pool, failures, parse_time, sample_uid
from curate.shards.tar import TarWriter, tar_header

# A 1x1 RGBA PNG as fixed bytes: uids of samples using it do not depend on an encoder version.
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
PNG_1x1_SHA = "497790947d4666760ce38f3c00e852c71fdb66cae849bae8e9ede352719e1581"


def tree_digest(root: Path) -> dict:
    """Every file under root -> (sha256, size, mtime_ns): to show sources are never touched."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def jpeg(color, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(color, size=(10, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def photo_dir(tmp_path):
    """src/images/* (JPEG, PNG, GIF, a corrupt and a truncated file) and src/photos.csv."""
    src = tmp_path / "src"
    img = src / "images"
    (img / "sub").mkdir(parents=True)
    (img / "a.jpg").write_bytes(jpeg((200, 10, 10)))
    (img / "b.png").write_bytes(png((10, 200, 10)))
    (img / "sub" / "c.jpg").write_bytes(jpeg((10, 10, 200), size=(33, 7)))
    (img / "one.png").write_bytes(PNG_1x1)
    gif = io.BytesIO()
    Image.new("P", (5, 4), 3).save(gif, format="GIF")
    (img / "d.gif").write_bytes(gif.getvalue())
    (img / "corrupt.jpg").write_bytes(b"this is not an image at all")
    (img / "truncated.jpg").write_bytes(jpeg((1, 2, 3), size=(64, 64))[:200])
    rows = [
        # path, caption, time, photo_id (leading zeros must survive), uid (clashes with the pool's)
        ("images/a.jpg", "Café crème – 東京の猫 🐱", "2008-12-31T23:59:59Z", "007", "u1"),
        ("images/b.png", "line one\nline two, \"quoted\"", "1230768000", "008", "u2"),
        ("images/sub/c.jpg", "NA", "2011-01-01 00:00:00", "009", "u3"),
        ("images/missing.jpg", "gone", "1230768000", "010", "u4"),
        ("images/corrupt.jpg", "bad bytes", "1230768000", "011", "u5"),
        ("images/truncated.jpg", "cut short", "1230768000", "012", "u6"),
        ("images/one.png", "photo 0", "1072915200", "013", "u7"),
        ("images/one.png", "photo 0", "1072915200", "014", "u8"),  # same bytes + caption: duplicate
        ("images/one.png", "photo 1", "1420070399", "015", "u9"),  # same bytes, other caption: kept
        ("images/d.gif", "", "2013-06-15T12:00:00+02:00", "016", "u10"),
    ]
    with open(src / "photos.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "taken", "photo_id", "uid"])
        w.writerows(rows)
    return src


def build(photo_dir, out, **kw):
    kw.setdefault("time_col", "taken")
    return build_pool(photo_dir / "photos.csv", out, "path", "caption", progress=False, **kw)


def test_pool_layout_uids_and_failures(photo_dir, tmp_path):
    before = tree_digest(photo_dir)
    out = tmp_path / "pool"
    res = build(photo_dir, out)
    assert tree_digest(photo_dir) == before  # sources never modified or deleted
    assert (res.rows, res.samples, res.shards) == (10, 6, 1)
    assert res.failed == {"failed_to_download": 1, "failed_to_resize": 2, "duplicate": 1}

    meta = pq.read_table(out / "metadata" / "00000000.parquet").to_pylist()
    assert [m["photo_id"] for m in meta] == ["007", "008", "009", "013", "015", "016"]
    by_id = {m["photo_id"]: m for m in meta}
    # pinned by hand: sha256 of the fixed PNG, uid = sha256(sha_hex + "\n" + caption)[:32]
    assert by_id["013"]["sha256"] == PNG_1x1_SHA
    assert by_id["013"]["uid"] == "659b60fb2f34fa0fd3d94a9a126704c7"
    assert by_id["015"]["uid"] == "70799e2ddcfa0963dfb254d30933df61"
    for m in meta:
        data = (photo_dir / m["url"]).read_bytes()
        assert m["sha256"] == hashlib.sha256(data).hexdigest()
        assert m["uid"] == hashlib.sha256(f"{m['sha256']}\n{m['text']}".encode()).hexdigest()[:32]
        assert m["clip_b32_similarity_score"] is None and m["face_bboxes"] is None
    assert by_id["007"]["text"] == "Café crème – 東京の猫 🐱"
    assert by_id["008"]["text"] == 'line one\nline two, "quoted"'
    assert by_id["009"]["text"] == "NA"  # a caption, not a missing value
    assert by_id["016"]["text"] == ""
    assert (by_id["007"]["original_width"], by_id["007"]["original_height"]) == (24, 16)
    assert (by_id["009"]["original_width"], by_id["009"]["original_height"]) == (33, 7)
    assert (by_id["016"]["original_width"], by_id["016"]["original_height"]) == (5, 4)
    assert by_id["008"]["source_uid"] == "u2"  # a table column named like a pool column is renamed
    assert by_id["007"]["taken"] == "2008-12-31T23:59:59Z"  # kept verbatim
    assert by_id["007"]["time_utc"] == dt.datetime(2008, 12, 31, 23, 59, 59)
    assert by_id["008"]["time_utc"] == dt.datetime(2009, 1, 1)
    assert by_id["016"]["time_utc"] == dt.datetime(2013, 6, 15, 10, 0)  # +02:00 -> UTC

    # shards: img2dataset layout; metadata row r <-> key r of shard 0
    with tarfile.open(out / "shards" / "00000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert sorted(members) == sorted(
        f"{r:012d}.{ext}" for r, e in enumerate(["jpg", "png", "jpg", "png", "png", "png"])
        for ext in (e, "txt", "json"))
    for r, m in enumerate(meta):
        js = json.loads(members[f"{r:012d}.json"])
        assert (js["uid"], js["key"], js["status"], js["sha256"]) == (m["uid"], f"{r:012d}", "success", m["sha256"])
        assert members[f"{r:012d}.txt"].decode() == m["text"]
    assert members["000000000000.jpg"] == (photo_dir / "images/a.jpg").read_bytes()  # bytes as read
    assert Image.open(io.BytesIO(members["000000000005.png"])).size == (5, 4)  # GIF re-encoded as PNG
    stats = json.loads((out / "shards" / "00000000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (10, 6, 1, 2)

    shard_rows = pq.read_table(out / "shards" / "00000000.parquet").to_pylist()
    assert [r["key"] for r in shard_rows] == [f"{r:012d}" for r in range(6)]  # samples only, key order
    assert {r["status"] for r in shard_rows} == {"success"}
    assert [r["source_row"] for r in shard_rows] == [0, 1, 2, 6, 8, 9]
    fails = {r["source_row"]: (r["status"], r["error_message"]) for r in failures(out).to_pylist()}
    assert sorted(fails) == [3, 4, 5, 7]
    assert fails[3] == ("failed_to_download", "image file not found")
    assert fails[4][0] == fails[5][0] == "failed_to_resize"
    assert fails[7] == ("duplicate", "same image bytes and caption as table row 6")

    # the shard checker of `curate shards` accepts the shards as img2dataset's
    from tests.cli.test_main import invoke

    res = invoke("shards", "verify", out / "shards")
    assert res.exit_code == 0 and "6 samples in 1 tars: ok" in res.output, res.output

    # the catalog takes the pool as it is; the uid rule holds in SQL too
    cat = tmp_path / "c.duckdb"
    init_catalog(cat, pool=out)
    con = connect(cat)
    assert con.execute("SELECT count(*) FROM pool WHERE sha256(sha256 || chr(10) || text)[1:32] = uid").fetchone()[0] == 6
    assert con.execute("SELECT typeof(time_utc), typeof(photo_id) FROM pool LIMIT 1").fetchone() == ("TIMESTAMP", "VARCHAR")
    con.close()


@pytest.mark.parametrize("value, fmt, expected", [
    (1230768000, "auto", dt.datetime(2009, 1, 1)),
    ("1230767999", "auto", dt.datetime(2008, 12, 31, 23, 59, 59)),
    (1230768000.5, "unix", dt.datetime(2009, 1, 1, 0, 0, 0, 500000)),
    ("1230768000000", "unix_ms", dt.datetime(2009, 1, 1)),
    (" 1230768000.25 ", "auto", dt.datetime(2009, 1, 1, 0, 0, 0, 250000)),
    ("253402300799", "unix", dt.datetime(9999, 12, 31, 23, 59, 59)),  # exact: integer arithmetic
    (-1, "unix", dt.datetime(1969, 12, 31, 23, 59, 59)),
    ("2009-01-01", "auto", dt.datetime(2009, 1, 1)),
    ("2009-01-01T01:30:00+01:30", "iso", dt.datetime(2009, 1, 1)),
    ("2008-01-03 15:40:29.0", "auto", dt.datetime(2008, 1, 3, 15, 40, 29)),  # YFCC's datetaken
    ("2017", "year", dt.datetime(2017, 1, 1)),
    (2017, "auto", dt.datetime(1970, 1, 1, 0, 33, 37)),  # a bare number is Unix seconds
    (dt.datetime(2010, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5))), "auto", dt.datetime(2010, 5, 1, 17)),
    (dt.date(2012, 2, 29), "auto", dt.datetime(2012, 2, 29)),
])
def test_parse_time(value, fmt, expected):
    assert parse_time(value, fmt) == expected


@pytest.mark.parametrize("value, fmt", [(None, "auto"), ("yesterday", "auto"), ("2009-13-01", "iso"),
                                        ("nan", "unix"), (5, "iso"), ("20x7", "year"),
                                        (True, "auto"), ("253402300800", "unix")])
def test_parse_time_rejects(value, fmt):
    with pytest.raises(ValueError):
        parse_time(value, fmt)


def test_uid_definition_pinned():
    # sha256(b"") = e3b0...b855; uid = sha256("e3b0...b855\n")[:32], computed with hashlib by hand
    assert sample_uid(hashlib.sha256(b"").hexdigest(), "") == "38acb15d02d5ac0f2a2789602e9df950"
    assert sample_uid(PNG_1x1_SHA, "猫 café") == "a0c4f628e13aeae350ba7bd40db9ac4b"


def test_resume_after_kill_equals_fresh_build(photo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(poolbuild, "SAMPLES_PER_SHARD", 2)
    fresh = tmp_path / "fresh"
    build(photo_dir, fresh)
    assert sorted(p.name for p in (fresh / "metadata").iterdir()) == [f"{i:08d}.parquet" for i in range(3)]

    real = poolbuild.load_image
    calls = {"n": 0}

    def dying(path):
        calls["n"] += 1
        if calls["n"] > 8:  # the worker dies while the third shard is open
            raise KeyboardInterrupt
        return real(path)

    killed = tmp_path / "killed"
    monkeypatch.setattr(poolbuild, "load_image", dying)
    with pytest.raises(KeyboardInterrupt):
        build(photo_dir, killed, workers=1)
    assert (killed / "shards" / "00000001_stats.json").is_file()
    assert not (killed / "shards" / "00000002_stats.json").exists()
    monkeypatch.setattr(poolbuild, "load_image", real)
    # what a SIGKILL (no clean-up) can leave of the open shard: temp files, even a finished tar
    (killed / "shards" / ".00000002.tar.tmp").write_bytes(b"partial")
    (killed / "shards" / "00000002.tar").write_bytes(b"complete but unrecorded")
    (killed / "metadata" / ".00000002.parquet.abc123.tmp").write_bytes(b"partial")
    res = build(photo_dir, killed)
    assert res.resumed_from_row > 0 and res.samples == 6 and res.shards == 3
    for sub in ("metadata", "shards", "failures"):
        names = sorted(p.name for p in (fresh / sub).iterdir())
        assert names == sorted(p.name for p in (killed / sub).iterdir())
        for n in names:
            if n.endswith(".tar"):
                assert (fresh / sub / n).read_bytes() == (killed / sub / n).read_bytes()
            elif n.endswith(".parquet"):
                assert pq.read_table(fresh / sub / n).equals(pq.read_table(killed / sub / n))
    assert build(photo_dir, killed).already_complete


def test_parquet_table_with_typed_columns(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for i in range(3):
        (img / f"{i}.jpg").write_bytes(jpeg((i * 40, 0, 0)))
    pq.write_table(pa.table({
        "file": [str(img / f"{i}.jpg") for i in range(3)],  # absolute paths; "file" clashes
        "title": ["a", "b", "c"],
        "uploaded": pa.array([1230767999, 1230768000, 1356998400], pa.int64()),
        "score": pa.array([1.5, None, 3.0], pa.float64()),
    }), tmp_path / "t.parquet")
    res = build_pool(tmp_path / "t.parquet", tmp_path / "pool", "file", "title", time_col="uploaded",
                     columns=["uploaded", "score"], progress=False)
    assert res.samples == 3
    t = pq.read_table(tmp_path / "pool" / "metadata" / "00000000.parquet")
    assert t.schema.field("uploaded").type == pa.int64() and t.schema.field("score").type == pa.float64()
    assert "file" not in t.schema.names and "source_file" not in t.schema.names
    assert [d.year for d in t.column("time_utc").to_pylist()] == [2008, 2009, 2013]


def test_bad_input(photo_dir, tmp_path):
    table = photo_dir / "photos.csv"
    with pytest.raises(CurateError, match=r"--image-col 'file' is not a column"):
        build_pool(table, tmp_path / "a", "file", "caption", progress=False)
    with pytest.raises(CurateError, match=r"unknown table type"):
        build_pool(photo_dir / "images" / "a.jpg", tmp_path / "a", "p", "c", progress=False)
    bad = photo_dir / "bad_time.csv"
    bad.write_text("path,caption,taken\nimages/a.jpg,x,2009-01-01\nimages/b.png,y,soon\n")
    with pytest.raises(CurateError, match=r"bad_time.csv: row 1, column 'taken': value 'soon' is not a time"):
        build_pool(bad, tmp_path / "b", "path", "caption", time_col="taken", progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CurateError, match=r"exists and is not empty"):
        build(photo_dir, busy)
    build(photo_dir, tmp_path / "p")
    with pytest.raises(CurateError, match=r"other settings .*time_col"):
        build(photo_dir, tmp_path / "p", time_col=None)
    ragged = photo_dir / "ragged.csv"
    ragged.write_text("path,caption\nimages/a.jpg,x,extra\n")
    with pytest.raises(CurateError, match=r"ragged.csv: cannot parse the table"):
        build_pool(ragged, tmp_path / "r", "path", "caption", progress=False)
    nothing = photo_dir / "nothing.csv"
    nothing.write_text("path,caption\nimages/missing.jpg,x\n")
    with pytest.raises(CurateError, match=r"no image could be read"):
        build_pool(nothing, tmp_path / "n", "path", "caption", progress=False)


def test_tsv_and_image_root(photo_dir, tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("img\tcap\na.jpg\tfirst\tcaption\n".replace("\tcaption", "") + "b.png\t\"tab\tinside\"\n")
    res = build_pool(tsv, tmp_path / "pool", "img", "cap", image_root=photo_dir / "images", progress=False)
    assert res.samples == 2
    texts = pq.read_table(tmp_path / "pool" / "metadata" / "00000000.parquet").column("text").to_pylist()
    assert texts == ["first", "tab\tinside"]
    assert os.path.isdir(tmp_path / "pool" / "shards")


def test_cli_from_table_with_catalog_and_groups(photo_dir, tmp_path):
    from tests.cli.test_main import invoke

    out, cat = tmp_path / "pool", tmp_path / "p.duckdb"
    res = invoke("pool", "from-table", photo_dir / "photos.csv", "--image-col", "path", "--caption-col",
                 "caption", "--time-col", "taken", "--out", out, "--catalog", cat,
                 "--groups", "2004-2008,2009-2010,2011-2012,2013-2014")
    assert res.exit_code == 0, res.output
    assert "wrote " + str(out) + ": 6 samples from 10 table rows in 1 shards" in res.output
    assert "row 3: images/missing.jpg: failed_to_download: image file not found" in res.output
    # by hand: 2004 photo 0, 2008-12-31 -> 2004-2008 (2); 2009-01-01 -> 2009-2010 (1);
    # 2011-01-01 -> 2011-2012 (1); 2013-06-15, 2014-12-31 -> 2013-2014 (2); one test each
    lines = [ln.split() for ln in res.output.splitlines() if ln.startswith("  20")]
    assert lines == [["2004-2008", "1", "1"], ["2009-2010", "0", "1"], ["2011-2012", "0", "1"],
                     ["2013-2014", "1", "1"]]
    res = invoke("pool", "timesplit", cat, "--period-col", "photo_id")
    assert res.exit_code == 0 and "  007 " in res.output, res.output
    res = invoke("pool", "timesplit", cat, "--groups", "2009-2008")
    assert res.exit_code == 1 and res.output.startswith("error: year group '2009-2008' ends before it starts")
    res = invoke("pool", "from-table", photo_dir / "photos.csv", "--image-col", "path", "--caption-col",
                 "caption", "--out", tmp_path / "x", "--groups", "2004-2008")
    assert res.exit_code == 1 and "error: --groups needs --time-col" in res.output


@pytest.mark.parametrize("rows, shards, meta_files, last_successes", [
    # 4 good images, 2 per shard: the table ends exactly at a full shard, which becomes the last
    (["a", "b", "c", "d"], 2, 2, 2),
    # a trailing failure after the last full shard gets a last shard of its own with 0 samples
    (["a", "b", "c", "d", "missing"], 3, 2, 0),
    # failures before and between successes stay in the shard that was open
    (["missing", "a", "missing", "b", "c"], 2, 2, 1),
])
def test_shard_boundaries(tmp_path, monkeypatch, rows, shards, meta_files, last_successes):
    monkeypatch.setattr(poolbuild, "SAMPLES_PER_SHARD", 2)
    img = tmp_path / "img"
    img.mkdir()
    for i, name in enumerate("abcd"):
        (img / f"{name}.jpg").write_bytes(jpeg((i * 50, 0, 0)))
    table = tmp_path / "t.csv"
    table.write_text("path,caption\n" + "".join(f"img/{r}.jpg,x\n" for r in rows))
    res = build_pool(table, tmp_path / "pool", "path", "caption", progress=False)
    assert res.shards == shards and res.rows == len(rows)
    assert len(list((tmp_path / "pool" / "metadata").glob("*.parquet"))) == meta_files
    stats = [json.loads((tmp_path / "pool" / "shards" / f"{s:08d}_stats.json").read_text()) for s in range(shards)]
    assert [s["final"] for s in stats] == [False] * (shards - 1) + [True]
    assert stats[-1]["successes"] == last_successes
    assert sum(s["count"] for s in stats) == len(rows)
    assert [(s["input_start"], s["input_end"]) for s in stats] == list(zip(
        [0] + [s["input_end"] for s in stats[:-1]], [s["input_end"] for s in stats]))
    init_catalog(tmp_path / "c.duckdb", pool=tmp_path / "pool")
    con = connect(tmp_path / "c.duckdb")
    # img2dataset's rule as the catalog computes it: shard = first_shard + row // 10**4,
    # key = shard * 10**4 + row % 10**4; every such key's json in that tar has the row's uid
    for shard, key, uid in con.execute(
            "SELECT f.first_shard + p.row // 10000, (f.first_shard + p.row // 10000) * 10000 + p.row % 10000, "
            "p.uid FROM pool p JOIN pool_files f USING (file)").fetchall():
        with tarfile.open(tmp_path / "pool" / "shards" / f"{shard:08d}.tar") as tf:
            assert json.loads(tf.extractfile(f"{key:012d}.json").read())["uid"] == uid
    con.close()
    assert build_pool(table, tmp_path / "pool", "path", "caption", progress=False).already_complete


@pytest.mark.parametrize("members", [
    [],
    [("000000000000.jpg", b"\xff\xd8" + b"x" * 1000), ("000000000000.txt", "猫".encode()), ("000000000000.json", b"{}")],
    [("a" * 100, b"y" * 512), ("000000010000.png", b""), ("k.webp", b"z" * 10239)],
])
def test_tar_stream_is_byte_identical_to_tarfile(members):
    ours = io.BytesIO()
    ts = TarWriter(ours)
    for name, data in members:
        ts.add(name, data)
    ts.close()
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tf.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == ref.getvalue()


def test_tar_stream_refuses_what_ustar_cannot_hold():
    with pytest.raises(ValueError):
        tar_header("n" * 101, 1)


def test_uid_set_exact_membership():
    s = poolbuild.UidSet()
    a = "0123456789abcdef" + "0" * 16
    b = "0123456789abcdef" + "f" * 16  # same upper half as a
    c = "0123456789abcdee" + "0" * 16  # same top 27 bits as a, different uid
    s.add([a])
    assert a in s and b not in s and c not in s
    for i in range(20):  # enough runs to force merges
        s.add([f"{i:016x}{i:016x}"])
    s.add([b])
    assert a in s and b in s and c not in s
    assert all(f"{i:016x}{i:016x}" in s for i in range(20)) and f"{21:016x}{21:016x}" not in s


def test_byod_score_keeps_the_tables_columns(photo_dir, tmp_path):
    """`curate byod score` on a built pool: the scored metadata keeps the table's columns and
    time_utc after the nine, row for row, so time splits and CLIP filters meet in one pool."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from curate.pool.byod import SourceColumns, score_data_dir
    from tests.pool.test_byod import TINY

    out = tmp_path / "pool"
    build(photo_dir, out)
    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), tmp_path / "tiny.pt")
    res = score_data_dir(out, None, tmp_path / "tiny.pt", model_config=cfg, progress=False)
    src = pq.read_table(out / "metadata" / "00000000.parquet")
    scored = pq.read_table(out / "metadata_scored" / "00000000.parquet")
    assert res.carried == src.column_names[9:] and {"photo_id", "source_uid", "taken", "time_utc"} <= set(res.carried)
    assert scored.schema.names == src.schema.names
    for c in res.carried:
        assert scored.schema.field(c).type == src.schema.field(c).type
        assert scored.column(c).to_pylist() == src.column(c).to_pylist(), c
    assert scored.column("clip_l14_similarity_score").null_count == 0
    # a shard without samples (a last shard of failures only has no metadata rows): nothing to find
    assert [len(a) for a in SourceColumns(out / "metadata").for_shard(7, [], [], "x")] == [0] * len(res.carried)
