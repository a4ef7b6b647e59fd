"""TiC-DataComp on a catalog: time splits as views, split export, eval sets, continual plans.

TiC-CLIP publishes per-year and per-month uid files and two evaluation maps for the xlarge
pool. ``attach`` turns them into the catalog views ``timesplit(uid, year, month)``,
``tic_yearly(uid, year)`` and ``tic_eval(uid, task, year, wnid, class_id)``; the filters in
``filters/tic/`` and ``export`` make every split a query (``evalsets`` reshards the eval sets
into clip_benchmark webdatasets); ``plan`` writes the training schedule of each
continual-learning strategy of the paper, ``prepare`` materialises its data dirs and
``train`` runs it step by step with the fixed trainer; ``analytics`` counts samples by time.
``artifacts`` writes TiC-format files for any pool so that all of it runs offline.

This module holds the names every part shares: the artifact file names as TiC ships them,
the valid year range and the ImageNet-1k class list (from timm's package data, read as a
plain file so that neither torch nor timm is imported).
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from curate.errors import CurateError

#: TiC-DataComp covers Common Crawl snapshots from 2014 to 2023 (2023: a few months only).
YEAR_MIN, YEAR_MAX = 2014, 2023

YEARLY_DIR = "tic-datacomp_training_yearly_noeval"
MONTHLY_DIR = "tic-datacomp_training_monthly"
RETRIEVAL_MAP = "tic-datacomp_retrieval_evals_year2uids"  # + .json or .pkl
DATACOMPNET_MAP = "tic-datacompnet_year2uids"  # + .json or .pkl
TASKS = ("retrieval", "datacompnet")

_YEAR_RE = re.compile(r"\d{4}\Z")
_MONTH_RE = re.compile(r"(\d{4})(\d{2})\Z")


class TicError(CurateError):
    """TiC artifacts or arguments that cannot be used as they are."""


def check_year(value, where: str) -> int:
    """A year as int, or an error naming ``where`` it came from."""
    text = str(value).strip()
    if not _YEAR_RE.match(text):
        raise TicError(f"{where}: {value!r} is not a year (YYYY)")
    year = int(text)
    if not YEAR_MIN <= year <= YEAR_MAX:
        raise TicError(f"{where}: year {year} is out of range {YEAR_MIN}..{YEAR_MAX}")
    return year


def check_month(value, where: str) -> tuple[int, int]:
    """``'201610'`` -> ``(2016, 10)``, or an error naming ``where`` it came from."""
    m = _MONTH_RE.match(str(value).strip())
    if not m:
        raise TicError(f"{where}: {value!r} is not a month (YYYYMM)")
    year = check_year(m.group(1), where)
    month = int(m.group(2))
    if not 1 <= month <= 12:
        raise TicError(f"{where}: month {month:02d} of {value!r} is out of range 01..12")
    return year, month


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the standard class-id order (index = class id)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise TicError("the ImageNet-1k synset list comes from timm's package data: pip install timm")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info" / "imagenet_synsets.txt"
    if not path.is_file():
        raise TicError(f"{path}: ImageNet-1k synset list not found in the installed timm")
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(wnids) != 1000:
        raise TicError(f"{path}: expected 1000 ImageNet-1k wnids, found {len(wnids)}")
    return wnids


@lru_cache(maxsize=1)
def wnid_to_class_id() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}
