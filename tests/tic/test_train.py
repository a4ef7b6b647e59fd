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
from curate.tic.train import mixture_weights, plan_step_spec, run_plan
from curate.train.trainer import DataSource, TrainSpec, build_command, read_record, scale_config
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
    # the plan gives each of the 4 years probability 1/4; 2014-2016 are links to one dir of
    # S_a samples, 2017 holds S_b: weights 1/4 * (3 S_a + S_b) / S
    s_a, s_b = second["data"][0]["samples"], second["data"][3]["samples"]
    total = 3 * s_a + s_b
    assert [d["weight"] for d in second["data"]] == pytest.approx([total / 4 / s_a] * 3 + [total / 4 / s_b])
    assert "--train-data-upsampling-factors" in second["command"] and "--dataset-resampled" in second["command"]
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


def _sources(held):
    return [DataSource(f"d{i}", [f"/x/d{i}/{{0..1}}.tar"], 2, n) for i, n in enumerate(held)]


# (plan probabilities, samples each dir holds, weights worked by hand: w_d = p_d * T / S_d)
WEIGHTS = [
    # plan 29 + 29, but the replay dir came out with 18: T = 47, 23.5/18 and 23.5/29
    ((0.5, 0.5), (18, 29), (23.5 / 18, 23.5 / 29)),
    # every dir exactly as planned (Cumulative-Exp step 4 of test_plan): all 1
    ((0.125, 0.125, 0.25, 0.5), (150, 150, 300, 600), (1.0, 1.0, 1.0, 1.0)),
    # equal probabilities over 100 and 300 held samples: T = 400, 200/100 and 200/300
    ((0.5, 0.5), (100, 300), (2.0, 2 / 3)),
    # a dir planned at 0 (a buffer share of 0) gets weight 0
    ((0.0, 1.0), (5, 20), (0.0, 25 / 20)),
]


@pytest.mark.parametrize("probs,held,want", WEIGHTS)
def test_mixture_weights_honour_the_plan(probs, held, want):
    step = {"name": "s", "data": [{"probability": p} for p in probs]}
    got = mixture_weights(step, _sources(held))
    assert got == pytest.approx(want, rel=1e-12)
    # the expected share of drawn samples (shards drawn by weight, each yields its samples)
    draws = [w * n for w, n in zip(got, held)]
    assert [x / sum(draws) for x in draws] == pytest.approx(probs, rel=1e-12)


def test_trainer_arguments_carry_the_plan_weights(tmp_path):
    step = {"name": "2017", "data": [{"probability": 0.5}, {"probability": 0.5}]}
    sources = _sources((18, 29))
    for s, w in zip(sources, mixture_weights(step, sources)):
        s.weight = w
    spec = TrainSpec(scale="tiny", data="d0::d1", output_dir=tmp_path)
    args = build_command(spec, sources, scale_config("tiny"), 1, None)
    assert args[args.index("--train-data") + 1] == "/x/d0/{0..1}.tar::/x/d1/{0..1}.tar"
    assert args[args.index("--train-data-upsampling-factors") + 1] == f"{23.5 / 18!r}::{23.5 / 29!r}"
    assert "--dataset-resampled" in args
    # a dir of unknown size (e.g. s3://) counts as its planned samples: 29 and 29 -> 1, 1
    planned = {"name": "2017", "data": [{"probability": 0.5, "samples": 29}, {"probability": 0.5, "samples": 29}]}
    assert mixture_weights(planned, [DataSource("s3://b/d0", ["s3://b/d0/{0..1}.tar"], 0, None), sources[1]]) \
        == pytest.approx([1.0, 1.0])
    with pytest.raises(CurateError, match="2 data entries but 1 data dirs"):
        mixture_weights(step, sources[:1])
