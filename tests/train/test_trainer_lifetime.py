"""The trainer subprocess does not outlive a `curate train` killed with kill -9 (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

REPO = Path(__file__).resolve().parents[2]

# what train() does around the trainer, with a trainer that would run for a minute
DRIVER = """
import os, sys
from curate.train import trainer
trainer._run([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), [], None)
"""


def _state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()[0]


def _child(pid: int) -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                raw = (d / "stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2:].split()[1]) == pid:
                return int(d.name)
    return None


def test_trainer_dies_with_a_killed_curate_train():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO)
    child = None
    try:
        deadline = time.time() + 60
        while child is None and time.time() < deadline and driver.poll() is None:
            child = _child(driver.pid)
            time.sleep(0.05)
        assert child is not None, "the trainer subprocess never started"
        time.sleep(0.5)  # past fork/exec
        assert _state(child) not in (None, "Z")
    finally:
        driver.kill()
        driver.wait()
    deadline = time.time() + 5
    while time.time() < deadline and _state(child) not in (None, "Z"):
        time.sleep(0.05)
    alive = _state(child) not in (None, "Z")
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the trainer outlived the killed `curate train`"
