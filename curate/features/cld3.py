"""The ``text_lang_cld3`` table: CLD3's language label of every caption, computed once.

Only DataComp's ``laion2b`` baseline reads CLD3, and CLD3 costs 2.5-4x what fastText does per
caption, so it is not part of ``text_features`` (:mod:`curate.features.text`): it is its own
producer, built by ``curate features cld3`` or by ``curate run`` on the first filter that
references the view. One parquet per pool file, ``FEATURES_DIR/text_lang_cld3/{file}.parquet``,
same rows in the same order as the pool file:

====================  ==========================================================================
uid, file, row        the pool row (join on file + row, or on uid)
lang_cld3             ``gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)``
                      ``.FindLanguage(text.replace('\\n', ' ')).language`` (reliability ignored)
====================  ==========================================================================

The table has one part, ``cld3`` (:data:`CLD3_PARTS`, cost 3), which can be computed for some
rows only (:func:`curate.features.parts.build_parts`, e.g. the rows whose B/32 score passes the
laion2b threshold); a row not computed is NULL. Everything else -- resumable per-file outputs
written atomically, stale detection from the source file's identity and the CLD3 settings
recorded in each output, one task per pool file with work run where the
:class:`~curate.engine.Engine` given says (this process, worker processes, Ray), no partial table
on a NULL or non-UTF-8 caption -- is the shared machinery of :mod:`curate.features.parts`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from curate.engine import Engine
from curate.features.langid import Cld3LID, cld3_identity
from curate.features.parts import BuildResult, CaptionTable, CaptionTableProducer, Part, PoolFileRef, build_table, per_distinct

VIEW = "text_lang_cld3"
SCHEMA_VERSION = 1
META_KEY = b"curate.text_lang_cld3"

OUTPUT_SCHEMA = pa.schema([
    ("uid", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("lang_cld3", pa.string()),
])

#: part -> its columns
CLD3_PARTS: dict[str, tuple[str, ...]] = {"cld3": ("lang_cld3",)}
PART_COST = {"cld3": 3}

_CLD3 = None


def _cld3():
    """The detector, created once per process."""
    global _CLD3
    if _CLD3 is None:
        _CLD3 = Cld3LID()
    return _CLD3


def settings_identity() -> dict:
    return {"schema": SCHEMA_VERSION, "cld3": cld3_identity()}


def compute_parts(parts: tuple[str, ...], texts: pa.Array, settings: dict) -> dict[str, pa.Array]:
    """``lang_cld3`` of a string array without NULLs (once per distinct caption)."""
    return {"lang_cld3": per_distinct(_cld3().labels, texts)}


def _settings(out_dir: Path, files: list[PoolFileRef]) -> dict:
    return settings_identity()


def _comparable(settings: dict) -> dict:
    return json.loads(json.dumps(settings))


def part_settings(settings: dict, part: str) -> dict:
    return {"schema": settings.get("schema"), "cld3": settings.get("cld3")}


def _load(settings: dict, parts) -> None:
    """Load CLD3 in this process (a worker loads it as it starts: see CaptionTable.load)."""
    _cld3()


TABLE = CaptionTable(VIEW, META_KEY, OUTPUT_SCHEMA, SCHEMA_VERSION,
                     {p: Part(p, cols, PART_COST[p]) for p, cols in CLD3_PARTS.items()},
                     compute_parts, _settings, _comparable, part_settings, _load)


def build_text_lang_cld3(catalog=None, progress: bool = True, force: bool = False,
                         engine: Engine | None = None) -> BuildResult:
    """Compute CLD3 labels for every pool row that lacks a current one; register ``text_lang_cld3``.

    One task per pool file with work, run where ``engine`` says (None: this machine).
    """
    return build_table(TABLE, catalog, progress=progress, force=force, engine=engine)


PRODUCER = CaptionTableProducer(TABLE, build_text_lang_cld3, lambda s: {"cld3": s["cld3"]} if s.get("cld3") else {})
