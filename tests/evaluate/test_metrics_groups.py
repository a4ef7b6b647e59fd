"""WILDS / fairness / WinoGAViL metrics (spec §6.2, DataComp's eval_utils/{wilds,fairness,wino}_eval.py):
pure functions against values worked out by hand, and a real `curate eval` over local
webdatasets (per-sample .npy metadata; WinoGAViL instances) with a tiny random open_clip model."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curate.errors import CurateError
from curate.evaluate.metrics import (camelyon17_metrics, dollar_street_metrics, f1_macro, fmow_metrics, geode_metrics,
                                     group_metrics, iwildcam_metrics, jaccard_top_n, winogavil_metrics)
from curate.evaluate.run import aggregate, evaluate_run
from curate.evaluate.tasks import load_tasklist
from curate.evaluate.winogavil import export_winogavil, winogavil_prompt
from tests.conftest import open_clip_from_run
from tests.evaluate.test_run import _tar


def onehot(pred, n):
    """Logits whose argmax is ``pred``."""
    out = np.zeros((len(pred), n))
    out[np.arange(len(pred)), pred] = 1.0
    return out


# --------------------------------------------------------------------------- by hand

@pytest.mark.parametrize("labels,pred,expected", [
    # class 0: TP1 FP1 FN1 -> 2/4; class 1: TP2 FP1 FN0 -> 4/5; class 2: TP0 FP0 FN1 -> 0
    ([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], (0.5 + 0.8 + 0.0) / 3),
    # class 3 is predicted but never a label: not averaged; class 0: TP1 FP0 FN1 -> 2/3
    ([0, 0], [0, 3], 2 / 3),
    ([1, 1, 1], [1, 1, 1], 1.0),
])
def test_f1_macro_by_hand(labels, pred, expected):
    assert f1_macro(np.array(labels), np.array(pred)) == pytest.approx(expected)


def test_iwildcam_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    m = iwildcam_metrics(onehot([0, 1, 1, 1, 0], 3), labels)  # needs no metadata
    assert m["acc_all"] == pytest.approx(3 / 5)
    assert m["recall-macro_all"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)
    assert m["F1-macro_all"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_group_metrics_empty_group_and_ignore():
    vals, groups = [1, 0, 1, 1, 0], [0, 0, 2, 2, 3]
    out, worst = group_metrics(vals, groups, "acc", "region")
    assert out == {"acc_region:0": 0.5, "count_region:0": 2, "acc_region:1": None, "count_region:1": 0,
                   "acc_region:2": 1.0, "count_region:2": 2, "acc_region:3": 0.0, "count_region:3": 1}
    assert worst == 0.0  # the empty group 1 is never the worst
    out, worst = group_metrics(vals, groups, "acc", "region", names=["Asia", "Eu rope", "Africa", "Other"],
                               ignore="Other")
    assert worst == 0.5 and out["acc_region:Other"] == 0.0 and out["count_region:Europe"] == 0
    assert group_metrics([1], [0], "acc", "region", names=["Other"], ignore="Other")[1] is None


# FMoW metadata columns: region, year, y (DataComp's FMoWEvaluator field order)
FMOW_META = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0], [3, 0, 0], [3, 0, 0]])
FMOW_CORRECT = [True, False, True, True, False, False]


@pytest.mark.parametrize("names,worst_region", [
    (None, 0.0),  # regions named by index: nothing is "Other", region 3 (0/2) is the worst
    ({"region": ["Asia", "Europe", "Africa", "Other"]}, 0.5),  # "Other" ignored -> Asia 1/2
])
def test_fmow_by_hand(names, worst_region):
    labels = np.array([1, 1, 1, 1, 1, 1])
    pred = [1 if c else 0 for c in FMOW_CORRECT]
    m = fmow_metrics(onehot(pred, 2), labels, FMOW_META, names)
    assert m["acc_all"] == pytest.approx(3 / 6)
    # year 0: samples 0, 4, 5 -> 1/3; year 1: samples 1, 2, 3 -> 2/3
    assert m["acc_year:0"] == pytest.approx(1 / 3) and m["acc_year:1"] == pytest.approx(2 / 3)
    assert m["acc_worst_year"] == pytest.approx(1 / 3)
    assert m["acc_worst_region"] == pytest.approx(worst_region)
    key = "region:Africa" if names else "region:2"
    assert m[f"acc_{key}"] is None and m[f"count_{key}"] == 0  # empty region reported, never worst


def test_dollar_street_top5_by_hand():
    desc = [6, 5, 4, 3, 2, 1]
    logits = np.array([desc, desc, desc, desc[::-1]], dtype=float)
    labels = np.array([5, 4, 0, 5])  # ranks 6 (miss), 5 (hit), 1 (hit), 1 (hit)
    meta = np.array([[0, 7, 1], [0, 9, 1], [2, 3, 0], [2, 4, 0]])  # income_ds, income_meta, region
    m = dollar_street_metrics(logits, labels, meta)
    assert m["acc_top5_all"] == pytest.approx(3 / 4)
    assert m["acc_top5_income_ds:0"] == pytest.approx(0.5) and m["acc_top5_income_ds:1"] is None
    assert m["acc_top5_income_ds:2"] == 1.0 and m["acc_top5_wg"] == pytest.approx(0.5)


def test_geode_tie_goes_to_first_class():
    logits = np.array([[2, 2, 0], [2, 2, 0], [0, 1, 3]], dtype=float)
    labels = np.array([0, 1, 2])  # the tie predicts class 0: right, then wrong
    meta = np.array([[1, 10], [1, 11], [0, 12]])  # region, country
    m = geode_metrics(logits, labels, meta)
    assert m["acc_all"] == pytest.approx(2 / 3)
    assert (m["acc_region:0"], m["acc_region:1"], m["acc_wg"]) == (1.0, 0.5, 0.5)


def test_camelyon17_by_hand():
    meta = np.array([[0, 0, 1], [1, 2, 0], [1, 2, 1]])  # hospital, slide, y
    m = camelyon17_metrics(onehot([1, 1, 1], 2), np.array([1, 0, 1]), meta)
    assert m["acc_all"] == pytest.approx(2 / 3) and m["acc_slide:1"] is None
    assert (m["acc_slide:0"], m["acc_slide:2"], m["acc_wg"]) == (1.0, 0.5, 0.5)


def test_bad_metadata():
    with pytest.raises(CurateError, match="non-negative integers"):
        geode_metrics(onehot([0], 2), np.array([0]), np.array([[-1, 0]]))
    with pytest.raises(CurateError, match="needs column 1"):
        fmow_metrics(onehot([0], 2), np.array([0]), np.array([[0]]))


def test_winogavil_by_hand():
    a = ([.9, .1, .8, .2, .3], [1, 0, 0, 0, 1])  # picks 0, 2 -> {0} / {0, 2, 4} = 1/3
    b = ([5, 4, 0, 3, 0, 0, 0, 0, 0, 0], [1, 1, 1] + [0] * 7)  # picks 0, 1, 3 -> 2/4
    c = ([0] * 12, [0] * 11 + [1])  # all tied: stable sort, the last index wins -> 1/1
    d = ([1, 0, 0, 0, 0, 2] + [0] * 6, [1, 1] + [0] * 10)  # picks 5, 0 -> 1/3
    assert [jaccard_top_n(*x) for x in (a, b, c, d)] == pytest.approx([1 / 3, 0.5, 1.0, 1 / 3])
    m = winogavil_metrics([a, b, c, d])
    assert m["jaccard_score_5"] == pytest.approx(1 / 3) and m["jaccard_score_6"] is None
    assert m["jaccard_score_10"] == pytest.approx(0.5) and m["jaccard_score_12"] == pytest.approx(2 / 3)
    assert m["jaccard_score_5-6"] == pytest.approx(1 / 3)
    assert m["jaccard_score_10-12"] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)
    assert m["avg_jaccard_score"] == pytest.approx((1 / 3 + 0.5 + 1.0 + 1 / 3) / 4)
    assert jaccard_top_n([1, 2], [0, 0]) == 0.0  # no association: DataComp's argsort()[-0:] picks all


def test_tasklist_still_38_scored_with_group_metrics():
    t = load_tasklist()
    scored = {k: v["main_metric"] for k, v in t.items() if v["main_metric"] is not None}
    assert len(scored) == 38
    assert (scored["wilds/fmow"], scored["wilds/camelyon17"], scored["fairness/geode"]) == (
        "acc_worst_region", "acc1", "acc_wg")
    res = {k: {"metrics": {"main_metric": 0.5}} for k in scored}
    assert aggregate(res, t)["Average"] == {"value": 0.5, "tasks": "38/38"}


# --------------------------------------------------------------------------- a real run with metadata

COLOURS = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220)),
           ("yellow", (220, 220, 30)), ("purple", (140, 30, 160)), ("grey", (128, 128, 128))]


def _jpeg(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _npy(v) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(v, dtype=np.int64))
    return buf.getvalue()


def _task(root: Path, classes, samples, nshards_txt=True):
    _tar(root / "test" / "0.tar", samples)
    if nshards_txt:
        (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("".join(f"{c}\n" for c in classes))
    (root / "zeroshot_classification_templates.txt").write_text("a {c} square.\n{c}\n")


# FMoW-style: 3 classes, region (index 3 named "Other"), year; Dollar Street: 6 classes, income_ds
FMOW = [(i % 3, [[0, 1, 3][i % 3], i % 2, i % 3]) for i in range(9)]
DOLLAR = [(i % 6, [i % 4 if i % 4 != 2 else 3, 0, 1]) for i in range(12)]  # income group 2 empty


@pytest.fixture
def meta_data(tmp_path):
    d = tmp_path / "evaldata"
    fm = d / "wds_wilds-fmow_test"
    _task(fm, [c for c, _ in COLOURS[:3]], [(f"s{i:04d}", {"jpg": _jpeg(COLOURS[c][1]), "cls": str(c).encode(),
                                                          "npy": _npy(v)}) for i, (c, v) in enumerate(FMOW)])
    (fm / "metadata_names.json").write_text(json.dumps({"region": ["Asia", "Europe", "Africa", "Other"]}))
    _task(d / "wds_dollar_street_test", [c for c, _ in COLOURS],  # DataComp drops "fairness/" here
          [(f"s{i:04d}", {"webp" if i % 2 else "png": _png(COLOURS[c][1], "WEBP" if i % 2 else "PNG"),
                          "cls": str(c).encode(), "npy": _npy(v)}) for i, (c, v) in enumerate(DOLLAR)])
    # GeoDE data without metadata: its worst-region accuracy cannot be computed
    _task(d / "wds_geode_test", ["red", "green"], [("s0000", {"jpg": _jpeg((220, 30, 30)), "cls": b"0"})])
    # a classification set where the task list expects WinoGAViL instances
    _task(d / "wds_misc-winogavil_test", ["x"], [("s0000", {"jpg": _jpeg((0, 0, 0)), "cls": b"0"})])
    (d / "wds_misc-winogavil_test" / "dataset_type.txt").write_text("classification\n")
    tasks = tmp_path / "tasks.yml"
    tasks.write_text(
        "wilds/fmow:\n  name: FMoW\n  num_classes: 3\n  main_metric: acc_worst_region\n"
        "fairness/dollar_street:\n  name: Dollar Street\n  num_classes: 6\n  main_metric: acc_top5_wg\n"
        "fairness/geode:\n  name: GeoDE\n  num_classes: 2\n  main_metric: acc_wg\n"
        "misc/winogavil:\n  name: WinoGAViL\n  main_metric: jaccard_score_10-12\n  task: winogavil\n")
    return d, tasks


def _png(rgb, fmt) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format=fmt)
    return buf.getvalue()


def _independent_logits(run_dir: Path, classes, images: list[bytes]) -> np.ndarray:
    """Zero-shot logits computed here with open_clip directly (not through curate.evaluate.run)."""
    import torch
    from PIL import Image

    model, pre, tok = open_clip_from_run(run_dir)
    with torch.no_grad():
        w = []
        for c in classes:
            e = model.encode_text(tok([f"a {c} square.", c])).double()
            e = torch.nn.functional.normalize(e, dim=-1).mean(0)
            w.append(e / e.norm())
        w = torch.stack(w, dim=1).numpy()
        f = model.encode_image(torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])).numpy()
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    return 100.0 * f @ w


def test_eval_run_with_metadata(run_dir, meta_data):
    data, tasks = meta_data
    s = evaluate_run(run_dir, tasks=tasks, data_dir=data)
    rows = {r["key"]: r for r in s.rows}
    assert {k: r["status"] for k, r in rows.items()} == {
        "wilds/fmow": "evaluated", "fairness/dollar_street": "evaluated", "fairness/geode": "unsupported",
        "misc/winogavil": "unsupported"}
    assert ".npy metadata" in rows["fairness/geode"]["reason"] and "region, country" in rows["fairness/geode"]["reason"]
    assert rows["misc/winogavil"]["reason"] == "data is classification but the task is winogavil"
    assert "needs per-sample .npy metadata" in s.table()
    res = {json.loads(x)["key"]: json.loads(x) for x in (run_dir / "eval_results.jsonl").read_text().splitlines()}
    assert set(res) == {"wilds/fmow", "fairness/dollar_street"}

    fm = res["wilds/fmow"]["metrics"]
    labels = np.array([c for c, _ in FMOW])
    logits = _independent_logits(run_dir, [c for c, _ in COLOURS[:3]], [_jpeg(COLOURS[c][1]) for c in labels])
    want = fmow_metrics(logits, labels, np.array([v for _, v in FMOW]),
                        {"region": ["Asia", "Europe", "Africa", "Other"]})
    assert fm["main_metric"] == fm["acc_worst_region"] == pytest.approx(want["acc_worst_region"])
    for k, v in want.items():
        assert fm[k] == (pytest.approx(v) if v is not None else None), k
    assert fm["count_region:Other"] == 3 and fm["acc_region:Africa"] is None
    # region "Other" is not among the candidates for the worst region
    assert fm["acc_worst_region"] == min(fm["acc_region:Asia"], fm["acc_region:Europe"])

    ds = res["fairness/dollar_street"]["metrics"]
    labels = np.array([c for c, _ in DOLLAR])
    imgs = [_png(COLOURS[c][1], "WEBP" if i % 2 else "PNG") for i, c in enumerate(labels)]
    logits = _independent_logits(run_dir, [c for c, _ in COLOURS], imgs)
    want = dollar_street_metrics(logits, labels, np.array([v for _, v in DOLLAR]))
    assert ds["main_metric"] == ds["acc_top5_wg"] == pytest.approx(want["acc_top5_wg"])
    assert ds["acc_top5_all"] == pytest.approx(want["acc_top5_all"]) and ds["acc_top5_income_ds:2"] is None
    for m in (fm, ds):
        for k, v in m.items():
            if v is not None and not k.startswith("count_"):
                assert 0.0 <= v <= 1.0, k
    assert res["fairness/dollar_street"]["n"] == 12 and res["wilds/fmow"]["n"] == 9


def test_partial_metadata_is_an_error(run_dir, tmp_path):
    d = tmp_path / "e"
    _task(d / "wds_wilds-fmow_test", ["red", "green"],
          [("s0000", {"jpg": _jpeg((220, 30, 30)), "cls": b"0", "npy": _npy([0, 0, 0])}),
           ("s0001", {"jpg": _jpeg((30, 200, 30)), "cls": b"1"})])
    tasks = tmp_path / "t.yml"
    tasks.write_text("wilds/fmow:\n  name: FMoW\n  main_metric: acc_worst_region\n")
    with pytest.raises(CurateError, match="s0001 has no .npy metadata"):
        evaluate_run(run_dir, tasks=tasks, data_dir=d)


# --------------------------------------------------------------------------- WinoGAViL, end to end

@pytest.mark.parametrize("cue,prompt", [("Apple", "An apple"), ("banana", "A banana"), ("Umbrella", "An umbrella"),
                                        ("yacht", "A yacht"), ("hour", "A hour"), ("ice cream", "An ice cream")])
def test_winogavil_prompt_is_datacomps(cue, prompt):
    assert winogavil_prompt(cue) == prompt  # vowel letters only, as DataComp's get_clip_prompt


WINO_COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (240, 240, 240), (20, 20, 20), (200, 200, 30)]


def _wino_rows():
    """Five 5-candidate and two 10-candidate instances of coloured squares (PIL images, as HF yields)."""
    from PIL import Image

    rows = []
    for k in range(7):
        n = 5 if k < 5 else 10
        cols = [WINO_COLOURS[(k + i) % len(WINO_COLOURS)] for i in range(n)]
        names = [f"c{k}_{i}" for i in range(n)]
        rows.append({"cue": ["red", "apple", "sky", "snow", "night", "sun", "grass"][k], "candidates": names,
                     "associations": names[: 1 + k % 3],
                     "candidate_images": [Image.new("RGB", (32, 32), c) for c in cols]})
    return rows


def _independent_jaccards(run_dir: Path, rows) -> list[tuple[int, float]]:
    """Per instance (n candidates, Jaccard) computed here with open_clip and sklearn's rule."""
    import torch

    model, pre, tok = open_clip_from_run(run_dir)
    out = []
    with torch.no_grad():
        for r in rows:
            cue = r["cue"].lower()
            text = tok([f"An {cue}" if cue[0] in "aeiou" else f"A {cue}"])
            t = torch.nn.functional.normalize(model.encode_text(text), dim=-1)
            f = torch.nn.functional.normalize(
                model.encode_image(torch.stack([pre(im) for im in r["candidate_images"]])), dim=-1)
            s = (t @ f.T).squeeze(0).numpy()
            truth = np.isin(r["candidates"], r["associations"])
            picked = np.zeros(len(s), bool)
            picked[np.argsort(s, kind="stable")[-int(truth.sum()):]] = True
            out.append((len(s), (picked & truth).sum() / (picked | truth).sum()))
    return out


def test_winogavil_export_and_eval(run_dir, tmp_path):
    d = tmp_path / "evaldata"
    rows = _wino_rows()
    assert export_winogavil(iter(rows), d / "wds_misc-winogavil_test", shard_size=3) == 7
    root = d / "wds_misc-winogavil_test"
    assert (root / "test" / "nshards.txt").read_text() == "3\n" and (root / "dataset_type.txt").read_text() == "winogavil\n"
    assert not list(d.glob(".*tmp*"))
    s = evaluate_run(run_dir, data_dir=d, only=["misc/winogavil"])
    assert [(r["key"], r["status"]) for r in s.rows] == [("misc/winogavil", "evaluated")]
    line = json.loads((run_dir / "eval_results.jsonl").read_text().splitlines()[0])
    m = line["metrics"]
    want = _independent_jaccards(run_dir, rows)
    assert m["jaccard_score_5"] == pytest.approx(np.mean([j for n, j in want if n == 5]))
    assert m["main_metric"] == m["jaccard_score_10-12"] == pytest.approx(np.mean([j for n, j in want if n >= 10]))
    assert m["avg_jaccard_score"] == pytest.approx(np.mean([j for _, j in want]))
    assert m["jaccard_score_6"] is None and line["n"] == 7 and line["images_per_second"] > 0


def test_winogavil_bad_instance_names_the_sample(run_dir, tmp_path):
    d = tmp_path / "evaldata"
    rows = _wino_rows()[:2]
    export_winogavil(rows, d / "wds_misc-winogavil_test")
    shard = d / "wds_misc-winogavil_test" / "test" / "0.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:  # drop the image of candidate 3 of the second instance
        for m, data in members:
            if m.name != "000001.3.png":
                tf.addfile(m, io.BytesIO(data))
    with pytest.raises(CurateError, match=r"0\.tar: sample 000001: no image for candidate 3 \('c1_3'\)"):
        evaluate_run(run_dir, data_dir=d, only=["misc/winogavil"])
    with pytest.raises(CurateError, match="2 candidates but 1 images"):
        export_winogavil([{"cue": "x", "candidates": ["a", "b"], "associations": ["a"],
                           "candidate_images": [b"\x89PNG\r\n\x1a\n"]}], tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def _hf_copies(rows, root: Path) -> dict[str, Path]:
    """The same rows as every local form of a HF dataset `eval-export-winogavil --source` reads,
    written by the real `datasets` library: save_to_disk, a DatasetDict, the parquet export, and
    a parquet whose name lists are text (JSON / Python literal), as the dataset card shows them."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    feats = datasets.Features({"cue": datasets.Value("string"),
                               "candidates": datasets.Sequence(datasets.Value("string")),
                               "associations": datasets.Sequence(datasets.Value("string")),
                               "candidate_images": datasets.Sequence(datasets.Image())})
    ds = datasets.Dataset.from_list(rows, features=feats)
    out = {"save_to_disk": root / "disk", "dataset_dict": root / "dict", "parquet_export": root / "export"}
    ds.save_to_disk(str(out["save_to_disk"]))
    datasets.DatasetDict({"train": ds.select([0]), "test": ds}).save_to_disk(str(out["dataset_dict"]))
    (out["parquet_export"] / "default" / "test").mkdir(parents=True)
    ds.to_parquet(str(out["parquet_export"] / "default" / "test" / "0000.parquet"))
    t = pq.read_table(out["parquet_export"] / "default" / "test" / "0000.parquet")
    t = t.set_column(t.schema.get_field_index("candidates"), "candidates",
                     pa.array([json.dumps(r["candidates"]) for r in rows]))
    t = t.set_column(t.schema.get_field_index("associations"), "associations",
                     pa.array([repr(r["associations"]) for r in rows]))
    out["text_lists"] = root / "text_lists.parquet"
    pq.write_table(t, out["text_lists"])
    return out


def test_winogavil_export_from_local_hf_copies(run_dir, tmp_path):
    from click.testing import CliRunner

    from curate.cli.main import main

    rows = _wino_rows()
    want = _independent_jaccards(run_dir, rows)
    for form, src in _hf_copies(rows, tmp_path / "hf").items():
        d = tmp_path / form
        r = CliRunner().invoke(main, ["eval-export-winogavil", "--data-dir", str(d), "--source", str(src),
                                      "--shard-size", "4"])
        assert r.exit_code == 0, (form, r.output)
        assert "wrote 7 WinoGAViL instances" in r.output
        with tarfile.open(d / "wds_misc-winogavil_test" / "test" / "0.tar") as tf:
            first = json.loads(tf.extractfile("000000.json").read())
        assert first == {k: rows[0][k] for k in ("cue", "candidates", "associations")}, form
        s = evaluate_run(run_dir, data_dir=d, output_dir=tmp_path / f"res_{form}", only=["misc/winogavil"])
        m = json.loads((tmp_path / f"res_{form}" / "eval_results.jsonl").read_text().splitlines()[0])["metrics"]
        assert [row["status"] for row in s.rows] == ["evaluated"]
        assert m["jaccard_score_5"] == pytest.approx(np.mean([j for n, j in want if n == 5])), form
        assert m["jaccard_score_10-12"] == pytest.approx(np.mean([j for n, j in want if n >= 10])), form


def test_winogavil_local_copy_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from curate.cli.main import main

    def run(src):
        r = CliRunner().invoke(main, ["eval-export-winogavil", "--data-dir", str(tmp_path / "E"), "--source", str(src)])
        assert r.exit_code == 1, r.output
        assert not (tmp_path / "E" / "wds_misc-winogavil_test").exists()
        return r.output

    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    base = {"cue": ["moon"], "candidates": [["a", "b"]], "associations": [["a"]]}
    # an image given by path only (not embedded): named, nothing written
    pq.write_table(pa.table({**base, "candidate_images": pa.array(
        [[{"bytes": b"\x89PNG\r\n\x1a\n", "path": None}, {"bytes": None, "path": "/x/b.png"}]], pa.list_(img))}),
        tmp_path / "paths.parquet")
    assert "paths.parquet: row 0: candidate image 1 has no embedded bytes (only a path: '/x/b.png')" in run(
        tmp_path / "paths.parquet")
    pq.write_table(pa.table(base), tmp_path / "noimg.parquet")
    assert "missing candidate_images" in run(tmp_path / "noimg.parquet")
    pq.write_table(pa.table({**base, "candidates": ["a, b"], "candidate_images": pa.array([[]], pa.list_(img))}),
                   tmp_path / "badlist.parquet")
    assert "row 0, candidates: not a list of names: 'a, b'" in run(tmp_path / "badlist.parquet")
    # a list literal is parsed, never evaluated: code in it is refused
    pq.write_table(pa.table({**base, "candidates": ["__import__('os').getcwd()"],
                             "candidate_images": pa.array([[]], pa.list_(img))}), tmp_path / "code.parquet")
    assert "not a list of names" in run(tmp_path / "code.parquet")
    (tmp_path / "empty").mkdir()
    assert "no save_to_disk dataset (state.json) and no .parquet files" in run(tmp_path / "empty")
