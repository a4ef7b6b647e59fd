"""TiC-YFCC15M: YFCC15M's metadata table -> a pool with four upload-year groups and a 99/1 split.

What TiC-CLIP's ``dataset_creation/tic-yfcc15m/create_splits.py`` defines, kept here:

* caption = ``clean(f"{title}. {description}. {usertags}")[:500]`` (first 500 code points),
  with a missing field as ``""`` and ``clean(x) = remove_html(ftfy.fix_text(unquote_plus(x)))``,
  ``remove_html`` deleting every ``<.*?>`` match;
* image path = ``{key[:3]}/{key[3:6]}/{key}.jpg`` under the images directory;
* the year of ``dateuploaded`` (Unix seconds) picks the group 2004-2008, 2009-2010, 2011-2012
  or 2013-2014; rows of other years are left out (TiC counts them as "not mapped");
* a 99/1 train/test split per group with scikit-learn's sizes (``ceil(0.01 * n)`` test).

Deliberate differences: the year is taken in UTC (TiC's ``datetime.fromtimestamp`` uses the
time zone of the machine that runs it, so uploads near New Year move between groups from
machine to machine); the split is by a seeded hash of the uid (TiC's is unseeded, different on
every run); fields are read as text, so a title "NA" stays "NA" (pandas would make it empty);
TiC's script also crashes as written (``years = []; years[0] = ...``).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path, write_json
from curate.errors import CurateError
from curate.pool.build import SOURCE_DIR, BuildResult, build_pool, iter_table, parse_time, table_schema
from curate.pool.recipes.periods import YFCC15M_GROUPS
from curate.progress import Progress

CAPTION_CHARS = 500
REQUIRED = ("key", "title", "description", "usertags", "dateuploaded")
_HTML_TAG = re.compile("<.*?>")


def clean_text(x: str) -> str:
    """TiC's ``clean_text``: URL-unquote (``+`` is a space), fix mojibake, drop HTML tags."""
    try:
        import ftfy  # lazy: optional extra [recipes]
    except ImportError:
        raise CurateError("the YFCC15M recipe cleans captions with ftfy, as TiC does: "
                          "pip install 'curate[recipes]'") from None
    return _HTML_TAG.sub("", ftfy.fix_text(urllib.parse.unquote_plus(x)))


def caption(title: str | None, description: str | None, usertags: str | None) -> str:
    """The TiC-YFCC15M caption of one photo."""
    return clean_text(f"{title or ''}. {description or ''}. {usertags or ''}")[:CAPTION_CHARS]


def image_path(key: str) -> str:
    return f"{key[:3]}/{key[3:6]}/{key}.jpg"


def year_group(year: int) -> str | None:
    return next((name for name, first, last in YFCC15M_GROUPS if first <= year <= last), None)


def prepare_table(csv_path: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> dict:
    """Write the table ``curate pool from-table`` reads: ``path``, ``caption`` and the CSV's
    columns, for rows uploaded in 2004-2014 (streamed). Counts go to ``dest`` + ``.json``.
    Skipped when ``dest`` was already made from this CSV."""
    csv_path, dest = Path(csv_path).resolve(), Path(dest)
    schema = table_schema(csv_path)
    st = csv_path.stat()
    source_id = f"{csv_path}|{st.st_size}|{st.st_mtime_ns}"
    counts_path = dest.with_name(dest.name + ".json")
    if dest.is_file() and counts_path.is_file():
        done = json.loads(counts_path.read_text())
        if done.get("source") == source_id:
            return done["counts"]
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise CurateError(f"{csv_path}: missing column(s) {', '.join(missing)} "
                          f"(a YFCC15M table has {', '.join(REQUIRED)}, ...)")
    # the derived columns come first; CSV columns of the same name are renamed, not shadowed
    rest = [f.with_name(f"source_{f.name}" if f.name in ("path", "caption") else f.name) for f in schema]
    out_schema = pa.schema([("path", pa.string()), ("caption", pa.string())] + rest)
    rows = kept = unmapped = 0
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, out_schema) as writer:
        for first, batch in Progress(iter_table(csv_path, schema), desc="yfcc15m table", unit="batch",
                                 disable=not progress):
            cols = batch.to_pydict()
            keep, paths, caps = [], [], []
            for i in range(batch.num_rows):
                row = first + i
                key, when = cols["key"][i], cols["dateuploaded"][i]
                if not key:
                    raise CurateError(f"{csv_path}: row {row}, column 'key' is empty")
                try:
                    year = parse_time(when, "unix").year
                except (ValueError, OverflowError) as e:
                    raise CurateError(f"{csv_path}: row {row}, column 'dateuploaded': "
                                      f"{when!r} is not Unix seconds ({e})") from None
                if year_group(year) is None:
                    unmapped += 1
                    continue
                keep.append(i)
                paths.append(image_path(key))
                caps.append(caption(cols["title"][i], cols["description"][i], cols["usertags"][i]))
            rows += batch.num_rows
            kept += len(keep)
            part = batch.take(pa.array(keep, pa.int64()))
            writer.write_table(pa.table([pa.array(paths, pa.string()), pa.array(caps, pa.string())]
                                        + part.columns, schema=out_schema))
    counts = {"rows": rows, "kept": kept, "unmapped": unmapped}
    write_json(counts_path, {"source": source_id, "counts": counts})
    return counts


def build(csv_path: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
          workers: int | None = None, progress: bool = True) -> tuple[dict, BuildResult]:
    """The TiC-YFCC15M pool under ``out`` (``source/yfcc15m.parquet`` is the derived table)."""
    out = Path(out)
    table = out / SOURCE_DIR / "yfcc15m.parquet"
    counts = prepare_table(csv_path, table, progress=progress)
    result = build_pool(table, out, image_col="path", caption_col="caption", time_col="dateuploaded",
                        time_format="unix", image_root=images, workers=workers, progress=progress)
    return counts, result
