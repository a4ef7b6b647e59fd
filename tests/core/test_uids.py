"""The uid codec against DataComp's definition: (int(u[:16],16), int(u[16:32],16))."""

import numpy as np
import pyarrow as pa
import pytest

from curate.uids import (
    SUBSET_DTYPE,
    BadUid,
    hex_array_to_pairs,
    hex_array_to_records,
    hex_to_pair,
    pair_to_hex,
    pairs_to_hex_array,
    sort_pairs,
    sort_records,
    to_records,
)

VALID = [
    "00000000000000000000000000000000",
    "ffffffffffffffffffffffffffffffff",
    "0000000000000001ffffffffffffffff",
    "8000000000000000000000000000000a",
    "ABCDEF0123456789abcdef0123456789",  # int() accepts upper case, so DataComp does too
]


@pytest.mark.parametrize("uid", VALID)
def test_matches_python_int(uid):
    assert hex_to_pair(uid) == (int(uid[:16], 16), int(uid[16:32], 16))


@pytest.mark.parametrize("bad,pos", [
    (["0" * 31], 0),                       # too short
    (["0" * 32, "0" * 33], 1),             # too long
    (["0" * 31 + "g"], 0),                 # not hex
    (["0" * 15 + " " + "0" * 16], 0),      # whitespace (bytes.fromhex would skip it)
    (["0" * 15 + "_" + "0" * 16], 0),      # DuckDB's cast would accept a digit separator
    (["0" * 30 + "é"], 0),                 # 31 code points but 32 bytes
    (["0" * 32, None], 1),                 # null
])
@pytest.mark.parametrize("parse", [hex_array_to_pairs, hex_array_to_records])
def test_rejects_bad_uids_naming_value_and_position(bad, pos, parse):
    with pytest.raises(BadUid) as e:
        parse(pa.array(bad, pa.string()))
    assert e.value.position == pos
    assert repr(bad[pos]) in str(e.value)


def test_chunked_positions_are_global():
    arr = pa.chunked_array([pa.array(["0" * 32] * 3), pa.array(["0" * 32, "xyz"])])
    with pytest.raises(BadUid) as e:
        hex_array_to_pairs(arr)
    assert e.value.position == 4


def test_round_trip_lowercases():
    hi, lo = hex_array_to_pairs(pa.array(VALID))
    assert pairs_to_hex_array(hi, lo).to_pylist() == [u.lower() for u in VALID]
    assert pair_to_hex(1, 2) == "0000000000000001" + "0000000000000002"


def test_sort_pairs_orders_like_the_hex_string_and_keeps_duplicates():
    uids = ["ff" * 16, "00" * 16, "0000000000000001" + "f" * 16, "0000000000000001" + "0" * 16,
            "00" * 16, "0000000000000001" + "0" * 15 + "1"]
    hi, lo = hex_array_to_pairs(pa.array(uids))
    shi, slo = sort_pairs(hi, lo)
    assert pairs_to_hex_array(shi, slo).to_pylist() == sorted(uids)


def test_sort_pairs_large_random_equals_lexsort():
    rng = np.random.default_rng(1)
    hi = rng.integers(0, 50, 10_000).astype(np.uint64)  # many ties on hi
    lo = rng.integers(0, 2**63, 10_000).astype(np.uint64)
    shi, slo = sort_pairs(hi, lo)
    order = np.lexsort((lo, hi))
    assert (shi == hi[order]).all() and (slo == lo[order]).all()


def test_records_parse_matches_pairs_parse():
    arr = pa.chunked_array([pa.array(VALID[:2]), pa.array(VALID[2:])])
    rec = hex_array_to_records(arr)
    hi, lo = hex_array_to_pairs(arr)
    assert rec.dtype == SUBSET_DTYPE and rec.shape == (len(VALID),)
    assert [tuple(map(int, r)) for r in rec] == [hex_to_pair(u) for u in VALID]
    assert (rec["f0"] == hi).all() and (rec["f1"] == lo).all()


def _lexsorted(rec):
    return rec[np.lexsort((rec["f1"], rec["f0"]))]


@pytest.mark.parametrize("n,hi_values", [
    (0, None), (1, None), (2, None), (3, [5, 5, 5]),
    # n = 1000 -> the key keeps the top 54 bits of f0; these differ only in the low 10 bits,
    # so every row ties in the key and order must come from the full (f0, f1) fix-up
    (1000, "low-bits"),
    # runs of ties in the key next to rows that do not tie, at both ends of the range
    (5000, "mixed"),
    (20000, "random"),
])
def test_sort_records_equals_lexsort(n, hi_values):
    rng = np.random.default_rng(n)
    if hi_values is None or hi_values == "random":
        hi = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    elif hi_values == "low-bits":
        hi = (np.uint64(0xABCD) << np.uint64(40)) + rng.permutation(n).astype(np.uint64)
    elif hi_values == "mixed":
        hi = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        hi[: n // 4] = np.uint64(2**64 - 1) - rng.integers(0, 64, n // 4).astype(np.uint64)
        hi[n // 4 : n // 2] = rng.integers(0, 64, n // 4).astype(np.uint64)
    else:
        hi = np.array(hi_values, np.uint64)
    lo = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    lo[: n // 10] = lo[n // 10 : 2 * (n // 10)]  # some exact duplicates (upsampling)
    hi[: n // 10] = hi[n // 10 : 2 * (n // 10)]
    rec = to_records(hi, lo)
    got = sort_records(rec)
    assert got.dtype == SUBSET_DTYPE
    assert got.tobytes() == _lexsorted(rec).tobytes()
