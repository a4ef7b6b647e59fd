"""Upstream tools load our checkpoints by the model name ``info.json`` records (issue 18).

A ``local-dir:`` name makes open_clip ignore ``pretrained=``, so clip_benchmark and DataComp's
evaluate.py evaluated a random model. The record now names the repository's tiny config by a
plain open_clip name (``tiny-vit``) and the run holds ``open_clip_models/tiny-vit.json``, which
``open_clip.add_model_config`` registers. Independent sides: open_clip's own
``create_model_and_transforms(NAME, pretrained=CKPT)`` (what DataComp's evaluate.py calls), a
zero-shot computed here with torch, and the real clip_benchmark 1.6.2 CLI in its own Python.
"""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.errors import CurateError
from curate.train.trainer import MODELS_DIR, TrainSpec, read_record, record_model_name, register_model, train
from tests.evaluate.test_run import _jpeg, _tar
from tests.train.test_trainer import reshard_sample_pool

# six colours, two shades each: 12 images, 6 classes (so acc5 is defined, as clip_benchmark's)
COLOURS = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220)),
           ("yellow", (230, 220, 40)), ("purple", (140, 40, 160)), ("white", (245, 245, 245))]
SHADES = (0, -25)
TEMPLATES = ["a {c} square.", "a photo of the colour {c}.", "{c}"]


def _rgb(i):
    _, (r, g, b) = COLOURS[i % 6]
    d = SHADES[i // 6]
    return (max(r + d, 0), max(g + d, 0), max(b + d, 0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by `curate train` (open_clip's trainer), and an eval set in the
    clip_benchmark / DataComp webdataset layout."""
    tmp = tmp_path_factory.mktemp("names")
    first, _ = reshard_sample_pool(tmp)
    train(TrainSpec(scale="tiny", data=str(first), output_dir=tmp / "runs", exp_name="t", workers=1,
                    train_num_samples=256, num_checkpoints=1, threads=1))
    run = tmp / "runs" / "t"
    ds = tmp / "evaldata" / "wds_colours_test"
    _tar(ds / "test" / "0.tar", [(f"{i:04d}", {"jpg": _jpeg(_rgb(i)), "cls": str(i % 6).encode()}) for i in range(12)])
    (ds / "test" / "nshards.txt").write_text("1\n")
    (ds / "classnames.txt").write_text("".join(f"{n}\n" for n, _ in COLOURS))
    (ds / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    tasks = tmp / "tasks.yml"
    tasks.write_text("colours:\n  name: Colours\n  main_metric: acc1\n")
    r = CliRunner().invoke(main, ["eval", "--train-output-dir", str(run), "--tasks", str(tasks), "--data-dir",
                                  str(tmp / "evaldata"), "--precision", "fp32", "--device", "cpu", "--threads", "1"])
    assert r.exit_code == 0, r.output
    line = json.loads((run / "eval_results.jsonl").read_text().splitlines()[0])
    return run, ds, line["metrics"]


def test_record_names_a_plain_model_and_holds_its_config(trained):
    run, _, _ = trained
    rec = read_record(run)
    assert rec["model"] == "tiny-vit"
    assert rec["trained_model_arg"] == f"local-dir:{MODELS_DIR / 'tiny-vit'}"  # what open_clip_train got
    wrapped = json.loads((MODELS_DIR / "tiny-vit" / "open_clip_config.json").read_text())
    assert rec["model_config"] == str(run / "open_clip_models" / "tiny-vit.json")
    assert json.loads((run / "open_clip_models" / "tiny-vit.json").read_text()) == wrapped["model_cfg"]


def test_open_clip_loads_the_checkpoint_by_name(trained):
    # DataComp's evaluate.py: create_model_and_transforms(info["model"], pretrained=info["checkpoint"])
    import open_clip
    import torch
    from PIL import Image

    run, _, curate_metrics = trained
    rec = read_record(run)
    open_clip.add_model_config(rec["model_config"])  # open_clip's own registration
    model, _, pre = open_clip.create_model_and_transforms(rec["model"], pretrained=rec["checkpoint"])
    model.eval()
    sd = torch.load(rec["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    mine = model.state_dict()
    assert set(mine) == set(sd)
    assert all(torch.equal(mine[k], v) for k, v in sd.items())  # not a random init
    # preprocessing as the config dir gives it (mean/std/size/interpolation)
    local = open_clip.create_model_and_transforms(f"local-dir:{MODELS_DIR / 'tiny-vit'}")[2]
    assert str(pre).replace("(", "[").replace(")", "]") == str(local).replace("(", "[").replace(")", "]")
    # zero-shot acc1 computed here with torch, as clip_benchmark does
    tok = open_clip.get_tokenizer(rec["model"])
    with torch.no_grad():
        w = []
        for n, _ in COLOURS:
            e = torch.nn.functional.normalize(model.encode_text(tok([t.format(c=n) for t in TEMPLATES])), dim=-1)
            e = e.mean(0)
            w.append(e / e.norm())
        w = torch.stack(w, dim=1)
        imgs = torch.stack([pre(Image.open(io.BytesIO(_jpeg(_rgb(i))))) for i in range(12)])
        f = torch.nn.functional.normalize(model.encode_image(imgs), dim=-1)
        pred = (f @ w).argmax(1).numpy()
    assert curate_metrics["acc1"] == pytest.approx(float((pred == np.arange(12) % 6).mean()), abs=1e-12)


def test_real_clip_benchmark_reproduces_curate_eval(trained, clip_benchmark_python, tmp_path):
    run, ds, curate_metrics = trained
    rec = read_record(run)
    out = tmp_path / "cb.json"
    # the registration clip_benchmark needs: one add_model_config call in its own process
    code = (f"import open_clip; open_clip.add_model_config({rec['model_config']!r}); "
            "from clip_benchmark.cli import main; main()")
    r = subprocess.run([str(clip_benchmark_python), "-c", code, "eval", "--dataset", "wds/colours",
                        "--dataset_root", str(ds), "--model", rec["model"], "--pretrained", rec["checkpoint"],
                        "--task", "zeroshot_classification", "--no_amp", "--batch_size", "5", "--num_workers", "0",
                        "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cb = json.loads(out.read_text())["metrics"]
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert curate_metrics[k] == pytest.approx(cb[k], abs=1e-9), k
    assert "initialized randomly" not in r.stderr


def test_names_and_registration_rules(tmp_path):
    import open_clip

    assert record_model_name("tiny-vit") == "tiny-vit"
    assert record_model_name(f"local-dir:{MODELS_DIR / 'tiny-vit'}") == "tiny-vit"
    assert record_model_name("ViT-B-32") == "ViT-B-32"  # an open_clip name stays
    # a config dir named like an open_clip model with another config keeps local-dir:
    clash = tmp_path / "ViT-B-32"
    clash.mkdir()
    (clash / "open_clip_config.json").write_text((MODELS_DIR / "tiny-vit" / "open_clip_config.json").read_text())
    assert record_model_name(str(clash)) == f"local-dir:{clash.resolve()}"
    with pytest.raises(CurateError, match="already has a different config"):
        register_model("ViT-B-32", clash / "open_clip_config.json")
    # old runs' local-dir names are accepted as they are
    assert register_model(f"local-dir:{MODELS_DIR / 'tiny-vit'}") == f"local-dir:{MODELS_DIR / 'tiny-vit'}"
    assert register_model("tiny-vit") == "tiny-vit" and "tiny-vit" in open_clip.list_models()
