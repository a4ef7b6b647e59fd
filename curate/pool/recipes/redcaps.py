"""TiC-RedCaps: RedCaps' per-subreddit, per-year annotation files -> a pool with yearly periods.

What TiC-CLIP's ``dataset_creation/tic-redcaps/create_splits.py`` defines, kept here:

* the files ``annotations/*_{year}.json`` for the years 2017, 2018, 2019 and 2020 (the year is
  the part of the file name after the last ``_``); each holds ``{"annotations": [...]}``;
* per annotation: image path ``{subreddit}/{image_id}.jpg`` under the images directory,
  caption = the ``caption`` field as it is;
* the period of a sample is the year of its file; a 99/1 train/test split per year with
  scikit-learn's sizes (``ceil(0.01 * n)`` test).

Kept as pool columns: ``image_id``, ``subreddit``, ``author``, ``created_utc`` (also the pool's
time column, so ``timesplit`` has real months), ``score``, ``permalink``, ``raw_caption``,
``annotation_year`` and ``annotation_file``; ``url`` is the image URL from the annotation.
Deliberate differences: files are read in sorted order (TiC: ``glob`` order); the split is by a
seeded hash of the uid (TiC's is unseeded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path, write_json
from curate.errors import CurateError
from curate.pool.build import SOURCE_DIR, BuildResult, build_pool
from curate.progress import Progress

YEARS = (2017, 2018, 2019, 2020)

TABLE_SCHEMA = pa.schema([
    ("path", pa.string()), ("caption", pa.string()), ("url", pa.string()),
    ("image_id", pa.string()), ("subreddit", pa.string()), ("author", pa.string()),
    ("created_utc", pa.float64()), ("score", pa.int64()), ("permalink", pa.string()),
    ("raw_caption", pa.string()), ("annotation_year", pa.int32()), ("annotation_file", pa.string()),
])


def annotation_files(annotations: Path, years=YEARS) -> list[tuple[int, Path]]:
    """``(year, file)`` for every ``*_{year}.json``, by year then name."""
    annotations = Path(annotations)
    if not annotations.is_dir():
        raise CurateError(f"{annotations}: annotations directory not found")
    files = [(y, p) for y in years for p in sorted(annotations.glob(f"*_{y}.json"))]
    if not files:
        raise CurateError(f"{annotations}: no annotation files *_{{year}}.json for years "
                          f"{', '.join(map(str, years))}")
    return files


def _rows(path: Path, year: int) -> dict[str, list]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CurateError(f"{path}: not a RedCaps annotation file ({e})") from None
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise CurateError(f"{path}: no \"annotations\" list")
    cols: dict[str, list] = {f.name: [] for f in TABLE_SCHEMA}
    for i, ann in enumerate(anns):
        where = f"{path}: annotation {i}"
        if not isinstance(ann, dict):
            raise CurateError(f"{where}: not an object")
        for k in ("subreddit", "image_id", "caption"):
            if not isinstance(ann.get(k), str) or (k != "caption" and not ann[k]):
                raise CurateError(f"{where}: field {k!r} is {ann.get(k)!r}, expected a string")
        created = ann.get("created_utc")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise CurateError(f"{where}: field 'created_utc' is {created!r}, expected Unix seconds")
        score = ann.get("score")
        cols["path"].append(f"{ann['subreddit']}/{ann['image_id']}.jpg")
        cols["caption"].append(ann["caption"])
        cols["url"].append(ann.get("url"))
        cols["image_id"].append(ann["image_id"])
        cols["subreddit"].append(ann["subreddit"])
        cols["author"].append(ann.get("author"))
        cols["created_utc"].append(float(created))
        cols["score"].append(score if isinstance(score, int) and not isinstance(score, bool) else None)
        cols["permalink"].append(ann.get("permalink"))
        cols["raw_caption"].append(ann.get("raw_caption"))
        cols["annotation_year"].append(year)
        cols["annotation_file"].append(path.name)
    return cols


def prepare_table(annotations: str | os.PathLike, dest: str | os.PathLike, years=YEARS,
                  progress: bool = True) -> dict:
    """Write the table ``curate pool from-table`` reads, one annotation file at a time.
    Counts per year go to ``dest`` + ``.json``; skipped when made from the same files."""
    dest = Path(dest)
    files = annotation_files(Path(annotations), years)
    source_id = "\n".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for _, p in files)
    counts_path = dest.with_name(dest.name + ".json")
    if dest.is_file() and counts_path.is_file():
        done = json.loads(counts_path.read_text())
        if done.get("source") == source_id:
            return done["counts"]
    counts: dict[str, int] = {}
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, TABLE_SCHEMA) as writer:
        for year, path in Progress(files, desc="redcaps annotations", unit="file", disable=not progress):
            table = pa.table(_rows(path, year), schema=TABLE_SCHEMA)
            writer.write_table(table)
            counts[str(year)] = counts.get(str(year), 0) + table.num_rows
    write_json(counts_path, {"source": source_id, "counts": counts})
    return counts


def build(annotations: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
          years=YEARS, workers: int | None = None, progress: bool = True) -> tuple[dict, BuildResult]:
    """The TiC-RedCaps pool under ``out`` (``source/redcaps.parquet`` is the derived table)."""
    out = Path(out)
    table = out / SOURCE_DIR / "redcaps.parquet"
    counts = prepare_table(annotations, table, years, progress=progress)
    result = build_pool(table, out, image_col="path", caption_col="caption", time_col="created_utc",
                        time_format="unix", url_col="url", image_root=images, workers=workers,
                        progress=progress)
    return counts, result
