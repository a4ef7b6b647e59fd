"""Caption tables built in parts and for some rows (issue 21): exactly the rows asked for get
values (checked against fastText / gcld3 called directly), the rest stays NULL; only missing rows
are computed; a full build afterwards equals a build from scratch (same bytes); outputs written
before parts existed (the bundled ones included) count as complete; a changed model NULLs only
its part; a changed pool file drops the whole output; bad captions fail only where needed; a
``kill -9`` in the middle of a partial build leaves nothing inconsistent and a re-run finishes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import connect, init_catalog
from curate.engine import Engine
from curate.errors import CurateError
from curate.features import cld3 as cld3features
from curate.features import text as textfeatures
from curate.features.langid import FastTextLID, bundled_lid_model
from curate.features.parts import build_parts, ensure_skeleton, part_status
from curate.features.registry import part_of_column
from tests.conftest import REPO, pool_table, uid_of

TEXT, CLD3 = textfeatures.TABLE, cld3features.TABLE
ONE = Engine(workers=1)

CAPTIONS = [
    "a small brown dog is playing with a red ball in the park",
    "ein kleiner Hund spielt im Garten mit dem Ball",
    "une voiture rouge garée dans la rue",
    "three white mice on a wooden table",
    "geese\nflying over the lake at sunset",
    "un gato negro durmiendo en el sofá",
    "il gatto dorme sul divano",
    "a\u3000dog",
    "we eat here",
    "de kat zit op de vensterbank",
    "uma menina lendo um livro na praia",
    "two horses grazing in a green field",
    "собака бежит по снегу",
    "犬が公園で遊んでいる",
    "a red bus on a london street",
    "der alte Mann liest die Zeitung",
    "la tour eiffel la nuit",
    "mountains covered with snow under a blue sky",
    "una casa blanca junto al mar",
    "a bowl of fresh fruit on the kitchen table",
    "il ragazzo gioca a calcio",
    "a cat sleeping on a laptop keyboard",
    "zwei Kinder bauen eine Sandburg",
    "",
    "   ",
    "an old wooden boat on the river bank",
    "le chien court sur la plage",
    "a vintage car parked outside a diner",
    "een fiets tegen een muur",
    "a plate of sushi and chopsticks",
]

pytestmark = pytest.mark.usefixtures("model_cache")  # tests/conftest.py


def files_of(captions):
    half = len(captions) // 2
    return [[{"uid": uid_of(i), "text": t} for i, t in enumerate(captions[:half])],
            [{"uid": uid_of(100 + i), "text": t} for i, t in enumerate(captions[half:])]]


def fdir(cat, view="text_features"):
    return cat.parent / "catalog.duckdb.features" / view


def meta_of(path, key=textfeatures.META_KEY):
    return json.loads(pq.read_schema(path).metadata[key])


def fasttext_direct(texts):
    """fastText's own predict, DataComp's call, one caption at a time."""
    from fasttext.FastText import _FastText

    model = _FastText(model_path=str(bundled_lid_model()))
    return [model.predict(t.replace("\n", " "), k=1)[0][0][len("__label__"):] for t in texts]


def gcld3_direct(texts):
    import gcld3

    det = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    return [det.FindLanguage(t.replace("\n", " ")).language for t in texts]


def feature_cols(path):
    t = pq.read_table(path)
    return {c: t.column(c).to_pylist() for c in t.column_names}


def test_lang_for_some_rows_then_only_missing_rows_then_everything(make_catalog, tmp_path, monkeypatch):
    cat = make_catalog(files_of(CAPTIONS))
    res = build_parts(TEXT, cat, ["lang"], rows={"0000": np.array([1, 4, 7], np.int64)}, engine=ONE, progress=False)
    assert res.computed == ["0000"] and res.skeletons == ["0001"] and res.rows_computed == 3
    out0, out1 = fdir(cat) / "0000.parquet", fdir(cat) / "0001.parquet"
    got = feature_cols(out0)
    assert got["row"] == list(range(15)) and got["uid"] == [uid_of(i) for i in range(15)]
    want = fasttext_direct([CAPTIONS[1], CAPTIONS[4], CAPTIONS[7]])
    assert want[:2] == ["de", "en"]  # the model's labels, stated so that a change shows up as such
    assert got["lang_fasttext"] == [want[[1, 4, 7].index(r)] if r in (1, 4, 7) else None for r in range(15)]
    for c in ("n_words", "n_chars", "n_tokens_fasttext", "in21k_entity"):
        assert got[c] == [None] * 15, c
    assert all(v == [None] * 15 for c, v in feature_cols(out1).items() if c not in ("uid", "file", "row"))
    m = meta_of(out0)
    assert {p: e["rows"] for p, e in m["parts"].items()} == {"counts": 0, "entity": 0, "lang": 3}
    assert m["parts"]["lang"]["settings"]["lid_model"]["name"] == "lid.176.ftz" and m["rows"] == 15
    assert m["parts"]["counts"]["settings"] is None
    assert part_status(TEXT, cat, "lang") == {"0000": (3, 15), "0001": (0, 15)}
    assert part_status(TEXT, cat, "counts") == {"0000": (0, 15), "0001": (0, 15)}
    con = connect(cat)  # the shell sees NULL for rows not computed
    assert con.execute("SELECT count(*), count(lang_fasttext), count(n_words) FROM text_features").fetchone() == (30, 3, 0)
    con.close()

    # rows [4, 9]: only 9 is computed; neither the counts nor WordNet are touched
    seen = []
    real = FastTextLID.labels

    def spy(self, texts):
        seen.extend(texts.to_pylist())
        return real(self, texts)

    monkeypatch.setattr(FastTextLID, "labels", spy)
    monkeypatch.setattr(textfeatures, "caption_counts", lambda *a, **k: pytest.fail("counts computed"))
    monkeypatch.setattr(textfeatures, "entity_flags", lambda *a, **k: pytest.fail("entity computed"))
    res = build_parts(TEXT, cat, ["lang"], rows={"0000": np.array([4, 9], np.int64)}, engine=ONE, progress=False)
    assert seen == [CAPTIONS[9]] and res.rows_computed == 1 and res.part_rows == {"lang": 1}
    assert [i for i, v in enumerate(feature_cols(out0)["lang_fasttext"]) if v is not None] == [1, 4, 7, 9]
    assert meta_of(out0)["parts"]["lang"]["rows"] == 4
    # nothing missing: no file is rewritten
    stamp = out0.stat().st_mtime_ns
    res = build_parts(TEXT, cat, ["lang"], rows={"0000": np.array([1, 9], np.int64)}, engine=ONE, progress=False)
    assert res.computed == [] and out0.stat().st_mtime_ns == stamp and seen == [CAPTIONS[9]]
    monkeypatch.undo()

    # the full build fills the rest: same bytes as a build from scratch (a second catalog, same pool)
    assert not textfeatures.PRODUCER.is_current(cat, {})
    res = textfeatures.build_text_features(cat, engine=ONE, progress=False)
    assert res.computed == ["0000", "0001"] and res.rows_computed == 30
    assert res.part_rows == {"counts": 30, "entity": 30, "lang": 26}
    assert textfeatures.PRODUCER.is_current(cat, {})
    ref = init_catalog(tmp_path / "ref.duckdb", pool=cat.parent, features_dir=tmp_path / "ref")
    textfeatures.build_text_features(ref, engine=ONE, progress=False)
    for name in ("0000.parquet", "0001.parquet"):
        assert (fdir(cat) / name).read_bytes() == (tmp_path / "ref" / "text_features" / name).read_bytes()
    d = textfeatures.PRODUCER.describe(cat, {})
    assert {p: (v["rows"], v["of"]) for p, v in d["parts"].items()} == {p: (30, 30) for p in ("counts", "entity", "lang")}
    assert d["parts"]["lang"]["settings"]["lid_model"]["name"] == "lid.176.ftz" and d["lid_model"]["name"] == "lid.176.ftz"


def test_parts_computed_one_by_one_equal_a_full_build(make_catalog, tmp_path, monkeypatch):
    cat = make_catalog(files_of(CAPTIONS))
    # entity alone loads neither fastText nor runs the counts
    monkeypatch.setattr(FastTextLID, "__init__", lambda *a, **k: pytest.fail("fastText loaded"))
    textfeatures._MODELS = None
    build_parts(TEXT, cat, ["entity"], rows={"0000": [3, 8], "0001": [8, 9]}, engine=ONE, progress=False)
    monkeypatch.undo()
    # by hand (as in test_text.py): "three white mice ..." (mice -> mouse) yes, "we eat here" (eat:
    # a verb) no, "" and "   " (no word) no
    assert feature_cols(fdir(cat) / "0000.parquet")["in21k_entity"] == [None] * 3 + [True] + [None] * 4 + [False] \
        + [None] * 6
    got = feature_cols(fdir(cat) / "0001.parquet")
    assert got["in21k_entity"] == [None] * 8 + [False, False] + [None] * 5
    assert got["n_words"] == [None] * 15
    build_parts(TEXT, cat, ["counts", "entity"], rows={"0000": [0, 7], "0001": [0, 1]}, engine=ONE, progress=False)
    got = feature_cols(fdir(cat) / "0000.parquet")
    # the reference definitions (str.split, len; ASCII spaces only: fastText's tokens are the words);
    # "a\u3000dog": 2 words, 5 chars, 1 fastText token (U+3000 is no fastText separator)
    c0 = CAPTIONS[0]
    assert [got[c][0] for c in ("n_words", "n_chars", "n_tokens_fasttext")] == [len(c0.split()), len(c0), len(c0.split())]
    assert [got[c][7] for c in ("n_words", "n_chars", "n_tokens_fasttext", "in21k_entity")] == [2, 5, 1, True]
    assert sum(v is not None for v in got["n_words"]) == 2
    assert {p: e["rows"] for p, e in meta_of(fdir(cat) / "0001.parquet")["parts"].items()} == \
        {"counts": 2, "entity": 4, "lang": 0}
    for part in ("counts", "entity", "lang"):
        build_parts(TEXT, cat, [part], engine=ONE, progress=False)
    ref = init_catalog(tmp_path / "ref.duckdb", pool=cat.parent, features_dir=tmp_path / "ref")
    textfeatures.build_text_features(ref, engine=ONE, progress=False)
    for name in ("0000.parquet", "0001.parquet"):
        assert (fdir(cat) / name).read_bytes() == (tmp_path / "ref" / "text_features" / name).read_bytes()


def test_cld3_for_some_rows(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    res = build_parts(CLD3, cat, ["cld3"], rows={"0000": [2, 5], "0001": [13]}, engine=ONE, progress=False)
    assert res.rows_computed == 3
    a = feature_cols(fdir(cat, "text_lang_cld3") / "0000.parquet")["lang_cld3"]
    b = feature_cols(fdir(cat, "text_lang_cld3") / "0001.parquet")["lang_cld3"]
    want = gcld3_direct([CAPTIONS[2], CAPTIONS[5], CAPTIONS[28]])
    assert want[:2] == ["fr", "es"]
    assert a == [want[0] if r == 2 else want[1] if r == 5 else None for r in range(15)]
    assert b == [want[2] if r == 13 else None for r in range(15)]
    assert part_status(CLD3, cat, "cld3") == {"0000": (2, 15), "0001": (1, 15)}
    assert not cld3features.PRODUCER.is_current(cat, {})
    assert meta_of(fdir(cat, "text_lang_cld3") / "0000.parquet", cld3features.META_KEY)["parts"]["cld3"]["rows"] == 2
    cld3features.build_text_lang_cld3(cat, engine=ONE, progress=False)
    assert feature_cols(fdir(cat, "text_lang_cld3") / "0000.parquet")["lang_cld3"] == gcld3_direct(CAPTIONS[:15])
    assert cld3features.PRODUCER.is_current(cat, {})


def test_outputs_without_parts_count_as_complete(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    textfeatures.build_text_features(cat, engine=ONE, progress=False)
    for out in fdir(cat).glob("*.parquet"):  # the metadata as written before parts existed
        t = pq.read_table(out)
        meta = json.loads(t.schema.metadata[textfeatures.META_KEY])
        old = {"file": meta["file"], "source": meta["source"], "settings": meta["settings"], "rows": meta["rows"]}
        pq.write_table(t.replace_schema_metadata({textfeatures.META_KEY: json.dumps(old).encode()}), out)
    for part in TEXT.parts:
        assert part_status(TEXT, cat, part) == {"0000": (15, 15), "0001": (15, 15)}
    assert textfeatures.PRODUCER.is_current(cat, {})
    assert build_parts(TEXT, cat, ["lang", "counts"], engine=ONE, progress=False).computed == []


def test_the_bundled_feature_tables_stay_complete(tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(REPO / "data" / "sample_pool" / "metadata", pool / "metadata")
    feats = tmp_path / "features"
    for view in ("text_features", "text_lang_cld3"):
        shutil.copytree(REPO / "data" / "sample_pool" / "features" / view, feats / view)
    cat = init_catalog(tmp_path / "cat.duckdb", pool=pool, features_dir=feats)
    for table in (TEXT, CLD3):
        for part in table.parts:
            assert all(k == n == 1000 for k, n in part_status(table, cat, part).values()), (table.view, part)
    assert build_parts(TEXT, cat, list(TEXT.parts), progress=False).computed == []
    assert build_parts(CLD3, cat, ["cld3"], progress=False).computed == []


def test_changed_model_nulls_only_lang(make_catalog, tmp_path):
    cat = make_catalog(files_of(CAPTIONS))
    textfeatures.build_text_features(cat, engine=ONE, progress=False)
    before = feature_cols(fdir(cat) / "0000.parquet")
    other = tmp_path / "lid.other.ftz"
    other.write_bytes(bundled_lid_model().read_bytes() + b"\0")  # another file (sha256), same labels
    assert part_status(TEXT, cat, "lang", lid_model=other) == {"0000": (0, 15), "0001": (0, 15)}
    assert part_status(TEXT, cat, "counts", lid_model=other) == {"0000": (15, 15), "0001": (15, 15)}
    assert build_parts(TEXT, cat, ["counts", "entity"], engine=ONE, progress=False, lid_model=other).computed == []
    build_parts(TEXT, cat, ["lang"], rows={"0000": [2]}, engine=ONE, progress=False, lid_model=other)
    after = feature_cols(fdir(cat) / "0000.parquet")
    assert after["lang_fasttext"] == [before["lang_fasttext"][2] if r == 2 else None for r in range(15)]
    for c in ("uid", "row", "n_words", "n_chars", "n_tokens_fasttext", "in21k_entity"):
        assert after[c] == before[c], c
    m = meta_of(fdir(cat) / "0000.parquet")
    assert m["parts"]["lang"] == {"settings": {"lid_model": m["settings"]["lid_model"]}, "rows": 1}
    assert m["settings"]["lid_model"]["name"] == "lid.other.ftz" and m["parts"]["counts"]["rows"] == 15
    # 0001 was not written: it still holds the old model's labels, counted for the old model only
    assert part_status(TEXT, cat, "lang", lid_model=other)["0001"] == (0, 15)
    assert part_status(TEXT, cat, "lang", lid_model=bundled_lid_model())["0001"] == (15, 15)
    # without a model named, the one the outputs were last built with (remembered on this machine)
    assert part_status(TEXT, cat, "lang") == {"0000": (1, 15), "0001": (0, 15)}


def test_changed_pool_file_drops_its_whole_output(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    textfeatures.build_text_features(cat, engine=ONE, progress=False)
    stamp0 = (fdir(cat) / "0000.parquet").stat().st_mtime_ns
    src = cat.parent / "metadata" / "0001.parquet"  # same row count, other captions
    pq.write_table(pool_table([{"uid": uid_of(200 + i), "text": f"a photo of {i} dogs"} for i in range(15)]), src)
    for part in TEXT.parts:
        assert part_status(TEXT, cat, part) == {"0000": (15, 15), "0001": (0, 15)}
    build_parts(TEXT, cat, ["counts"], rows={"0001": [0]}, engine=ONE, progress=False)
    got = feature_cols(fdir(cat) / "0001.parquet")
    assert got["uid"] == [uid_of(200 + i) for i in range(15)]
    assert got["n_words"] == [5] + [None] * 14 and got["lang_fasttext"] == [None] * 15  # "a photo of 0 dogs"
    assert got["in21k_entity"] == [None] * 15
    assert (fdir(cat) / "0000.parquet").stat().st_mtime_ns == stamp0


def test_ensure_skeleton(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    ensure_skeleton(TEXT, cat)
    con = connect(cat)
    assert con.execute("SELECT count(*), count(lang_fasttext), count(n_words), count(in21k_entity), "
                       "count(DISTINCT uid) FROM text_features").fetchone() == (30, 0, 0, 0, 30)
    con.close()
    stamps = [p.stat().st_mtime_ns for p in sorted(fdir(cat).glob("*.parquet"))]
    ensure_skeleton(TEXT, cat)  # current outputs are kept
    assert [p.stat().st_mtime_ns for p in sorted(fdir(cat).glob("*.parquet"))] == stamps
    assert part_status(TEXT, cat, "entity") == {"0000": (0, 15), "0001": (0, 15)}
    assert part_of_column("text_features", "lang_fasttext") == "lang"
    assert part_of_column("text_lang_cld3", "LANG_CLD3") == "cld3"
    assert part_of_column("text_features", "uid") is None and part_of_column("pool", "text") is None


def test_bad_requests(make_catalog):
    cat = make_catalog(files_of(CAPTIONS))
    with pytest.raises(CurateError, match="no part 'cld3'"):
        build_parts(TEXT, cat, ["cld3"], progress=False)
    with pytest.raises(CurateError, match="pool file 0000: row 15 out of range"):
        build_parts(TEXT, cat, ["lang"], rows={"0000": [3, 15]}, progress=False)
    with pytest.raises(CurateError, match="'0009' is not a pool file"):
        build_parts(TEXT, cat, ["lang"], rows={"0009": [0]}, progress=False)


def test_null_caption_fails_only_where_it_is_needed(tmp_path):
    meta = tmp_path / "pool" / "metadata"
    meta.mkdir(parents=True)
    t = pool_table([{"uid": uid_of(i), "text": t} for i, t in enumerate(["a dog", "x", "a cat", "the sea"])])
    texts = pa.array(["a dog", None, "a cat", "the sea"], pa.string())
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", texts), meta / "0000.parquet")
    cat = init_catalog(tmp_path / "cat.duckdb", pool=tmp_path / "pool")
    build_parts(TEXT, cat, ["lang", "counts"], rows={"0000": [0, 3]}, engine=ONE, progress=False)
    out = tmp_path / "cat.duckdb.features" / "text_features" / "0000.parquet"
    old = out.read_bytes()
    with pytest.raises(CurateError) as e:
        build_parts(TEXT, cat, ["lang"], rows={"0000": [1, 2]}, engine=ONE, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("0000.parquet: row 1: column text is NULL (DataComp's baselines need "
                                            "a caption string for every sample; drop or fill the row)")
    assert out.read_bytes() == old and sorted(p.name for p in out.parent.iterdir() if p.name != ".build.lock") == ["0000.parquet"]
    build_parts(TEXT, cat, ["lang"], rows={"0000": [2]}, engine=ONE, progress=False)
    assert [v is not None for v in feature_cols(out)["lang_fasttext"]] == [True, False, True, True]


KILL_FILES, KILL_ROWS = 8, 25_000


def _kill_pool(tmp_path):
    meta = tmp_path / "pool" / "metadata"
    meta.mkdir(parents=True)
    for f in range(KILL_FILES):
        n0 = f * KILL_ROWS
        t = pool_table([{"uid": uid_of(n0 + i), "text": f"photo {n0 + i} of a dog in the park"} for i in range(KILL_ROWS)])
        pq.write_table(t, meta / f"{f:04d}.parquet", row_group_size=10_000)
    return tmp_path / "pool"


def test_kill_during_partial_build_then_rerun_equals_clean_build(tmp_path):
    pool = _kill_pool(tmp_path)
    cat = init_catalog(tmp_path / "cat.duckdb", pool=pool)
    out_dir = tmp_path / "cat.duckdb.features" / "text_features"
    # some rows computed before (a cheaper filter's), then the run that is killed asks for more
    build_parts(TEXT, cat, ["lang"], rows={f"{f:04d}": np.arange(0, KILL_ROWS, 4) for f in range(2)}, engine=ONE,
                progress=False)
    script = textwrap.dedent(f"""
        import numpy as np
        from curate.engine import Engine
        from curate.features.parts import build_parts
        from curate.features.text import TABLE
        rows = {{f"{{f:04d}}": np.arange(0, {KILL_ROWS}, 2) for f in range({KILL_FILES})}}
        build_parts(TABLE, {str(cat)!r}, ["lang"], rows=rows, engine=Engine(workers=1), progress=False)
    """)
    cmd = [sys.executable, "-c", script]

    def lang_rows():
        return [meta_of(p)["parts"]["lang"]["rows"] for p in sorted(out_dir.glob("*.parquet"))]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and sum(r == KILL_ROWS // 2 for r in lang_rows()) < 3:
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = lang_rows()
    assert 3 <= sum(r == KILL_ROWS // 2 for r in done) < KILL_FILES, done
    for p in sorted(out_dir.glob("*.parquet")):  # every output: values and metadata agree
        lang = pq.read_table(p, columns=["lang_fasttext"]).column(0)
        assert len(lang) - lang.null_count == meta_of(p)["parts"]["lang"]["rows"], p.name
        assert np.all(np.flatnonzero(lang.is_valid().to_numpy(zero_copy_only=False)) % 2 == 0), p.name
    subprocess.run(cmd, check=True, capture_output=True)
    ref = init_catalog(tmp_path / "ref.duckdb", pool=pool, features_dir=tmp_path / "ref")
    build_parts(TEXT, ref, ["lang"], rows={f"{f:04d}": np.arange(0, KILL_ROWS, 2) for f in range(KILL_FILES)},
                engine=ONE, progress=False)
    for f in range(KILL_FILES):
        name = f"{f:04d}.parquet"
        assert (out_dir / name).read_bytes() == (tmp_path / "ref" / "text_features" / name).read_bytes(), name


def test_worker_processes_give_the_same_bytes(make_catalog):
    """The row arrays travel with the tasks to spawned workers; outputs equal in-process ones."""
    a, b = make_catalog(files_of(CAPTIONS)), make_catalog(files_of(CAPTIONS))
    rows = {"0000": np.array([0, 5, 9], np.int64), "0001": np.array([2, 3], np.int64)}
    for cat, engine in ((a, ONE), (b, Engine(workers=2))):
        res = build_parts(TEXT, cat, ["counts", "lang"], rows=rows, engine=engine, progress=False)
        assert res.computed == ["0000", "0001"] and res.part_rows == {"counts": 5, "lang": 5}
    for name in ("0000.parquet", "0001.parquet"):
        assert feature_cols(fdir(a) / name) == feature_cols(fdir(b) / name)
        assert meta_of(fdir(a) / name)["parts"] == meta_of(fdir(b) / name)["parts"]
