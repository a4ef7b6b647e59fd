"""The one tar writer: the bytes of Python's tarfile (USTAR, mtime 0, mode 0444), whichever file it writes to."""

from __future__ import annotations

import io
import tarfile

import pytest

from curate.shards.tar import ShardError, TarMemberError, TarWriter, sample_members, scan_tar, tar_header, write_tar


def tarfile_bytes(members, owner: str = "") -> bytes:
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            if owner:
                info.uname = info.gname = owner
            tf.addfile(info, io.BytesIO(data))
    return ref.getvalue()


MEMBERS = [(f"{i:012d}.{ext}", bytes([i % 251]) * (i * 37 % 1500)) for i in range(400) for ext in ("jpg", "txt", "json")]


@pytest.mark.parametrize("owner", ["", "curate"])
def test_buffered_unbuffered_and_write_tar_give_tarfiles_bytes(tmp_path, owner):
    want = tarfile_bytes(MEMBERS, owner)
    buf = io.BytesIO()
    w = TarWriter(buf, owner)
    for name, data in MEMBERS:
        w.add(name, data)
    w.close()
    assert buf.getvalue() == want and w.offset == len(want)
    # unbuffered: batched writev (1,200 members: several batches), memoryview bodies
    with open(tmp_path / "raw.tar", "wb", buffering=0) as f:
        w = TarWriter(f, owner)
        for name, data in MEMBERS:
            w.add(name.encode(), memoryview(data))
        w.close()
    assert (tmp_path / "raw.tar").read_bytes() == want
    write_tar(tmp_path / "w.tar", MEMBERS, owner=owner)
    assert (tmp_path / "w.tar").read_bytes() == want


def test_what_ustar_cannot_hold_is_a_clear_error():
    with pytest.raises(TarMemberError, match="is longer than 100 bytes"):
        tar_header(b"k" * 101, 1)
    with pytest.raises(ValueError, match="8 GiB or more"):
        tar_header("k.bin", 8 ** 11)
    assert issubclass(TarMemberError, ShardError)
    assert len(tar_header("k" * 100, 8 ** 11 - 1)) == 512


def test_members_read_back_by_the_reader(tmp_path):
    write_tar(tmp_path / "a.tar", MEMBERS[:9])
    scan = scan_tar(tmp_path / "a.tar")
    assert scan.keys == ["000000000000", "000000000001", "000000000002"] and not scan.truncated
    data = (tmp_path / "a.tar").read_bytes()
    got = sample_members(data, 0, scan.offsets[1], scan.lengths[1], "a.tar")
    assert [(ext, bytes(body)) for ext, body in got] == [(n.split(".")[1], d) for n, d in MEMBERS[3:6]]
