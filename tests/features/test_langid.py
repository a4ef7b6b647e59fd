"""Language ID as DataComp calls it: fastText top-1 on newline-replaced text (batched here, one
call per caption there), CLD3 with gcld3's API; both as DuckDB functions; model errors."""

import duckdb
import pyarrow as pa
import pytest

from curate.features.langid import Cld3LID, FastTextLID, LidModelError, bundled_lid_model, register_udfs, resolve_lid_model

CAPTIONS = ["a small brown dog is playing with a red ball in the park", "ein kleiner Hund spielt im Garten mit dem Ball",
            "une voiture rouge garée dans la rue", "a small brown dog is playing\nwith a red ball\nin the park", "", "   ",
            "\u3000", "12345", "夜の東京の街並み", "a\u3000photo\xa0of\x85a dog"]


@pytest.fixture(scope="module")
def ft():
    return FastTextLID()


def test_batched_equals_datacomp_single_calls(ft):
    # DataComp: model.predict(text.replace("\n", " ")) one caption at a time, label[0] minus __label__
    want = [ft.model.predict(t.replace("\n", " "))[0][0].replace("__label__", "") for t in CAPTIONS]
    assert ft.labels(pa.array(CAPTIONS)).to_pylist() == want
    assert want[:3] == ["en", "de", "fr"]
    assert want[3] == want[0]  # newlines replaced by spaces: same text for the model


def test_cld3_matches_gcld3_call():
    import gcld3

    det = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    want = [det.FindLanguage(t.replace("\n", " ")).language for t in CAPTIONS]
    assert Cld3LID().labels(pa.array(CAPTIONS)).to_pylist() == want
    assert want[:3] == ["en", "de", "fr"]


def test_nulls_stay_null(ft):
    assert ft.labels(pa.array(["a dog in the park", None])).to_pylist() == ["en", None]
    assert Cld3LID().labels(pa.array([None, "a dog in the park"])).to_pylist() == [None, "en"]


def test_duckdb_functions(ft):
    con = duckdb.connect()
    register_udfs(con)
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('the quick brown fox jumps over the lazy dog'), "
                "('une voiture rouge garée dans la rue'), (NULL)) v(text)")
    rows = con.execute("SELECT lang_fasttext(text), lang_cld3(text) FROM t").fetchall()
    assert rows == [("en", "en"), ("fr", "fr"), (None, None)]


def test_default_model_is_the_bundled_ftz(monkeypatch):
    monkeypatch.delenv("CURATE_LID_MODEL", raising=False)
    assert resolve_lid_model().name == "lid.176.ftz" == bundled_lid_model().name


def test_missing_model_says_how_to_get_one(tmp_path, monkeypatch):
    with pytest.raises(LidModelError, match=r"lid\.176\.bin.*not found; download .*lid\.176\.bin"):
        FastTextLID(tmp_path / "lid.176.bin")
    monkeypatch.setenv("CURATE_LID_MODEL", str(tmp_path / "nope.bin"))
    with pytest.raises(LidModelError, match="nope.bin: fastText LID model not found"):
        resolve_lid_model()


def test_not_a_model(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a fasttext model" * 10)
    with pytest.raises(LidModelError, match="model.bin: not a fastText model"):
        FastTextLID(bad)
