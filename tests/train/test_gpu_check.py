"""bench/gpu_check.sh in its CPU mode (what CI runs; no GPU is lent to this project's CI).

The script's four parts run at CPU sizes: faiss-cpu k-means and assignment checked against a
numpy float64 brute force (differences only at float ties), a tiny `curate train`, `curate
eval` fp32 vs bf16 autocast, `curate byod score`. It must say that the GPU parts were skipped
and why, and print its figures.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("faiss")


def test_cpu_mode_runs_and_reports(tmp_path):
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-only", "--work", str(tmp_path / "w"),
                        "--python", sys.executable], capture_output=True, text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 0, (out + r.stderr)[-3000:]
    assert "mode cpu (GPU parts skipped: --cpu-only given)" in out
    m = re.search(r"assignments differing: ([\d,]+) of 20,000; of them float ties: ([\d,]+)", out)
    assert m and m.group(1) == m.group(2), out
    assert re.search(r"tiny \(tiny-vit, fp32\): 256 samples in [\d.]+s .* samples/s", out), out
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert re.search(rf"{k}: fp32 [\d.]+, bf16 [\d.]+, delta [-+][\d.]+", out), out
    assert re.search(r"[\d,]+ pool rows scored in [\d.]+s .* rows/s", out), out
    assert out.rstrip().endswith("GPU parts skipped: --cpu-only given)")


def test_bad_option_is_one_line():
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown option --bogus (see --help)"
