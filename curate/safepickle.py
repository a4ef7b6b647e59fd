"""Load a pickle that someone else wrote without letting it run code.

TiC-CLIP ships its evaluation maps as pickles (``{year: [uid, ...]}``, ``{year: {wnid:
ndarray[uid]}}``). ``pickle.load`` on such a file may call any importable function, so curate
never uses it on input files. :func:`safe_load` uses an unpickler whose ``find_class`` admits
only what numpy needs to rebuild an array (``_reconstruct``, ``_frombuffer``, ``ndarray``,
``dtype``, scalars)
and ``_codecs.encode`` (how protocol 2 stores bytes); every other global is refused before
anything is called. After loading, the whole object is walked and must consist of plain
containers (dict, list, tuple, set), str, bytes, int, float, bool, None and numpy arrays or
scalars of those (object arrays are checked element by element).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from curate.errors import CurateError

_ALLOWED_KINDS = set("biufUS?O")  # bool, ints, floats, str, bytes; object arrays are walked
_PLAIN = (str, bytes, int, float, bool, type(None))


class UnsafePickle(CurateError):
    """A pickle that refers to something other than plain data, or cannot be read."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    # numpy 1 pickles name numpy.core.multiarray, numpy 2 numpy._core.multiarray: same functions
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = np.ndarray.__reduce__(np.empty(0))[0]
        allowed[(mod, "scalar")] = np.int64(0).__reduce__()[0]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5 out-of-band arrays
        allowed[(mod, "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # protocol 2 writes bytes as _codecs.encode(latin-1 str, 'latin1'); only that shape is allowed
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode called with unexpected arguments")
    return obj.encode("latin1")


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, origin: str):
        super().__init__(f)
        self.origin = origin
        self.allowed = _numpy_globals()
        self.allowed[("_codecs", "encode")] = _codecs_encode
        for mod in ("builtins", "__builtin__"):  # protocol 2 writes Python 2 module names
            self.allowed[(mod, "set")] = set
            self.allowed[(mod, "frozenset")] = frozenset

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"{self.origin}: refusing to load {module}.{name} (only plain containers, str, int, "
                f"float, bool, None and numpy arrays of those are allowed)"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickle(f"{self.origin}: refusing a persistent reference in a pickle")


def _check(obj, origin: str, path: str = "", depth: int = 0) -> None:
    """Walk a loaded object; anything that is not plain data is an error naming where it is."""
    if depth > 100:
        raise UnsafePickle(f"{origin}: nesting deeper than 100 levels at {path or 'top level'}")
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check(k, origin, f"{path}[{k!r}] (key)", depth + 1)
            _check(v, origin, f"{path}[{k!r}]", depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check(v, origin, f"{path}[{i}]", depth + 1)
        return
    if isinstance(obj, (np.ndarray, np.generic)):
        dt = obj.dtype
        if dt.fields is not None or dt.kind not in _ALLOWED_KINDS:
            raise UnsafePickle(f"{origin}: numpy dtype {dt} at {path or 'top level'} is not allowed")
        if dt.kind == "O":
            for i, v in enumerate(np.asarray(obj, dtype=object).ravel()):
                if not isinstance(v, _PLAIN):
                    raise UnsafePickle(
                        f"{origin}: object array at {path or 'top level'} holds a {type(v).__name__} "
                        f"at position {i}; only str/bytes/int/float/bool/None are allowed")
        return
    raise UnsafePickle(f"{origin}: a {type(obj).__name__} at {path or 'top level'} is not plain data")


def safe_loads(data: bytes, origin: str = "<bytes>"):
    """Unpickle ``data`` allowing only plain data (see the module docstring)."""
    try:
        obj = _Unpickler(io.BytesIO(data), origin).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is the user's file
        raise UnsafePickle(f"{origin}: not a readable pickle ({type(e).__name__}: {e})") from None
    _check(obj, origin)
    return obj


def safe_load(path: str | os.PathLike):
    """Load the pickle file ``path`` allowing only plain containers, str, int, float, bool,
    None and numpy arrays of those; anything else raises :class:`UnsafePickle` (a CurateError).

    >>> import pickle, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.pkl")
    >>> _ = open(p, "wb").write(pickle.dumps({2016: ["ab" * 16]}))
    >>> safe_load(p)
    {2016: ['abababababababababababababababab']}
    """
    path = Path(path)
    if not path.is_file():
        raise UnsafePickle(f"{path}: file not found")
    return safe_loads(path.read_bytes(), str(path))
