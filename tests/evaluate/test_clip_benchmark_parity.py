"""Evaluation details as clip_benchmark / DataComp do them (issue 18): blank template and caption
lines kept, templates filled with ``str.format``, acc5 null below 5 classes, multi-label mAP,
the precision recorded, and the zero-shot classifier built once per run and reused from disk.

Independent sides: open_clip called directly (``open_clip_from_run``) and hand-worked tables.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from curate.errors import CurateError
from curate.evaluate import models as models_mod
from curate.evaluate.metrics import average_precision_per_class, multilabel_metrics
from curate.evaluate.models import fill_template, resolve_precision
from curate.evaluate.run import _captions, evaluate_run
from tests.conftest import open_clip_from_run
from tests.evaluate.test_run import COLOURS, _jpeg, _tar


# --------------------------------------------------------------------------- hand-worked tables

@pytest.mark.parametrize("template,classname,expected", [
    ("a photo of a {c}.", "dog", "a photo of a dog."),
    ("{c}", "dog", "dog"),
    ("", "dog", ""),                         # a blank line is an empty prompt in clip_benchmark
    ("a {{c}} is {c}", "dog", "a {c} is dog"),  # format: doubled braces are literal ones
])
def test_fill_template_is_str_format(template, classname, expected):
    assert fill_template(template, classname) == expected


def test_fill_template_with_a_foreign_field_is_one_line():
    with pytest.raises(CurateError, match=r"templates: template 'a \{x\} of \{c\}' is not a format string"):
        fill_template("a {x} of {c}", "dog")


@pytest.mark.parametrize("raw,expected", [
    (b"a cat\nsecond", ["a cat", "second"]),
    (b"a cat\n\nafter a blank", ["a cat", "", "after a blank"]),  # str.splitlines keeps blank lines
    (b"only\n", ["only"]),
    (b"", []),
])
def test_captions_split_as_clip_benchmark(raw, expected):
    assert _captions(raw) == expected


@pytest.mark.parametrize("precision,device,expected", [
    ("auto", "cuda", "amp"), ("auto", "cuda:1", "amp"), ("auto", "cpu", "fp32"),
    ("fp32", "cuda", "fp32"), ("bf16", "cpu", "bf16"), ("amp", "cpu", "amp"),
])
def test_precision_defaults_to_datacomps(precision, device, expected):
    assert resolve_precision(precision, device) == expected


def test_average_precision_by_hand():
    # class 0: ranking by score 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): precisions at the
    # positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2 = 5/6. class 1: the one positive ranked 2nd
    # of 4 -> 1/2. class 2: no positive -> 0.
    scores = np.array([[0.9, 0.2, 0.5], [0.8, 0.9, 0.1], [0.7, 0.3, 0.2], [0.1, 0.4, 0.3]])
    targets = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    ap = average_precision_per_class(scores, targets)
    assert ap == pytest.approx([5 / 6, 1 / 2, 0.0])
    assert multilabel_metrics(scores, targets)["mean_average_precision"] == pytest.approx((5 / 6 + 1 / 2) / 3)


# --------------------------------------------------------------------------- real runs


@pytest.fixture
def colour_task(tmp_path):
    d = tmp_path / "evaldata"
    cls = d / "wds_colours_test"
    _tar(cls / "test" / "0.tar", [(f"{i:04d}", {"jpg": _jpeg(COLOURS[i % 3][1]), "cls": str(i % 3).encode()})
                                  for i in range(6)])
    (cls / "classnames.txt").write_text("red\ngreen\nblue\n")
    # a blank template line: clip_benchmark keeps it as the empty prompt
    (cls / "zeroshot_classification_templates.txt").write_text("a {c} square.\n\n{c}\n")
    tasks = tmp_path / "tasks.yml"
    tasks.write_text("colours:\n  name: Colours\n  main_metric: acc1\n")
    return d, tasks


def _logits_by_open_clip(run_dir, prompts_per_class):
    import torch
    from PIL import Image

    model, pre, tok = open_clip_from_run(run_dir)
    with torch.no_grad():
        w = []
        for prompts in prompts_per_class:
            e = torch.nn.functional.normalize(model.encode_text(tok(prompts)), dim=-1).mean(0)
            w.append(e / e.norm())
        w = torch.stack(w, dim=1)
        imgs = torch.stack([pre(Image.open(io.BytesIO(_jpeg(COLOURS[i % 3][1])))) for i in range(6)])
        f = torch.nn.functional.normalize(model.encode_image(imgs), dim=-1)
        return (100 * f @ w).numpy()


def test_blank_template_is_averaged_in_and_classifier_is_cached(run_dir, colour_task, tmp_path, monkeypatch):
    data, tasks = colour_task
    calls = {"n": 0}
    real = models_mod.encode_texts

    def counting(m, texts, *a, **kw):
        calls["n"] += 1
        return real(m, texts, *a, **kw)

    monkeypatch.setattr(models_mod, "encode_texts", counting)
    out = tmp_path / "out"
    evaluate_run(run_dir, tasks=tasks, data_dir=data, output_dir=out)
    line = json.loads((out / "eval_results.jsonl").read_text().splitlines()[0])
    logits = _logits_by_open_clip(run_dir, [[f"a {n} square.", "", n] for n, _ in COLOURS])
    expected_acc1 = float((logits.argmax(1) == np.arange(6) % 3).mean())
    assert line["metrics"]["acc1"] == pytest.approx(expected_acc1)
    assert line["metrics"]["acc5"] is None  # 3 classes
    assert line["precision"] == "fp32" and line["device"] == "cpu"  # DataComp's amp is CUDA-only
    # images/s is 6 over the task's whole time; `seconds` is that time rounded to 1 ms
    secs, ips = line["seconds"], line["images_per_second"]
    assert secs > 0 and 6 / (secs + 0.0005) <= ips <= 6 / max(secs - 0.0005, 1e-9)
    built = calls["n"]
    assert built == 3  # one text batch per class
    cached = list((out / "classifiers").glob("*.npy"))
    assert len(cached) == 1
    # a second evaluation into another results file reuses the classifier from disk
    calls["n"] = 0
    (out / "eval_results.jsonl").unlink()
    evaluate_run(run_dir, tasks=tasks, data_dir=data, output_dir=out)
    assert calls["n"] == 0
    again = json.loads((out / "eval_results.jsonl").read_text().splitlines()[0])
    assert again["metrics"]["acc1"] == line["metrics"]["acc1"]


def test_bf16_is_recorded_with_its_own_classifier(run_dir, colour_task, tmp_path):
    data, tasks = colour_task
    evaluate_run(run_dir, tasks=tasks, data_dir=data, output_dir=tmp_path / "fp32", precision="fp32")
    evaluate_run(run_dir, tasks=tasks, data_dir=data, output_dir=tmp_path / "bf16", precision="bf16", threads=1)
    a = json.loads((tmp_path / "fp32" / "eval_results.jsonl").read_text())
    b = json.loads((tmp_path / "bf16" / "eval_results.jsonl").read_text())
    assert (a["precision"], b["precision"]) == ("fp32", "bf16")
    # different precisions never share a cached classifier
    assert list((tmp_path / "fp32" / "classifiers").glob("*.npy"))[0].name != \
        list((tmp_path / "bf16" / "classifiers").glob("*.npy"))[0].name
    wa = np.load(next((tmp_path / "fp32" / "classifiers").glob("*.npy")))
    wb = np.load(next((tmp_path / "bf16" / "classifiers").glob("*.npy")))
    # bf16 autocast really ran (the text tower's output differs) and stays near fp32's
    assert not np.array_equal(wa, wb) and np.abs(wa - wb).max() < 0.05


def test_multilabel_task_as_clip_benchmark(run_dir, tmp_path):
    d = tmp_path / "evaldata"
    ml = d / "wds_ml_test"

    def npy(vec):
        buf = io.BytesIO()
        np.save(buf, np.array(vec, dtype=np.int64))
        return buf.getvalue()

    targets = [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
    _tar(ml / "test" / "0.tar", [(f"{i:04d}", {"jpg": _jpeg(COLOURS[i % 3][1]), "npy": npy(t)})
                                 for i, t in enumerate(targets)])
    (ml / "classnames.txt").write_text("red\ngreen\nblue\n")
    (ml / "zeroshot_classification_templates.txt").write_text("{c}\n")
    (ml / "dataset_type.txt").write_text("multilabel\n")
    tasks = tmp_path / "tasks.yml"
    tasks.write_text("ml:\n  name: ML\n  main_metric: mean_average_precision\n")
    evaluate_run(run_dir, tasks=tasks, data_dir=d)
    line = json.loads((run_dir / "eval_results.jsonl").read_text())
    import torch
    from PIL import Image

    model, pre, tok = open_clip_from_run(run_dir)
    with torch.no_grad():
        w = torch.nn.functional.normalize(model.encode_text(tok(["red", "green", "blue"])), dim=-1).T
        imgs = torch.stack([pre(Image.open(io.BytesIO(_jpeg(COLOURS[i % 3][1])))) for i in range(4)])
        logits = (100 * torch.nn.functional.normalize(model.encode_image(imgs), dim=-1) @ w).numpy()
    assert line["metrics"]["main_metric"] == pytest.approx(
        float(average_precision_per_class(logits, np.array(targets)).mean()), abs=1e-6)


def test_unknown_dataset_type_is_one_line(run_dir, colour_task):
    data, tasks = colour_task
    (data / "wds_colours_test" / "dataset_type.txt").write_text("segmentation\n")
    with pytest.raises(CurateError, match="dataset type 'segmentation' is not supported"):
        evaluate_run(run_dir, tasks=tasks, data_dir=data)


def test_cli_precision_and_threads(run_dir, colour_task, tmp_path):
    from click.testing import CliRunner

    from curate.cli.main import main

    data, tasks = colour_task
    r = CliRunner().invoke(main, ["eval", "--train-output-dir", str(run_dir), "--tasks", str(tasks),
                                  "--data-dir", str(data), "--precision", "fp32", "--threads", "1",
                                  "--output-dir", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "eval_results.jsonl").read_text())["precision"] == "fp32"
    r = CliRunner().invoke(main, ["eval", "--train-output-dir", str(run_dir), "--precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output
