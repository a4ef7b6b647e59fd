"""The explorer under test: the real `curate explore` on a free loopback port, and a real
headless chromium driven by selenium (Debian's chromium + chromium-driver; `.ci/run` installs
them). A missing browser is a failure, never a skip."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

CATALOG = REPO / "catalog.duckdb.example"


def curate_run(filter_file, out: Path, cwd: Path, *extra: str) -> Path:
    """`curate run` as a user runs it (a separate process): the independent side of the tests."""
    r = subprocess.run([sys.executable, "-m", "curate", "run", str(filter_file), "-c", str(CATALOG), "-o", str(out),
                        *extra], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def serve(catalog: Path, cwd: Path):
    """Base URL of `curate explore CATALOG --port P` started from ``cwd``, stopped on exit."""
    port = free_port()
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "curate", "explore", str(catalog), "--port", str(port)],
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            get_json(base + "/api/info")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"curate explore did not start: {(cwd / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    """Base URL of `curate explore CATALOG --port P` started from an empty directory."""
    with serve(CATALOG, tmp_path_factory.mktemp("explore-cwd")) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium; downloads go to ``browser.download_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium and chromium-driver are needed for the explorer's browser tests "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    dl = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(dl), "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(dl)})
    driver.download_dir = dl
    yield driver
    driver.quit()
