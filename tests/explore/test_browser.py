"""`curate explore` in a real headless browser: run a filter, page through kept and dropped
samples whose images decode, open a sample, compare two filters, export. Expected values come
from `curate run` (a separate process), the pool's parquet files and the tars read with Python's
tarfile; assertions are on the DOM. Screenshots are saved under the test's temp dir."""

from __future__ import annotations

import csv
import functools
import io
import json
import tarfile
import time
import urllib.request

import pyarrow.parquet as pq
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import REPO, read_uids
from tests.explore.conftest import curate_run

PAGE = 24  # thumbnails per page in app.js
POOL = REPO / "data" / "sample_pool"


def wait(driver, cond, timeout=60):
    try:
        return WebDriverWait(driver, timeout).until(lambda d: cond(d))
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(f"timed out at {driver.current_url}; page error: {error!r}; "
                             f"page: {driver.page_source[:1500]}") from None


def pool_rows_in_order() -> list[dict]:
    """Every pool row (uid, text) in DataComp order: parquet files by name, then row."""
    rows = []
    for f in sorted((POOL / "metadata").glob("*.parquet")):
        t = pq.read_table(f, columns=["uid", "text"])
        rows += t.to_pylist()
    return rows


@functools.lru_cache(maxsize=1)
def tar_images() -> dict[str, bytes]:
    """uid -> the image member's bytes, read with Python's tarfile (not curate's reader)."""
    out = {}
    for tar in sorted((POOL / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name, m in members.items():
                if name.endswith(".json"):
                    uid = json.loads(tf.extractfile(m).read())["uid"]
                    img = members.get(name[:-5] + ".jpg")
                    if img is not None:
                        out[uid] = tf.extractfile(img).read()
    return out


def grid_uids(driver, grid="#grid") -> list[str]:
    return [c.get_attribute("data-uid") for c in driver.find_elements(By.CSS_SELECTOR, f"{grid} .card")]


def images_decoded(driver, grid="#grid") -> list[int]:
    """naturalWidth of each thumbnail in the grid, once all finished loading."""
    sel = f"{grid} img.thumb"
    wait(driver, lambda d: d.execute_script(
        f"return Array.from(document.querySelectorAll('{sel}')).every(i => i.complete)"))
    return driver.execute_script(f"return Array.from(document.querySelectorAll('{sel}')).map(i => i.naturalWidth)")


def check_images(driver, grid: str, uids: list[str]) -> None:
    """Cards of samples in the tars show a thumbnail that decodes; the others (failed
    downloads of the sample pool) say there is no image."""
    in_tars = tar_images()
    with_image = [c.get_attribute("data-uid") for c in driver.find_elements(By.CSS_SELECTOR, f"{grid} .card")
                  if c.find_elements(By.CSS_SELECTOR, "img.thumb")]
    assert with_image == [u for u in uids if u in in_tars]
    assert len(driver.find_elements(By.CSS_SELECTOR, f"{grid} .card .noimg")) == len(uids) - len(with_image)
    widths = images_decoded(driver, grid)
    assert len(widths) == len(with_image) and all(w > 0 for w in widths)


def choose(driver, box: str, name: str):
    Select(driver.find_element(By.CSS_SELECTOR, f"{box} .src-kind")).select_by_value("filter:" + name)


def run_in_page(driver, base, name):
    driver.get(base + "/")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    choose(driver, "#src-main", name)
    driver.find_element(By.ID, "run-btn").click()
    wait(driver, lambda d: d.find_element(By.ID, "run-status").get_attribute("data-rid"))
    rid = driver.find_element(By.ID, "run-status").get_attribute("data-rid")
    wait(driver, lambda d: d.find_element(By.ID, "grid").get_attribute("data-loaded") == f"{rid}:kept:0")
    return rid


def download(driver, link_id: str, timeout=30) -> bytes:
    link = driver.find_element(By.ID, link_id)
    before = set(driver.download_dir.iterdir())
    driver.execute_script("arguments[0].click()", link)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in set(driver.download_dir.iterdir()) - before if not p.name.endswith(".crdownload")]
        if new:
            time.sleep(0.2)
            return new[0].read_bytes()
        time.sleep(0.1)
    raise AssertionError(f"{link_id}: nothing downloaded")


def test_run_laion2b_kept_and_dropped(explorer, browser, tmp_path):
    expected = curate_run("filters/laion2b.sql", tmp_path / "laion2b.npy", REPO)
    kept = read_uids(expected)  # sorted by uid, as the grid pages them
    run_in_page(browser, explorer, "laion2b")
    status = browser.find_element(By.ID, "run-status")
    assert int(status.get_attribute("data-count")) == len(kept) == 489
    assert f"kept {len(kept)} of 2,000 samples" in status.text
    shown = grid_uids(browser)
    assert shown == kept[:PAGE]
    check_images(browser, "#grid", kept[:PAGE])
    assert "1-24 of 489" in browser.find_element(By.ID, "page-info").text
    browser.find_element(By.ID, "tab-samples").click()
    browser.find_element(By.ID, "next-btn").click()
    wait(browser, lambda d: (d.find_element(By.ID, "grid").get_attribute("data-loaded") or "").endswith(":kept:24"))
    assert grid_uids(browser) == kept[PAGE:2 * PAGE]
    browser.save_screenshot(str(tmp_path / "kept.png"))

    # dropped: pool rows whose uid the filter did not keep, in pool order
    Select(browser.find_element(By.ID, "part-select")).select_by_value("dropped")
    wait(browser, lambda d: (d.find_element(By.ID, "grid").get_attribute("data-loaded") or "").endswith(":dropped:0"))
    keep = set(kept)
    dropped = [r["uid"] for r in pool_rows_in_order() if r["uid"] not in keep]
    assert int(browser.find_element(By.ID, "grid").get_attribute("data-total")) == len(dropped) == 2000 - 489
    assert grid_uids(browser) == dropped[:PAGE]
    check_images(browser, "#grid", dropped[:PAGE])
    browser.save_screenshot(str(tmp_path / "dropped.png"))


def test_open_a_sample(explorer, browser, tmp_path):
    run_in_page(browser, explorer, "laion2b")
    first = browser.find_element(By.CSS_SELECTOR, "#grid .card")
    uid = first.get_attribute("data-uid")
    first.click()
    wait(browser, lambda d: d.find_element(By.ID, "detail").get_attribute("data-uid") == uid)
    wait(browser, lambda d: d.execute_script("const i = document.getElementById('full-image'); "
                                             "return i.complete && i.naturalWidth > 0"))
    meta = {r.get_attribute("data-key"): r.find_elements(By.TAG_NAME, "td")[1].text
            for r in browser.find_elements(By.CSS_SELECTOR, "#meta-table tr")}
    row = next(r for r in pool_rows_in_order() if r["uid"] == uid)
    assert meta["uid"] == uid and meta["text"] == row["text"]
    feats = {r.get_attribute("data-key"): r.find_elements(By.TAG_NAME, "td")[1].text
             for r in browser.find_elements(By.CSS_SELECTOR, "#feature-table tr")}
    assert feats["text_lang_cld3.lang_cld3"] == "en"  # laion2b keeps English captions only
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours .card")) == 8)
    assert uid not in grid_uids(browser, "#neighbours")
    browser.save_screenshot(str(tmp_path / "sample.png"))
    # the full image is the tar member's own bytes
    src = browser.find_element(By.ID, "full-image").get_attribute("src")
    with urllib.request.urlopen(src) as r:
        assert r.read() == tar_images()[uid]


def test_compare_and_export_the_difference(explorer, browser, tmp_path):
    a = read_uids(curate_run("laion2b", tmp_path / "a.npy", tmp_path))
    b = read_uids(curate_run("clip_score_l14_30pct", tmp_path / "b.npy", tmp_path))
    a_only, b_only, both = sorted(set(a) - set(b)), sorted(set(b) - set(a)), sorted(set(a) & set(b))
    browser.get(explorer + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    browser.find_element(By.ID, "tab-compare").click()
    choose(browser, "#src-a", "laion2b")
    choose(browser, "#src-b", "clip_score_l14_30pct")
    browser.find_element(By.ID, "compare-btn").click()
    wait(browser, lambda d: d.find_element(By.ID, "cmp-counts").get_attribute("data-rid"))
    counts = {p: int(browser.find_element(By.ID, f"cnt-{p}").get_attribute("data-count"))
              for p in ("a_only", "b_only", "both")}
    assert counts == {"a_only": len(a_only), "b_only": len(b_only), "both": len(both)}
    for part, uids in (("a_only", a_only), ("b_only", b_only), ("both", both)):
        assert grid_uids(browser, f"#grid-{part}") == uids[:12]
        check_images(browser, f"#grid-{part}", uids[:12])
    browser.save_screenshot(str(tmp_path / "compare.png"))
    # the difference, exported, is the subset `curate run` writes for A EXCEPT B
    diff = tmp_path / "diff.sql"
    diff.write_text(f"SELECT uid FROM read_subset('{tmp_path / 'a.npy'}')\n"
                    f"EXCEPT SELECT uid FROM read_subset('{tmp_path / 'b.npy'}')\n")
    expected = curate_run(diff, tmp_path / "diff.npy", tmp_path).read_bytes()
    assert download(browser, "export-a_only") == expected
    csv_text = download(browser, "csv-a_only").decode()
    rows = list(csv.reader(io.StringIO(csv_text)))
    assert rows[0][:2] == ["uid", "text"]
    assert [r[0] for r in rows[1:]] == a_only


def test_export_kept_is_curate_runs_subset(explorer, browser, tmp_path):
    out = curate_run("clip_score_l14_30pct", tmp_path / "l14.npy", tmp_path, "--set", "fraction=0.2")
    expected = out.read_bytes()
    browser.get(explorer + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    choose(browser, "#src-main", "clip_score_l14_30pct")
    field = browser.find_element(By.NAME, "param-fraction")
    field.clear()
    field.send_keys("0.2")
    browser.find_element(By.ID, "run-btn").click()
    wait(browser, lambda d: d.find_element(By.ID, "run-status").get_attribute("data-rid"))
    assert "fraction=0.2" in browser.find_element(By.ID, "run-status").text
    assert int(browser.find_element(By.ID, "run-status").get_attribute("data-count")) == len(read_uids(out))
    assert download(browser, "export-npy") == expected
    browser.find_element(By.ID, "tab-histograms").click()
    wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('hist-clip_l14_similarity_score'); return i && i.complete && i.naturalWidth > 0"))
    browser.save_screenshot(str(tmp_path / "histograms.png"))


def test_errors_are_the_cli_one_line_message(explorer, browser, tmp_path):
    browser.get(explorer + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    Select(browser.find_element(By.CSS_SELECTOR, "#src-main .src-kind")).select_by_value("sql")
    box = browser.find_element(By.CSS_SELECTOR, "#src-main .src-sql")
    box.send_keys("SELECT uid, text FROM pool")
    browser.find_element(By.ID, "run-btn").click()
    err = browser.find_element(By.ID, "error")
    wait(browser, lambda d: err.is_displayed())
    assert err.text.startswith("error: ") and "\n" not in err.text
    assert "the query must return exactly one column named `uid`; it returns uid, text" in err.text
    box.clear()
    # 0.25 is exact in float32 and double; DuckDB orders NaN above every number, so leave it out
    box.send_keys("SELECT uid FROM pool WHERE clip_l14_similarity_score > 0.25 AND NOT isnan(clip_l14_similarity_score)")
    browser.find_element(By.ID, "run-btn").click()
    wait(browser, lambda d: d.find_element(By.ID, "run-status").get_attribute("data-rid"))
    assert not err.is_displayed()
    n = sum(1 for f in sorted((POOL / "metadata").glob("*.parquet"))
            for s in pq.read_table(f, columns=["clip_l14_similarity_score"]).column(0).to_pylist() if s is not None and s > 0.25)
    assert int(browser.find_element(By.ID, "run-status").get_attribute("data-count")) == n
