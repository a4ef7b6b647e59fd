"""Shard index and verify: tar header scanning, uid sources, truncated tars, catalog tables."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.shards.index import build_index, index_catalog
from curate.shards.tar import ShardError, scan_tar, walk_tar
from curate.shards.verify import verify_dir
from tests.conftest import uid_of


def member_bytes(uid: str, ext: str) -> bytes:
    """Deterministic member contents for the sample with ``uid`` (sizes differ per uid)."""
    if ext == "json":
        return json.dumps({"uid": uid, "caption": f"caption {uid[:6]}"}).encode()
    if ext == "txt":
        return f"caption {uid[:6]}".encode()
    return (f"{ext}:{uid}".encode()) * (1 + int(uid[:2], 16) % 7)


def write_tar(path: Path, samples, pax: bool = False) -> None:
    """samples: list of (key, uid, exts). Real tarfile output, img2dataset-like."""
    fmt = tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, uid, exts in samples:
            for ext in exts:
                data = member_bytes(uid, ext)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1.5 if pax else 0  # a float mtime makes tarfile write a PAX header
                tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path, shards, parquet: bool = True, stats: bool = True, missing_stats=(),
                truncate_last: int = 0) -> Path:
    """img2dataset layout: shards = [[(uid, exts), ...], ...]; keys shard*10^4 + i."""
    root.mkdir(parents=True, exist_ok=True)
    for s, samples in enumerate(shards):
        rows = [(f"{s * 10000 + i:012d}", uid, exts) for i, (uid, exts) in enumerate(samples)]
        write_tar(root / f"{s:08d}.tar", rows)
        if parquet:
            pq.write_table(pa.table({"key": [r[0] for r in rows], "uid": [r[1] for r in rows],
                                     "status": ["success"] * len(rows)}), root / f"{s:08d}.parquet")
        if stats and s not in missing_stats:
            (root / f"{s:08d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    if truncate_last:
        last = root / f"{len(shards) - 1:08d}.tar"
        data = last.read_bytes()
        end = len(data.rstrip(b"\0"))  # end of the last member's data
        last.write_bytes(data[: end - truncate_last])
    return root


U = [uid_of(i) for i in range(40)]
FULL = ("jpg", "txt", "json")


def test_scan_groups_members_and_ranges(tmp_path):
    make_shards(tmp_path / "s", [[(U[0], FULL), (U[1], ("jpg", "txt")), (U[2], FULL)]])
    scan = scan_tar(tmp_path / "s" / "00000000.tar")
    assert scan.keys == ["000000000000", "000000000001", "000000000002"]
    assert scan.has_json == [True, False, True]
    assert not scan.truncated
    # byte ranges: each member = 512 header + data padded to 512; worked out from the sizes
    sizes = [[len(member_bytes(U[i], e)) for e in exts] for i, exts in ((0, FULL), (1, ("jpg", "txt")), (2, FULL))]
    lens = [sum(512 + -(-n // 512) * 512 for n in s) for s in sizes]
    assert scan.lengths == lens
    assert scan.offsets == [0, lens[0], lens[0] + lens[1]]


def test_scan_matches_tarfile_with_pax_headers(tmp_path):
    p = tmp_path / "pax.tar"
    write_tar(p, [("a", U[0], FULL), ("b", U[1], FULL)], pax=True)
    with tarfile.open(p) as tf:
        expect = [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
    with open(p, "rb") as f:
        data = f.read()
    got = [(e.name, e.data, e.size) for e in walk_tar(lambda o, n: data[o:o + n], 0, len(data), "x")]
    assert got == expect
    scan = scan_tar(p)
    assert scan.offsets[0] == 0  # the sample's range starts at its first PAX header


def test_truncated_tar_drops_incomplete_sample(tmp_path):
    make_shards(tmp_path / "s", [[(U[0], FULL), (U[1], FULL), (U[2], FULL)]], truncate_last=5)
    scan = scan_tar(tmp_path / "s" / "00000000.tar")
    assert scan.truncated
    # the cut is inside sample 2's json: sample 2 is left out, samples 0 and 1 are kept
    assert scan.keys == ["000000000000", "000000000001"]


def test_corrupt_header_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.tar"
    write_tar(p, [("a", U[0], FULL)])
    data = bytearray(p.read_bytes())
    data[0:4] = b"ZZZZ"  # name changed, checksum no longer matches
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="bad.tar: corrupt tar header at byte 0"):
        scan_tar(p)


def test_uids_from_parquet_or_json(tmp_path):
    # with the parquet, a sample without json still has its uid; without, it has none
    make_shards(tmp_path / "a", [[(U[0], FULL), (U[1], ("jpg", "txt"))]], parquet=True)
    make_shards(tmp_path / "b", [[(U[0], FULL), (U[1], ("jpg", "txt"))]], parquet=False)
    _, ia = build_index(tmp_path / "a")
    fb, ib = build_index(tmp_path / "b")
    want = [(int(U[0][:16], 16), int(U[0][16:], 16)), (int(U[1][:16], 16), int(U[1][16:], 16))]
    assert list(zip(ia.column("uid_hi").to_pylist(), ia.column("uid_lo").to_pylist())) == want
    assert list(zip(ib.column("uid_hi").to_pylist(), ib.column("uid_lo").to_pylist())) == [want[0], (None, None)]
    assert fb.column("no_uid").to_pylist() == [1]


def test_index_catalog_is_incremental(tmp_path, make_catalog):
    cat = make_catalog([[{"uid": u} for u in U[:6]]])
    shards = make_shards(tmp_path / "pool1" / "shards", [[(u, FULL) for u in U[:3]], [(u, FULL) for u in U[3:6]]],
                         missing_stats=(1,))
    r = index_catalog(cat)
    assert (r.tars, r.scanned, r.samples, r.without_stats) == (2, 2, 6, ["00000001.tar"])
    r = index_catalog(cat)
    assert (r.tars, r.scanned, r.samples) == (2, 0, 6)
    write_tar(shards / "00000001.tar", [("000000010000", U[3], FULL)])  # a tar changed
    r = index_catalog(cat)
    assert (r.tars, r.scanned, r.samples) == (2, 1, 4)
    import duckdb

    con = duckdb.connect(str(cat), read_only=True)
    assert con.execute("SELECT count(*) FROM shard_index").fetchone()[0] == 4
    con.close()


def test_verify_reports_mismatches(tmp_path):
    root = make_shards(tmp_path / "s", [[(U[0], FULL), (U[1], FULL)], [(U[2], FULL)]], missing_stats=(1,))
    (root / "00000000_stats.json").write_text(json.dumps({"successes": 3}))
    (root / "sizes.json").write_text(json.dumps({"00000000.tar": 2, "00000001.tar": 1}))
    rep = verify_dir(root)
    assert not rep.ok
    assert any("00000000_stats.json: successes=3 but 00000000.tar holds 2" in p for p in rep.problems)
    assert any("00000001_stats.json: missing" in p for p in rep.problems)
    (root / "00000000_stats.json").write_text(json.dumps({"successes": 2}))
    (root / "00000001_stats.json").write_text(json.dumps({"successes": 1}))
    assert verify_dir(root).ok
    write_tar(root / "00000001.tar", [("bad key!", U[2], FULL)])
    rep = verify_dir(root)
    assert any("malformed key 'bad key!'" in p for p in rep.problems)


def test_gnu_long_names(tmp_path):
    p = tmp_path / "gnu.tar"
    long_key = "d" * 120
    with tarfile.open(p, "w", format=tarfile.GNU_FORMAT) as tf:
        for ext in FULL:
            data = member_bytes(U[0], ext)
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(p) as tf:
        expect = [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
    data = p.read_bytes()
    got = [(e.name, e.data, e.size) for e in walk_tar(lambda o, n: data[o:o + n], 0, len(data), "x")]
    assert got == expect
    scan = scan_tar(p)
    assert scan.keys == [long_key] and scan.offsets == [0] and scan.has_json == [True]
