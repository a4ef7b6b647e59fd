"""Benchmark: `curate explore` on a 10M-row pool: the first page of a query, and what a page
of thumbnails reads.

The pool is bench_filter.py's generated 10M-row pool (metadata only). Its catalog is copied and
given a shard index of the real size (10M rows, one per pool uid) whose entries point at the
real samples of the bundled pool's two tars, reused in turn: generating 10M JPEGs in tars is
out of reach here, and what the index size changes is the lookup, not the read (one ``pread``
of one sample either way). Prints, from one process (a :class:`curate.explore.session.Session`,
what the server calls):

  * opening the session (no tar is scanned: the catalog has an index);
  * running clip_score_l14_30pct.sql (through curate.run.run_filter, as `curate run`);
  * the first page of 100 kept samples after the query (metadata + shard lookup side by side):
    target 1 s; beside it a bare DuckDB count of the pool rows in the page's uid range (the
    bound: the pool is not ordered by uid, so finding a page's rows is a scan of that column);
  * 100 thumbnails of that page: reads counted (target: 100 reads, one per sample);
  * the next page (fetched ahead while the first was looked at), a kept page at offset
    1,000,000 (not fetched ahead), the first page of the dropped part.

``--browser N``: then N times, a fresh ``curate explore`` server on the catalog and a headless
chromium (selenium) running clip_score_l14_30pct from the page as a user does; from the moment
the query's answer reaches the page, the time until the grid's cards are shown and until its
24 thumbnails have decoded (timestamps taken in the page by a MutationObserver). ``--tree DIR``
serves another checkout's explorer (e.g. ``git archive HEAD | tar -x -C DIR``) for a
before/after on the same machine.

Usage: python bench/bench_explore.py [--rows-per-file 1000000] [--files 10] [--work bench/_work]
       [--browser 3] [--tree DIR] [--skip-session]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curate.catalog.connection import init_catalog  # noqa: E402
from curate.explore.session import Session  # noqa: E402
from curate.pool.sample import generate_pool  # noqa: E402
from curate.shards.index import build_index  # noqa: E402

SHARDS = ROOT / "data" / "sample_pool" / "shards"


def catalog_with_index(work: Path, files: int, rows: int) -> Path:
    pool = work / f"pool_{files}x{rows}"
    if not pool.exists():
        print(f"generating {files}x{rows} rows ...", flush=True)
        generate_pool(pool, files=files, rows_per_file=rows, seed=1, npz=False, shards=False, fast=True)
    base = work / f"catalog_{files}x{rows}.duckdb"
    if not base.exists():
        init_catalog(base, pool=pool)
    cat = work / f"explore_catalog_{files}x{rows}.duckdb"
    if cat.exists():
        return cat
    t0 = time.perf_counter()
    tmp = cat.with_name(cat.name + ".building")
    shutil.copyfile(base, tmp)
    shard_files, index = build_index(SHARDS)
    con = duckdb.connect(str(tmp))
    con.register("bf", shard_files)
    con.register("bi", index)
    con.execute("CREATE TABLE shard_files AS SELECT * FROM bf")
    con.execute("CREATE TEMP TABLE b AS SELECT row_number() OVER (ORDER BY shard_id, \"offset\") - 1 AS k, * FROM bi "
                "WHERE uid_hi IS NOT NULL")
    m = con.execute("SELECT count(*) FROM b").fetchone()[0]
    con.execute(f"CREATE TABLE shard_index AS SELECT b.shard_id, b.key, uid_hi(p.uid) AS uid_hi, "
                f"uid_lo(p.uid) AS uid_lo, b.\"offset\", b.length, b.has_json "
                f"FROM (SELECT uid, row_number() OVER () - 1 AS n FROM pool) p JOIN b ON b.k = p.n % {m}")
    n = con.execute("SELECT count(*) FROM shard_index").fetchone()[0]
    con.close()
    tmp.rename(cat)
    print(f"catalog with a {n:,}-row shard index over {m:,} real samples in {time.perf_counter() - t0:.1f}s")
    return cat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--rows-per-file", type=int, default=1_000_000)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--browser", type=int, default=0, help="browser runs (0: none)")
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose explorer --browser serves")
    ap.add_argument("--skip-session", action="store_true", help="only the browser runs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cat = catalog_with_index(args.work, args.files, args.rows_per_file)
    if not args.skip_session:
        session_figures(cat)
    for i in range(args.browser):
        shown, decoded, query = browser_first_page(cat, args.tree)
        print(f"browser run {i + 1} ({args.tree}): query {query:.2f}s; after its answer reached the page: "
              f"cards shown {shown:.3f}s, 24 thumbnails decoded {decoded:.3f}s", flush=True)


def session_figures(cat: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        s = Session(cat, Path(scratch))
        print(f"session opened in {time.perf_counter() - t0:.2f}s (shards: {s.reader.source}, "
              f"{s.pool_rows:,} rows)")
        time.sleep(2)  # a user picks a filter: meanwhile the shard index is read into memory
        t0 = time.perf_counter()
        res = s.run({"filter": "clip_score_l14_30pct"})
        print(f"query: kept {res.info['count']:,} in {time.perf_counter() - t0:.2f}s "
              f"(run_filter {res.info['elapsed']:.2f}s)")
        t0 = time.perf_counter()
        page = s.page(res.rid, "kept", 0, 100)
        t_page = time.perf_counter() - t0
        with_image = [r["uid"] for r in page["rows"] if r["image"]]
        # the bound: finding any uid in an unordered pool is a scan of the uid column
        con = duckdb.connect(str(cat), read_only=True)
        t0 = time.perf_counter()
        con.execute("SELECT count(*) FROM pool WHERE uid BETWEEN ? AND ?",
                    [page["rows"][0]["uid"], page["rows"][-1]["uid"]]).fetchone()
        t_bound = time.perf_counter() - t0
        con.close()
        print(f"first page of 100 kept samples after the query: {t_page:.3f}s "
              f"({len(with_image)} with an image); a bare scan of the uid column for the page's uid range: {t_bound:.3f}s "
              f"({t_page / t_bound:.2f}x)")
        reads0, bytes0 = s.reader.reads, s.reader.bytes_read
        t0 = time.perf_counter()
        for uid in with_image:
            s.image(uid, 200)
        t_thumbs = time.perf_counter() - t0
        print(f"{len(with_image)} thumbnails: {s.reader.reads - reads0} reads, "
              f"{(s.reader.bytes_read - bytes0) / 1024:.0f} KiB, {t_thumbs:.3f}s (decode + resize included)")
        s.settle()  # the next rows, fetched ahead while the first page is looked at
        t0 = time.perf_counter()
        s.page(res.rid, "kept", 100, 100)
        print(f"next page of 100 kept samples (fetched ahead): {time.perf_counter() - t0:.3f}s")
        s.settle()
        t0 = time.perf_counter()
        s.page(res.rid, "kept", 1_000_000, 100)
        print(f"kept page at offset 1,000,000: {time.perf_counter() - t0:.3f}s")
        s.settle()
        t0 = time.perf_counter()
        s.page(res.rid, "dropped", 0, 100)
        print(f"first page of 100 dropped samples (counts the part once): {time.perf_counter() - t0:.3f}s")
        s.close()


# In the page: when #run-status gets its data-rid (the query's answer arrived), when #grid is
# filled for that result, and when its thumbnails have all loaded.
_OBSERVE = """
window.__t = {};
const status = document.getElementById('run-status'), grid = document.getElementById('grid');
new MutationObserver(() => { if (status.dataset.rid && !__t.answer) __t.answer = performance.now(); })
  .observe(status, {attributes: true});
new MutationObserver(() => {
  if (!__t.answer || __t.shown || !(grid.dataset.loaded || '').startsWith(status.dataset.rid + ':kept:')) return;
  __t.shown = performance.now();
  const imgs = Array.from(grid.querySelectorAll('img.thumb'));
  let left = imgs.length;
  const done = () => { if (--left <= 0 && !__t.decoded) __t.decoded = performance.now(); };
  if (!imgs.length) __t.decoded = __t.shown;
  for (const i of imgs) { if (i.complete) done(); else { i.addEventListener('load', done); i.addEventListener('error', done); } }
}).observe(grid, {attributes: true});
"""


def browser_first_page(cat: Path, tree: Path) -> tuple[float, float, float]:
    """(cards shown, thumbnails decoded, query time) in seconds, in a fresh server and browser."""
    from selenium import webdriver  # lazy: only --browser needs selenium
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen([sys.executable, "-m", "curate", "explore", str(cat), "--port", str(port)],
                                cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium")
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(base + "/api/info", timeout=5).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("curate explore did not start")
                    time.sleep(0.2)
            driver.get(base + "/")
            wait = WebDriverWait(driver, 300)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            driver.execute_script(_OBSERVE)
            Select(driver.find_element(By.CSS_SELECTOR, "#src-main .src-kind")).select_by_value("filter:clip_score_l14_30pct")
            driver.find_element(By.ID, "run-btn").click()
            wait.until(lambda d: d.execute_script("return window.__t.decoded !== undefined"))
            t = driver.execute_script("return window.__t")
            query = float(driver.find_element(By.ID, "run-status").text.rsplit("in ", 1)[-1].rstrip("s"))
            return (t["shown"] - t["answer"]) / 1000, (t["decoded"] - t["answer"]) / 1000, query
        finally:
            driver.quit()
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a request still running in a worker thread
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
