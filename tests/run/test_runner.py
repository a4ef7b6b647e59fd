"""curate run: parameters, composition of subsets, duplicates, manifests and every bad input."""

import json

import numpy as np
import pytest

from curate.catalog.connection import init_catalog
from curate.errors import CurateError
from curate.run.query import FilterError, parse_sets, parse_value
from curate.run.runner import run_filter
from curate.subset import BadSubset
from tests.conftest import REPO, read_uids, uid_of

NO_FILTER = REPO / "filters" / "no_filter.sql"


def write(tmp_path, name, sql):
    p = tmp_path / name
    p.write_text(sql)
    return p


@pytest.fixture
def cat(make_catalog):
    rows = [{"uid": uid_of(i), "clip_b32_similarity_score": i / 10, "text": f"caption {i}"} for i in range(10)]
    return make_catalog([rows[:6], rows[6:]])


def test_no_filter_keeps_every_row_sorted(cat, tmp_path):
    res = run_filter(NO_FILTER, catalog=cat, out=tmp_path / "all.npy")
    assert read_uids(tmp_path / "all.npy") == sorted(uid_of(i) for i in range(10))
    assert (res.count, res.distinct, res.pool_rows) == (10, 10, 10)


def test_manifest(cat, tmp_path):
    flt = write(tmp_path, "f.sql", "SET VARIABLE t = 0.5;\nSELECT uid FROM pool WHERE clip_b32_similarity_score >= getvariable('t')")
    run_filter(flt, catalog=cat, out=tmp_path / "s.npy", sets={"t": 0.75})
    m = json.loads((tmp_path / "s.json").read_text())
    assert m["params"] == {"t": 0.75}
    assert m["count"] == 2 and m["distinct"] == 2 and m["pool_rows"] == 10  # 0.8, 0.9
    import hashlib
    assert m["filter_sha256"] == hashlib.sha256(flt.read_bytes()).hexdigest()
    assert {"curate", "duckdb", "numpy"} <= set(m["versions"]) and m["elapsed_seconds"] >= 0


@pytest.mark.parametrize("text,value", [("3", 3), ("0.25", 0.25), ("1e-3", 0.001), ("true", True),
                                         ("l14", "l14"), ("x=y", "x=y")])
def test_set_values_are_typed(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_set_value_is_bound_not_pasted(cat, tmp_path):
    flt = write(tmp_path, "f.sql", "SET VARIABLE name = 'x';\nSELECT uid FROM pool WHERE text = getvariable('name')")
    evil = "x' OR '1'='1"
    run_filter(flt, catalog=cat, out=tmp_path / "s.npy", sets=parse_sets([f"name={evil}"]))
    assert read_uids(tmp_path / "s.npy") == []
    run_filter(flt, catalog=cat, out=tmp_path / "s.npy", sets=parse_sets(["name=caption 3"]))
    assert read_uids(tmp_path / "s.npy") == [uid_of(3)]


def test_unknown_parameter(cat, tmp_path):
    with pytest.raises(FilterError, match="unknown parameter 'fraction' .*declares: none"):
        run_filter(NO_FILTER, catalog=cat, out=tmp_path / "s.npy", sets={"fraction": 0.1})


def test_compose_subsets(cat, tmp_path):
    run_filter(write(tmp_path, "a.sql", "SELECT uid FROM pool WHERE clip_b32_similarity_score >= 0.5"),
               catalog=cat, out=tmp_path / "a.npy")  # 5..9
    run_filter(write(tmp_path, "b.sql", "SELECT uid FROM pool WHERE clip_b32_similarity_score < 0.7"),
               catalog=cat, out=tmp_path / "b.npy")  # 0..6
    cases = {
        "SELECT uid FROM read_subset('a.npy') INTERSECT SELECT uid FROM read_subset('b.npy')": [5, 6],
        "SELECT uid FROM read_subset('a.npy') EXCEPT SELECT uid FROM read_subset('b.npy')": [7, 8, 9],
        "SELECT uid FROM read_subset('a.npy') UNION SELECT uid FROM read_subset('b.npy')": list(range(10)),
        # upsampling: UNION ALL keeps both copies of 5 and 6
        "SELECT uid FROM read_subset('a.npy') UNION ALL SELECT uid FROM read_subset('b.npy')":
            list(range(10)) + [5, 6],
        # a parameter can name the subset file
        "SET VARIABLE base = 'a.npy';\nSELECT uid FROM read_subset(getvariable('base')) JOIN pool USING (uid) "
        "WHERE text <> 'caption 9'": [5, 6, 7, 8],
    }
    import os
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        for sql, expected in cases.items():
            run_filter(write(tmp_path, "c.sql", sql), catalog=cat, out=tmp_path / "c.npy")
            assert read_uids(tmp_path / "c.npy") == sorted(uid_of(i) for i in expected), sql
    finally:
        os.chdir(old)


def test_duplicates_are_kept_and_sorted(cat, tmp_path):
    sql = "SELECT uid FROM pool, range(3) WHERE clip_b32_similarity_score >= 0.85"  # 3 copies of uid 9
    res = run_filter(write(tmp_path, "d.sql", sql), catalog=cat, out=tmp_path / "d.npy")
    assert read_uids(tmp_path / "d.npy") == [uid_of(9)] * 3
    assert (res.count, res.distinct) == (3, 1)


@pytest.mark.parametrize("sql,msg", [
    ("SELECT uid, text FROM pool", "exactly one column named `uid`; it returns uid, text"),
    ("SELECT text AS id FROM pool", "exactly one column named `uid`; it returns id"),
    ("SELECT 1::INTEGER AS uid FROM pool", "column `uid` has type INTEGER"),
    ("SELEC uid FROM pool", "syntax error"),
    ("SELECT uid FROM pool WHERE no_such_column > 1", "no_such_column"),
    ("SELECT uid FROM no_such_table", "no_such_table"),
    ("CREATE TABLE x AS SELECT 1", "last statement must be a query"),
    ("-- only a comment\n", "no SQL statement"),
])
def test_bad_filters_fail_with_one_line_and_no_output(cat, tmp_path, sql, msg):
    with pytest.raises(FilterError) as e:
        run_filter(write(tmp_path, "bad.sql", sql), catalog=cat, out=tmp_path / "o.npy")
    assert msg.lower() in str(e.value).lower() and "bad.sql" in str(e.value)
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))


def test_bad_uid_in_pool_names_file_row_and_column(make_catalog, tmp_path):
    rows = [{"uid": uid_of(0)}, {"uid": uid_of(1)}, {"uid": "not-a-uid"}]
    cat = make_catalog([rows], check_uid_values=False)  # init refuses it; this tests run's own check
    with pytest.raises(CurateError) as e:
        run_filter(NO_FILTER, catalog=cat, out=tmp_path / "o.npy")
    msg = str(e.value)
    assert "'not-a-uid'" in msg and "0000.parquet" in msg and "row 2" in msg and "column uid" in msg
    assert not (tmp_path / "o.npy").exists()


def test_subset_input_must_be_sorted_and_typed(cat, tmp_path):
    np.save(tmp_path / "unsorted.npy", np.array([(2, 0), (1, 0)], np.dtype("u8,u8")))
    np.save(tmp_path / "typed.npy", np.zeros(2, np.dtype("u4,u4")))
    for name, msg in (("unsorted.npy", "not sorted"), ("typed.npy", "not the subset dtype")):
        sql = f"SELECT uid FROM read_subset('{tmp_path / name}')"
        with pytest.raises(BadSubset, match=msg):
            run_filter(write(tmp_path, "s.sql", sql), catalog=cat, out=tmp_path / "o.npy")
    assert not (tmp_path / "o.npy").exists()


def test_missing_filter_and_catalog(cat, tmp_path):
    with pytest.raises(CurateError, match="filter file not found"):
        run_filter(tmp_path / "nope.sql", catalog=cat, out=tmp_path / "o.npy")
    with pytest.raises(CurateError, match="catalog not found"):
        run_filter(NO_FILTER, catalog=tmp_path / "nope.duckdb", out=tmp_path / "o.npy")


def test_empty_result(cat, tmp_path):
    res = run_filter(write(tmp_path, "e.sql", "SELECT uid FROM pool WHERE false"), catalog=cat, out=tmp_path / "e.npy")
    assert res.count == 0 and np.load(tmp_path / "e.npy").dtype == np.dtype("u8,u8")


def test_catalog_is_not_modified_by_a_filter(cat, tmp_path):
    # refused before anything runs (it used to reach DuckDB and fail there as read-only)
    with pytest.raises(FilterError, match=r"statement 1 \(DROP VIEW pool\) is not allowed in a filter"):
        run_filter(write(tmp_path, "w.sql", "DROP VIEW pool;\nSELECT 'x' AS uid"), catalog=cat, out=tmp_path / "o.npy")
    assert init_catalog  # catalog still usable:
    run_filter(NO_FILTER, catalog=cat, out=tmp_path / "ok.npy")
