"""Evaluation: metrics against hand-computed values, the task list, a real run over local
webdatasets (skip on re-run, missing tasks), and TiC's evaluation matrix."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curate.errors import CurateError
from curate.evaluate.matrix import plot_matrix, step_of_split, tic_matrix, transfer_scores
from curate.evaluate.metrics import balanced_accuracy, classification_metrics, retrieval_metrics, zero_shot_weights
from curate.evaluate.run import aggregate, evaluate_run
from curate.evaluate.tasks import load_tasklist
from tests.conftest import open_clip_from_run

# --------------------------------------------------------------------------- metrics by hand

LOGITS = np.array([[0.9, 0.1, 0.0],   # label 0 -> predicted 0
                   [0.2, 0.7, 0.1],   # label 1 -> 1
                   [0.5, 0.4, 0.1],   # label 1 -> 0 (wrong)
                   [0.1, 0.2, 0.7]])  # label 2 -> 2
LABELS = np.array([0, 1, 1, 2])


def test_classification_by_hand():
    m = classification_metrics(LOGITS, LABELS)
    assert m["acc1"] == pytest.approx(3 / 4)
    assert m["acc5"] is None  # fewer than 5 classes: clip_benchmark gives NaN, DataComp writes null
    # recalls: class 0 1/1, class 1 1/2, class 2 1/1
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_top5_by_hand():
    logits = np.array([[6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1]], dtype=float)
    m = classification_metrics(logits, np.array([5, 4]))  # ranked 6th (miss) and 5th (hit)
    assert m["acc1"] == 0.0 and m["acc5"] == pytest.approx(0.5)


def test_balanced_accuracy_ignores_classes_absent_from_labels():
    # sklearn: classes predicted but never true do not count
    assert balanced_accuracy(np.array([0, 0, 1]), np.array([0, 2, 2])) == pytest.approx((0.5 + 0.0) / 2)


def test_zero_shot_weights_by_hand():
    w = zero_shot_weights([np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0]])])
    # class A: normalise -> (0.6, 0.8), (1, 0); mean (0.8, 0.4); renormalise by sqrt(0.8)
    assert w[:, 0] == pytest.approx([0.8 / math.sqrt(0.8), 0.4 / math.sqrt(0.8)])
    assert w[:, 1] == pytest.approx([0.0, 1.0])


def test_retrieval_by_hand():
    # 4 captions x 3 images; captions 0 and 1 belong to image 0
    scores = np.array([[0.9, 0.1, 0.2],
                       [0.3, 0.5, 0.1],
                       [0.2, 0.8, 0.55],
                       [0.6, 0.1, 0.5]])
    m = retrieval_metrics(scores, np.array([0, 0, 1, 2]))
    # captions: 0 hit, 1 miss (image 1 first), 2 hit, 3 miss (image 0 first) -> 2/4
    assert m["image_retrieval_recall@1"] == pytest.approx(0.5)
    # images: 0 -> caption 0 (its own), 1 -> caption 2 (own), 2 -> caption 2 (not own) -> 2/3
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["mean_recall@1"] == pytest.approx(0.5 * (0.5 + 2 / 3))
    # top-2: caption 1 -> {1, 0} hit, caption 3 -> {0, 2} hit; image 2 -> {2, 3} hit
    assert m["image_retrieval_recall@5"] == 1.0 and m["text_retrieval_recall@5"] == 1.0


# --------------------------------------------------------------------------- task list (spec §6.1)


def test_tasklist_is_datacomps():
    t = load_tasklist()
    assert len(t) == 40
    scored = [k for k, v in t.items() if v["main_metric"] is not None]
    assert len(scored) == 38 and set(t) - set(scored) == {"fairness/fairface", "fairness/utkface"}
    groups = {}
    for v in t.values():
        groups[v.get("group")] = groups.get(v.get("group"), 0) + 1
    assert (groups["vtab"], groups["dist_shift"], groups["retrieval"], groups["imagenet"]) == (13, 6, 3, 1)
    assert t["imagenet1k"]["main_metric"] == "acc1" and t["imagenet1k"]["num_classes"] == 1000
    assert t["vtab/pets"]["main_metric"] == "mean_per_class_recall"
    assert t["wilds/iwildcam"]["main_metric"] == "F1-macro_all"
    assert t["fairness/dollar_street"]["main_metric"] == "acc_top5_wg"
    assert t["misc/winogavil"]["main_metric"] == "jaccard_score_10-12"


def test_aggregate_counts_what_is_present():
    tasks = {"a": {"main_metric": "acc1", "group": "vtab"}, "b": {"main_metric": "acc1", "group": "vtab"},
             "c": {"main_metric": "acc1"}, "d": {"main_metric": None}}
    res = {"a": {"metrics": {"main_metric": 0.2}}, "c": {"metrics": {"main_metric": 0.6}},
           "d": {"metrics": {"main_metric": None}}}
    agg = aggregate(res, tasks)
    assert agg["VTAB"] == {"value": pytest.approx(0.2), "tasks": "1/2"}
    assert agg["Average"] == {"value": pytest.approx(0.4), "tasks": "2/3"}


# --------------------------------------------------------------------------- TiC (spec §7.4)


def test_transfer_scores_by_hand():
    m = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    s = transfer_scores(m)
    assert s["id"] == pytest.approx(5) and s["backward"] == pytest.approx((4 + 7 + 8) / 3)
    assert s["forward"] == pytest.approx((2 + 3 + 6) / 3)
    assert transfer_scores([[1, float("nan")], [2, 3]])["forward"] is None


@pytest.mark.parametrize("split,steps,expected", [
    ("2014", ["2016", "2017"], 0), ("2016", ["2016", "2017"], 0), ("2017", ["2016", "2017"], 1),
    ("201705", ["2016", "2017"], 1), ("2018", ["2016", "2017"], None),
])
def test_step_of_split(split, steps, expected):
    assert step_of_split(split, steps) == expected


def test_tic_matrix_from_results(tmp_path):
    vals = {"2016": {"2015": 0.2, "2016": 0.4, "2017": 0.1}, "2017": {"2015": 0.3, "2016": 0.5, "2017": 0.6}}
    runs = []
    for step, per in vals.items():
        d = tmp_path / step
        d.mkdir()
        lines = [json.dumps({"key": f"tic/datacomp/retrieval/yearly/{y}", "dataset": y,
                             "metrics": {"main_metric": v}}) for y, v in per.items()]
        lines.append(json.dumps({"key": "tic/datacomp/datacompnet/yearly/2016", "dataset": "x",
                                 "metrics": {"main_metric": 0.99}}))  # other kind: ignored
        (d / "eval_results.jsonl").write_text("\n".join(lines) + "\n")
        runs.append((step, d))
    r = tic_matrix(runs)
    # row 2016: step 2016 = mean(2015, 2016) = 0.3, step 2017 = 0.1; row 2017: 0.4, 0.6
    assert np.allclose(r["matrix"], [[0.3, 0.1], [0.4, 0.6]])
    assert (r["id"], r["backward"], r["forward"]) == (pytest.approx(0.45), pytest.approx(0.4), pytest.approx(0.1))
    png = plot_matrix(r, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- a real evaluation run

COLOURS = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))]


def _jpeg(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def eval_data(tmp_path):
    d = tmp_path / "evaldata"
    cls = d / "wds_colours_test"
    _tar(cls / "test" / "0.tar", [(f"{i:04d}", {"jpg": _jpeg(COLOURS[i % 3][1]), "cls": str(i % 3).encode()})
                                  for i in range(6)])
    _tar(cls / "test" / "1.tar", [(f"{i:04d}", {"jpg": _jpeg(COLOURS[i % 3][1]), "cls": str(i % 3).encode()})
                                  for i in range(6, 9)])
    (cls / "test" / "nshards.txt").write_text("2\n")
    (cls / "classnames.txt").write_text("red\ngreen\nblue\n")
    (cls / "zeroshot_classification_templates.txt").write_text("a {c} square.\n{c}\n")
    ret = d / "wds_shapes-retrieval_test"
    _tar(ret / "test" / "0.tar", [(f"{i:04d}", {"jpg": _jpeg(c), "txt": f"a {n} square\n{n} colour".encode()})
                                  for i, (n, c) in enumerate(COLOURS)])
    (ret / "test" / "nshards.txt").write_text("1\n")
    (ret / "dataset_type.txt").write_text("retrieval\n")
    wild = d / "wds_wilds-fmow_test"
    _tar(wild / "test" / "0.tar", [("0000", {"jpg": _jpeg((0, 0, 0)), "cls": b"0"})])
    (wild / "classnames.txt").write_text("x\n")
    (wild / "zeroshot_classification_templates.txt").write_text("{c}\n")
    tasks = tmp_path / "tasks.yml"
    tasks.write_text(
        "colours:\n  name: Colours\n  main_metric: acc1\n  num_classes: 3\n"
        "shapes/retrieval:\n  name: Shapes\n  main_metric: mean_recall@1\n  task: retrieval\n  group: retrieval\n"
        "wilds/fmow:\n  name: FMoW\n  main_metric: acc_worst_region\n"
        "absent:\n  name: Absent\n  main_metric: acc1\n")
    return d, tasks


def _independent_acc1(run_dir: Path) -> float:
    """acc1 of the colour task computed here with open_clip directly (not curate.evaluate.run)."""
    import torch
    from PIL import Image

    model, pre, tok = open_clip_from_run(run_dir)
    with torch.no_grad():
        w = []
        for name, _ in COLOURS:
            e = torch.nn.functional.normalize(model.encode_text(tok([f"a {name} square.", name])), dim=-1).mean(0)
            w.append(e / e.norm())
        w = torch.stack(w, dim=1)
        imgs = torch.stack([pre(Image.open(io.BytesIO(_jpeg(COLOURS[i % 3][1])))) for i in range(9)])
        f = torch.nn.functional.normalize(model.encode_image(imgs), dim=-1)
        pred = (100 * f @ w).argmax(1).numpy()
    return float((pred == np.arange(9) % 3).mean())


def test_evaluate_run_appends_skips_and_reports_missing(run_dir, eval_data, tmp_path):
    data, tasks = eval_data
    s = evaluate_run(run_dir, tasks=tasks, data_dir=data)
    status = {r["key"]: r["status"] for r in s.rows}
    assert status == {"colours": "evaluated", "shapes/retrieval": "evaluated", "wilds/fmow": "unsupported",
                      "absent": "missing"}
    lines = [json.loads(x) for x in (run_dir / "eval_results.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == ["colours", "shapes/retrieval"]
    col = lines[0]
    assert col["n"] == 9 and col["images_per_second"] > 0
    assert col["metrics"]["main_metric"] == col["metrics"]["acc1"] == pytest.approx(_independent_acc1(run_dir))
    ret = lines[1]["metrics"]
    assert ret["main_metric"] == ret["mean_recall@1"] and lines[1]["n"] == 3
    assert "images/s" in s.table()
    # re-run: nothing recomputed, nothing appended
    s2 = evaluate_run(run_dir, tasks=tasks, data_dir=data)
    assert [r["status"] for r in s2.rows][:2] == ["done", "done"]
    assert len((run_dir / "eval_results.jsonl").read_text().splitlines()) == 2


def test_bad_templates_and_missing_record(run_dir, eval_data, tmp_path):
    data, tasks = eval_data
    (data / "wds_colours_test" / "zeroshot_classification_templates.txt").write_text("a photo\n")
    with pytest.raises(CurateError, match="lacks the \\{c\\} placeholder"):
        evaluate_run(run_dir, tasks=tasks, data_dir=data, only=["colours"])
    with pytest.raises(CurateError, match="no training record"):
        evaluate_run(tmp_path / "nowhere", tasks=tasks, data_dir=data)


def test_cli_eval_and_errors(run_dir, eval_data, tmp_path):
    from click.testing import CliRunner

    from curate.cli.main import main

    data, tasks = eval_data
    r = CliRunner().invoke(main, ["eval", "--train-output-dir", str(run_dir), "--tasks", str(tasks),
                                  "--data-dir", str(data), "--task", "colours", "--task", "absent"])
    assert r.exit_code == 0, r.output
    assert "images/s" in r.output and "1 evaluated" in r.output and "1 missing" in r.output
    r = CliRunner().invoke(main, ["train", "--scale", "huge", "--data", str(data), "--output-dir", str(tmp_path)])
    assert r.exit_code == 1 and r.output.strip().startswith("error: unknown scale 'huge'")
    assert len(r.output.strip().splitlines()) == 1
    for cmd in (["train"], ["eval"], ["demo"], ["tic", "train"], ["tic", "matrix"]):
        h = CliRunner().invoke(main, cmd + ["--help"])
        assert h.exit_code == 0 and "Example:" in h.output


def test_tic_tasks_from_export_layout(run_dir, tmp_path):
    # `curate tic export` / convert_wds.sh layout: flat {0..N-1}.tar, nshards.txt, count.txt
    root = tmp_path / "export"
    for year in (2016, 2017):
        d = root / "eval" / "retrieval" / str(year)
        _tar(d / "0.tar", [(f"{i:04d}", {"jpg": _jpeg(c), "txt": f"a {n} square".encode()})
                           for i, (n, c) in enumerate(COLOURS)])
        (d / "nshards.txt").write_text("1\n")
        (d / "count.txt").write_text("3\n")
        (d / "dataset_type.txt").write_text("retrieval\n")
    from curate.evaluate.tasks import load_tasklist

    tasks = {k: v for k, v in load_tasklist(REPO_TIC_TASKS).items() if "/retrieval/" in k and k[-4:] in ("2016", "2017")}
    tfile = tmp_path / "tic.yml"
    import yaml

    tfile.write_text(yaml.safe_dump(tasks))
    s = evaluate_run(run_dir, tasks=tfile, data_dir=root)
    assert [r["status"] for r in s.rows] == ["evaluated", "evaluated"] and all(r["n"] == 3 for r in s.rows)
    m = tic_matrix([("2016", run_dir), ("2017", run_dir)])
    assert not np.isnan(np.array(m["matrix"])).any()


REPO_TIC_TASKS = Path(__file__).resolve().parents[2] / "eval" / "tic_tasklist.yml"
