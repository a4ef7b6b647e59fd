"""The text_lang_cld3 producer: CLD3 labels in their own per-pool-file table (only laion2b reads
them), resumable, stale detection, provenance, built on demand and never by `features text`."""

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.catalog.connection import connect, features_dir, init_catalog
from curate.features.cld3 import META_KEY, PRODUCER, build_text_lang_cld3
from curate.cli.main import main
from curate.errors import CurateError
from curate.features.registry import needed_producers
from curate.features.text import read_output_meta
from curate.engine import Engine
from tests.conftest import REPO, pool_table, uid_of

pytestmark = pytest.mark.usefixtures("model_cache")  # tests/conftest.py


DE = "ein kleiner Hund spielt im Garten mit dem Ball"
FR = "une voiture rouge garée dans la rue"
DOG = "a small brown dog is playing with a red ball in the park"
CAPTIONS = [DOG, DE, FR, DOG.replace(" ", "\n", 3), "", "   ", "a big dog"]


def gcld3_labels(texts):
    """DataComp's call, one caption at a time (baselines/apply_filter.py)."""
    import gcld3

    det = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    return [det.FindLanguage(t.replace("\n", " ")).language for t in texts]


def files_of(texts):
    return [[{"uid": uid_of(i), "text": t} for i, t in enumerate(texts[:3])],
            [{"uid": uid_of(10 + i), "text": t} for i, t in enumerate(texts[3:])]]


def outputs(cat):
    con = connect(cat)
    fdir = features_dir(con, cat) / "text_lang_cld3"
    con.close()
    return sorted(fdir.glob("*.parquet"))


def test_values_view_and_provenance(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    res = build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False)
    assert len(res.computed) == 2 and res.rows_computed == len(CAPTIONS)
    con = connect(cat)
    got = con.execute('SELECT p.text, c.file, c."row", c.lang_cld3 FROM pool p '
                      'JOIN text_lang_cld3 c ON c.file = p.file AND c."row" = p."row" '
                      'ORDER BY p.file, p."row"').fetchall()
    assert [r[0] for r in con.execute("DESCRIBE text_lang_cld3").fetchall()] == ["uid", "file", "row", "lang_cld3"]
    con.close()
    assert [g[0] for g in got] == CAPTIONS
    assert [(g[1], g[2]) for g in got] == [("0000", 0), ("0000", 1), ("0000", 2), ("0001", 0), ("0001", 1),
                                           ("0001", 2), ("0001", 3)]
    assert [g[3] for g in got] == gcld3_labels(CAPTIONS)
    assert [g[3] for g in got][:4] == ["en", "de", "fr", "en"]  # newlines replaced before CLD3
    meta = read_output_meta(outputs(cat)[0], META_KEY)
    assert meta["settings"]["cld3"]["min_num_bytes"] == 0 and meta["settings"]["cld3"]["max_num_bytes"] == 1000
    assert PRODUCER.is_current(cat, {})
    d = PRODUCER.describe(cat, {})
    assert d["files"] == 2 and d["rows"] == len(CAPTIONS) and d["cld3"]["name"] == "gcld3.NNetLanguageIdentifier"


def test_resume_and_stale_pool_file(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    assert not PRODUCER.is_current(cat, {})  # never built
    build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False)
    stamps = [p.stat().st_mtime_ns for p in outputs(cat)]
    res = build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False)
    assert res.computed == [] and len(res.skipped) == 2
    assert [p.stat().st_mtime_ns for p in outputs(cat)] == stamps
    pq.write_table(pool_table([{"uid": uid_of(10), "text": DE}]), cat.parent / "metadata" / "0001.parquet")
    assert not PRODUCER.is_current(cat, {})
    init_catalog(cat, pool=cat.parent, overwrite=True)
    res = build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False)
    assert res.computed == ["0001"] and res.skipped == ["0000"]
    con = connect(cat)
    assert con.execute("SELECT list(lang_cld3 ORDER BY file, \"row\") FROM text_lang_cld3").fetchone()[0] \
        == ["en", "de", "fr", "de"]
    con.close()


def test_settings_change_recomputes(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False)
    out = outputs(cat)[0]
    t = pq.read_table(out)
    meta = json.loads(t.schema.metadata[META_KEY])
    meta["settings"]["cld3"]["max_num_bytes"] = 512  # an output built with other CLD3 settings
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), out)
    assert not PRODUCER.is_current(cat, {})
    assert build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False).computed == ["0000"]


def test_parallel_equals_serial(make_catalog):
    a, b = make_catalog(files_of(CAPTIONS)), make_catalog(files_of(CAPTIONS))
    build_text_lang_cld3(a, engine=Engine(workers=1), progress=False)
    assert sorted(build_text_lang_cld3(b, engine=Engine(workers=2), progress=False).computed) == ["0000", "0001"]
    for x, y in zip(outputs(a), outputs(b)):
        assert pq.read_table(x).equals(pq.read_table(y))


def test_null_caption_fails_without_partial_table(tmp_path):
    meta = tmp_path / "pool" / "metadata"
    meta.mkdir(parents=True)
    pq.write_table(pool_table([{"uid": uid_of(0), "text": "a dog"}]), meta / "0000.parquet")
    t = pool_table([{"uid": uid_of(1), "text": "a cat"}, {"uid": uid_of(2), "text": "x"}])
    t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(["a cat", None], pa.string()))
    pq.write_table(t, meta / "0001.parquet")
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    with pytest.raises(CurateError, match=r"0001\.parquet: row 1: column text is NULL"):
        build_text_lang_cld3(cat, engine=Engine(workers=1), progress=False)
    fdir = tmp_path / "cat.duckdb.features" / "text_lang_cld3"
    assert not (fdir / "0001.parquet").exists() and not [p for p in fdir.iterdir() if p.name.endswith(".tmp")]
    con = duckdb.connect(str(cat), read_only=True)
    assert con.execute("SELECT count(*) FROM curate_views WHERE name = 'text_lang_cld3'").fetchone()[0] == 0
    con.close()


def test_cli_and_only_laion2b_needs_it(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    r = CliRunner().invoke(main, ["features", "text", str(cat), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert not (cat.parent / "catalog.duckdb.features" / "text_lang_cld3").exists()  # features text: no CLD3
    r = CliRunner().invoke(main, ["features", "cld3", str(cat), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "text_lang_cld3: computed 2 file(s) (7 captions" in r.output and "cld3-py" in r.output
    r = CliRunner().invoke(main, ["features", "cld3", str(cat)])
    assert "computed 0 file(s)" in r.output and "2 already current" in r.output
    r = CliRunner().invoke(main, ["features", "cld3", str(cat.parent / "nope.duckdb")])
    assert r.exit_code == 1 and r.output.strip().startswith("error: ") and "nope.duckdb: catalog not found" in r.output
    filters = REPO / "filters"
    assert needed_producers((filters / "laion2b.sql").read_text()) == ["text_lang_cld3"]
    for name in ("basic_filter", "text_based"):
        assert needed_producers((filters / f"{name}.sql").read_text()) == ["text_features"]
