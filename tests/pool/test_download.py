"""curate download: the real img2dataset against a real HTTP server on 127.0.0.1.

The server (a thread in the test) serves generated JPEGs; some URLs answer 404, some serve
bytes that are not an image, some serve an image whose sha256 differs from the metadata's, some
answer slowly (within the timeout). Every expected status below is fixed by how the row's URL
was constructed, not by running the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.catalog.connection import connect
from curate.cli.main import main
from curate.pool.download import (DownloadError, DownloadReport, DownloadSettings, done_shards, check_metadata, download,
                             fetch_metadata, no_success_error, status_report)

from tests.conftest import uid_of

REPO = Path(__file__).resolve().parents[2]


def jpeg(seed: int, size=(64, 48)) -> bytes:
    """A noisy image (so blurring visibly changes it), JPEG-encoded."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class ImageServer:
    """A threaded HTTP server: path -> (status, body, delay seconds); counts every request."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, float]] = {}
        self.requests: Counter = Counter()
        self.gate = threading.Event()  # /gate/* paths block until set (for the kill tests)
        self.held: set[str] | None = None  # when a set: only these /gate/* paths block
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server naming
                server.requests[self.path] += 1
                if self.path.startswith("/gate/") and (server.held is None or self.path in server.held):
                    server.gate.wait(60)
                status, body, delay = server.routes.get(self.path, (404, b"not found", 0.0))
                if delay:
                    time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed (the kill tests)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default backlog (5) can refuse img2dataset's parallel requests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ImageServer()
    yield s
    s.close()


# kind -> expected status; the row's URL and sha256 are built from the kind
EXPECTED = {"ok": "success", "slow": "success", "missing": "failed_to_download",
            "corrupt": "failed_to_resize", "tampered": "hash_mismatch", "gate": "success"}
FILE_A = ["ok", "ok_face", "ok", "ok", "ok", "ok", "missing", "missing", "corrupt", "tampered", "slow", "slow"]
FILE_B = ["ok", "ok", "ok", "ok", "ok", "tampered", "missing", "corrupt"]


def make_rows(server: ImageServer, kinds: list[str], start: int) -> list[dict]:
    rows = []
    for j, kind in enumerate(kinds):
        i = start + j
        path = f"/{kind}/{i}.jpg"
        body = jpeg(i)
        face = [[0.0, 0.0, 0.5, 0.5]] if kind == "ok_face" else []
        sha = hashlib.sha256(body).hexdigest()
        if kind == "missing":
            pass  # no route: 404
        elif kind == "corrupt":
            body = b"this is not an image " * 10
            sha = hashlib.sha256(body).hexdigest()  # the hash matches: the bytes just do not decode
            server.routes[path] = (200, body, 0.0)
        elif kind == "tampered":
            server.routes[path] = (200, jpeg(10_000 + i), 0.0)  # served bytes differ from the pool's
        elif kind == "slow":
            server.routes[path] = (200, body, 0.4)
        else:
            server.routes[path] = (200, body, 0.0)
        rows.append({"uid": uid_of(i), "url": server.base + path, "text": f"caption {i} ({kind})",
                     "face_bboxes": face, "sha256": sha, "kind": kind.replace("ok_face", "ok")})
    return rows


POOL_TYPES = {"uid": pa.string(), "url": pa.string(), "text": pa.string(),
              "face_bboxes": pa.list_(pa.list_(pa.float64())), "sha256": pa.string()}


def write_meta(path: Path, rows: list[dict], columns=None):
    cols = columns or list(POOL_TYPES)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({c: pa.array([r[c] for r in rows], POOL_TYPES[c]) for c in cols}), path)


@pytest.fixture
def pool(tmp_path, server):
    """Two metadata files (12 + 8 rows -> shards 0 and 1) and the expected status per uid."""
    a, b = make_rows(server, FILE_A, 0), make_rows(server, FILE_B, 100)
    meta = tmp_path / "meta"
    write_meta(meta / "a.parquet", a)
    write_meta(meta / "b.parquet", b)
    expected = {r["uid"]: EXPECTED[r["kind"]] for r in a + b}
    return meta, a, b, expected


FAST = DownloadSettings(processes=1, threads=8, image_size=32, retries=0, timeout=5)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def full_rows(rows: list[dict]) -> list[dict]:
    """The nine CommonPool columns, so a catalog can be built over the same metadata."""
    return [{**r, "original_width": 64, "original_height": 48, "clip_b32_similarity_score": 0.3,
             "clip_l14_similarity_score": 0.3} for r in rows]


FULL_TYPES = {**POOL_TYPES, "original_width": pa.int64(), "original_height": pa.int64(),
              "clip_b32_similarity_score": pa.float32(), "clip_l14_similarity_score": pa.float32()}


def write_full(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
            "clip_l14_similarity_score", "face_bboxes", "sha256"]
    rows = full_rows(rows)
    pq.write_table(pa.table({c: pa.array([r[c] for r in rows], FULL_TYPES[c]) for c in cols}), path)


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_download_verifies_reports_and_resumes(tmp_path, server):
    a, b = make_rows(server, FILE_A, 0), make_rows(server, FILE_B, 100)
    meta = tmp_path / "meta"
    write_full(meta / "a.parquet", a)
    write_full(meta / "b.parquet", b)
    expected = {r["uid"]: EXPECTED[r["kind"]] for r in a + b}
    data, cat = tmp_path / "data", tmp_path / "pool.duckdb"
    args = ["download", "--metadata-dir", str(meta), "--data-dir", str(data), "--processes", "1",
            "--threads", "8", "--image-size", "32", "--retries", "0", "--timeout", "5", "--catalog", str(cat)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    # 20 rows: 13 ok/slow, 3 x 404, 2 undecodable, 2 served with other bytes than the pool's sha256
    for line in ["success                     13   65.00%", "failed_to_download           3   15.00%",
                 "failed_to_resize             2   10.00%", "hash_mismatch                2   10.00%",
                 "attempted                   20", "(2 of 2 shards done)"]:
        assert line in r.output, r.output
    rep = json.loads((data / "download_report.json").read_text())
    assert rep["counts"] == {"success": 13, "failed_to_download": 3, "failed_to_resize": 2, "hash_mismatch": 2}
    assert rep["verified"] is True

    shards = data / "shards"
    assert sorted(p.name for p in shards.iterdir() if not p.name.startswith("_")) == [
        "00000000.parquet", "00000000.tar", "00000000_stats.json",
        "00000001.parquet", "00000001.tar", "00000001_stats.json"]
    # tars hold successes only, keyed shard*10^4 + row, with the uid and blurred faces
    members = {**tar_members(shards / "00000000.tar"), **tar_members(shards / "00000001.tar")}
    ok_keys = sorted([f"{i:012d}" for i, k in enumerate(FILE_A) if k.startswith(("ok", "slow"))]
                     + [f"{10000 + i:012d}" for i, k in enumerate(FILE_B) if k.startswith("ok")])
    assert sorted(n[:-4] for n in members if n.endswith(".jpg")) == ok_keys
    by_key = {json.loads(members[f"{k}.json"])["key"]: json.loads(members[f"{k}.json"]) for k in ok_keys}
    rows = {**{f"{i:012d}": r for i, r in enumerate(a)}, **{f"{10000 + i:012d}": r for i, r in enumerate(b)}}
    for key, j in by_key.items():
        assert j["uid"] == rows[key]["uid"] and j["caption"] == rows[key]["text"]
        assert j["sha256"] == rows[key]["sha256"]
        assert members[f"{key}.txt"].decode() == rows[key]["text"]
    assert by_key["000000000001"]["face_bboxes"] == [[0.0, 0.0, 0.5, 0.5]]
    face = np.asarray(Image.open(io.BytesIO(members["000000000001.jpg"])).convert("L"), float)
    h, w = face.shape
    blurred, untouched = face[: h // 2, : w // 2].std(), face[h // 2:, w // 2:].std()
    assert blurred < 0.5 * untouched  # the noise under the face box was blurred away

    # the status table in the catalog: which pool uids really are in the shards
    con = connect(cat)
    got = dict(con.execute("SELECT uid, status FROM download_status").fetchall())
    assert got == expected
    present = con.execute("SELECT count(*) FROM pool JOIN download_status d USING (uid) "
                          "WHERE d.status = 'success' AND d.sha256_ok").fetchone()[0]
    assert present == 13
    assert con.execute("SELECT count(*) FROM download_status WHERE sha256_ok = false").fetchone()[0] == 2
    con.close()

    # the report and status files rebuild from the files alone (no network)
    shutil.rmtree(data / "download_status")
    r = CliRunner().invoke(main, ["download-status", "--data-dir", str(data), "--metadata-dir", str(meta)])
    assert r.exit_code == 0, r.output
    assert re.search(r"hash_mismatch +2 +10\.00%", r.output), r.output
    # without --metadata-dir: the metadata dir the download recorded in download_manifest.json
    assert not (data / "metadata").exists()
    r2 = CliRunner().invoke(main, ["download-status", "--data-dir", str(data)])
    assert r2.exit_code == 0, r2.output
    assert re.search(r"hash_mismatch +2 +10\.00%", r2.output), r2.output
    t = pq.read_table(data / "download_status" / "00000000.parquet")
    assert t.column("status").to_pylist() == [EXPECTED[r["kind"]] for r in a]
    assert t.column("key").to_pylist() == list(range(12)) and set(t.column("shard").to_pylist()) == {0}
    assert t.column("sha256_ok").to_pylist() == [
        {"success": True, "hash_mismatch": False}.get(EXPECTED[r["kind"]]) for r in a]
    assert status_report(data, metadata_dir=meta, progress=False).counts["success"] == 13

    # re-run: every shard is finished, nothing is requested again
    before = sum(server.requests.values())
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert sum(server.requests.values()) == before

    # read-only data dir ("disk full"): one clear line, and nothing already downloaded is lost
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only directory cannot be simulated")
    (shards / "00000001_stats.json").rename(tmp_path / "stats1.json")  # shard 1 now needs work
    kept = snapshot(data)
    for d in (data, shards):
        d.chmod(0o555)
    try:
        cmd = [sys.executable, "-m", "curate.cli.main", *args]
        if os.geteuid() == 0:  # root ignores permissions unless it gives up CAP_DAC_OVERRIDE
            cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    finally:
        for d in (data, shards):
            d.chmod(0o755)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "cannot write there" in p.stderr
    assert snapshot(data) == kept


def test_resume_after_kill_then_byod_score(tmp_path, server):
    """Bring-your-own-data end to end, with a real SIGKILL in the middle.

    Minimal BYOD metadata (uid, url, text: no face_bboxes, no sha256). The CLI is killed while
    shard 1 waits on the server; the re-run downloads shard 1 only. The shards are then scored
    with a tiny random-init open_clip model and become a catalog whose pool joins download_status.
    """
    a, b = make_rows(server, ["ok"] * 4, 0), make_rows(server, ["ok", "gate", "ok"], 100)
    server.routes["/gate/101.jpg"] = (200, jpeg(101), 0.0)
    meta = tmp_path / "meta"
    write_meta(meta / "a.parquet", a, ["uid", "url", "text"])
    write_meta(meta / "b.parquet", b, ["uid", "url", "text"])
    for name, rows in (("a.parquet", a), ("b.parquet", b)):  # a column of the user's own
        t = pq.read_table(meta / name)
        pq.write_table(t.append_column("posted_year", pa.array([1990 + int(r["uid"][-4:], 16) % 30 for r in rows],
                                                               pa.int16())), meta / name)
    data = tmp_path / "data"
    args = ["download", "--metadata-dir", str(meta), "--data-dir", str(data), "--processes", "1",
            "--threads", "4", "--image-size", "32", "--retries", "0", "--timeout", "30", "--skip-bbox-blurring"]
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli.main", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (server.requests["/gate/101.jpg"] and (data / "shards" / "00000000_stats.json").exists()):
            assert time.time() < deadline and proc.poll() is None, "download did not reach shard 1"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and img2dataset's worker processes
        proc.wait()
    assert not (data / "shards" / "00000001_stats.json").exists()
    server.gate.set()
    first = Counter(server.requests)
    settings = DownloadSettings(processes=1, threads=4, image_size=32, retries=0, timeout=30, blur=False)
    report = download(data, metadata_dir=meta, settings=settings, progress=False)
    again = server.requests - first
    assert set(again) == {"/ok/100.jpg", "/gate/101.jpg", "/ok/102.jpg"}  # shard 1 only
    assert report.counts == {"success": 7} and report.shards_done == 2 and not report.verified
    assert len([n for n in tar_members(data / "shards" / "00000001.tar") if n.endswith(".jpg")]) == 3
    st = pq.read_table(data / "download_status" / "00000001.parquet")
    assert st.column("sha256_ok").to_pylist() == [None] * 3  # nothing to verify against

    # score the real img2dataset shards, then query them like a pool
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from tests.pool.test_byod import TINY

    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), tmp_path / "tiny.pt")
    r = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(data), "--model-config", str(cfg),
                                  "--checkpoint", str(tmp_path / "tiny.pt"), "--catalog", str(tmp_path / "mine.duckdb")])
    assert r.exit_code == 0, r.output
    # the metadata dir (not under DATA_DIR) came from download_manifest.json
    assert "scored 2 shards (0 already done): 7 rows, 7 images" in r.output
    assert "kept source columns posted_year" in r.output
    con = connect(tmp_path / "mine.duckdb")
    years = dict(con.execute("SELECT uid, posted_year FROM pool").fetchall())
    assert years == {r["uid"]: 1990 + int(r["uid"][-4:], 16) % 30 for r in a + b}
    rows = con.execute("SELECT p.uid, d.shard, d.key, p.text FROM pool p JOIN download_status d USING (uid) "
                       "WHERE p.clip_l14_similarity_score IS NOT NULL ORDER BY d.key").fetchall()
    assert [(u, s, k) for u, s, k, _ in rows] == (
        [(r["uid"], 0, i) for i, r in enumerate(a)] + [(r["uid"], 1, 10000 + i) for i, r in enumerate(b)])
    assert [t for *_, t in rows] == [r["text"] for r in a + b]
    con.close()


# img2dataset's _stats.json fields that hold wall-clock readings (downloader.py: start_time and
# end_time are time.time() around the shard, duration their difference); every other field
# (count, successes, failed_to_download, failed_to_resize, status_dict) must match exactly
STATS_CLOCK_FIELDS = {"start_time", "end_time", "duration"}
KILL_A = ["ok", "ok_face", "missing", "gate", "corrupt", "tampered", "ok"]  # shard 0
KILL_B = ["ok", "tampered", "ok", "missing", "gate", "ok"]  # shard 1


def tar_without_mtimes(path: Path) -> list[tuple]:
    """Every member in order: all its header fields and pax records except mtime (and the header
    checksum, which covers mtime), and its bytes (see the kill test)."""
    with tarfile.open(path) as tf:
        return [(sorted((k, v) for k, v in m.get_info().items() if k not in ("mtime", "chksum")),
                 sorted((k, v) for k, v in m.pax_headers.items() if k != "mtime"),
                 tf.extractfile(m).read() if m.isfile() else None) for m in tf.getmembers()]


def session_processes(sid: int, needle: str) -> dict[int, str]:
    """Live processes in session ``sid`` (every process the killed run started inherits it) or
    whose command line mentions ``needle`` (the test's data dir); zombies do not count."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and (int(fields[3]) == sid or needle in cmd):
            out[int(d.name)] = cmd
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find surviving processes")
@pytest.mark.parametrize("point", ["during_first_shard", "after_first_shard"])
def test_kill_9_then_rerun_equals_uninterrupted_download(tmp_path, server, point):
    """``kill -9`` of `curate download` (its main process only), then the same command again,
    gives the same files as a download that was never interrupted, and leaves nothing behind.

    Killed either while shard 0 waits on the server, or after shard 0 finished while shard 1
    waits. Compared with an uninterrupted download of the same metadata into another data dir:
    the shard parquet files, curate's download_status/*.parquet, download_report.json and
    download_manifest.json are byte-identical. What legitimately differs, all img2dataset's:

    * tars: webdataset's TarWriter stamps each member's mtime with time.time() (img2dataset
      gives it no fixed mtime); a float mtime goes into a pax record (``NN mtime=1764...``, of
      varying length, so even the members' offsets shift) and the ustar header's mtime and
      checksum. The tars are compared member by member, in order: every header field and pax
      record except mtime (and the checksum), and every byte of every member's content;
    * ``_stats.json``: start_time, end_time and duration (STATS_CLOCK_FIELDS) are wall-clock;
    * order: img2dataset writes samples in completion order (ThreadPool.imap_unordered), so with
      more than one thread per process the order of tar members and shard parquet rows varies
      between any two runs, killed or not; this test pins it with ``--threads 1``. curate's own
      status files are sorted by key and do not depend on it.

    The killed run's worker processes (img2dataset's pool worker and logger, multiprocessing's
    resource tracker) must not outlive it: an orphaned worker would go on writing into shards/
    next to the re-run.
    """
    a, b = make_rows(server, KILL_A, 0), make_rows(server, KILL_B, 100)
    meta = tmp_path / "meta"
    write_meta(meta / "a.parquet", a)
    write_meta(meta / "b.parquet", b)
    held = "/gate/3.jpg" if point == "during_first_shard" else "/gate/104.jpg"

    def cmd(data: Path) -> list[str]:
        return [sys.executable, "-m", "curate.cli.main", "download", "--metadata-dir", str(meta),
                "--data-dir", str(data), "--processes", "1", "--threads", "1", "--image-size", "32",
                "--retries", "0", "--timeout", "30"]

    server.held = set()  # the reference run: nothing blocks
    ref = tmp_path / "reference"
    r = subprocess.run(cmd(ref), capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr

    server.held = {held}
    data = tmp_path / "killed"
    proc = subprocess.Popen(cmd(data), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (server.requests[held] >= 2 and (point == "during_first_shard"
                                                   or (data / "shards" / "00000000_stats.json").exists())):
            # >= 2: the reference run asked once already
            assert time.time() < deadline and proc.poll() is None, f"download did not reach {held}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` or the OOM killer would
        proc.wait()
        deadline = time.time() + 15  # a worker gets SIGKILL from the kernel, at worst its watchdog's poll
        while (left := session_processes(proc.pid, str(data))) and time.time() < deadline:
            time.sleep(0.1)
        assert not left, f"processes of the killed run survived: {left}"
    finally:
        for pid in session_processes(proc.pid, str(data)):  # never leak them into other tests
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.gate.set()
    shards = data / "shards"
    if point == "during_first_shard":
        assert not (shards / "00000000_stats.json").exists()
    else:
        assert (shards / "00000000_stats.json").exists() and not (shards / "00000001_stats.json").exists()

    first = Counter(server.requests)
    r = subprocess.run(cmd(data), capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    again = server.requests - first
    unfinished = a + b if point == "during_first_shard" else b
    assert again == Counter(r["url"][len(server.base):] for r in unfinished)  # those shards' rows, once each

    files, ref_files = sorted(p.relative_to(data) for p in data.rglob("*")), sorted(
        p.relative_to(ref) for p in ref.rglob("*"))
    assert files == ref_files  # no temp file, no img2dataset _tmp dir, no stray probe anywhere
    assert not [p for p in files if "tmp" in p.name or p.name.startswith(".")]
    assert {str(p) for p in files if p.parent == Path("shards")} == {
        f"shards/0000000{s}{ext}" for s in (0, 1) for ext in (".tar", ".parquet", "_stats.json")}
    for rel in files:
        got, want = data / rel, ref / rel
        if got.is_dir():
            continue
        if rel.suffix == ".tar":
            assert tar_without_mtimes(got) == tar_without_mtimes(want), rel
        elif rel.name.endswith("_stats.json"):
            g, w = json.loads(got.read_text()), json.loads(want.read_text())
            assert set(g) == set(w) and STATS_CLOCK_FIELDS <= set(g)
            assert {k: v for k, v in g.items() if k not in STATS_CLOCK_FIELDS} == {
                k: v for k, v in w.items() if k not in STATS_CLOCK_FIELDS}, rel
        else:  # shard parquet, download_status/*.parquet, download_report.json, download_manifest.json
            assert got.read_bytes() == want.read_bytes(), rel
    rep = json.loads((data / "download_report.json").read_text())
    assert rep["counts"] == {"success": 8, "failed_to_download": 2, "failed_to_resize": 1, "hash_mismatch": 2}
    status = pq.read_table(data / "download_status", columns=["uid", "status"]).to_pylist()
    assert {s["uid"]: s["status"] for s in status} == {r["uid"]: EXPECTED[r["kind"]] for r in a + b}
    for shard, rows in ((0, a), (1, b)):
        jpgs = sorted(n[:-4] for n in tar_members(shards / f"{shard:08d}.tar") if n.endswith(".jpg"))
        assert jpgs == [f"{shard * 10000 + i:012d}" for i, r in enumerate(rows) if EXPECTED[r["kind"]] == "success"]


def test_unreachable_host_is_one_clear_error(tmp_path):
    """Probed before img2dataset runs: a dead network must not record shards as done (all failed)."""
    rows = [{"uid": uid_of(i), "url": f"http://127.0.0.1:9/{i}.jpg", "text": "x", "face_bboxes": [],
             "sha256": "0" * 64} for i in range(3)]
    write_meta(tmp_path / "meta" / "a.parquet", rows)
    r = CliRunner().invoke(main, ["download", "--metadata-dir", str(tmp_path / "meta"), "--data-dir",
                                  str(tmp_path / "data"), "--processes", "1", "--retries", "0", "--timeout", "2"])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: http://127.0.0.1:9/0.jpg: cannot connect to 127.0.0.1:9")
    assert "nothing was downloaded" in line
    assert done_shards(tmp_path / "data" / "shards") == []


def test_all_failed_report_is_an_error():
    """Hosts that answer but serve nothing usable: the report is printed, then one error line."""
    rep = DownloadReport(Path("d"), {"failed_to_download": 3}, 3, 1, 1, 0, True,
                         [("failed_to_download", "HTTP Error 404: Not Found", 3)])
    err = no_success_error(rep)
    assert str(err) == ("d: none of 3 images could be downloaded (most common error: HTTP Error 404: Not Found); "
                        "check that the hosts in the url column are reachable")
    assert no_success_error(DownloadReport(Path("d"), {"success": 1, "failed_to_download": 3}, 4, 1, 1, 0, True)) is None
    assert "failed_to_download           3  100.00%" in rep.table()


def test_bad_metadata_fails_before_downloading(tmp_path):
    rows = [{"uid": uid_of(i), "url": f"http://127.0.0.1:9/{i}.jpg", "text": "x", "face_bboxes": [],
             "sha256": "0" * 64} for i in range(3)]

    def fails(meta_dir, *extra):
        r = CliRunner().invoke(main, ["download", "--metadata-dir", str(meta_dir), "--data-dir",
                                      str(tmp_path / "data"), *extra])
        assert r.exit_code == 1, r.output
        line = r.output.strip().splitlines()[-1]
        assert line.startswith("error: ")
        return line

    write_meta(tmp_path / "nourl" / "a.parquet", rows, ["uid", "text", "face_bboxes", "sha256"])
    assert "a.parquet: missing column 'url'" in fails(tmp_path / "nourl")
    write_meta(tmp_path / "nobox" / "a.parquet", rows, ["uid", "url", "text"])
    assert "missing column 'face_bboxes'" in fails(tmp_path / "nobox")
    assert "--skip-bbox-blurring" in fails(tmp_path / "nobox")
    write_meta(tmp_path / "mixed" / "a.parquet", rows)
    write_meta(tmp_path / "mixed" / "b.parquet", rows, ["uid", "url", "text", "face_bboxes"])
    line = fails(tmp_path / "mixed")
    assert "b.parquet: column 'sha256' is absent here but string in a.parquet" in line and "mixed schemas" in line
    pq.write_table(pa.table({"uid": ["a"], "url": [1], "text": ["t"]}), tmp_path / "inturl.parquet")
    (tmp_path / "inturl").mkdir()
    (tmp_path / "inturl.parquet").rename(tmp_path / "inturl" / "x.parquet")
    assert "column 'url' has type int64, expected string" in fails(tmp_path / "inturl", "--skip-bbox-blurring")
    nulls = [dict(r, sha256=None) if i == 1 else r for i, r in enumerate(rows)]
    write_meta(tmp_path / "nullsha" / "a.parquet", nulls)
    assert "'sha256' has 1 null values" in fails(tmp_path / "nullsha")
    (tmp_path / "empty").mkdir()
    assert "no .parquet files" in fails(tmp_path / "empty")
    assert not (tmp_path / "data" / "shards").exists()  # nothing started

    md = check_metadata(tmp_path / "nobox", blur=False)
    assert (md.num_rows, md.num_shards, md.has_sha256) == (3, 1, False)


def test_metadata_changed_since_download_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    (data / "shards" / "00000000_stats.json").write_text("{}")
    (data / "download_manifest.json").write_text(json.dumps({"files": [["a.parquet", 5]], "verify_hash": True}))
    rows = [{"uid": uid_of(i), "url": "http://127.0.0.1:9/x.jpg", "text": "x", "face_bboxes": [],
             "sha256": "0" * 64} for i in range(3)]
    write_meta(tmp_path / "meta" / "a.parquet", rows)
    with pytest.raises(DownloadError, match=r"a.parquet: metadata changed .* \(5 rows then, 3 now\)"):
        download(data, metadata_dir=tmp_path / "meta", settings=FAST, progress=False)


def test_hub_offline_fails_at_once_with_instructions(tmp_path, monkeypatch):
    # the real huggingface_hub code path, pointed at a closed local port: no network involved
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = CliRunner().invoke(main, ["download", "--scale", "small", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: mlfoundations/datacomp_small: cannot fetch metadata from the Hugging Face hub")
    # the command the installed huggingface_hub provides (`hf` since 0.34; 2.x has no other)
    cli = "hf" if (Path(sys.executable).parent / "hf").exists() else "huggingface-cli"
    assert f"`{cli} download mlfoundations/datacomp_small --repo-type dataset --include '*.parquet'" in line
    assert "--metadata-dir" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set"):
        fetch_metadata("xlarge", tmp_path / "m", tmp_path / "hf")
    # a completed fetch is not repeated (re-runs need no network)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / ".curate_metadata_complete").write_text(json.dumps({"npz": False}))
    assert fetch_metadata("xlarge", tmp_path / "m", tmp_path / "hf") is False


def test_byod_download_with_catalog_then_score(tmp_path, server):
    """Issue 17: `curate download --metadata-dir M --data-dir D --skip-bbox-blurring --catalog C` with
    BYOD metadata of the documented minimal form (uid, url, text, sha256 + a column of the user's
    own) prints the status table, then builds C over what was downloaded: one pool row per
    metadata row, original_width/height of the images served (their sizes are chosen here), NULL
    CLIP scores. `curate byod score --catalog C` then replaces C with the scored pool; the bundled
    filters run on it before and after scoring.
    """
    kinds = ["ok", "ok", "missing", "ok", "corrupt", "tampered", "ok", "ok"]
    rows = make_rows(server, kinds, 0)
    sizes = {}  # served image size per uid: big enough for basic_filter (>= 200 px) or not
    for i, (kind, r) in enumerate(zip(kinds, rows)):
        if kind == "ok":
            size = (240 + 10 * i, 210 + 5 * i) if i % 2 == 0 else (64 + i, 48)
            body = jpeg(i, size)
            server.routes[f"/ok/{i}.jpg"] = (200, body, 0.0)
            r["sha256"] = hashlib.sha256(body).hexdigest()
            sizes[r["uid"]] = size
        r["text"] = f"a photo of a red bicycle parked next to house number {i}"
    meta = tmp_path / "meta"
    write_meta(meta / "a.parquet", rows, ["uid", "url", "text", "sha256"])
    t = pq.read_table(meta / "a.parquet")
    pq.write_table(t.append_column("source_id", pa.array([f"src-{i}" for i in range(len(rows))])),
                   meta / "a.parquet")
    data, cat = tmp_path / "data", tmp_path / "D.duckdb"
    r = CliRunner().invoke(main, ["download", "--metadata-dir", str(meta), "--data-dir", str(data),
                                  "--skip-bbox-blurring", "--catalog", str(cat), "--processes", "1",
                                  "--threads", "4", "--image-size", "32", "--retries", "0", "--timeout", "5"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # 8 rows: 5 served, one 404, one undecodable, one served with other bytes than its sha256
    table = ["success                      5   62.50%", "failed_to_download           1   12.50%",
             "failed_to_resize             1   12.50%", "hash_mismatch                1   12.50%",
             "attempted                    8"]
    for line in table:
        assert line in lines, r.output
    assert lines.index(table[0]) < next(i for i, x in enumerate(lines) if "catalog" in x)  # table first
    assert f"wrote {data / 'pool_metadata'}: your metadata in the pool's format (8 rows" in r.output
    assert f"wrote catalog {cat}: view download_status" in r.output

    con = connect(cat)
    got = con.execute("SELECT uid, original_width, original_height, clip_b32_similarity_score, "
                      "clip_l14_similarity_score, face_bboxes, sha256, source_id, text FROM pool ORDER BY file, row"
                      ).fetchall()
    status = dict(con.execute("SELECT uid, status FROM download_status").fetchall())
    con.close()
    assert [g[0] for g in got] == [r["uid"] for r in rows]  # one row per metadata row, in order
    for g, row in zip(got, rows):
        w, h = sizes.get(row["uid"], (None, None))
        assert (g[1], g[2]) == (w, h), g  # the served image's size; NULL where nothing was downloaded
        assert g[3] is None and g[4] is None  # no CLIP scores before `byod score`
        assert g[5] == [] and g[6] == row["sha256"] and g[8] == row["text"]
    assert [g[7] for g in got] == [f"src-{i}" for i in range(8)]
    assert status == {r["uid"]: EXPECTED[r["kind"]] for r in rows}

    # bundled filters before scoring. The downloaded rows are 0, 1, 3, 6 and 7; the even ones (0, 6)
    # have images >= 200 px on both sides, so basic_filter (English, > 2 words, > 5 characters,
    # shorter side >= 200, aspect <= 3) keeps exactly those two; no score exists yet
    big = sorted(rows[i]["uid"] for i in (0, 6))
    downloaded = sorted(rows[i]["uid"] for i in (0, 1, 3, 6, 7))

    def run(flt, *extra):
        out = tmp_path / f"{flt}-{len(list(tmp_path.glob('*.npy')))}.npy"
        res = CliRunner().invoke(main, ["run", flt, "-c", str(cat), "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        assert f"on catalog {cat}\n" in res.output
        return sorted(f"{int(x['f0']):016x}{int(x['f1']):016x}" for x in np.load(out))

    assert run("basic_filter") == big
    assert run("no_filter") == sorted(r["uid"] for r in rows)
    assert run("clip_score_l14_threshold", "--set", "threshold=-1") == []

    # score with a tiny random-init open_clip model: the same catalog file gets the scores
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    import torch

    from tests.pool.test_byod import TINY

    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), tmp_path / "tiny.pt")
    r = CliRunner().invoke(main, ["byod", "score", "--data-dir", str(data), "--model-config", str(cfg),
                                  "--checkpoint", str(tmp_path / "tiny.pt"), "--catalog", str(cat)])
    assert r.exit_code == 0, r.output
    assert "scored 1 shards (0 already done): 8 rows, 5 images" in r.output
    assert f"wrote catalog {cat} over {data / 'metadata_scored'} with view download_status (replacing" in r.output
    con = connect(cat)
    scored = con.execute("SELECT uid, clip_l14_similarity_score, clip_b32_similarity_score, original_width, "
                         "original_height, source_id FROM pool ORDER BY file, row").fetchall()
    assert con.execute("SELECT count(*) FROM download_status").fetchone()[0] == 8
    con.close()
    assert [s[0] for s in scored] == [r["uid"] for r in rows]
    assert sorted(s[0] for s in scored if s[1] is not None) == downloaded  # scores where an image is
    assert all(-1.0 <= s[1] <= 1.0 for s in scored if s[1] is not None)  # cosines
    assert all(s[2] is None for s in scored)
    assert {s[0]: (s[3], s[4]) for s in scored if s[0] in sizes} == sizes
    assert [s[5] for s in scored] == [f"src-{i}" for i in range(8)]
    assert run("basic_filter") == big
    assert run("clip_score_l14_threshold", "--set", "threshold=-1") == downloaded  # every cosine >= -1

    # the status again with the same catalog: its (scored) pool is kept, only the view is replaced
    r = CliRunner().invoke(main, ["download-status", "--data-dir", str(data), "--catalog", str(cat)])
    assert r.exit_code == 0, r.output
    assert f"updated catalog {cat}: view download_status (replaced)" in r.output and "pool_metadata" not in r.output
    assert run("clip_score_l14_threshold", "--set", "threshold=-1") == downloaded


def test_commonpool_metadata_lacking_columns_keeps_its_error(tmp_path):
    """Metadata fetched from the hub (`--scale`) is a CommonPool: a file without its columns is an
    error for the catalog, not something to fill in. Shards and status files are written by hand
    here (img2dataset's layout) so that no network is involved."""
    from curate.pool.download import HUB_COMPLETE, download_catalog, update_status

    rows = [{"uid": uid_of(i), "url": f"http://127.0.0.1:9/{i}.jpg", "text": "x", "face_bboxes": [],
             "sha256": "0" * 64} for i in range(3)]
    data = tmp_path / "data"
    write_meta(data / "metadata" / "a.parquet", rows)
    (data / "metadata" / HUB_COMPLETE).write_text("{}")
    shards = data / "shards"
    shards.mkdir(parents=True)
    pq.write_table(pa.table({"uid": [r["uid"] for r in rows], "key": [f"{i:012d}" for i in range(3)],
                             "status": ["failed_to_download"] * 3, "error_message": ["x"] * 3,
                             "sha256": pa.nulls(3, pa.string())}), shards / "00000000.parquet")
    (shards / "00000000_stats.json").write_text("{}")
    md = check_metadata(data / "metadata")
    status = update_status(data, md, progress=False)
    from curate.errors import CurateError

    with pytest.raises(CurateError, match=r"a.parquet: missing column 'original_width' \(a CommonPool parquet has"):
        download_catalog(tmp_path / "c.duckdb", data, md, status, progress=False)
    assert not (tmp_path / "c.duckdb").exists() and not (data / "pool_metadata").exists()
