"""The uid codec against DataComp's definition: (int(u[:16],16), int(u[16:32],16))."""

import numpy as np
import pyarrow as pa
import pytest

from curate.uids import BadUid, hex_array_to_pairs, hex_to_pair, pair_to_hex, pairs_to_hex_array, sort_pairs

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
def test_rejects_bad_uids_naming_value_and_position(bad, pos):
    with pytest.raises(BadUid) as e:
        hex_array_to_pairs(pa.array(bad, pa.string()))
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
