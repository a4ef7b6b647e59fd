"""Subset files: DataComp's exact bytes, validation of inputs, info and parquet export."""

import io
import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.subset import BadSubset, open_subset, subset_info, subset_to_parquet, write_subset

U16 = np.dtype("u8,u8")  # what DataComp's load_subset asserts


def datacomp_bytes(uids):
    """What DataComp's apply_filter writes: structured u8,u8 array, .sort(), np.save."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], U16)
    arr.sort()
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


UIDS = ["ff" * 16, "00" * 16, "0123456789abcdef" * 2, "00" * 16, "0000000000000001" + "0" * 16]


def test_bytes_equal_datacomp_np_save(tmp_path):
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in UIDS], U16)
    arr.sort()
    write_subset(tmp_path / "s.npy", arr["f0"], arr["f1"])
    data = (tmp_path / "s.npy").read_bytes()
    assert data == datacomp_bytes(UIDS)
    assert data[:8] == b"\x93NUMPY\x01\x00"  # format v1.0
    assert b"'descr': [('f0', '<u8'), ('f1', '<u8')]" in data[:128]
    assert len(data) == 128 + 16 * len(UIDS)  # header + 16 bytes per record, duplicates kept


def test_refuses_to_write_unsorted(tmp_path):
    with pytest.raises(BadSubset, match="unsorted"):
        write_subset(tmp_path / "s.npy", np.array([2, 1], np.uint64), np.array([0, 0], np.uint64))
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_open_accepts_npy_and_raw_memmap_read_only(tmp_path):
    arr = np.sort(np.array([(1, 2), (1, 3), (5, 0)], U16))
    np.save(tmp_path / "a.npy", arr)
    raw = tmp_path / "a.raw"
    arr.tofile(raw)
    os.chmod(raw, 0o444)  # DataComp's loader needs write permission here; we do not
    assert open_subset(tmp_path / "a.npy").tolist() == arr.tolist()
    assert open_subset(raw).tolist() == arr.tolist()


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p, np.array([(5, 0), (1, 0)], U16)), "not sorted ascending at record 1"),
    (lambda p: np.save(p, np.array([(1, 9), (1, 2)], U16)), "not sorted ascending at record 1"),
    (lambda p: np.save(p, np.zeros(3, np.dtype("u4,u4"))), "is not the subset dtype"),
    (lambda p: np.save(p, np.zeros(3, np.dtype([("a", "<u8"), ("b", "<u8")]))), "is not the subset dtype"),
    (lambda p: np.save(p, np.zeros(3, np.dtype(">u8,>u8"))), "is not the subset dtype"),
    (lambda p: np.save(p, np.zeros((2, 2), U16)), "not one-dimensional"),
    (lambda p: np.save(p, np.array([object()] * 2, dtype=object), allow_pickle=True), "not a subset file"),
    (lambda p: open(p, "wb").write(b"x" * 17), "not a multiple of 16"),
])
def test_bad_subset_files_are_named(tmp_path, make, msg):
    p = tmp_path / "bad.npy"
    make(p)
    with pytest.raises(BadSubset) as e:
        open_subset(p)
    assert msg in str(e.value) and str(p) in str(e.value)


def test_pickled_npy_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.npy"
    np.save(p, np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(BadSubset):
        open_subset(p)
    assert not (tmp_path / "pwned").exists()
    assert pickle  # the payload really was a pickle


def test_info_counts_duplicates_by_hand(tmp_path):
    # records: a a b c c c  -> count 6, distinct 3, 3 extra copies, max 3 copies
    arr = np.array([(1, 1), (1, 1), (1, 2), (7, 0), (7, 0), (7, 0)], U16)
    np.save(tmp_path / "s.npy", arr)
    info = subset_info(tmp_path / "s.npy")
    assert (info.count, info.distinct, info.duplicates, info.max_copies) == (6, 3, 3, 3)
    assert info.sorted and info.dtype_ok


def test_info_reports_unsorted_and_wrong_dtype(tmp_path):
    np.save(tmp_path / "u.npy", np.array([(2, 0), (1, 0), (1, 0)], U16))
    info = subset_info(tmp_path / "u.npy")
    assert not info.sorted and (info.count, info.distinct) == (3, 2)
    np.save(tmp_path / "d.npy", np.zeros(2, "<u8"))
    assert not subset_info(tmp_path / "d.npy").dtype_ok


def test_empty_subset(tmp_path):
    write_subset(tmp_path / "e.npy", np.empty(0, np.uint64), np.empty(0, np.uint64))
    info = subset_info(tmp_path / "e.npy")
    assert (info.count, info.distinct, info.sorted) == (0, 0, True)
    assert np.load(tmp_path / "e.npy").dtype == U16


def test_to_parquet_hex(tmp_path):
    uids = sorted(["ab" * 16, "00" * 16, "00" * 16])
    (tmp_path / "s.npy").write_bytes(datacomp_bytes(uids))
    assert subset_to_parquet(tmp_path / "s.npy", tmp_path / "s.parquet") == 3
    assert pq.read_table(tmp_path / "s.parquet").column("uid").to_pylist() == uids
