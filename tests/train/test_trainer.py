"""Fixed training: scale configs, shard discovery, the open_clip command, and real trainer runs.

The trainer tests run open_clip's own trainer (tiny model, a handful of steps) on real
resharder outputs of the bundled sample pool: a mixture of two directories, one with
``sizes.json`` and one without, with weights; a kill after the first checkpoint and a resume;
(the TiC warm start runs in tests/tic/test_train.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.train.trainer import (DataSource, TrainSpec, brace_runs, build_command, discover_shards, launcher, load_scales,
                          parse_data, read_record, resolve_model, train, train_data_args)

REPO = Path(__file__).resolve().parents[2]
POOL = REPO / "data" / "sample_pool"


# --------------------------------------------------------------------------- scales (spec §5.1)


# scale: (model, global batch, lr, warmup, samples seen, beta2) from DataComp/TiC scale_configs.py
DATACOMP = {
    "debug": ("ViT-B-32", 1024, 1e-4, 500, 128_000, None),
    "small": ("ViT-B-32", 4096, 5e-4, 500, 12_800_000, None),
    "medium": ("ViT-B-32", 4096, 5e-4, 500, 128_000_000, None),
    "large": ("ViT-B-16", 8192, 5e-4, 500, 1_280_000_000, None),
    "xlarge": ("ViT-L-14", 90112, 1e-3, 10_000, 12_800_000_000, 0.95),
    "tic_debug": ("ViT-B-32", 1024, 1e-4, 500, 1024 * 1000, None),
    "tic_medium": ("ViT-B-32", 4096, 5e-4, 500, 4096 * 4500, None),
    "tic_large": ("ViT-B-16", 8192, 5e-4, 500, 8192 * 22500, None),
    "tic_xlarge": ("ViT-B-16", 90112, 1e-3, 10_000, 90112 * 20500, None),
}


@pytest.mark.parametrize("scale", sorted(DATACOMP))
def test_scales_match_datacomp(scale):
    cfg = load_scales()[scale]
    got = (cfg["model"], cfg["batch_size"], cfg["learning_rate"], cfg["warmup"], cfg["train_num_samples"], cfg["beta2"])
    assert got == DATACOMP[scale]


def test_tiny_scale_is_a_local_config():
    cfg = load_scales()["tiny"]
    m = resolve_model(cfg["model"])
    assert m.startswith("local-dir:") and Path(m[len("local-dir:"):], "open_clip_config.json").is_file()
    # "vit" in the name gives open_clip's ViT optimiser defaults (beta2 0.98, eps 1e-6) as DataComp's B/32
    assert "vit" in m.lower()


# --------------------------------------------------------------------------- shard discovery


def _touch_shards(d: Path, numbers, successes=None, stats=True):
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(numbers):
        (d / f"{n:08d}.tar").write_bytes(b"")
        if stats:
            (d / f"{n:08d}_stats.json").write_text(json.dumps({"successes": (successes or {}).get(n, 10)}))


@pytest.mark.parametrize("nums,expected", [
    ([(0, 8)], ["p/00000000.tar"]),
    ([(0, 8), (1, 8), (2, 8)], ["p/{00000000..00000002}.tar"]),
    ([(0, 8), (1, 8), (5, 8), (7, 8), (8, 8)], ["p/{00000000..00000001}.tar", "p/00000005.tar", "p/{00000007..00000008}.tar"]),
    ([(3, 1), (1, 1), (2, 1)], ["p/{1..3}.tar"]),
])
def test_brace_runs(nums, expected):
    assert brace_runs("p/", nums, ".tar") == expected


def test_discover_with_and_without_sizes_json(tmp_path):
    a = tmp_path / "a"
    _touch_shards(a, [0, 1, 2], successes={0: 7, 1: 5, 2: 3})
    src = discover_shards(a)
    assert src.patterns == [f"{a}/{{00000000..00000002}}.tar"] and src.num_shards == 3 and src.num_samples == 15
    # sizes.json wins over _stats.json (TiC add_sizes.py), per shard name
    (a / "sizes.json").write_text(json.dumps({"00000000.tar": 100, "00000001.tar": 200, "00000002.tar": 300}))
    assert discover_shards(a).num_samples == 600
    # a shard with neither: count unknown, still trainable (DataComp passes --train-num-samples)
    b = tmp_path / "b"
    _touch_shards(b, [0, 3], stats=False)
    src = discover_shards(b)
    assert src.num_samples is None and src.patterns == [f"{b}/00000000.tar", f"{b}/00000003.tar"]


def test_discover_nested_dirs_and_single_tar(tmp_path):
    _touch_shards(tmp_path / "2016" / "0", [0, 1])
    _touch_shards(tmp_path / "2016" / "1", [0])
    src = discover_shards(tmp_path / "2016")
    assert src.patterns == [f"{tmp_path}/2016/0/{{00000000..00000001}}.tar", f"{tmp_path}/2016/1/00000000.tar"]
    assert src.num_samples == 30
    one = discover_shards(tmp_path / "2016" / "1" / "00000000.tar")
    assert one.num_shards == 1 and one.num_samples == 10


def test_weights_repeat_per_component(tmp_path):
    _touch_shards(tmp_path / "a", [0, 1, 5])
    _touch_shards(tmp_path / "b", [0])
    srcs = parse_data(f"{tmp_path}/a::{tmp_path}/b", "1::3")
    data, factors = train_data_args(srcs)
    assert data == f"{tmp_path}/a/{{00000000..00000001}}.tar::{tmp_path}/a/00000005.tar::{tmp_path}/b/00000000.tar"
    assert factors == "1.0::1.0::3.0"
    assert train_data_args(parse_data(f"{tmp_path}/a"))[1] is None


@pytest.mark.parametrize("data,weights,msg", [
    ("{t}/a::{t}/b", "1", "2 --data entries"),
    ("{t}/a", "x", "not a number"),
    ("{t}/a", "-1", "must be >= 0"),
    ("{t}/nope", None, "not a directory"),
    ("{t}/empty", None, "no .tar shards"),
])
def test_bad_data_is_one_line(tmp_path, data, weights, msg):
    _touch_shards(tmp_path / "a", [0])
    _touch_shards(tmp_path / "b", [0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match=msg) as e:
        parse_data(data.format(t=tmp_path), weights)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the command (spec §5.2)


def _args(cmd: list[str]) -> dict:
    out, i = {}, 0
    while i < len(cmd):
        if i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
            out[cmd[i]] = cmd[i + 1]
            i += 2
        else:
            out[cmd[i]] = True
            i += 1
    return out


def test_command_small_scale(tmp_path):
    src = [DataSource("d", ["/d/{00000000..00000009}.tar"], 10, 100)]
    spec = TrainSpec(scale="small", data="d", output_dir=tmp_path)
    a = _args(build_command(spec, src, load_scales()["small"], world_size=1, resume="latest"))
    # DataComp: per-GPU batch = 4096 // (1 * 1); samples per "epoch" = 12.8M // 5 checkpoints
    assert a["--batch-size"] == "4096" and a["--train-num-samples"] == "2560000" and a["--epochs"] == "5"
    assert a["--lr"] == "0.0005" and a["--warmup"] == "500" and a["--model"] == "ViT-B-32"
    assert a["--precision"] == "amp" and a["--workers"] == "4" and a["--name"] == "small_scale"
    for flag in ("--ddp-static-graph", "--local-loss", "--gather-with-grad", "--grad-checkpointing",
                 "--save-most-recent", "--dataset-resampled"):
        assert a[flag] is True
    assert a["--resume"] == "latest" and a["--dataset-type"] == "webdataset" and a["--save-frequency"] == "0"
    assert "--beta2" not in a and "--train-data-upsampling-factors" not in a


def test_command_xlarge_on_8_gpus_with_overrides(tmp_path):
    src = [DataSource("d", ["/d/0.tar"], 1, 1, weight=2.0)]
    spec = TrainSpec(scale="xlarge", data="d", output_dir=tmp_path, accum_freq=2, warmup=0,
                     train_num_samples=1000, exp_name="x")
    a = _args(build_command(spec, src, load_scales()["xlarge"], world_size=8, resume=None))
    assert a["--batch-size"] == str(90112 // (8 * 2))  # 5632
    assert a["--beta2"] == "0.95" and a["--precision"] == "amp_bfloat16"
    assert a["--warmup"] == "0" and a["--train-num-samples"] == "200" and a["--accum-freq"] == "2"
    assert a["--train-data-upsampling-factors"] == "2.0" and "--resume" not in a


def test_command_refuses_blur_field_and_bad_precision(tmp_path):
    src = [DataSource("d", ["/d/0.tar"], 1, 1)]
    cfg = load_scales()["small"]
    with pytest.raises(CurateError, match="blur-field"):
        build_command(TrainSpec(scale="small", data="d", output_dir=tmp_path, blur_field="face_bboxes"), src, cfg, 1, None)
    with pytest.raises(CurateError, match="precision"):
        build_command(TrainSpec(scale="small", data="d", output_dir=tmp_path, precision="fp8"), src, cfg, 1, None)


# --------------------------------------------------------------------------- real trainer runs


def reshard_sample_pool(tmp_path: Path) -> tuple[Path, Path]:
    """Two resharder outputs over the bundled pool: the first 1000 rows and the rest."""
    from curate.engine import Engine
    from curate.shards.reshard import reshard
    from curate.subset import write_subset
    from curate.uids import hex_array_to_pairs, sort_pairs

    files = sorted((POOL / "metadata").glob("*.parquet"))
    outs = []
    for k, f in enumerate(files):
        hi, lo = hex_array_to_pairs(pq.read_table(f, columns=["uid"]).column("uid"))
        sub = write_subset(tmp_path / f"s{k}.npy", *sort_pairs(hi, lo))
        outs.append(tmp_path / f"r{k}")
        reshard([POOL / "shards"], outs[-1], sub, shard_size=300, engine=Engine(workers=1))
    return outs[0], outs[1]


def test_trainer_mixture_kill_and_resume(tmp_path):
    with_sizes, without = reshard_sample_pool(tmp_path)
    assert (with_sizes / "sizes.json").is_file()
    (without / "sizes.json").unlink()  # consumed from the _stats.json files instead
    data = f"{with_sizes}::{without}"
    out = tmp_path / "runs"
    run = out / "mix"
    # Launch through the CLI in its own process group, kill it after the first checkpoint.
    cmd = [sys.executable, "-m", "curate.cli.main", "train", "--scale", "tiny", "--data", data, "--data-weights", "1::3",
           "--output-dir", str(out), "--exp-name", "mix", "--workers", "1", "--num-checkpoints", "3",
           "--train-num-samples", "960", "--log-every-n-steps", "1", "--threads", "1", "-q"]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    latest = run / "checkpoints" / "epoch_latest.pt"  # save-frequency 0: only the latest until the end
    while not latest.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert latest.exists(), "trainer wrote no checkpoint"
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "info.json").exists() or p.returncode == 0

    res = train(TrainSpec(scale="tiny", data=data, data_weights="1::3", output_dir=out, exp_name="mix",
                          workers=1, num_checkpoints=3, train_num_samples=960, log_every_n_steps=1, threads=1))
    log = (run / "out.log").read_text()
    # killed mid-run (the trainer died with the process group), then continued from the
    # checkpoint of epoch 1 or 2, not from scratch
    assert p.returncode == -signal.SIGKILL
    assert re.search(r"=> resuming checkpoint .*epoch_latest\.pt' \(epoch [12]\)", log), log[-2000:]
    assert (run / "checkpoints" / "epoch_3.pt").is_file()
    rec = read_record(run)
    assert rec["epochs_done"] == 3 and rec["checkpoint"] == str(res.checkpoint)
    assert [d["samples"] for d in rec["data"]] == [1000 - _failed(0), 1000 - _failed(1)]
    assert [d["weight"] for d in rec["data"]] == [1.0, 3.0]
    params = (run / "params.txt").read_text()
    assert "train_data_upsampling_factors: 1.0::3.0" in params and "dataset_resampled: True" in params



def _failed(k: int) -> int:
    """Rows of pool file k that are not in its shards (the sample pool simulates failed downloads)."""
    files = sorted((POOL / "metadata").glob("*.parquet"))
    uids = set(pq.read_table(files[k], columns=["uid"]).column("uid").to_pylist())
    present = 0
    for st in sorted((POOL / "shards").glob("*.parquet")):
        t = pq.read_table(st, columns=["uid", "status"]).to_pylist()
        present += sum(1 for r in t if r["uid"] in uids and r["status"] == "success")
    return len(uids) - present


def test_trainer_under_torchrun_two_processes(tmp_path):
    # The multi-GPU path (torch.distributed.run, per-process batch = global / world size) with two
    # CPU processes: open_clip picks the gloo backend without a GPU. NCCL on real GPUs is not
    # exercised here (the machine has none).
    first, second = reshard_sample_pool(tmp_path)
    out = tmp_path / "runs"
    res = train(TrainSpec(scale="tiny", data=f"{first}::{second}", output_dir=out, exp_name="ddp", workers=1,
                          nproc=2, train_num_samples=512, log_every_n_steps=1, threads=1))
    run = out / "ddp"
    log = (run / "out.log").read_text()
    assert "Running in distributed mode with multiple processes. Device: cpu." in log, log[-2000:]
    assert "total 2." in log
    params = (run / "params.txt").read_text()
    assert "distributed: True" in params and "world_size: 2" in params
    assert "batch_size: 32" in params  # the tiny scale's global batch of 64 over 2 processes
    assert res.checkpoint.is_file()
    assert read_record(run)["world_size"] == 2


def test_launcher_commands():
    assert launcher(1)[1:] == ["-m", "open_clip_train.main"]
    gpu = launcher(8, gpus=8)
    # torchrun's options end at "--", so open_clip's --logs is not read as torchrun's --logs-specs
    assert gpu[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "-m", "--",
                       "open_clip_train.main"]
    assert launcher(2, gpus=0)[-1] == "curate.train.entry"  # CPU DDP shim, only without GPUs


def test_tic_warm_start_under_torchrun_two_processes(tmp_path):
    # TiC's --new-run with several processes: open_clip wraps the model in DDP before loading a
    # bare --resume state dict, so the warm-start file needs DDP's `module.` keys (issue 18:
    # 'Missing key(s) "module.positional_embedding"' on every rank).
    import torch

    first, second = reshard_sample_pool(tmp_path)
    out = tmp_path / "runs"
    base = train(TrainSpec(scale="tiny", data=str(first), output_dir=out, exp_name="step0", workers=1,
                           train_num_samples=256, threads=1))
    warm = train(TrainSpec(scale="tiny", data=str(second), output_dir=out, exp_name="step1", workers=1, nproc=2,
                           train_num_samples=256, threads=1, new_run=True, resume=str(base.checkpoint)))
    log = (out / "step1" / "out.log").read_text()
    assert "Missing key" not in log and "world_size: 2" in (out / "step1" / "params.txt").read_text()
    assert warm.checkpoint.is_file()
    ws = torch.load(out / "step1" / "warmstart.pt", map_location="cpu", weights_only=True)
    src = torch.load(base.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    src = {k[len("module."):] if k.startswith("module.") else k: v for k, v in src.items()}
    assert set(ws) == {f"module.{k}" for k in src}  # the DDP keys open_clip loads under torchrun
    assert all(torch.equal(ws[f"module.{k}"], v) for k, v in src.items())  # step 0's weights, unchanged
