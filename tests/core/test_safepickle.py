"""curate.safepickle: plain data loads under every protocol; anything else is refused before it runs."""

import os
import re
import pickle

import numpy as np
import pytest

from curate.errors import CurateError
from curate.safepickle import UnsafePickle, safe_load, safe_loads

U = "0123456789abcdef" * 2

PLAIN = [
    {2016: [U, U.upper()]},
    {"2016": {"n01440764": np.array([U, U], dtype=object)}},  # TiC's DataCompNet shape
    {"2016": {"n01440764": np.array([U], dtype="<U32")}},
    [1, 2.5, True, None, "s", b"bytes", (1, 2), {3, 4}, frozenset({5})],
    np.arange(6, dtype=np.int64).reshape(2, 3),
    np.zeros(3, dtype=np.float32),
    np.array([True, False]),
    {"scalar": np.int64(7), "str": np.str_("x"), "f": np.float64(1.5)},
]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("obj", PLAIN, ids=range(len(PLAIN)))
def test_plain_data_round_trips(obj, protocol):
    got = safe_loads(pickle.dumps(obj, protocol=protocol))
    assert repr(got) == repr(obj)


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create a file if it ran


class Custom:
    pass


def test_global_call_is_refused_before_it_runs(tmp_path):
    target = tmp_path / "pwned"
    data = pickle.dumps({"2016": [Evil(str(target))]})
    with pytest.raises(UnsafePickle, match=r"refusing to load (builtins|io)\.open"):
        safe_loads(data, "evil.pkl")
    assert not target.exists()


@pytest.mark.parametrize("obj, message", [
    (Evil("/nonexistent/x"), "refusing to load"),
    (Custom(), "refusing to load .*Custom"),
    ({"a": os.system}, "refusing to load (posix|nt).system"),
    (np.array([{"a": 1}], dtype=object), "object array .* holds a dict"),
    (np.zeros(2, dtype="u8,u8"), "numpy dtype .* is not allowed"),
    (np.array(["2016-01-01"], dtype="datetime64[D]"), "numpy dtype datetime64"),
], ids=["reduce-open", "custom-class", "function", "object-array-dict", "structured", "datetime"])
def test_refused(obj, message):
    with pytest.raises(UnsafePickle, match=message):
        safe_loads(pickle.dumps(obj), "x.pkl")


def test_persistent_id_refused():
    import io

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if obj == "magic" else None

    buf = io.BytesIO()
    P(buf).dump(["magic"])
    with pytest.raises(UnsafePickle, match="persistent reference"):
        safe_loads(buf.getvalue())


def test_garbage_and_missing_file(tmp_path):
    with pytest.raises(UnsafePickle, match="not a readable pickle"):
        safe_loads(b"\x80\x04not really", "g.pkl")
    with pytest.raises(CurateError, match="file not found"):
        safe_load(tmp_path / "none.pkl")


def test_safe_load_file_names_the_file(tmp_path):
    p = tmp_path / "m.pkl"
    p.write_bytes(pickle.dumps({2016: [U]}))
    assert safe_load(p) == {2016: [U]}
    p.write_bytes(pickle.dumps(Custom()))
    with pytest.raises(UnsafePickle, match=str(p)):
        safe_load(p)


# --------------------------------------------------------------------------- bounded work


def _shared_bomb(levels: int, wrap=list):
    x = wrap(["leaf"])
    for _ in range(levels):
        x = wrap([x, x])  # memo-shared: the pickle stays tiny, the expanded tree doubles per level
    return x


def _deep_nesting(levels: int) -> bytes:
    # EMPTY_LIST x n, then APPEND x (n-1): list k holds list k+1 (no recursion in the writer)
    return b"\x80\x02" + b"]" * levels + b"a" * (levels - 1) + b"."


def _body(obj) -> bytes:
    """The opcodes that build ``obj`` (protocol 2, no header, no STOP), to embed in a hand-built pickle."""
    data = pickle.dumps(obj, protocol=2)
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


def _self_cycle():
    a = []
    a.append(a)
    return a


def _dict_cycle():
    d = {}
    d["self"] = [d]
    return d


class _HugeArray:
    def __reduce__(self):  # what numpy never writes: an array allocated before its data is seen
        return (np.ndarray.__reduce__(np.empty(0))[0], (np.ndarray, (1 << 40,), b"b"))


HOSTILE = {
    # id: (pickle bytes, message regex)
    "shared-list-bomb-40": (pickle.dumps(_shared_bomb(40)), r"expand to more than 1,000,000 items"),
    "shared-tuple-bomb-as-dict-key": (b"\x80\x02}" + _body(_shared_bomb(40, tuple)) + b"K\x01s.",
                                      r"a tuple whose shared references expand to more than 1,000,000 items"),
    # each key alone is under the limit (2**19 leaves), hashing them all is not
    "hash-work-dict-keys": (pickle.dumps({(_shared_bomb(18, tuple), i): i for i in range(3)}),
                            r"hashing its dict keys / set items would walk more than 1,000,000 items"),
    "hash-work-frozenset": (pickle.dumps(frozenset((_shared_bomb(18, tuple), i) for i in range(3)), protocol=4),
                            r"hashing its dict keys / set items"),
    "hash-work-protocol-2-set": (pickle.dumps({(_shared_bomb(18, tuple), i) for i in range(3)}, protocol=2),
                                 r"hashing its dict keys / set items"),
    "shared-tuple-bomb-60": (pickle.dumps(_shared_bomb(60, tuple)), r"a tuple whose shared references expand"),
    "deep-tuple-as-dict-key": (b"\x80\x02}N" + b"\x85" * 100_000 + b"K\x01s.", r"tuples nested deeper than 100"),
    "ndarray-called-directly": (b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R.",
                                r"refusing a call of numpy.ndarray"),
    "newobj-ndarray": (b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85\x81.", r"refusing the NEWOBJ opcode"),
    "wide-shared-count": (pickle.dumps([[["u" * 32] * 1000] * 1000] * 1000), r"expand to more than"),
    "deep-nesting-1e5": (_deep_nesting(100_000), r"nesting deeper than 100 levels at \.\.\.(\[0\])+$"),
    "list-contains-itself": (pickle.dumps(_self_cycle()), r"a container at \[0\] contains itself"),
    "dict-cycle": (pickle.dumps(_dict_cycle()), r"at \['self'\]\[0\] contains itself"),
    "array-allocated-before-data": (pickle.dumps(_HugeArray()),
                                    r"not a readable pickle .*_reconstruct called with unexpected"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickles_fail_fast_in_one_line(case, tmp_path):
    import time

    data, message = HOSTILE[case]
    p = tmp_path / "hostile.pkl"
    p.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(UnsafePickle) as e:
        safe_load(p)
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ")
    assert re.search(message, msg), msg
    assert len(msg) < 400
    # no speed test: unbounded, these run for hours; 30 s only tells "fails fast" from "hangs"
    assert elapsed < 30.0, f"{case} took {elapsed:.2f}s"


def test_bomb_is_tiny():
    # the case: ~330 bytes that a naive walk would expand to 2**40 leaves
    assert len(HOSTILE["shared-list-bomb-40"][0]) < 400


def test_moderate_sharing_is_still_plain_data():
    shared = [U] * 10
    obj = {2016: shared, 2017: shared, "nested": [[shared, shared]] * 3}
    got = safe_loads(pickle.dumps(obj))
    assert got == obj and got[2016] is got[2017]  # loaded, sharing kept


def test_file_over_the_byte_limit_is_not_read(tmp_path):
    p = tmp_path / "big.pkl"
    p.write_bytes(pickle.dumps(list(range(1000))))
    size = p.stat().st_size
    with pytest.raises(UnsafePickle, match=rf"^{re.escape(str(p))}: {size:,} bytes, over the 100-byte limit"):
        safe_load(p, max_bytes=100)
    assert safe_load(p, max_bytes=size) == list(range(1000))


def _load_cls_map(p):
    from curate.shards.plan import load_cls_map

    return load_cls_map(p)


def _load_array_file(p):
    from curate.features.clusters import load_array_file

    return load_array_file(p, "centroids")


@pytest.mark.parametrize("loader", [_load_cls_map, _load_array_file], ids=["reshard --cls-file", "clusters import"])
@pytest.mark.parametrize("case", ["shared-list-bomb-40", "hash-work-dict-keys", "deep-nesting-1e5"])
def test_callers_fail_fast_on_bombs(tmp_path, loader, case):
    import time

    p = tmp_path / "cls.pkl"
    p.write_bytes(HOSTILE[case][0])
    t0 = time.perf_counter()
    with pytest.raises(CurateError) as e:
        loader(p)
    assert time.perf_counter() - t0 < 30.0  # a hang, not a speed test (see above)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
