"""curate.safepickle: plain data loads under every protocol; anything else is refused before it runs."""

import os
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
