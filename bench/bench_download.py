"""Benchmark the download path on loopback: verification cost, status table, byod scoring.

* img2dataset (DataComp settings) with ``verify_hash`` vs without, against a local HTTP server,
  and both vs the bound: fetching the same URLs with a plain urllib thread pool (no decode,
  resize, encode or tar writing).
* the ``download_status`` table (one DuckDB join per shard against the metadata rows) vs the
  naive way: read every sample's json from the tars and compare its sha256 with a Python dict
  of the pool built from the metadata.
* ``byod score`` (batched) vs one sample at a time, with a tiny random-init open_clip model.

Run: ``.venv/bin/python bench/bench_download.py [--rows 20000]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_IMAGES = 256  # distinct images; URLs are per row


def make_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def serve(images):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            i = int(self.path.rsplit("/", 1)[1].split(".")[0])
            body = images[i % N_IMAGES]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # the default backlog of 5 drops connections under 64 client threads

    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def write_metadata(meta: Path, base: str, rows: int, images) -> None:
    meta.mkdir(parents=True)
    shas = [hashlib.sha256(b).hexdigest() for b in images]
    half = rows // 2
    for f, (lo, hi) in enumerate([(0, half), (half, rows)]):
        idx = range(lo, hi)
        pq.write_table(pa.table({
            "uid": [f"{i:032x}" for i in idx], "url": [f"{base}/img/{i}.jpg" for i in idx],
            "text": [f"a photo number {i}" for i in idx],
            "face_bboxes": pa.array([[]] * len(idx), pa.list_(pa.list_(pa.float64()))),
            "sha256": [shas[i % N_IMAGES] for i in idx],
        }), meta / f"{f:04d}.parquet")


def bound_fetch(meta: Path, threads: int) -> float:
    urls = [u for p in sorted(meta.glob("*.parquet")) for u in pq.read_table(p, columns=["url"]).column(0).to_pylist()]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        n = sum(len(b) for b in ex.map(lambda u: urlopen(u, timeout=60).read(), urls))
    assert n > 0
    return time.perf_counter() - t0


def naive_status(data: Path, meta: Path) -> dict:
    pool = {}
    for p in sorted(meta.glob("*.parquet")):
        d = pq.read_table(p, columns=["uid", "sha256"]).to_pydict()
        pool.update(zip(d["uid"], d["sha256"]))
    ok = {}
    for tar in sorted((data / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    j = json.loads(tf.extractfile(m).read())
                    ok[j["uid"]] = j["sha256"] == pool[j["uid"]]
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--byod-naive", type=int, default=500, help="samples for the one-at-a-time byod baseline")
    args = ap.parse_args()

    from curate.pool.download import DownloadSettings, check_metadata, download, update_status

    tmp = Path(tempfile.mkdtemp(prefix="bench_download_"))
    images = make_images()
    httpd, base = serve(images)
    meta = tmp / "meta"
    write_metadata(meta, base, args.rows, images)
    print(f"pool: {args.rows:,} rows in 2 files, {N_IMAGES} distinct 128x96 JPEGs served from {base}")

    t_bound = bound_fetch(meta, args.threads * args.processes)
    print(f"bound (urllib thread pool, fetch only):   {t_bound:7.1f}s  {args.rows / t_bound:8.0f} img/s")

    times, spans = {}, {}
    for verify in (False, True):
        s = DownloadSettings(processes=args.processes, threads=args.threads, verify_hash=verify, retries=0, timeout=60)
        data = tmp / f"data_verify{int(verify)}"
        t0 = time.perf_counter()
        rep = download(data, metadata_dir=meta, settings=s, progress=False)
        times[verify] = time.perf_counter() - t0
        assert rep.counts.get("success") == args.rows, rep.counts
        stats = [json.loads(p.read_text()) for p in (data / "shards").glob("*_stats.json")]
        spans[verify] = max(x["end_time"] for x in stats) - min(x["start_time"] for x in stats)
        print(f"curate download verify_hash={verify!s:<5}:    {times[verify]:7.1f}s  "
              f"{args.rows / times[verify]:8.0f} img/s wall (incl. process start-up, status table); "
              f"shard phase {spans[verify]:.1f}s = {args.rows / spans[verify]:.0f} img/s")
    print(f"ratio verified / unverified: wall {times[True] / times[False]:.2f}x, shard phase "
          f"{spans[True] / spans[False]:.2f}x;  verified shard phase / bound: {spans[True] / t_bound:.2f}x")

    data = tmp / "data_verify1"
    md = check_metadata(meta)
    shutil.rmtree(data / "download_status")
    t0 = time.perf_counter()
    update_status(data, md, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_status(data, meta)
    t_naive = time.perf_counter() - t0
    assert len(naive) == args.rows and all(naive.values())
    print(f"status table: ours (DuckDB join per shard) {t_ours:.2f}s vs naive (tar json + dict) {t_naive:.2f}s "
          f"-> {t_naive / t_ours:.1f}x")

    import open_clip
    import torch
    from PIL import Image

    from curate.pool.byod import score_shards

    cfg = tmp / "bench-tiny-clip.json"
    cfg.write_text(json.dumps({"embed_dim": 32,
                               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                              "head_width": 32},
                               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                                            "layers": 2}}))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("bench-tiny-clip")
    model.eval()
    tok = open_clip.get_tokenizer("bench-tiny-clip")
    t0 = time.perf_counter()
    res = score_shards(data / "shards", tmp / "scored", model, pre, tok, progress=False)
    t_batched = time.perf_counter() - t0
    # one sample at a time over the first shard's first samples
    n = 0
    t0 = time.perf_counter()
    with tarfile.open(data / "shards" / "00000000.tar") as tf, torch.no_grad():
        members = {}
        for m in tf:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tf.extractfile(m).read()
            if len(members[key]) == 3:
                s = members.pop(key)
                i = model.encode_image(pre(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))[None])
                t = model.encode_text(tok([s["txt"].decode()]))
                float((torch.nn.functional.normalize(i, dim=-1) * torch.nn.functional.normalize(t, dim=-1)).sum())
                n += 1
                if n == args.byod_naive:
                    break
    t_naive = time.perf_counter() - t0
    print(f"byod score: batched {res.images / t_batched:.0f} img/s ({res.images:,} images, {t_batched:.1f}s) vs "
          f"one at a time {n / t_naive:.0f} img/s -> {(res.images / t_batched) / (n / t_naive):.1f}x")
    httpd.shutdown()
    shutil.rmtree(tmp)


if __name__ == "__main__":  # img2dataset spawns processes that re-import this module
    main()
