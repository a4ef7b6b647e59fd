"""``curate tic train PLAN``: a TiC continual plan run step by step with open_clip's trainer.

A two-step cumulative plan over resharder outputs of the bundled pool (standing in for the
yearly splits): step 2016 from scratch, step 2017 warm-started from 2016's weights with a
fresh optimizer and schedule (TiC's ``--new_run``); a re-run skips both.
"""

from __future__ import annotations

import json

import pytest

from curate.errors import CurateError
from curate.tic.plan import make_plan, write_plan
from curate.tic.train import plan_step_spec, run_plan
from curate.train.trainer import TrainSpec, read_record
from tests.train.test_trainer import reshard_sample_pool


def test_plan_step_paths_resolve_against_root(tmp_path):
    plan = make_plan("cumulative-all", [2016, 2017], 640, {"2014": 1, "2015": 1, "2016": 1, "2017": 1}, scale="tiny")
    spec = plan_step_spec(plan["steps"][1], tmp_path, workers=1)
    assert isinstance(spec, TrainSpec) and spec.new_run and spec.warmup == 0 and spec.train_num_samples == 640
    assert spec.data.split("::") == [str(tmp_path / f"tic/train/{y}") for y in (2014, 2015, 2016, 2017)]
    assert spec.resume == str(tmp_path / "runs/tic/cumulative-all/2016/checkpoints/epoch_latest.pt")
    assert spec.run_dir == tmp_path / "runs/tic/cumulative-all/2017"
    with pytest.raises(CurateError, match="bad train entry"):
        plan_step_spec({"name": "x", "train": {"scale": "tiny", "data": "a", "output_dir": "o", "bogus": 1}}, tmp_path)


def two_step_plan(tmp_path):
    """A cumulative-all plan (steps 2016, 2017) over yearly dirs made from the bundled pool."""
    a, b = reshard_sample_pool(tmp_path)
    train_root = tmp_path / "tic" / "train"
    train_root.mkdir(parents=True)
    for year, src in ((2014, a), (2015, a), (2016, a), (2017, b)):
        (train_root / str(year)).symlink_to(src, target_is_directory=True)
    plan = make_plan("cumulative-all", [2016, 2017], 128, {"2014": 1000, "2015": 1000, "2016": 1000, "2017": 1000},
                     scale="tiny")
    path = write_plan(plan, tmp_path / "plan.json")
    return path


def test_run_plan_scratch_then_warm_start_then_skip(tmp_path):
    path = two_step_plan(tmp_path)
    said = []
    done = run_plan(path, root=tmp_path, workers=1, num_checkpoints=1, threads=1, say=said.append)
    assert [d["status"] for d in done] == ["trained", "trained"]
    runs = tmp_path / "runs" / "tic" / "cumulative-all"
    first, second = read_record(runs / "2016"), read_record(runs / "2017")
    assert first["new_run"] is False and first["warmup"] == 500 and first["train_num_samples"] == 128
    assert second["new_run"] is True and second["warmup"] == 0
    assert second["resumed_from"] == str(runs / "2017" / "warmstart.pt")
    log = (runs / "2017" / "out.log").read_text()
    assert "=> loaded checkpoint" in log and "(epoch 0)" in log  # weights only, epoch/optimizer fresh
    assert len(second["data"]) == 4
    again = run_plan(path, root=tmp_path, workers=1, num_checkpoints=1, threads=1, say=said.append)
    assert [d["status"] for d in again] == ["skipped", "skipped"]


def test_two_step_plan_under_torchrun(tmp_path):
    # `curate tic train PLAN --nproc 2`: the warm step loads step 2016's weights into the
    # DDP-wrapped model on both ranks (gloo on CPU).
    from click.testing import CliRunner

    from curate.cli import main

    path = two_step_plan(tmp_path)
    r = CliRunner().invoke(main, ["tic", "train", str(path), "--root", str(tmp_path), "--workers", "1",
                                  "--num-checkpoints", "1", "--threads", "1", "--nproc", "2", "-q"])
    assert r.exit_code == 0, r.output
    runs = tmp_path / "runs" / "tic" / "cumulative-all"
    second = read_record(runs / "2017")
    assert second["new_run"] is True and second["world_size"] == 2
    log = (runs / "2017" / "out.log").read_text()
    assert "Missing key" not in log and "=> loaded checkpoint" in log and "(epoch 0)" in log
