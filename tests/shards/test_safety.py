"""Issue 16 for shards and subset files: only data members are copied, nothing that existed is
destroyed, truncated or corrupt tars / cls files / subset files fail with one line naming the file
(and byte offset), and a killed reshard resumes byte-identically.

Hostile inputs (pickled members, cut tars, object-dtype .npy) are built here, never shipped.
Every failing case checks the exit code, the one ``error:`` line, and that the whole directory
tree is byte-for-byte what it was before (so no output, temp file or sibling dir is left).
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
from curate.engine import Engine
from curate.shards.reshard import reshard
from curate.shards.index import scan_paths
from curate.shards.tar import ShardError, scan_tar
from tests.conftest import uid_of
from tests.shards.test_index import FULL, U, make_shards, member_bytes
from tests.shards.test_reshard import read_tar, subset


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under ``root``, by relative path."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def cli(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r, *parts: str) -> str:
    """The result failed with exit 1 and exactly one ``error:`` line holding every part; no traceback."""
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for p in parts:
        assert p in lines[0], (p, lines[0])
    assert "Traceback" not in r.output
    return lines[0]


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A USTAR tar as Python's tarfile (and img2dataset, through webdataset) writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# ------------------------------------------------------------------ 1. only data members copied

def test_reshard_copies_only_data_members_and_reports_the_others(tmp_path):
    root = tmp_path / "shards"
    payload = pickle.dumps(Evil())
    members = []
    for i, uid in enumerate(U[:2]):
        key = f"{i:012d}"
        members += [(f"{key}.{e}", member_bytes(uid, e)) for e in FULL]
        members += [(f"{key}.pyd", payload), (f"{key}.pth", payload), (f"{key}.0.pyd", payload)]
    members += [("000000000002.jpg", member_bytes(U[2], "jpg")), ("000000000002.pickle", payload),
                ("000000000002.json", member_bytes(U[2], "json"))]
    tar_of(root / "00000000.tar", members)
    sub = subset(tmp_path / "s.npy", [U[0], U[0], U[2]])  # U0 twice: two copies of each member
    r = cli("reshard", "-i", root, "-o", tmp_path / "out", "-s", sub, "-j", "1")
    assert r.exit_code == 0, r.output
    # worked out by hand: U0 x2 copies x (pyd, pth, 0.pyd) + U2 x1 pickle
    want = {"0.pyd": 2, "pickle": 1, "pth": 2, "pyd": 2}
    assert "dropped 7 members that are not data" in r.output
    assert "2 .0.pyd, 1 .pickle, 2 .pth, 2 .pyd" in r.output
    got = read_tar(tmp_path / "out" / "00000000.tar")
    assert [n for n, _ in got] == [f"{U[0]}-0.{e}" for e in FULL] + [f"{U[0]}-1.{e}" for e in FULL] + \
        [f"{U[2]}-0.jpg", f"{U[2]}-0.json"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dropped_members"] == want
    stats = json.loads((tmp_path / "out" / "00000000_stats.json").read_text())
    assert stats == {"successes": 3, "dropped_members": want}
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------- 2. nothing is destroyed

@pytest.fixture
def data(tmp_path):
    """data/shards (the pool), data/notes.txt (unrelated), a subset and a previous complete output."""
    d = tmp_path / "data"
    make_shards(d / "shards", [[(U[0], FULL), (U[1], FULL)], [(U[2], FULL)]])
    (d / "notes.txt").write_text("mine")
    subset(tmp_path / "s.npy", [U[0], U[2]])
    subset(tmp_path / "t.npy", [U[1]])
    r = cli("reshard", "-i", d / "shards", "-o", tmp_path / "prev", "-s", tmp_path / "s.npy", "-j", "1")
    assert r.exit_code == 0, r.output
    return tmp_path


@pytest.mark.parametrize("inp,out,extra,msg", [
    ("data/shards", "data", ["--overwrite"], "the output directory contains the input"),
    ("data/shards", "data", [], "the output directory contains the input"),
    ("data/shards", "data/shards", ["--overwrite"], "the output directory is also an input"),
    ("data/shards", "data/shards/sub", ["--overwrite"], "the output directory is inside the input"),
    ("data/shards", "data", ["--overwrite", "-i", "prev"], "the output directory contains the input"),
])
def test_output_overlapping_an_input_is_refused(data, inp, out, extra, msg):
    before = tree(data)
    r = cli("reshard", "-i", data / inp, "-o", data / out, "-s", data / "s.npy", "-j", "1", *extra)
    one_error_line(r, str(data / out), msg)
    assert tree(data) == before


def test_output_that_is_a_file_is_refused(data):
    # the CLI refuses it as a usage error (click); the library says so in one line too
    from curate.shards.reshard import ReshardError

    before = tree(data)
    with pytest.raises(ReshardError, match="notes.txt: exists and is not a directory"):
        reshard(data / "data" / "shards", data / "data" / "notes.txt", data / "s.npy", engine=Engine(workers=1),
                overwrite=True)
    assert tree(data) == before


@pytest.mark.parametrize("setup,msg", [
    (lambda p: (p / "notes.txt").write_text("x"), "notes.txt was not written by curate reshard"),
    (lambda p: (p / "sub").mkdir(), "sub was not written by curate reshard"),
    (lambda p: (p / "00000007.parquet").write_bytes(b"PAR1"), "00000007.parquet was not written by curate"),
    (lambda p: (p / ".curate_reshard.json").unlink(), "has no .curate_reshard.json"),
])
def test_overwrite_refuses_a_directory_with_foreign_files(data, setup, msg):
    setup(data / "prev")
    before = tree(data)
    r = cli("reshard", "-i", data / "data" / "shards", "-o", data / "prev", "-s", data / "t.npy", "-j", "1",
            "--overwrite")
    one_error_line(r, str(data / "prev"), msg)
    assert tree(data) == before


def test_overwrite_of_a_directory_that_is_not_a_reshard_output(tmp_path):
    # an img2dataset shard dir: tars and stats look like ours, its parquet does not
    pool = make_shards(tmp_path / "pool", [[(U[0], FULL)]])
    other = make_shards(tmp_path / "other", [[(U[1], FULL)]], parquet=False)
    subset(tmp_path / "s.npy", [U[0]])
    before = tree(tmp_path)
    r = cli("reshard", "-i", pool, "-o", other, "-s", tmp_path / "s.npy", "-j", "1", "--overwrite")
    one_error_line(r, str(other), "has no .curate_reshard.json")
    assert tree(tmp_path) == before


def test_failed_overwrite_leaves_the_old_output_untouched(tmp_path):
    root = tmp_path / "shards"
    bad = json.dumps({"uid": U[1], "face_bboxes": [[0, 0, 1, 1]]}).encode()
    tar_of(root / "00000000.tar", [("000000000000.jpg", member_bytes(U[0], "jpg")),
                                   ("000000000000.json", member_bytes(U[0], "json")),
                                   ("000000000001.jpg", b"not a jpeg"), ("000000000001.json", bad)])
    r = cli("reshard", "-i", root, "-o", tmp_path / "out", "-s", subset(tmp_path / "a.npy", [U[0]]), "-j", "1")
    assert r.exit_code == 0, r.output
    before = tree(tmp_path)
    r = cli("reshard", "-i", root, "-o", tmp_path / "out", "-s", subset(tmp_path / "b.npy", [U[0], U[1]]), "-j", "1",
            "--overwrite", "--apply-blur")
    before["b.npy"] = (tmp_path / "b.npy").read_bytes()
    one_error_line(r, "00000000.tar at byte", "cannot decode the image to blur it")
    assert tree(tmp_path) == before  # the old output byte-identical, no half output beside it


def test_overwrite_replaces_a_reshard_output_with_a_fresh_one(data):
    ref = data / "ref"
    assert cli("reshard", "-i", data / "data" / "shards", "-o", ref, "-s", data / "t.npy", "-j", "1").exit_code == 0
    r = cli("reshard", "-i", data / "data" / "shards", "-o", data / "prev", "-s", data / "t.npy", "-j", "1",
            "--overwrite")
    assert r.exit_code == 0, r.output
    strip = lambda t: {k: v for k, v in t.items() if k != "meta.json"}  # noqa: E731 - meta names its dir
    assert strip(tree(data / "prev")) == strip(tree(ref))
    assert sorted(p.name for p in data.iterdir()) == ["data", "prev", "ref", "s.npy", "t.npy"]


def test_failed_run_into_a_new_directory_leaves_nothing(tmp_path):
    root = tmp_path / "shards"
    tar_of(root / "00000000.tar", [("000000000000.png", b"not a png"),
                                   ("000000000000.json", json.dumps({"uid": U[0], "face_bboxes": [[0, 0, 1, 1]]}).encode())])
    subset(tmp_path / "s.npy", [U[0]])
    before = tree(tmp_path)
    r = cli("reshard", "-i", root, "-o", tmp_path / "new" / "out", "-s", tmp_path / "s.npy", "-j", "1", "--apply-blur")
    one_error_line(r, "cannot decode the image to blur it")
    assert tree(tmp_path) == {**before, "new": None}  # the parent it made may stay, empty
    (tmp_path / "empty").mkdir()  # an empty directory that existed stays
    before = tree(tmp_path)
    r = cli("reshard", "-i", root, "-o", tmp_path / "empty", "-s", tmp_path / "s.npy", "-j", "1", "--apply-blur")
    one_error_line(r, "cannot decode the image to blur it")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------ 3. truncated tars

def _offsets(path: Path) -> list[tuple[int, int]]:
    """(header offset, end of padded data) of each member, from Python's tarfile."""
    with tarfile.open(path) as tf:
        return [(m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tf.getmembers()]


# where to cut the 2-sample tar (U0, U1; 3 members each), from tarfile's own member offsets, and
# which samples survive: the last sample seen in a cut tar may be incomplete, so it is left out
CUTS = {
    "at a member boundary inside a sample": (lambda o: o[4][0], [U[0]]),  # U1's jpg, not its txt/json
    "at a sample boundary, no end blocks": (lambda o: o[3][0], []),  # U0 could have had more members
    "after the last member, no end blocks": (lambda o: o[5][1], [U[0]]),
    "inside a member's data": (lambda o: o[4][0] + 512 + 3, [U[0]]),
    "inside a member's padding": (lambda o: o[5][1] - 5, [U[0]]),
    "inside a header": (lambda o: o[5][0] + 100, [U[0]]),
    "after one of the two end blocks": (lambda o: o[5][1] + 512, [U[0]]),
}


@pytest.mark.parametrize("where", list(CUTS))
def test_truncated_tar_is_reported_with_shard_and_offset(tmp_path, where):
    root = make_shards(tmp_path / "shards", [[(U[0], FULL), (U[1], FULL)]])
    tar = root / "00000000.tar"
    at, kept = CUTS[where]
    cut = at(_offsets(tar))
    tar.write_bytes(tar.read_bytes()[:cut])
    assert scan_tar(tar).truncated
    r = cli("shards", "verify", root)
    assert r.exit_code == 1, r.output
    assert f"problem: {tar}: truncated at byte {cut} " in r.output
    sub = subset(tmp_path / "s.npy", [U[0], U[1]])
    r = cli("reshard", "-i", root, "-o", tmp_path / "out", "-s", sub, "-j", "1")
    assert r.exit_code == 0, r.output
    assert "truncated input tars" in r.output and f"00000000.tar (ends at byte {cut})" in r.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["truncated_inputs"], meta["output_count"]) == (["00000000.tar"], len(kept))
    if kept:
        assert read_tar(tmp_path / "out" / "00000000.tar") == \
            [(f"{U[0]}-0.{e}", member_bytes(U[0], e)) for e in FULL]


def test_complete_tar_is_not_truncated(tmp_path):
    root = make_shards(tmp_path / "shards", [[(U[0], FULL), (U[1], FULL)]])
    assert not scan_tar(root / "00000000.tar").truncated
    assert cli("shards", "verify", root).exit_code == 0


def _pax_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ext in FULL:
            data = member_bytes(U[0], ext)
            info = tarfile.TarInfo(f"000000000000.{ext}")
            info.size = len(data)
            info.mtime = 1.5  # a float mtime: tarfile writes a PAX header before each member
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("old,new,msg", [
    (b"13 mtime=1.5\n", b"xx mtime=1.5\n", "record length b'xx' is not a number"),
    (b"13 mtime=1.5\n", b"00 mtime=1.5\n", "record length 0 does not fit the header"),
    (b"13 mtime=1.5\n", b"99 mtime=1.5\n", "record length 99 does not fit the header"),
])
def test_pax_header_that_does_not_parse_is_one_line(tmp_path, old, new, msg):
    root = tmp_path / "shards"
    root.mkdir()
    tar = root / "00000000.tar"
    _pax_tar(tar)
    data = tar.read_bytes()
    assert data.count(old) == 3
    tar.write_bytes(data.replace(old, new, 1))  # the first member's PAX header, at byte 0
    subset(tmp_path / "s.npy", [U[0]])
    before = tree(tmp_path)
    r = cli("reshard", "-i", root, "-o", tmp_path / "out", "-s", tmp_path / "s.npy", "-j", "1")
    one_error_line(r, f"{tar} at byte 0: corrupt PAX header", msg)
    assert tree(tmp_path) == before
    r = cli("shards", "verify", root)
    assert r.exit_code == 1 and f"problem: {tar} at byte 0: corrupt PAX header ({msg})" in r.output
    with pytest.raises(ShardError, match=f"at byte 0: corrupt PAX header"):  # the index build, 2 workers
        scan_paths([tar, tar], workers=2)


# ------------------------------------------------------------------------------- 4. cls file

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_cls_parquet_is_one_line(tmp_path, damage):
    pool = make_shards(tmp_path / "shards", [[(U[0], FULL)]])
    cls = tmp_path / "cls.parquet"
    pq.write_table(pa.table({"uid": [U[0]] * 100, "cls": list(range(100))}), cls)
    data = cls.read_bytes()
    cls.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PAR1" + b"\x07" * 200 + b"PAR1")
    subset(tmp_path / "s.npy", [U[0]])
    before = tree(tmp_path)
    r = cli("reshard", "-i", pool, "-o", tmp_path / "out", "-s", tmp_path / "s.npy", "--cls-file", cls, "-j", "1")
    one_error_line(r, f"{cls}: not a readable parquet cls file")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------- 5. subset files

def _object_npy(p: Path) -> None:
    np.save(p, np.array([Evil()], dtype=object), allow_pickle=True)


def _truncated_npy(p: Path) -> None:
    np.save(p, np.array([(1, 2), (3, 4)], np.dtype("u8,u8")))
    p.write_bytes(p.read_bytes()[:-5])


def _trailing_npy(p: Path) -> None:
    np.save(p, np.array([(1, 2)], np.dtype("u8,u8")))
    p.write_bytes(p.read_bytes() + b"extra")


SUBSET_CASES = {
    "object dtype (pickle)": (_object_npy, "holds pickled Python objects; refused, never unpickled"),
    "truncated npy": (_truncated_npy, "truncated .npy: its header says 2 records of 16 bytes (160 bytes) "
                                      "but the file has 155 bytes"),
    "bytes after the records": (_trailing_npy, "5 bytes after the last record"),
    "32-byte text file": (lambda p: p.write_bytes(b"0123456789abcdef0123456789abcde\n"), "its bytes are text"),
    "0-byte file": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "bad header": (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': zzz}\n" + bytes(16)),
                   "unreadable .npy header"),
}


@pytest.mark.parametrize("case", list(SUBSET_CASES))
@pytest.mark.parametrize("command", ["info", "reshard", "to-parquet"])
def test_bad_subset_file_is_one_line(tmp_path, monkeypatch, case, command):
    monkeypatch.chdir(tmp_path)  # a payload that ran would leave ./pwned
    make, msg = SUBSET_CASES[case]
    pool = make_shards(tmp_path / "shards", [[(U[0], FULL)]])
    p = tmp_path / "sub.npy"
    make(p)
    before = tree(tmp_path)
    if command == "info":
        r = cli("subset", "info", p)
    elif command == "to-parquet":
        r = cli("subset", "to-parquet", p, tmp_path / "out.parquet")
    else:
        r = cli("reshard", "-i", pool, "-o", tmp_path / "out", "-s", p, "-j", "1")
    one_error_line(r, str(p), msg)
    assert tree(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_raw_subsets_still_read_and_empty_subset_rules(tmp_path):
    pool = make_shards(tmp_path / "shards", [[(U[0], FULL), (U[1], FULL)]])
    raw = tmp_path / "sub.raw"
    np.load(subset(tmp_path / "s.npy", [U[1]])).tofile(raw)  # DataComp's headerless memmap
    r = cli("reshard", "-i", pool, "-o", tmp_path / "out", "-s", raw, "-j", "1")
    assert r.exit_code == 0 and "1 samples in 1 shards" in r.output, r.output
    empty = subset(tmp_path / "e.npy", [])
    r = cli("subset", "info", empty)
    assert r.exit_code == 0 and f"warning: {empty}: empty subset (0 uids)" in r.output
    before = tree(tmp_path)
    r = cli("reshard", "-i", pool, "-o", tmp_path / "out2", "-s", empty, "-j", "1")
    one_error_line(r, f"{empty}: empty subset (0 uids)")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------ 6. kill -9

def _run_until(cmd, out: Path, ready) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not ready(out):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _stats(n):
    return lambda out: out.is_dir() and sum(p.name.endswith("_stats.json") for p in out.iterdir()) >= n


@pytest.fixture(scope="module")
def kill_pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("killpool")
    uids = [uid_of(i) for i in range(600)]
    pool = make_shards(d / "shards", [[(u, ("txt", "json")) for u in uids[i:i + 300]] for i in (0, 300)],
                       parquet=False)
    s1, s2 = subset(d / "s1.npy", uids), subset(d / "s2.npy", uids[::2])
    base = [sys.executable, "-m", "curate.cli.main", "reshard", "-i", str(pool), "--shard-size", "1", "-j", "1"]
    refs = {}
    for s in (s1, s2):
        ref = d / f"ref_{s.stem}"
        subprocess.run(base + ["-s", str(s), "-o", str(ref)], check=True, capture_output=True)
        refs[s.stem] = tree(ref)
    return base, s1, s2, refs


def _no_meta(t: dict) -> dict:
    return {k: v for k, v in t.items() if k != "meta.json"}


@pytest.mark.parametrize("point", ["marker written", "3 shards", "100 shards"])
def test_kill_reshard_and_rerun_is_byte_identical(tmp_path, kill_pool, point):
    base, s1, _, refs = kill_pool
    out = tmp_path / "out"
    ready = {"marker written": lambda o: (o / ".curate_reshard.json").exists(),
             "3 shards": _stats(3), "100 shards": _stats(100)}[point]
    cmd = base + ["-s", str(s1), "-o", str(out)]
    _run_until(cmd, out, ready)
    assert not (out / "meta.json").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    assert _no_meta(tree(out)) == _no_meta(refs["s1"])
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or "curate-" in p.name]


@pytest.mark.parametrize("point", ["building dir made", "20 shards beside"])
def test_kill_overwrite_keeps_the_old_output_then_rerun_replaces_it(tmp_path, kill_pool, point):
    base, s1, s2, refs = kill_pool
    out = tmp_path / "out"
    subprocess.run(base + ["-s", str(s1), "-o", str(out)], check=True, capture_output=True)
    old = tree(out)
    new = tmp_path / ".out.curate-new"
    ready = {"building dir made": lambda o: new.is_dir(), "20 shards beside": lambda o: _stats(20)(new)}[point]
    cmd = base + ["-s", str(s2), "-o", str(out), "--overwrite"]
    _run_until(cmd, out, ready)
    assert tree(out) == old  # the killed --overwrite destroyed nothing
    subprocess.run(cmd, check=True, capture_output=True)
    assert _no_meta(tree(out)) == _no_meta(refs["s2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
