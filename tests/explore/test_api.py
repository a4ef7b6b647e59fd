"""The explorer's JSON API over a real Session (starlette's TestClient): errors as one line,
reading images by seeking (N reads for N thumbnails, never a tar scan), read-only on the
catalog, histograms and keep rates worked out by hand."""

from __future__ import annotations

import hashlib
import json
import tarfile

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from starlette.testclient import TestClient

import curate.explore.samples as samples_mod
import curate.shards.index as index_mod
import curate.shards.tar as tar_mod
from curate.explore.app import create_app, is_loopback
from curate.explore.session import Session
from tests.conftest import REPO, read_uids, uid_of

CATALOG = REPO / "catalog.duckdb.example"
SHARDS = REPO / "data" / "sample_pool" / "shards"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    s = Session(CATALOG, tmp_path_factory.mktemp("explore-work"))
    yield s, TestClient(create_app(s))
    s.close()


def sample_ranges() -> dict[str, int]:
    """uid -> byte length of the sample in its tar (first header to the end of the last member's
    padded data), from Python's tarfile: what one read of the sample must read."""
    out = {}
    for tar in sorted(SHARDS.glob("*.tar")):
        with tarfile.open(tar) as tf:
            groups: dict[str, list] = {}
            for m in tf.getmembers():
                groups.setdefault(m.name.split(".", 1)[0], []).append(m)
            for key, ms in groups.items():
                js = next(m for m in ms if m.name.endswith(".json"))
                uid = json.loads(tf.extractfile(js).read())["uid"]
                end = ms[-1].offset_data + -(-ms[-1].size // 512) * 512
                out[uid] = end - ms[0].offset
    return out


def test_a_page_of_n_thumbnails_is_n_reads_and_no_scan(bundled, monkeypatch):
    s, client = bundled
    r = client.post("/api/run", json={"filter": "clip_score_l14_30pct"})
    assert r.status_code == 200, r.text
    rid = r.json()["rid"]

    def no_scan(*a, **k):
        raise AssertionError("a tar was scanned while serving a page")

    for mod in (tar_mod, index_mod):
        monkeypatch.setattr(mod, "scan_tar", no_scan)
    monkeypatch.setattr(samples_mod, "build_index", no_scan)
    page = client.get(f"/api/page?rid={rid}&part=kept&offset=0&limit=50").json()
    ranges = sample_ranges()
    shown = [row["uid"] for row in page["rows"] if row["image"]]
    assert shown == [row["uid"] for row in page["rows"] if row["uid"] in ranges]
    reads0, bytes0 = s.reader.reads, s.reader.bytes_read
    for uid in shown:
        got = client.get(f"/api/image/{uid}?thumb=64")
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert s.reader.reads - reads0 == len(shown) > 40
    assert s.reader.bytes_read - bytes0 == sum(ranges[u] for u in shown)


def test_api_errors_are_one_line(bundled):
    s, client = bundled
    rid = client.post("/api/run", json={"filter": "laion2b"}).json()["rid"]
    cases = [
        (client.get("/api/page?rid=r999"), 404, "error: result 'r999': no such result in this session"),
        (client.get(f"/api/page?rid={rid}&limit=0"), 400, "error: limit=0: must be 1..500"),
        (client.get(f"/api/page?rid={rid}&offset=x"), 400, "error: offset='x': expected a whole number"),
        (client.get(f"/api/page?rid={rid}&part=nope"), 400, f"error: part 'nope': result {rid} has kept, dropped"),
        (client.post("/api/run", content=b"{not json"), 400, "error: request body is not JSON"),
        (client.post("/api/run", json=[1]), 400, "error: request body must be a JSON object"),
        (client.post("/api/run", json={}), 400, "error: give a filter, a query returning uid, or a subset file"),
        (client.post("/api/run", json={"filter": "nosuch"}), 400, "error: nosuch: filter file not found"),
        (client.post("/api/run", json={"filter": "laion2b", "sets": {"fraction": "1"}}), 400,
         "error: " + str(REPO / "filters" / "laion2b.sql") + ": unknown parameter 'fraction'"),
        (client.post("/api/run", json={"sql": "SELECT uid FROM read_csv('/etc/passwd')"}), 400, "outside what the catalog"),
        (client.post("/api/compare", json={"a": {"filter": "laion2b"}}), 400, "error: compare needs two sources"),
        (client.get("/api/image/zz"), 400, "error: uid 'zz': not a uid (32 hex characters)"),
        (client.get("/api/sample/" + "0" * 32), 400, "error: uid '" + "0" * 32 + "': not in the pool"),
        (client.get(f"/api/hist/{rid}/nope.png"), 400, "error: column 'nope': not a pool column"),
        (client.get(f"/api/keep-rate/{rid}"), 400, "error: this catalog has no timesplit view"),
        (client.get(f"/api/export/{rid}/kept.zip"), 400, "error: kept.zip: export as PART.npy or PART.csv"),
    ]
    for resp, status, text in cases:
        body = resp.json()
        assert resp.status_code == status, (text, body)
        assert "\n" not in body["error"] and body["error"].startswith("error: ")
        assert text in body["error"], (text, body)


def tiny_pool(make_catalog):
    # l14 scores 0, 0.25, 0.5, 1 and a NaN: 4 bins of width 0.25 hold one each; NaN in none
    scores = [0.0, 0.25, 0.5, 1.0, float("nan")]
    return make_catalog([[{"uid": uid_of(i), "clip_l14_similarity_score": s} for i, s in enumerate(scores)]])


def test_histogram_and_keep_rate_by_hand(make_catalog, tmp_path):
    cat = tiny_pool(make_catalog)
    con = duckdb.connect(str(cat))  # a TiC-like timesplit view: rows 0-2 in 2014, 3-4 in 2015
    con.execute('CREATE VIEW timesplit AS SELECT uid, CASE WHEN "row" < 3 THEN 2014 ELSE 2015 END AS year, '
                'NULL::INTEGER AS month FROM pool')
    con.close()
    (tmp_path / "work").mkdir()
    s = Session(cat, tmp_path / "work")
    try:
        res = s.run({"sql": "SELECT uid FROM pool WHERE clip_l14_similarity_score >= 0.5 "
                            "AND NOT isnan(clip_l14_similarity_score)"})
        assert res.info["count"] == 2
        h = s.histogram(res.rid, "clip_l14_similarity_score", bins=4)
        assert h["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert h["all"] == [1, 1, 1, 1] and h["kept"] == [0, 0, 1, 1]
        assert s.keep_rate(res.rid) == [{"year": 2014, "month": None, "samples": 3, "kept": 1},
                                        {"year": 2015, "month": None, "samples": 2, "kept": 1}]
        assert s.keep_rate_png(res.rid)[:4] == b"\x89PNG"
        # no shards: metadata only
        page = s.page(res.rid, "dropped", 0, 10)
        assert page["shards"] is False and [r["image"] for r in page["rows"]] == [False] * 3
        assert [r["uid"] for r in page["rows"]] == [uid_of(0), uid_of(1), uid_of(4)]
    finally:
        s.close()


def test_read_only_and_missing_features_refused(make_catalog, tmp_path):
    cat = tiny_pool(make_catalog)
    before = hashlib.sha256(cat.read_bytes()).hexdigest()
    files_before = sorted(p.relative_to(cat.parent) for p in cat.parent.rglob("*"))
    (tmp_path / "work").mkdir()
    s = Session(cat, tmp_path / "work")
    client = TestClient(create_app(s))
    try:
        r = client.post("/api/run", json={"filter": "laion2b"})  # needs text_lang_cld3, which is not built
        assert r.status_code == 400
        assert "feature view text_lang_cld3 is missing or out of date" in r.json()["error"]
        assert "explore never writes to the catalog" in r.json()["error"]
        rid = client.post("/api/run", json={"filter": "clip_score_l14_30pct", "sets": {"fraction": "0.4"}}).json()["rid"]
        assert client.get(f"/api/page?rid={rid}&part=dropped").status_code == 200
        assert client.get(f"/api/hist/{rid}/clip_l14_similarity_score.png").content[:4] == b"\x89PNG"
        assert client.get(f"/api/export/{rid}/kept.csv").status_code == 200
        assert client.get(f"/api/sample/{uid_of(3)}").json()["meta"]["uid"] == uid_of(3)
    finally:
        s.close()
    assert hashlib.sha256(cat.read_bytes()).hexdigest() == before
    assert sorted(p.relative_to(cat.parent) for p in cat.parent.rglob("*")) == files_before


def test_subset_file_source_and_its_export(bundled, tmp_path):
    s, client = bundled
    rid = client.post("/api/run", json={"filter": "laion2b"}).json()["rid"]
    npy = client.get(f"/api/export/{rid}/kept.npy").content
    (tmp_path / "mine.npy").write_bytes(npy)
    info = client.post("/api/run", json={"subset": str(tmp_path / "mine.npy")}).json()
    assert info["count"] == info["distinct"] == len(read_uids(tmp_path / "mine.npy")) == 489
    c = client.post("/api/compare", json={"a": {"subset": str(tmp_path / "mine.npy")}, "b": {"filter": "laion2b"}}).json()
    assert (c["count_a_only"], c["count_both"], c["count_b_only"]) == (0, 489, 0)
    both = client.get(f"/api/export/{c['rid']}/both.npy").content
    assert both == npy
    assert np.load(tmp_path / "mine.npy").dtype.names == ("f0", "f1")


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                       ("0.0.0.0", False), ("192.0.2.7", False)])
def test_loopback_hosts(host, loop):
    assert is_loopback(host) is loop


def recs(pairs):
    from curate.uids import SUBSET_DTYPE

    return np.array(pairs, dtype=SUBSET_DTYPE)


@pytest.mark.parametrize("a,b,expected", [
    ([], [(1, 1)], []),
    ([(1, 1)], [], [False]),
    ([(1, 1), (1, 2), (3, 0)], [(1, 2), (3, 0), (9, 9)], [False, True, True]),
    # several records of b share a high half: the low halves decide
    ([(5, 1), (5, 4), (5, 7), (6, 4)], [(5, 2), (5, 4), (5, 7), (7, 0)], [False, True, True, False]),
    ([(2**64 - 1, 2**64 - 1)], [(2**64 - 1, 2**64 - 2), (2**64 - 1, 2**64 - 1)], [True]),
])
def test_isin_sorted_by_hand(a, b, expected):
    from curate.explore.session import isin_sorted

    assert isin_sorted(recs(a), recs(b)).tolist() == expected


def test_distinct_sorted_by_hand():
    from curate.explore.session import distinct_sorted

    got = distinct_sorted(recs([(1, 1), (1, 1), (1, 2), (2, 1), (2, 1), (2, 1)]))
    assert got.tolist() == [(1, 1), (1, 2), (2, 1)]
    assert distinct_sorted(recs([])).tolist() == [] and distinct_sorted(recs([(4, 4)])).tolist() == [(4, 4)]


def test_dropped_pages_are_in_pool_order(bundled):
    s, client = bundled
    rid = client.post("/api/run", json={"filter": "laion2b"}).json()["rid"]
    kept = set(read_uids(s.export_subset(rid)))
    pool = [u for f in sorted((REPO / "data" / "sample_pool" / "metadata").glob("*.parquet"))
            for u in pq.read_table(f, columns=["uid"]).column(0).to_pylist()]
    dropped = [u for u in pool if u not in kept]
    for offset, limit in ((0, 7), (990, 100), (1500, 100)):
        page = client.get(f"/api/page?rid={rid}&part=dropped&offset={offset}&limit={limit}").json()
        assert page["total"] == len(dropped) == 1511
        assert [r["uid"] for r in page["rows"]] == dropped[offset:offset + limit]


def test_own_filter_parameters(bundled, tmp_path):
    s, client = bundled
    f = tmp_path / "mine.sql"
    f.write_text("-- wide images\nSET VARIABLE min_width = 300;\nSELECT uid FROM pool WHERE original_width >= getvariable('min_width')\n")
    d = client.get(f"/api/filter-params?path={f}").json()
    assert d == {"name": str(f), "params": {"min_width": 300}, "summary": "wide images"}
    info = client.post("/api/run", json={"filter": str(f), "sets": {"min_width": "500"}}).json()
    widths = [w for p in sorted((REPO / "data" / "sample_pool" / "metadata").glob("*.parquet"))
              for w in pq.read_table(p, columns=["original_width"]).column(0).to_pylist()]
    assert info["params"] == {"min_width": 500} and info["count"] == sum(w >= 500 for w in widths)
    bad = client.post("/api/run", json={"filter": str(f), "sets": {"min_width": "wide"}}).json()
    assert bad["error"].startswith("error: --set min_width=wide: min_width is a INTEGER parameter")


def test_cli_warns_off_loopback(monkeypatch):
    from click.testing import CliRunner

    import curate.cli.explore as cli_explore
    from curate.cli.main import main

    calls = []
    monkeypatch.setattr(cli_explore, "serve", lambda *a: calls.append(a))
    r = CliRunner().invoke(main, ["explore", str(CATALOG), "--port", "8801"])
    assert r.exit_code == 0 and "warning" not in r.output
    assert "http://127.0.0.1:8801/" in r.output and f"on catalog {CATALOG} (Ctrl-C to stop)" in r.output
    r = CliRunner().invoke(main, ["explore", "--port", "8802"], env={"CURATE_CATALOG": ""})
    assert "(the bundled example; pass -c FILE or set CURATE_CATALOG)" in r.output
    r = CliRunner().invoke(main, ["explore", str(CATALOG), "--host", "0.0.0.0"])
    assert r.exit_code == 0
    assert "warning: --host 0.0.0.0: the explorer is reachable from other machines" in r.output
    assert calls == [(CATALOG, "127.0.0.1", 8801), (None, "127.0.0.1", 8802), (CATALOG, "0.0.0.0", 8765)]


def pool_cards() -> dict[str, dict]:
    """uid -> its first pool row (files by name, rows in order), read with pyarrow."""
    out = {}
    for f in sorted((REPO / "data" / "sample_pool" / "metadata").glob("*.parquet")):
        for i, r in enumerate(pq.read_table(f, columns=["uid", "text"]).to_pylist()):
            out.setdefault(r["uid"], {**r, "file": f.stem, "row": i})
    return out


@pytest.fixture
def fresh(tmp_path):
    s = Session(CATALOG, tmp_path)
    yield s, TestClient(create_app(s))
    s.close()


def test_pages_are_fetched_ahead_on_one_open_connection(fresh, monkeypatch):
    """Each page fetches the next kept samples' rows in the background: the pages after it query
    nothing. The catalog is opened once, not per page."""
    import curate.explore.session as session_mod
    from curate.explore.session import PREFETCH

    s, client = fresh
    rid = client.post("/api/run", json={"filter": "clip_score_l14_30pct"}).json()["rid"]
    kept = read_uids(s.export_subset(rid))  # sorted by uid: the kept grid's order
    cards, in_tars = pool_cards(), sample_ranges()
    s.settle()
    queried, opened = [], []
    query_rows, connect = s._query_rows, session_mod.connect
    monkeypatch.setattr(s, "_query_rows", lambda recs: queried.append(len(recs)) or query_rows(recs))
    monkeypatch.setattr(session_mod, "connect", lambda *a, **k: opened.append(a) or connect(*a, **k))
    assert len(kept) > PREFETCH + 100
    for offset in (0, 24, 48):  # the first page queries its rows, the next ones were fetched ahead
        page = client.get(f"/api/page?rid={rid}&part=kept&offset={offset}&limit=24").json()
        s.settle()
        assert [(r["uid"], r["text"], r["file"], r["row"]) for r in page["rows"]] == \
            [(u, cards[u]["text"], cards[u]["file"], cards[u]["row"]) for u in kept[offset:offset + 24]]
        assert [r["image"] for r in page["rows"]] == [u in in_tars for u in kept[offset:offset + 24]]
    # page 0: its 24 rows, then 24..264 ahead; pages 24 and 48: only the 24 more rows ahead each
    assert queried == [24, PREFETCH, 24, 24]
    far = PREFETCH + 72  # past everything fetched ahead: the page queries its own rows first
    page = client.get(f"/api/page?rid={rid}&part=kept&offset={far}&limit=30").json()
    s.settle()
    assert [r["uid"] for r in page["rows"]] == kept[far:far + 30]
    assert queried[4:] == [30, PREFETCH]
    assert client.get(f"/api/hist/{rid}/clip_l14_similarity_score").status_code == 200
    assert len(opened) == 1  # pages, fetches ahead and a histogram share the connection the first page opened


def test_caption_features_built_on_demand_are_enough_when_they_cover_the_filter(make_catalog, tmp_path):
    """`curate run laion2b` computes CLD3 only for rows whose B/32 score passes 0.28
    (curate.run.ondemand); explore then runs laion2b as it is, but refuses a lower threshold that
    needs rows not computed yet (running it would write the table)."""
    from curate.run.runner import run_filter

    rows = [{"uid": uid_of(i), "text": t, "clip_b32_similarity_score": s}
            for i, (t, s) in enumerate([("a brown dog playing in the park", 0.3), ("the cat sat on the mat", 0.1),
                                        ("ein kleiner Hund spielt im Garten", 0.5), ("a red car on the road", 0.29)])]
    cat = make_catalog([rows])
    run_filter(REPO / "filters" / "laion2b.sql", catalog=cat, out=tmp_path / "cli.npy")
    before = sorted((p.relative_to(cat.parent), p.stat().st_mtime_ns) for p in cat.parent.rglob("*") if p.is_file())
    (tmp_path / "work").mkdir()
    s = Session(cat, tmp_path / "work")
    client = TestClient(create_app(s))
    try:
        r = client.post("/api/run", json={"filter": "laion2b"})
        assert r.status_code == 200, r.json()
        assert r.json()["count"] == 2 == len(read_uids(tmp_path / "cli.npy"))  # the dog and the car
        r = client.post("/api/run", json={"filter": "laion2b", "sets": {"threshold": "0.05"}})
        assert r.status_code == 400
        assert "text_lang_cld3 is missing or out of date" in r.json()["error"]
    finally:
        s.close()
    after = sorted((p.relative_to(cat.parent), p.stat().st_mtime_ns) for p in cat.parent.rglob("*") if p.is_file())
    assert after == before
