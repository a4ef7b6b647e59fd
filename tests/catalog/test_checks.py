"""`curate catalog init` refuses a pool whose uids or npz files `curate run` would reject or
silently double: one line naming the file (row, uid, key), exit 1, nothing written."""

import io
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli import main
from tests.conftest import pool_table, uid_of


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_pool(root, files, npz=None):
    """files: list of uid lists (one parquet each); npz: {index: bytes or dict of arrays}."""
    meta = root / "metadata"
    meta.mkdir(parents=True)
    for i, uids in enumerate(files):
        pq.write_table(pool_table([{"uid": u} for u in uids]), meta / f"{i:04d}.parquet")
    for i, content in (npz or {}).items():
        if isinstance(content, bytes):
            (meta / f"{i:04d}.npz").write_bytes(content)
        else:
            np.savez(meta / f"{i:04d}.npz", **content)
    return root


def emb(n, d=768, dtype=np.float16):
    return np.zeros((n, d), dtype)


def truncated_member(rows):
    """An npz whose l14_img header promises `rows` rows but holds two."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": (rows, 768)})
    buf.write(np.zeros((2, 768), np.float16).tobytes())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("l14_img.npy", buf.getvalue())
    return out.getvalue()


def object_member(rows):
    """An npz whose member is an object (pickled) array: refused from the header, never unpickled."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (rows, 768)})
    buf.write(b"\x80\x04cos\nsystem\n.")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("l14_img.npy", buf.getvalue())
    return out.getvalue()


U = [uid_of(i) for i in range(6)]

CASES = [
    # (id, files, npz, expected message fragments (regex-free substrings))
    ("dup-two-files", [U[:3], [U[3], U[1]]], None,
     ["0000.parquet and ", "0001.parquet: both hold uid " + U[1], "--allow-duplicate-uids"]),
    ("dup-case-insensitive", [U[:2], [U[1].upper()]], None,
     ["0000.parquet and ", "0001.parquet: both hold uid " + U[1]]),
    ("dup-one-file", [[U[0], U[1], U[2], U[1]]], None,
     ["0000.parquet: rows 1 and 3 both hold uid " + U[1]]),
    ("uid-short", [U[:2], [U[2], "abc123"]], None, ["0001.parquet: row 1: uid 'abc123' is not 32 hex digits"]),
    ("uid-not-hex", [[U[0], "g" * 32]], None, ["0000.parquet: row 1: uid '" + "g" * 32 + "' is not 32 hex digits"]),
    ("uid-null", [[U[0], None, U[1]]], None, ["0000.parquet: row 1: uid NULL is not 32 hex digits"]),
    ("uid-too-long", [[U[0] + "0"]], None, ["0000.parquet: row 0: uid '" + U[0] + "0' is not 32 hex digits"]),
    ("npz-not-zip", [U[:2]], {0: b"not a zip at all"}, ["0000.npz: not a readable .npz file"]),
    ("npz-empty-zip", [U[:2]], {0: b"PK\x05\x06" + b"\0" * 18}, ["0000.npz: holds no arrays"]),
    ("npz-rows", [U[:2], U[2:5]], {0: {"l14_img": emb(2)}, 1: {"l14_img": emb(2)}},
     ["0001.npz: key 'l14_img' has 2 rows but the parquet has 3"]),
    ("npz-missing-key", [U[:2], U[2:5]], {0: {"l14_img": emb(2), "b32_img": emb(2, 512)}, 1: {"b32_img": emb(3, 512)}},
     ["0001.npz: keys b32_img differ from 0000.npz's b32_img, l14_img"]),
    ("npz-int-dtype", [U[:2]], {0: {"l14_img": emb(2, dtype=np.int16)}}, ["0000.npz: key 'l14_img' has dtype int16"]),
    ("npz-1d", [U[:2]], {0: {"l14_img": np.zeros(2, np.float16)}}, ["0000.npz: key 'l14_img' has shape (2,)"]),
    ("npz-dim-differs", [U[:2], U[2:4]], {0: {"dedup": emb(2, 128)}, 1: {"dedup": emb(2, 256)}},
     ["0001.npz: key 'dedup' has dimension 256, expected 128 (as in 0000.npz)"]),
    ("npz-truncated", [U[:4]], {0: truncated_member(4)}, ["0000.npz: key 'l14_img' holds", "truncated or corrupt"]),
    ("npz-object", [U[:2]], {0: object_member(2)}, ["0000.npz: key 'l14_img' has dtype object"]),
]


@pytest.mark.parametrize("files,npz,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_init_refuses_bad_pool(tmp_path, files, npz, fragments):
    root = write_pool(tmp_path / "p", files, npz)
    before = snapshot(tmp_path)
    cat = tmp_path / "c.duckdb"
    r = CliRunner().invoke(main, ["catalog", "init", str(cat), "--pool", str(root)])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # no catalog, no temp file, the pool untouched
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_allow_duplicate_uids_accepts_them(tmp_path):
    root = write_pool(tmp_path / "p", [U[:3], [U[3], U[1]]])
    cat = tmp_path / "c.duckdb"
    r = CliRunner().invoke(main, ["catalog", "init", str(cat), "--pool", str(root), "--allow-duplicate-uids"])
    assert r.exit_code == 0, r.output
    assert "5 samples in 2 parquet files" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.duckdb", "p"]


def test_good_npz_and_uppercase_uids_are_accepted(tmp_path):
    root = write_pool(tmp_path / "p", [[U[0].upper(), U[1]], U[2:5]],
                      {0: {"l14_img": emb(2), "b32_img": emb(2, 512, np.float32)},
                       1: {"l14_img": emb(3), "b32_img": emb(3, 512, np.float32)}})
    r = CliRunner().invoke(main, ["catalog", "init", str(tmp_path / "c.duckdb"), "--pool", str(root)])
    assert r.exit_code == 0, r.output
    assert "5 samples in 2 parquet files (2 with .npz)" in r.output
    # np.savez_compressed (how dataset2metadata writes them) is accepted too
    root2 = tmp_path / "q"
    write_pool(root2, [U[:2]])
    np.savez_compressed(root2 / "metadata" / "0000.npz", l14_img=emb(2))
    r = CliRunner().invoke(main, ["catalog", "init", str(tmp_path / "c2.duckdb"), "--pool", str(root2)])
    assert r.exit_code == 0, r.output


def test_catalog_paths(tmp_path):
    """A catalog under a regular file or in an unwritable directory: one line naming both; a
    missing directory is created (the TiC quick start's first command)."""
    root = write_pool(tmp_path / "p", [U[:2]])
    (tmp_path / "afile").write_text("mine")
    before = snapshot(tmp_path)
    for cat, why in [(tmp_path / "afile" / "c.duckdb", f"{tmp_path / 'afile'} is a file, not a directory"),
                     (tmp_path / "afile" / "x" / "c.duckdb", f"{tmp_path / 'afile'} is a file, not a directory")]:
        r = CliRunner().invoke(main, ["catalog", "init", str(cat), "--pool", str(root)])
        assert r.exit_code == 1 and r.output == f"error: {cat}: cannot create the catalog ({why})\n", r.output
        assert snapshot(tmp_path) == before
    cat = tmp_path / "new" / "deeper" / "c.duckdb"
    r = CliRunner().invoke(main, ["catalog", "init", str(cat), "--pool", str(root)])
    assert r.exit_code == 0 and cat.is_file(), r.output


def test_catalog_in_unwritable_directory(tmp_path):
    """A directory the user cannot write. Root writes into read-only directories, so as root
    the command runs in a private mount namespace where that directory is mounted read-only."""
    root = write_pool(tmp_path / "p", [U[:2]])
    ro = tmp_path / "ro"
    ro.mkdir()
    cli = [sys.executable, "-m", "curate", "catalog", "init", str(ro / "c.duckdb"), "--pool", str(root)]
    if os.geteuid() == 0:
        script = (f"mount --bind {shlex.quote(str(ro))} {shlex.quote(str(ro))} && "
                  f"mount -o remount,bind,ro {shlex.quote(str(ro))} && exec {shlex.join(cli)}")
        cmd = ["unshare", "-m", "sh", "-c", script]
    else:
        ro.chmod(0o500)
        cmd = cli
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    finally:
        ro.chmod(0o700)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == f"error: {ro / 'c.duckdb'}: cannot create the catalog ({ro} is not writable: permission denied)\n"
    assert not list(ro.iterdir())
