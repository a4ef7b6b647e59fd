"""curate train refuses shards holding members that webdataset's default decoders would unpickle.

open_clip decodes samples with ``wds.decode("pilrgb")``, whose fallback (webdataset's
``basichandlers``) calls ``pickle.loads`` on ``.pyd``/``.pickle`` and ``torch.load`` on ``.pth``
(``.gz`` first decompressed). The shards here are built in the test; the hostile member's
unpickling would create a marker file, which must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.shards.tar import write_tar
from curate.train.trainer import check_shard_members, pickle_member_type

# a 1x1 PNG (bytes worked out once from the PNG spec; never decoded here)
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
                    "0000000c4944415408d763f8ffff3f0005fe02fea7356b810000000049454e44ae426082")


class _Marker:
    """Unpickling this creates ``path`` (os.open is a builtin-free global, so pickle.loads runs it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.open, (self.path, os.O_CREAT | os.O_WRONLY, 0o644))


def _sample(key: str, **extra) -> list[tuple[str, bytes]]:
    members = [(f"{key}.jpg", PNG), (f"{key}.txt", b"a caption"), (f"{key}.json", json.dumps({"key": key}).encode())]
    return members + [(f"{key}.{ext}", body) for ext, body in extra.items()]


def _gz(data: bytes) -> bytes:
    import gzip

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as g:
        g.write(data)
    return buf.getvalue()


def _write_shards(d: Path, hostile: tuple[str, bytes] | None, where: str) -> Path:
    """Two shards in ``d`` (one in a subdirectory when where == 'nested'); the hostile member in the last."""
    d.mkdir(parents=True)
    (d / "00000000_stats.json").write_text(json.dumps({"successes": 2}))
    write_tar(d / "00000000.tar", _sample("000000000") + _sample("000000001"))
    bad_dir = d / "sub" if where == "nested" else d
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / "00000001_stats.json").write_text(json.dumps({"successes": 2}))
    members = _sample("000000002") + _sample("000000003")
    if hostile is not None:
        members.insert(3, (f"000000002.{hostile[0]}", hostile[1]))
    bad = bad_dir / "00000001.tar"
    write_tar(bad, members)
    return bad


CASES = {
    # id: (member extension, body builder, where)
    "pyd": ("pyd", lambda m: pickle.dumps(_Marker(m)), "flat"),
    "pickle": ("pickle", lambda m: pickle.dumps(_Marker(m)), "flat"),
    "pth": ("pth", lambda m: pickle.dumps(_Marker(m)), "flat"),
    "pyd.gz": ("pyd.gz", lambda m: _gz(pickle.dumps(_Marker(m))), "flat"),
    "upper-case PYD": ("PYD", lambda m: pickle.dumps(_Marker(m)), "flat"),
    "double extension x.pickle": ("x.pickle", lambda m: pickle.dumps(_Marker(m)), "flat"),
    "pkl": ("pkl", lambda m: pickle.dumps(_Marker(m)), "flat"),
    "pt in nested dir": ("pt", lambda m: pickle.dumps(_Marker(m)), "nested"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_refuses_pickle_members(tmp_path, case):
    ext, body, where = CASES[case]
    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    bad = _write_shards(data, (ext, body(str(marker))), where)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, ["train", "--scale", "tiny", "--data", str(data), "--output-dir", str(out),
                                    "--exp-name", "x", "-q"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith(f"error: {bad.resolve()}: member '000000002.{ext}' ")
    assert "unpickle" in lines[0]
    assert "Traceback" not in res.output
    assert not marker.exists()
    assert not out.exists()  # nothing created, trainer never launched
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_single_tar_entry_is_checked_too(tmp_path):
    marker = tmp_path / "pwned"
    bad = _write_shards(tmp_path / "data", ("pyd", pickle.dumps(_Marker(str(marker)))), "flat")
    res = CliRunner().invoke(main, ["train", "--scale", "tiny", "--data", str(bad), "--output-dir",
                                    str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 1
    assert f"{bad.resolve()}: member '000000002.pyd' (at byte 3072)" in res.output
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, kind", [
    ("k.pyd", "pyd"), ("k.pickle", "pickle"), ("k.pth", "pth"), ("k.pth.gz", "pth"), ("dir/k.seg.PYD", "pyd"),
    ("k.pkl", "pkl"), ("k.pt", "pt"),
    ("k.jpg", None), ("k.txt", None), ("k.json", None), ("k.cls", None), ("k.npy", None), ("k.npz", None),
    ("k.pyd.txt", None), ("k.gz", None), ("noext", None), ("dir.pyd/k.txt", None),
])
def test_pickle_member_type(name, kind):
    assert pickle_member_type(name) == kind


def test_clean_shards_pass(tmp_path):
    bad = _write_shards(tmp_path / "data", None, "flat")
    for t in (bad, tmp_path / "data" / "00000000.tar"):
        assert check_shard_members(t) is None  # data members only: no error


def test_the_hostile_payload_is_real(tmp_path):
    # control: the member used above does run code when unpickled the way webdataset would
    marker = tmp_path / "pwned"
    os.close(pickle.loads(pickle.dumps(_Marker(str(marker)))))
    assert marker.exists()


def _tarfile_shard(path: Path, members, mode: str = "w", pax_paths: dict | None = None) -> None:
    """A shard written with Python's tarfile (PAX headers, compression) rather than curate's writer."""
    import tarfile

    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for name, body in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(body), 0
            if pax_paths and name in pax_paths:
                ti.pax_headers = {"path": pax_paths[name]}
            tf.addfile(ti, io.BytesIO(body))


TARFILE_CASES = {
    # id: (tarfile mode, PAX path overrides, the name webdataset sees)
    # the USTAR name field says .jpg; the PAX header (which tarfile, hence webdataset, obeys) says .pyd
    "pax-path-hides-pyd": ("w", {"000000002.x.jpg": "000000002.pyd"}, "000000002.pyd"),
    "gzip-compressed-tar": ("w:gz", None, "000000002.pyd"),
}


@pytest.mark.parametrize("case", sorted(TARFILE_CASES))
def test_names_are_the_ones_the_loader_sees(tmp_path, case):
    mode, pax, seen = TARFILE_CASES[case]
    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    data.mkdir()
    hostile = "000000002.x.jpg" if pax else "000000002.pyd"
    members = _sample("000000002") + [(hostile, pickle.dumps(_Marker(str(marker))))]
    _tarfile_shard(data / "00000000.tar", members, mode, pax)
    before = (data / "00000000.tar").read_bytes()
    res = CliRunner().invoke(main, ["train", "--scale", "tiny", "--data", str(data), "--output-dir",
                                    str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith(f"error: {(data / '00000000.tar').resolve()}: member '{seen}' ")
    assert len(res.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "runs").exists()
    assert (data / "00000000.tar").read_bytes() == before


def test_unreadable_shard_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "00000000.tar").write_bytes(b"not a tar at all" * 64)
    res = CliRunner().invoke(main, ["train", "--scale", "tiny", "--data", str(data), "--output-dir",
                                    str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 1
    assert res.output.startswith(f"error: {(data / '00000000.tar').resolve()}: not a readable tar (")
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
