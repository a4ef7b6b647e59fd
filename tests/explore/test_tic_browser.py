"""The keep rate by year and month in the browser, on a TiC catalog made by the real commands
(`curate sample-pool`, `catalog init`, `tic artifacts`, `tic attach`, as docs/tic.md shows).
Expected counts are computed with pandas from the TiC monthly uid files and the subset file of
a separate `curate run`, never by the explorer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
from selenium.webdriver.common.by import By

from tests.explore.conftest import serve
from tests.explore.test_browser import choose, wait

MONTHLY = "tic-datacomp_training_monthly"


def curate(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "curate", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def expected_keep_rates(art, kept_npy) -> pd.DataFrame:
    """(year, month, samples, kept) from the monthly uid files and the kept subset file."""
    frames = []
    for f in sorted((art / MONTHLY).glob("*.npy")):
        a = np.load(f)
        frames.append(pd.DataFrame({"hi": a["f0"], "lo": a["f1"], "year": int(f.stem[:4]), "month": int(f.stem[4:])}))
    months = pd.concat(frames, ignore_index=True)
    k = np.load(kept_npy)
    kept = pd.DataFrame({"hi": k["f0"], "lo": k["f1"]}).drop_duplicates().assign(is_kept=1)
    m = months.merge(kept, on=["hi", "lo"], how="left").fillna({"is_kept": 0})
    out = m.groupby(["year", "month"]).agg(samples=("hi", "size"), kept=("is_kept", "sum")).reset_index()
    return out.astype({"samples": int, "kept": int}).sort_values(["year", "month"]).reset_index(drop=True)


def test_keep_rate_by_year_and_month_on_a_tic_catalog(browser, tmp_path):
    curate("sample-pool", tmp_path / "pool", "--files", 2, "--rows-per-file", 300, "--no-npz", "--no-shards",
           cwd=tmp_path)
    cat = tmp_path / "c.duckdb"
    curate("catalog", "init", cat, "--pool", tmp_path / "pool", cwd=tmp_path)
    curate("tic", "artifacts", cat, "--out", tmp_path / "art", "--monthly", "npy", cwd=tmp_path)
    curate("tic", "attach", cat, "--tic-dir", tmp_path / "art", cwd=tmp_path)
    curate("run", "clip_score_l14_30pct", "-c", cat, "-o", tmp_path / "kept.npy", cwd=tmp_path)
    want = expected_keep_rates(tmp_path / "art", tmp_path / "kept.npy")
    assert want["samples"].sum() == 600 and 0 < want["kept"].sum() < 600 and len(want) > 50

    (tmp_path / "cwd").mkdir()
    with serve(cat, tmp_path / "cwd") as base:
        browser.get(base + "/")
        wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        choose(browser, "#src-main", "clip_score_l14_30pct")
        browser.find_element(By.ID, "run-btn").click()
        wait(browser, lambda d: d.find_element(By.ID, "run-status").get_attribute("data-rid"))
        rid = browser.find_element(By.ID, "run-status").get_attribute("data-rid")
        browser.find_element(By.ID, "tab-histograms").click()
        wait(browser, lambda d: d.find_element(By.ID, "keep-rate-table").get_attribute("data-rid") == rid)
        wait(browser, lambda d: d.execute_script(
            "const i = document.getElementById('keep-rate'); return i && i.complete && i.naturalWidth > 0"))
        browser.save_screenshot(str(tmp_path / "keep-rate.png"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#keep-rate-table tr.keep-rate-row")
        got = pd.DataFrame([{k: int(r.get_attribute(f"data-{k}")) for k in ("year", "month", "samples", "kept")}
                            for r in rows])
        rates = [r.find_element(By.CSS_SELECTOR, "td.rate").text for r in rows]
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert rates == [f"{100 * k / n:.2f}%" for n, k in zip(want["samples"], want["kept"])]
