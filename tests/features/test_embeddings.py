"""Embeddings: npz -> float32 .npy conversion (streamed, exact, resumable), the SQL view over
the memory maps, and clear errors for npz files that disagree with their parquet."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import curate.features.embeddings as E
from curate.catalog.connection import connect, init_catalog
from tests.conftest import pool_table, uid_of


def write_pool(root, sizes, dims=None, seed=0, npz=True, mutate=None):
    """Parquet + float16 npz per file (np.savez_compressed, like dataset2metadata); returns arrays."""
    dims = dims or {"l14_img": 768, "b32_img": 512}
    meta = root / "metadata"
    meta.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays, start = [], 0
    for i, n in enumerate(sizes):
        pq.write_table(pool_table([{"uid": uid_of(start + r)} for r in range(n)]), meta / f"{i:04d}.parquet")
        arrs = {k: rng.normal(size=(n, d)).astype(np.float16) for k, d in dims.items()}
        if mutate:
            arrs = mutate(i, arrs)
        if npz:
            np.savez_compressed(meta / f"{i:04d}.npz", **arrs)
        arrays.append(arrs)
        start += n
    return arrays


@pytest.fixture
def pool(tmp_path):
    arrays = write_pool(tmp_path / "p", [7, 0, 12])
    return init_catalog(tmp_path / "p" / "cat.duckdb", pool=tmp_path / "p"), arrays


def test_convert_is_exact_float32_and_streams_in_chunks(pool, monkeypatch):
    cat, arrays = pool
    monkeypatch.setattr(E, "CHUNK_ROWS", 5)  # 12 rows -> chunks 5, 5, 2
    r = E.convert_embeddings(cat, "l14_img", progress=False)
    assert (r["files"], r["converted"], r["rows"], r["dim"]) == (3, 3, 19, 768)
    for ef, arrs in zip(E.pool_embedding_files(cat, "l14_img"), arrays):
        got = np.load(ef.npy, mmap_mode="r")
        assert got.dtype == np.float32 and got.shape == (ef.num_rows, 768)
        # float16 -> float32 is exact: every bit of the source survives
        assert np.array_equal(got, arrays[int(ef.file)]["l14_img"].astype(np.float32))


def test_convert_resumes_and_skips_done_files(pool):
    cat, _ = pool
    E.convert_embeddings(cat, "l14_img", progress=False)
    files = E.pool_embedding_files(cat, "l14_img")
    stamp = files[0].npy.stat().st_mtime_ns
    files[2].npy.unlink()
    r = E.convert_embeddings(cat, "l14_img", progress=False)
    assert r["converted"] == 1 and files[0].npy.stat().st_mtime_ns == stamp and files[2].npy.is_file()


def test_iter_batches_same_from_npz_and_npy(pool):
    cat, arrays = pool
    ef = E.pool_embedding_files(cat, "b32_img")[2]
    from_npz = np.concatenate(list(E.iter_batches(ef, "b32_img", batch_rows=5)))
    E.convert_embeddings(cat, "b32_img", progress=False)
    from_npy = np.concatenate(list(E.iter_batches(ef, "b32_img", batch_rows=5)))
    assert np.array_equal(from_npz, from_npy)
    assert np.array_equal(from_npy, arrays[2]["b32_img"].astype(np.float32))


def test_sql_view_is_float_array_joinable_to_pool(pool):
    cat, arrays = pool
    E.convert_embeddings(cat, "l14_img", progress=False)
    con = connect(cat)
    E.attach_embeddings(con, cat, "l14_img")
    assert con.sql("SELECT typeof(embedding) FROM embeddings_l14_img LIMIT 1").fetchall() == [("FLOAT[768]",)]
    rows = con.sql('SELECT p.uid, e.file, e."row", array_inner_product(e.embedding, e.embedding) '
                   'FROM pool p JOIN embeddings_l14_img e USING (file, "row") ORDER BY e.file, e."row"').fetchall()
    con.close()
    assert len(rows) == 19
    # pool rows: file 0000 rows 0..6 are uids 0..6, file 0002 rows 0..11 are uids 7..18
    assert [r[0] for r in rows] == [uid_of(i) for i in range(19)]
    v = arrays[2]["l14_img"][3].astype(np.float32)
    f, row, ip = rows[7 + 3][1:]
    assert (f, row) == ("0002", 3) and ip == pytest.approx(float(v @ v), rel=1e-5)


def test_row_embedding(pool):
    cat, arrays = pool
    assert np.array_equal(E.row_embedding(cat, "l14_img", "0002", 11), arrays[2]["l14_img"][11].astype(np.float32))
    with pytest.raises(E.EmbeddingError, match="row 12 out of range"):
        E.row_embedding(cat, "l14_img", "0002", 12)


def _bad_pool(tmp_path, mutate, sizes=(4, 5)):
    write_pool(tmp_path / "b", list(sizes), mutate=mutate)
    return init_catalog(tmp_path / "b" / "cat.duckdb", pool=tmp_path / "b", check_npz_files=False)  # init refuses it; this tests the reader's own check


@pytest.mark.parametrize("mutate,message", [
    # rows that disagree with the parquet (5 rows in file 0001)
    (lambda i, a: {**a, "l14_img": a["l14_img"][:3]} if i == 1 else a, r"0001\.npz: key 'l14_img' has 3 rows but the parquet has 5"),
    # missing key
    (lambda i, a: {"b32_img": a["b32_img"]} if i == 1 else a, r"0001\.npz: no key 'l14_img' \(keys: b32_img\)"),
    # wrong dimension for a documented key
    (lambda i, a: {**a, "l14_img": a["l14_img"][:, :512]} if i == 1 else a, r"0001\.npz: key 'l14_img' has dimension 512, expected 768"),
    # integer data
    (lambda i, a: {**a, "l14_img": a["l14_img"].astype(np.int16)} if i == 1 else a, r"0001\.npz: key 'l14_img' has dtype int16"),
    # 1-D array
    (lambda i, a: {**a, "l14_img": a["l14_img"][:, 0]} if i == 1 else a, r"0001\.npz: key 'l14_img' has shape \(5,\)"),
])
def test_bad_npz_fails_naming_the_file_and_writes_nothing(tmp_path, mutate, message):
    cat = _bad_pool(tmp_path, mutate)
    with pytest.raises(E.EmbeddingError, match=message):
        E.convert_embeddings(cat, "l14_img", progress=False)
    out = E.pool_embedding_files(cat, "l14_img")[0].npy.parent
    assert not out.exists() or not os.listdir(out)  # checked before any file is written


def test_dimension_must_agree_across_files(tmp_path):
    cat = _bad_pool(tmp_path, lambda i, a: {**a, "dedup": np.zeros((len(a["l14_img"]), 256 if i else 128), np.float16)})
    with pytest.raises(E.EmbeddingError, match=r"0001\.npz: key 'dedup' has dimension 256, expected 128"):
        E.convert_embeddings(cat, "dedup", progress=False)


def test_missing_and_corrupt_npz(tmp_path):
    write_pool(tmp_path / "m", [3], npz=False)
    cat = init_catalog(tmp_path / "m" / "cat.duckdb", pool=tmp_path / "m")
    with pytest.raises(E.EmbeddingError, match="pool file 0000: no .npz"):
        E.convert_embeddings(cat, "l14_img", progress=False)
    write_pool(tmp_path / "c", [3])
    (tmp_path / "c" / "metadata" / "0000.npz").write_bytes(b"not a zip")
    cat = init_catalog(tmp_path / "c" / "cat.duckdb", pool=tmp_path / "c", check_npz_files=False)  # init refuses it; this tests the reader's own check
    with pytest.raises(E.EmbeddingError, match=r"0000\.npz: not a readable \.npz"):
        E.convert_embeddings(cat, "l14_img", progress=False)


def test_truncated_member_is_reported(tmp_path):
    """A member whose header promises more rows than it holds fails naming the row."""
    import io
    import zipfile
    write_pool(tmp_path / "t", [4])
    npz = tmp_path / "t" / "metadata" / "0000.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": (4, 768)})
    buf.write(np.zeros((2, 768), np.float16).tobytes())
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("l14_img.npy", buf.getvalue())
    cat = init_catalog(tmp_path / "t" / "cat.duckdb", pool=tmp_path / "t", check_npz_files=False)  # init refuses it; this tests the reader's own check
    with pytest.raises(E.EmbeddingError, match="truncated at row 2"):
        E.convert_embeddings(cat, "l14_img", progress=False)
    assert not list(E.pool_embedding_files(cat, "l14_img")[0].npy.parent.glob("*.npy"))


def test_bad_key_name(pool):
    cat, _ = pool
    with pytest.raises(E.EmbeddingError, match="embedding key"):
        E.convert_embeddings(cat, "../x", progress=False)
