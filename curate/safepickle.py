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

The work is bounded by what was read: a file over :data:`MAX_BYTES` is not read; each
distinct container is walked once (memo-shared objects are not walked again); nesting deeper
than :data:`MAX_DEPTH`, a container that contains itself, and shared references that expand to
far more items than the file's bytes could hold (``max(1e6, 4 x bytes)``) are refused. So a
hostile file fails in about the time it takes to read it, with one line naming the file.
Loading uses pickle's pure-Python unpickler so that the opcodes that hash (dict keys, set
items) can be charged first: a memo-shared tuple's hash walks its whole expansion, and a deeply
nested one overflows the C stack; both are refused before hashing. Opcodes plain data never
uses (NEWOBJ, INST, OBJ) and calls that allocate before any data is seen are refused too.
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
_PLAIN_TYPES = frozenset(_PLAIN)


class UnsafePickle(CurateError):
    """A pickle that refers to something other than plain data, or cannot be read."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    # numpy 1 pickles name numpy.core.multiarray, numpy 2 numpy._core.multiarray: same functions
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _reconstruct
        allowed[(mod, "scalar")] = np.int64(0).__reduce__()[0]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5 out-of-band arrays
        allowed[(mod, "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]


def _reconstruct(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + __setstate__ (which checks the
    # data against the shape): an empty plain ndarray is all it ever asks for, so nothing bigger
    # is allocated before the data is seen
    if subtype is not np.ndarray or tuple(shape) != (0,):
        what = getattr(subtype, "__name__", type(subtype).__name__)
        raise pickle.UnpicklingError(f"_reconstruct called with unexpected arguments ({what}, shape {str(shape)[:40]})")
    return _NP_RECONSTRUCT(subtype, shape, dtype)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # protocol 2 writes bytes as _codecs.encode(latin-1 str, 'latin1'); only that shape is allowed
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode called with unexpected arguments")
    return obj.encode("latin1")


_HASHED = (tuple, frozenset)


class _Unpickler(pickle._Unpickler):  # noqa: SLF001 - the Python unpickler: its opcodes can be checked
    """pickle's pure-Python unpickler with every global refused but numpy's array pieces, and the
    opcodes that hash (dict keys, set items) charged for what hashing costs: a tuple's hash walks
    every tuple inside it, so a few hundred bytes of memo-shared tuples used as a dict key would
    hash for hours inside C code; here the key is refused before it is hashed."""

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, f, origin: str, budget: int = 1_000_000):
        super().__init__(f)
        self.origin = origin
        self.budget = budget
        self.spent = 0
        self.sizes: dict[int, tuple] = {}  # id(tuple) -> (tuple, expanded size, depth), for nested ones
        self.allowed = _numpy_globals()
        self.allowed[("_codecs", "encode")] = _codecs_encode
        for mod in ("builtins", "__builtin__"):  # protocol 2 writes Python 2 module names
            self.allowed[(mod, "set")] = self._set
            self.allowed[(mod, "frozenset")] = self._frozenset

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

    # -- bounded hashing
    def _size(self, o) -> int:
        return self._info(o)[0]

    def _info(self, o) -> tuple[int, int]:
        """(expanded size, tuple nesting depth) of an object on the stack."""
        if isinstance(o, _HASHED):
            hit = self.sizes.get(id(o))
            return hit[1:] if hit is not None and hit[0] is o else (1 + len(o), 1)
        return 1, 0

    def _charge(self, items) -> None:
        self.spent += sum(self._size(k) for k in items)
        if self.spent > self.budget:
            raise UnsafePickle(
                f"{self.origin}: hashing its dict keys / set items would walk more than {self.budget:,} "
                f"items (memo-shared tuples), far more than the file holds; refusing it (a pickle bomb?)")

    def _note_tuple(self) -> None:
        t = self.stack[-1]
        n, depth = 1, 1
        for e in t:
            en, ed = self._info(e)
            n += en
            depth = max(depth, ed + 1)
        if n > self.budget:
            raise UnsafePickle(f"{self.origin}: a tuple whose shared references expand to more than "
                               f"{self.budget:,} items, far more than the file holds; refusing it (a pickle bomb?)")
        if depth > MAX_DEPTH:  # hashing a deeper one recurses in C (no recursion guard)
            raise UnsafePickle(f"{self.origin}: tuples nested deeper than {MAX_DEPTH} levels")
        if n > 1 + len(t):
            self.sizes[id(t)] = (t, n, depth)

    def _set(self, items=()):
        items = list(items)
        self._charge(items)
        return set(items)

    def _frozenset(self, items=()):
        items = list(items)
        self._charge(items)
        return frozenset(items)

    def load_tuple(self):
        super().load_tuple()
        self._note_tuple()
    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self):
        super().load_tuple1()
        self._note_tuple()
    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self):
        super().load_tuple2()
        self._note_tuple()
    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self):
        super().load_tuple3()
        self._note_tuple()
    dispatch[pickle.TUPLE3[0]] = load_tuple3

    def load_setitem(self):
        self._charge([self.stack[-2]])
        super().load_setitem()
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        self._charge(self.stack[0::2])  # items since the mark: key, value, key, value, ...
        super().load_setitems()
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        self._charge(self.stack[0::2])
        super().load_dict()
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        self._charge(self.stack)
        super().load_additems()
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        self._charge(self.stack)
        super().load_frozenset()
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    # -- what numpy never writes: objects built by calling a class (allocations before any data)
    def load_reduce(self):
        if self.stack[-2] is np.ndarray:
            raise UnsafePickle(f"{self.origin}: refusing a call of numpy.ndarray (numpy pickles arrays "
                               f"with _reconstruct)")
        super().load_reduce()
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _refuse_op(self, op: str):
        raise UnsafePickle(f"{self.origin}: refusing the {op} opcode (plain data never uses it)")

    def load_newobj(self):
        self._refuse_op("NEWOBJ")
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        self._refuse_op("NEWOBJ_EX")
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_inst(self):
        self._refuse_op("INST")
    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self):
        self._refuse_op("OBJ")
    dispatch[pickle.OBJ[0]] = load_obj


MAX_DEPTH = 100
MAX_BYTES = 4 << 30  # a larger pickle is refused before it is read
_MIN_ITEMS = 1_000_000


def _where(path: tuple) -> str:
    """A readable location from the steps of a walk: ``(kind, key)`` with kind "i" (an index),
    "k" (a dict value) or "key" (a dict key)."""
    if not path:
        return "top level"
    s = "".join(f"[{k}]" if kind == "i" else f"[{_key(k)}]" + (" (key)" if kind == "key" else "")
                for kind, k in path)
    return s if len(s) <= 120 else "..." + s[-117:]


def _key(k) -> str:
    if isinstance(k, (str, bytes, int, float, bool, type(None), np.generic)):
        r = repr(k)
        return r if len(r) <= 40 else r[:37] + "..."
    return f"<{type(k).__name__}>"


class _Checker:
    """Walks a loaded object once per distinct container (memo-shared objects are walked once),
    refusing non-plain data, cycles, nesting deeper than ``MAX_DEPTH`` and shared structures that
    expand to more than ``max_items`` items (a pickle of a list holding itself twice, 40 levels
    deep, is ~330 bytes and 2**40 items to any caller that walks it)."""

    def __init__(self, origin: str, max_items: int):
        self.origin = origin
        self.max_items = max_items
        self.sizes: dict[int, int] = {}  # id(container) -> expanded item count
        self.active: set[int] = set()
        self.keep: list = []  # holds what `sizes` refers to, so no id is reused during the walk

    def fail(self, what: str):
        raise UnsafePickle(f"{self.origin}: {what}")

    def check(self, obj, path: tuple = (), depth: int = 0) -> int:
        """Expanded item count of ``obj``."""
        if isinstance(obj, _PLAIN):
            return 1
        if depth >= MAX_DEPTH:
            self.fail(f"nesting deeper than {MAX_DEPTH} levels at {_where(path)}")
        oid = id(obj)
        if oid in self.sizes:
            return self.sizes[oid]
        if oid in self.active:
            self.fail(f"a container at {_where(path)} contains itself (a reference cycle)")
        if isinstance(obj, dict):
            self.active.add(oid)
            n = 1
            for k, v in obj.items():
                n += 1 if type(k) in _PLAIN_TYPES else self.check(k, path + (("key", k),), depth + 1)
                n += 1 if type(v) in _PLAIN_TYPES else self.check(v, path + (("k", k),), depth + 1)
                self.count(n, path)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            self.active.add(oid)
            n = 1
            for i, v in enumerate(obj):
                if type(v) in _PLAIN_TYPES:
                    n += 1
                    continue
                n += self.check(v, path + (("i", i),), depth + 1)
                self.count(n, path)
        elif isinstance(obj, (np.ndarray, np.generic)):
            dt = obj.dtype
            if dt.fields is not None or dt.kind not in _ALLOWED_KINDS:
                self.fail(f"numpy dtype {dt} at {_where(path)} is not allowed")
            n = 1 + int(obj.size)
            if dt.kind == "O":
                for i, v in enumerate(np.asarray(obj, dtype=object).ravel()):
                    if not isinstance(v, _PLAIN):
                        self.fail(f"object array at {_where(path)} holds a {type(v).__name__} at position {i}; "
                                  f"only str/bytes/int/float/bool/None are allowed")
            self.count(n, path)
            if not isinstance(obj, np.ndarray):
                return n  # scalars are not shared containers
        else:
            self.fail(f"a {type(obj).__name__} at {_where(path)} is not plain data")
        self.active.discard(oid)
        self.sizes[oid] = n
        self.keep.append(obj)
        return n

    def count(self, n: int, path: tuple) -> None:
        if n > self.max_items:
            self.fail(f"shared references at {_where(path)} expand to more than {self.max_items:,} items, "
                      f"far more than the file holds; refusing it (a pickle bomb?)")


def _check(obj, origin: str, nbytes: int = 0) -> None:
    """Walk a loaded object; anything that is not plain data is an error naming where it is.

    The work is bounded by what was read: each distinct container is walked once, and the
    structure a caller would see (shared references expanded) may hold at most
    ``max(1_000_000, 4 * nbytes)`` items (an unshared pickle holds fewer items than bytes).
    """
    _Checker(origin, max(_MIN_ITEMS, 4 * nbytes)).check(obj)


def safe_loads(data: bytes, origin: str = "<bytes>"):
    """Unpickle ``data`` allowing only plain data (see the module docstring)."""
    try:
        obj = _Unpickler(io.BytesIO(data), origin, max(_MIN_ITEMS, 4 * len(data))).load()
    except UnsafePickle:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is the user's file
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UnsafePickle(f"{origin}: not a readable pickle ({type(e).__name__}: {msg[:200]})") from None
    _check(obj, origin, len(data))
    return obj


def safe_load(path: str | os.PathLike, max_bytes: int = MAX_BYTES):
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
    size = path.stat().st_size
    if size > max_bytes:
        raise UnsafePickle(f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit for a pickle")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnsafePickle(f"{path}: cannot read ({e.strerror or e})") from None
    return safe_loads(data, str(path))
