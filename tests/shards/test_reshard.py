"""The resharder: DataComp's output contract, deterministic bytes, resume, routing, bad input.

Expected outputs are written out by hand from the fixture pools (which uid sits where) and the
contract in the reference spec section 3; outputs are read back with Python's own ``tarfile``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli.main import main
from curate.errors import CurateError
from curate.engine import Engine
from curate.shards.index import index_catalog
from curate.shards.reshard import Output, ReshardError, load_cls_map, reshard, reshard_many
from curate.shards.tar import tar_header
from curate.shards.verify import verify_dir
from curate.subset import BadSubset, write_subset
from curate.uids import SUBSET_DTYPE, hex_to_pair, sort_pairs
from tests.conftest import uid_of
from tests.shards.test_index import FULL, U, make_shards, member_bytes, write_tar


def subset(path: Path, uids: list[str]) -> Path:
    pairs = [hex_to_pair(u) for u in uids]
    hi = np.array([p[0] for p in pairs], np.uint64)
    lo = np.array([p[1] for p in pairs], np.uint64)
    hi, lo = sort_pairs(hi, lo)
    return write_subset(path, hi, lo)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def expected_members(uid: str, j: int, exts=FULL) -> list[tuple[str, bytes]]:
    return [(f"{uid}-{j}.{e}", member_bytes(uid, e)) for e in exts]


def dir_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != "meta.json"}


@pytest.fixture
def pool(tmp_path):
    # shard 0: U0, U1, U2 (no json), U3; shard 1: U4, U5, U6
    return make_shards(tmp_path / "shards", [
        [(U[0], FULL), (U[1], FULL), (U[2], ("jpg", "txt")), (U[3], FULL)],
        [(U[4], FULL), (U[5], FULL), (U[6], FULL)],
    ])


def test_contract_duplicates_absent_and_no_json(tmp_path, pool):
    # U1 twice (upsampling), U2 has no json, U30 is not in the pool
    sub = subset(tmp_path / "s.npy", [U[1], U[1], U[2], U[5], U[6], U[30]])
    res = reshard(pool, tmp_path / "out", sub, shard_size=2, engine=Engine(workers=1))
    out = tmp_path / "out"
    # order = (input shard, position in tar), copies adjacent; cut every 2 samples
    assert read_tar(out / "00000000.tar") == expected_members(U[1], 0) + expected_members(U[1], 1)
    assert read_tar(out / "00000001.tar") == expected_members(U[5], 0) + expected_members(U[6], 0)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000000.tar", "00000000_stats.json", "00000001.tar", "00000001_stats.json",
        "meta.json", "sample_ids.npy", "sizes.json"]
    assert json.loads((out / "00000000_stats.json").read_text()) == {"successes": 2}
    assert json.loads((out / "sizes.json").read_text()) == {"00000000.tar": 2, "00000001.tar": 2}
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["output_count"], meta["output_shard_count"], meta["output_shard_format"]) == (4, 2, "{:08d}.tar")
    assert meta["skipped"] == {"absent_uids": 1, "no_json_entries": 1, "input_duplicates": 0}
    assert (out / "sample_ids.npy").read_bytes() == sub.read_bytes()
    assert (res.subset_count, res.subset_entries_present, res.output_count) == (6, 4, 4)
    assert any("skipped 1 subset entries whose uid is not in the input" in s for s in res.summary())
    assert verify_dir(out).ok
    # header of every member: mtime 0, no PAX, regular file
    with tarfile.open(out / "00000000.tar") as tf:
        assert all(m.mtime == 0 and not m.pax_headers and m.isreg() for m in tf.getmembers())


def test_tar_header_equals_python_tarfile():
    info = tarfile.TarInfo("0123456789abcdef0123456789abcdef-12.json")
    info.size, info.mtime, info.mode, info.uname, info.gname = 1234, 0, 0o444, "", ""
    assert tar_header(info.name.encode(), 1234) == info.tobuf(tarfile.USTAR_FORMAT)


def test_same_bytes_whatever_the_workers(tmp_path, pool):
    sub = subset(tmp_path / "s.npy", [U[i] for i in range(7)] + [U[3]])
    reshard(pool, tmp_path / "a", sub, shard_size=3, engine=Engine(workers=1))
    reshard(pool, tmp_path / "b", sub, shard_size=3, engine=Engine(workers=2))
    a, b = dir_bytes(tmp_path / "a"), dir_bytes(tmp_path / "b")
    assert a == b and len([n for n in a if n.endswith(".tar")]) == 3


def test_resume_keeps_completed_shards(tmp_path, pool):
    sub = subset(tmp_path / "s.npy", [U[i] for i in range(7)])
    out = tmp_path / "out"
    reshard(pool, out, sub, shard_size=2, engine=Engine(workers=1))
    full = dir_bytes(out)
    # as if killed while writing shard 2: its stats, meta.json and a temp file are missing/left
    (out / "00000002_stats.json").unlink()
    (out / "meta.json").unlink()
    (out / ".00000002.tar.x.tmp").write_bytes(b"partial")
    before = {n: (out / n).stat().st_mtime_ns for n in ("00000000.tar", "00000001.tar")}
    time.sleep(0.01)
    res = reshard(pool, out, sub, shard_size=2, engine=Engine(workers=1))
    assert (res.shards_written, res.shards_resumed) == (1, 2)  # 6 samples (U2 has no json): shards 0-2
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    assert dir_bytes(out) == full
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_resume_after_sigkill(tmp_path):
    # a real kill of the CLI mid-run, then the same command: identical to an uninterrupted run
    uids = [uid_of(i) for i in range(900)]
    pool = make_shards(tmp_path / "shards", [[(u, ("txt", "json")) for u in uids[i:i + 300]] for i in (0, 300, 600)],
                       parquet=False)
    sub = subset(tmp_path / "s.npy", uids)
    cmd = [sys.executable, "-m", "curate.cli.main", "reshard", "-i", str(pool), "-s", str(sub), "--shard-size", "1",
           "-j", "1"]
    ref = tmp_path / "ref"
    subprocess.run(cmd + ["-o", str(ref)], check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "00000009_stats.json").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists()
    assert not verify_dir(out).ok  # an unfinished output says so
    done = {p.name for p in out.iterdir() if p.name.endswith("_stats.json")}
    assert 10 <= len(done) < 900
    subprocess.run(cmd + ["-o", str(out)], check=True, capture_output=True)
    assert dir_bytes(out) == dir_bytes(ref)
    assert json.loads((out / "meta.json").read_text())["output_count"] == 900


def test_reads_only_shards_with_selected_samples(tmp_path, make_catalog):
    cat = make_catalog([[{"uid": u} for u in U[:30]]])
    shards = make_shards(tmp_path / "pool1" / "shards", [[(u, FULL) for u in U[i:i + 10]] for i in (0, 10, 20)])
    index_catalog(cat)
    sub = subset(tmp_path / "s.npy", [U[12], U[15]])
    res = reshard(shards, tmp_path / "out", sub, catalog=cat, engine=Engine(workers=1))
    assert (res.input_shards_read, res.input_shards_total) == (1, 3)
    total = sum((shards / f"{i:08d}.tar").stat().st_size for i in range(3))
    assert res.bytes_total == total and 0 < res.bytes_read < total / 3
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["index"] == {"tars": 3, "from_catalog": 3, "scanned": 0}
    # a tar rewritten after indexing is rescanned, not trusted
    write_tar(shards / "00000001.tar", [("000000010000", U[15], FULL)])
    res = reshard(shards, tmp_path / "out2", sub, catalog=cat, engine=Engine(workers=1))
    assert res.output_count == 1
    assert json.loads((tmp_path / "out2" / "meta.json").read_text())["index"]["scanned"] == 1


def test_truncated_input_and_missing_stats(tmp_path):
    pool = make_shards(tmp_path / "shards", [[(U[0], FULL)], [(U[1], FULL), (U[2], FULL)]],
                       missing_stats=(0,), truncate_last=3)
    sub = subset(tmp_path / "s.npy", [U[0], U[1], U[2]])
    res = reshard(pool, tmp_path / "out", sub, engine=Engine(workers=1))
    # shard 0 has no _stats.json but is read; U2's json is cut off, so U2 is left out
    assert read_tar(tmp_path / "out" / "00000000.tar") == expected_members(U[0], 0) + expected_members(U[1], 0)
    assert (res.truncated_inputs, res.inputs_without_stats) == (["00000001.tar"], ["00000000.tar"])
    assert res.absent_uids == 1


def test_empty_subset(tmp_path, pool):
    # issue 16: an empty subset is an error for reshard (it used to write an empty output, exit 0);
    # among several outputs (reshard_many, e.g. a TiC year) an empty one is still written
    sub = subset(tmp_path / "s.npy", [])
    with pytest.raises(ReshardError, match="s.npy: empty subset .0 uids."):
        reshard(pool, tmp_path / "out", sub, engine=Engine(workers=1))
    assert not (tmp_path / "out").exists()
    res = reshard_many(pool, [(tmp_path / "out", sub, None)], engine=Engine(workers=1))[0]
    assert (res.output_count, res.output_shard_count, res.input_shards_read) == (0, 0, 0)
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {}
    assert verify_dir(tmp_path / "out").ok


def test_reshard_a_reshard(tmp_path, pool):
    first = reshard(pool, tmp_path / "a", subset(tmp_path / "a.npy", [U[1], U[1], U[4], U[6]]), engine=Engine(workers=1))
    assert first.output_count == 4
    res = reshard(tmp_path / "a", tmp_path / "b", subset(tmp_path / "b.npy", [U[4], U[6], U[6]]), engine=Engine(workers=1))
    assert res.output_count == 3
    assert read_tar(tmp_path / "b" / "00000000.tar") == (
        expected_members(U[4], 0) + expected_members(U[6], 0) + expected_members(U[6], 1))


def test_many_outputs_equal_separate_runs(tmp_path, pool):
    s1 = subset(tmp_path / "y1.npy", [U[0], U[4]])
    s2 = subset(tmp_path / "y2.npy", [U[1], U[5], U[6]])
    reshard_many(pool, [(tmp_path / "m1", s1, None), Output(tmp_path / "m2", s2)], engine=Engine(workers=2))
    reshard(pool, tmp_path / "r1", s1, engine=Engine(workers=1))
    reshard(pool, tmp_path / "r2", s2, engine=Engine(workers=1))
    assert dir_bytes(tmp_path / "m1") == dir_bytes(tmp_path / "r1")
    assert dir_bytes(tmp_path / "m2") == dir_bytes(tmp_path / "r2")


@pytest.mark.parametrize("kind", ["pickle", "json", "parquet", "dict"])
def test_cls_member(tmp_path, pool, kind):
    m = {U[1]: 7, U[5]: 981}
    if kind == "pickle":
        src = tmp_path / "c.pkl"
        src.write_bytes(pickle.dumps({k: np.int64(v) for k, v in m.items()}))
    elif kind == "json":
        src = tmp_path / "c.json"
        src.write_text(json.dumps(m))
    elif kind == "parquet":
        src = tmp_path / "c.parquet"
        pq.write_table(pa.table({"uid": list(m), "cls": list(m.values())}), src)
    else:
        src = m
    reshard(pool, tmp_path / "out", subset(tmp_path / "s.npy", [U[1], U[5]]), cls=src, engine=Engine(workers=1))
    got = read_tar(tmp_path / "out" / "00000000.tar")
    assert got == (expected_members(U[1], 0) + [(f"{U[1]}-0.cls", b"7")]
                   + expected_members(U[5], 0) + [(f"{U[5]}-0.cls", b"981")])


def test_cls_missing_uid_writes_nothing(tmp_path, pool):
    with pytest.raises(ReshardError, match=f"1 selected uids have no class in the cls file .first: {U[5]}"):
        reshard(pool, tmp_path / "out", subset(tmp_path / "s.npy", [U[1], U[5]]), cls={U[1]: 3}, engine=Engine(workers=1))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cls_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({U[0]: Evil()}))
    with pytest.raises(CurateError, match="refusing to load"):
        load_cls_map(p)


def test_bad_subsets(tmp_path, pool):
    unsorted = tmp_path / "u.npy"
    arr = np.array([hex_to_pair(U[5]), hex_to_pair(U[1])], dtype=SUBSET_DTYPE)
    arr = np.sort(arr)[::-1].copy()
    np.save(unsorted, arr)
    with pytest.raises(BadSubset, match="not sorted ascending at record 1"):
        reshard(pool, tmp_path / "out", unsorted, engine=Engine(workers=1))
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.arange(4, dtype=np.int64))
    with pytest.raises(BadSubset, match="is not the subset dtype"):
        reshard(pool, tmp_path / "out", wrong, engine=Engine(workers=1))
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_overwrite(tmp_path, pool):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    sub = subset(tmp_path / "s.npy", [U[1]])
    with pytest.raises(ReshardError, match="not empty .1 entries, e.g. precious.txt.; use --overwrite"):
        reshard(pool, out, sub, engine=Engine(workers=1))
    # --overwrite removes only what curate wrote: a foreign file is refused, and kept
    with pytest.raises(ReshardError, match="precious.txt was not written by curate reshard"):
        reshard(pool, out, sub, engine=Engine(workers=1), overwrite=True)
    assert (out / "precious.txt").read_text() == "x"
    (out / "precious.txt").unlink()
    reshard(pool, out, sub, engine=Engine(workers=1))
    reshard(pool, out, sub, engine=Engine(workers=1), overwrite=True)
    # the same job again resumes (nothing to do); another job needs --overwrite
    assert reshard(pool, out, sub, engine=Engine(workers=1)).shards_resumed == 1
    with pytest.raises(ReshardError, match="output of a different reshard job"):
        reshard(pool, out, subset(tmp_path / "t.npy", [U[4]]), engine=Engine(workers=1))


def _png(color, size=64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.new("RGB", (size, size), color)
    for x in range(size):  # a sharp checkerboard, so blurring visibly changes pixels
        for y in range(size):
            if (x // 4 + y // 4) % 2:
                im.putpixel((x, y), (0, 0, 0))
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_blur_faces_from_json_and_inject_metadata(tmp_path):
    from PIL import Image

    root = tmp_path / "shards"
    root.mkdir()
    box = [0.5, 0.5, 0.75, 0.75]
    with tarfile.open(root / "00000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, uid, boxes in (("000000000000", U[0], [box]), ("000000000001", U[1], [])):
            for ext, data in (("png", _png((255, 255, 255))),
                              ("json", json.dumps({"uid": uid, "face_bboxes": boxes}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    res = reshard(root, tmp_path / "out", subset(tmp_path / "s.npy", [U[0], U[1]]), engine=Engine(workers=1),
                  apply_blur=True, inject_blur_metadata=True)
    assert res.blurred == 1
    got = dict(read_tar(tmp_path / "out" / "00000000.tar"))
    assert set(got) == {f"{U[0]}-0.webp", f"{U[0]}-0.json", f"{U[1]}-0.png", f"{U[1]}-0.json"}
    assert json.loads(got[f"{U[0]}-0.json"])["face_bboxes"] == [box]
    orig = np.asarray(Image.open(io.BytesIO(_png((255, 255, 255)))).convert("RGB")).astype(int)
    out = np.asarray(Image.open(io.BytesIO(got[f"{U[0]}-0.webp"])).convert("RGB")).astype(int)
    # box = pixels 32..48, grown by 10% of 16 px: inside it the checkerboard is smoothed away,
    # far from it the (lossless-quality) webp keeps the pattern
    inside = np.abs(out[36:44, 36:44] - orig[36:44, 36:44]).mean()
    outside = np.abs(out[0:16, 0:16] - orig[0:16, 0:16]).mean()
    assert inside > 40 and outside < 10
    assert got[f"{U[1]}-0.png"] == _png((255, 255, 255))  # no face: bytes untouched


def test_blur_corrupt_image_is_an_error(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "00000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for ext, data in (("jpg", b"not a jpeg"), ("json", json.dumps({"uid": U[0], "face_bboxes": [[0, 0, 1, 1]]}).encode())):
            info = tarfile.TarInfo(f"000000000000.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ReshardError, match="00000000.tar at byte 0: cannot decode the image to blur it"):
        reshard(root, tmp_path / "out", subset(tmp_path / "s.npy", [U[0]]), engine=Engine(workers=1), apply_blur=True)
    assert not (tmp_path / "out").exists()  # a failed run into a new directory leaves nothing


def test_cli_reshard_verify_and_errors(tmp_path, pool, make_catalog):
    sub = subset(tmp_path / "s.npy", [U[1], U[4]])
    r = CliRunner().invoke(main, ["reshard", "-i", str(pool), "-o", str(tmp_path / "out"), "-s", str(sub), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert "2 samples in 1 shards" in r.output and "read 2 of 2 input shards" in r.output
    r = CliRunner().invoke(main, ["shards", "verify", str(tmp_path / "out")])
    assert r.exit_code == 0 and "reshard output, 2 samples in 1 tars: ok" in r.output
    r = CliRunner().invoke(main, ["reshard", "-i", str(pool), "-o", str(tmp_path / "out"), "-s", str(tmp_path / "nope.npy")])
    assert r.exit_code == 1 and "error: " in r.output and "nope.npy: subset file not found" in r.output
    cat = make_catalog([[{"uid": u} for u in U[:7]]], shards=pool)
    r = CliRunner().invoke(main, ["shards", "index", str(cat)])
    assert r.exit_code == 0 and "7 samples in 2 tars (2 scanned now)" in r.output
    for cmd in (["reshard", "--help"], ["shards", "index", "--help"], ["shards", "verify", "--help"]):
        assert "Example:" in CliRunner().invoke(main, cmd).output


def test_verify_recounts_against_the_input(tmp_path, pool):
    sub = subset(tmp_path / "s.npy", [U[1], U[1], U[4], U[30]])
    reshard(pool, tmp_path / "out", sub, engine=Engine(workers=1))
    assert verify_dir(tmp_path / "out", inputs=[pool]).ok
    # drop a sample from the output (and fix every count so only the input recount can notice)
    out = tmp_path / "out"
    kept = [m for m in read_tar(out / "00000000.tar") if not m[0].startswith(f"{U[4]}-")]
    with tarfile.open(out / "00000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in kept:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (out / "00000000_stats.json").write_text('{"successes": 2}')
    (out / "sizes.json").write_text('{"00000000.tar": 2}')
    meta = json.loads((out / "meta.json").read_text())
    meta["output_count"] = meta["subset_entries_present"] = 2
    (out / "meta.json").write_text(json.dumps(meta))
    assert verify_dir(out).ok
    rep = verify_dir(out, inputs=[pool])
    assert rep.problems == [f"{out}: the input holds 3 entries of sample_ids.npy but 2 samples were written"]
    r = CliRunner().invoke(main, ["shards", "verify", str(out), "-i", str(pool)])
    assert r.exit_code == 1 and "2 samples in 1 tars: 1 problems" in r.output


def test_blur_boxes_from_the_pool(tmp_path, make_catalog):
    box = [0.25, 0.25, 0.5, 0.5]
    cat = make_catalog([[{"uid": U[0], "face_bboxes": [box]}, {"uid": U[1]}]])
    root = tmp_path / "pool1" / "shards"
    root.mkdir()
    with tarfile.open(root / "00000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, uid in (("000000000000", U[0]), ("000000000001", U[1])):
            # the json carries no face_bboxes: the pool's column is the source
            for ext, data in (("png", _png((255, 255, 255))), ("json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    r = CliRunner().invoke(main, ["reshard", "-i", str(root), "-o", str(tmp_path / "out"), "-j", "1",
                                  "-s", str(subset(tmp_path / "s.npy", [U[0], U[1]])), "--catalog", str(cat),
                                  "--apply-blur", "--inject-blur-metadata"])
    assert r.exit_code == 0, r.output
    assert "blurred faces in 1 images" in r.output
    got = dict(read_tar(tmp_path / "out" / "00000000.tar"))
    assert set(got) == {f"{U[0]}-0.webp", f"{U[0]}-0.json", f"{U[1]}-0.png", f"{U[1]}-0.json"}
    assert json.loads(got[f"{U[0]}-0.json"]) == {"uid": U[0], "face_bboxes": [box]}
    assert json.loads(got[f"{U[1]}-0.json"]) == {"uid": U[1], "face_bboxes": []}


def test_input_with_pax_headers(tmp_path):
    # DataComp's own outputs come from webdataset's TarWriter with float mtimes: PAX headers
    root = tmp_path / "shards"
    root.mkdir()
    write_tar(root / "00000000.tar", [(f"{U[3]}-0", U[3], FULL), (f"{U[4]}-0", U[4], FULL)], pax=True)
    res = reshard(root, tmp_path / "out", subset(tmp_path / "s.npy", [U[4], U[4]]), engine=Engine(workers=1))
    assert res.output_count == 2
    assert read_tar(tmp_path / "out" / "00000000.tar") == expected_members(U[4], 0) + expected_members(U[4], 1)


def test_uid_twice_in_the_input_is_copied_once(tmp_path):
    # DataComp would write both input samples under the same keys; we take the first (by shard, offset)
    root = make_shards(tmp_path / "shards", [[(U[0], FULL), (U[1], FULL)], [(U[1], FULL)]])
    res = reshard(root, tmp_path / "out", subset(tmp_path / "s.npy", [U[1], U[1]]), engine=Engine(workers=1))
    assert (res.output_count, res.input_duplicates, res.input_shards_read) == (2, 1, 1)
    assert read_tar(tmp_path / "out" / "00000000.tar") == expected_members(U[1], 0) + expected_members(U[1], 1)
    assert any("present in several input samples" in line for line in res.summary())


def test_input_dir_without_tars_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="empty: no .tar shards in this directory"):
        reshard(tmp_path / "empty", tmp_path / "out", subset(tmp_path / "s.npy", [U[0]]), engine=Engine(workers=1))
    with pytest.raises(CurateError, match="nope: shard directory not found"):
        reshard(tmp_path / "nope", tmp_path / "out", subset(tmp_path / "s.npy", [U[0]]), engine=Engine(workers=1))


def test_changed_input_is_not_resumed(tmp_path, pool):
    sub = subset(tmp_path / "s.npy", [U[1], U[4]])
    reshard(pool, tmp_path / "out", sub, engine=Engine(workers=1))
    (tmp_path / "out" / "meta.json").unlink()  # as if killed at the end
    write_tar(pool / "00000001.tar", [("000000010000", U[4], FULL)])  # an input tar changed since
    with pytest.raises(ReshardError, match="output of a different reshard job"):
        reshard(pool, tmp_path / "out", sub, engine=Engine(workers=1))


def test_ray_engine_writes_the_same_bytes(tmp_path, pool):
    sub = subset(tmp_path / "s.npy", [U[i] for i in range(7)] + [U[3]])
    reshard(pool, tmp_path / "local", sub, shard_size=3, engine=Engine(workers=1))
    reshard(pool, tmp_path / "ray", sub, shard_size=3, engine=Engine(kind="ray"))
    assert dir_bytes(tmp_path / "ray") == dir_bytes(tmp_path / "local")
