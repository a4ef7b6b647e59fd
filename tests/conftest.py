"""Shared fixtures: small hand-made pools written as real parquet files, and catalogs over them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog.connection import init_catalog

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    """No progress lines mixed into the command output tests compare (CliRunner's output holds
    stderr too); tests/test_progress.py turns them back on where it checks them."""
    monkeypatch.setenv("CURATE_PROGRESS", "off")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """For one test module: a fresh cache of unpacked models and word lists ($CURATE_CACHE) and
    the bundled language-ID model ($CURATE_LID_MODEL unset); both restored afterwards. Modules
    that build text features use it with ``pytestmark = pytest.mark.usefixtures("model_cache")``."""
    saved = {k: os.environ.get(k) for k in ("CURATE_CACHE", "CURATE_LID_MODEL")}
    os.environ["CURATE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("CURATE_LID_MODEL", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def uid_of(i: int) -> str:
    """A deterministic, valid uid for test row i (spread over the 128-bit range)."""
    return f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}{(i * 0xC2B2AE3D27D4EB4F + 1) % (1 << 64):016x}"


def pool_table(rows: list[dict]) -> pa.Table:
    """A CommonPool-schema table; missing fields get plain defaults."""
    cols = {
        "uid": pa.string(), "url": pa.string(), "text": pa.string(),
        "original_width": pa.int64(), "original_height": pa.int64(),
        "clip_b32_similarity_score": pa.float32(), "clip_l14_similarity_score": pa.float32(),
        "face_bboxes": pa.list_(pa.list_(pa.float64())), "sha256": pa.string(),
    }
    defaults = {"url": "http://x/1.jpg", "text": "a photo of a dog", "original_width": 256,
                "original_height": 256, "clip_b32_similarity_score": 0.3,
                "clip_l14_similarity_score": 0.3, "face_bboxes": [], "sha256": "0" * 64}
    data = {c: [r.get(c, defaults.get(c)) for r in rows] for c in cols}
    return pa.table({c: pa.array(v, t) for (c, t), v in zip(cols.items(), data.values())})


@pytest.fixture
def make_catalog(tmp_path):
    """make_catalog([[row, ...], [row, ...]]) -> catalog path over one parquet file per list."""
    counter = {"n": 0}

    def make(files: list[list[dict]], **kw) -> Path:
        counter["n"] += 1
        root = tmp_path / f"pool{counter['n']}"
        meta = root / "metadata"
        meta.mkdir(parents=True)
        for i, rows in enumerate(files):
            pq.write_table(pool_table(rows), meta / f"{i:04d}.parquet", row_group_size=max(1, len(rows) // 2 or 1))
        return init_catalog(root / "catalog.duckdb", pool=root, **kw)

    return make


@pytest.fixture
def run_dir(tmp_path):
    """A 'trained' tiny model for the evaluation tests: random init, saved as an open_clip
    training checkpoint plus our training record."""
    import json

    import open_clip
    import torch

    from curate.train.trainer import resolve_model

    model = resolve_model("tiny-vit")
    torch.manual_seed(0)
    m = open_clip.create_model(model)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ck = run / "checkpoints" / "epoch_latest.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, ck)
    (run / "info.json").write_text(json.dumps({"scale": "tiny", "model": model, "checkpoint": str(ck)}))
    return run


@pytest.fixture
def chdir_tmp(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def read_uids(path) -> list[str]:
    arr = np.load(path)
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(arr["f0"], arr["f1"])]


def open_clip_from_run(run_dir: Path):
    """(model, preprocess, tokenizer) of a training run's checkpoint, loaded with open_clip
    directly: the independent side of the evaluation tests (not through curate.evaluate.run)."""
    import json

    import open_clip
    import torch

    rec = json.loads((Path(run_dir) / "info.json").read_text())
    model, _, pre = open_clip.create_model_and_transforms(rec["model"])
    sd = torch.load(rec["checkpoint"], map_location="cpu")["state_dict"]
    model.load_state_dict({k[len("module."):]: v for k, v in sd.items()})
    model.eval()
    return model, pre, open_clip.get_tokenizer(rec["model"])


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for every test that needs it; yields its GCS address."""
    ray = pytest.importorskip("ray")
    from curate.engine.ray import connect_ray

    started = not ray.is_initialized()
    connect_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def loopback_s3(*buckets: str):
    """A moto S3 server on 127.0.0.1 with ``buckets``; yields (fsspec options, endpoint URL)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in process-wide state: start each server empty
    import urllib.request
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    for b in buckets:
        client.create_bucket(Bucket=b)
    try:
        yield opts, endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def clip_benchmark_python(tmp_path_factory) -> Path:
    """A Python with the real clip_benchmark 1.6.2 (the reference implementation) importable.

    A venv layered on this one's site-packages (a ``.pth`` file) so torch/open_clip are shared,
    with what clip_benchmark needs that ``.[all]`` lacks: ``numpy<2.4`` (its ``accuracy()``
    raises ``TypeError`` on numpy 2.4), pycocoevalcap/pycocotools (imported by its CLI) and
    requests. Installed from the machine's package index, never at curate's run time.
    """
    import site
    import subprocess
    import sys
    import venv

    root = tmp_path_factory.mktemp("clip-benchmark-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    py = root / "bin" / "python"
    child_site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    Path(child_site, "zz_parent.pth").write_text(site.getsitepackages()[0] + "\n")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "numpy<2.4", "clip_benchmark==1.6.2",
                        "pycocoevalcap", "pycocotools", "requests"], capture_output=True, text=True)
    assert r.returncode == 0, f"installing clip_benchmark failed: {r.stderr[-2000:]}"
    assert sys.executable != str(py)
    return py
