"""Write TiC-DataComp's published artifacts for any pool, so the TiC path is testable offline.

The real artifacts describe the 12.8B-sample xlarge pool and cannot be downloaded here. This
writes the same files, in the same formats and names, for the pool of a catalog:

* ``tic-datacomp_training_yearly_noeval/{YYYY}.npy`` + ``sizes.json`` (eval uids removed),
* ``tic-datacomp_training_monthly/{YYYYMM}.npy`` (or one ``{YYYY}.tar`` of them per year)
  + ``sizes.json`` (eval uids included, as TiC's monthly files are),
* ``tic-datacomp_retrieval_evals_year2uids.{json,pkl}``: ``{year: [uid, ...]}``,
* ``tic-datacompnet_year2uids.{json,pkl}``: ``{year: {wnid: [uid, ...]}}`` (ndarray values in
  the pickle, as TiC ships them).

Each uid's month, eval role and ImageNet class come from ``md5(seed || uid)``, so the same
pool and seed give the same files; the hash is computed in DuckDB and re-derivable in Python
(``hashlib.md5``), which tests use to work out expected splits independently.
"""

from __future__ import annotations

import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.atomic import atomic_path, write_json
from curate.catalog.connection import connect
from curate.subset import write_subset
from curate.tic import DATACOMPNET_MAP, MONTHLY_DIR, RETRIEVAL_MAP, YEARLY_DIR, imagenet_wnids
from curate.uids import hex_array_to_pairs, sort_pairs

#: Common Crawl snapshot months 2014-03 .. 2022-12 with TiC's known gaps (no 2014-05/06,
#: no 2022-02..04); the generator spreads the pool over these uniformly.
DEFAULT_MONTHS = tuple(
    y * 100 + m
    for y in range(2014, 2023)
    for m in range(1, 13)
    if not (y == 2014 and m in (1, 2, 5, 6)) and not (y == 2022 and m in (2, 3, 4))
)


@dataclass
class Assignment:
    """The rule mapping a uid to its month and eval role (documented so tests can recompute it)."""

    seed: int = 0
    retrieval_fraction: float = 0.05
    datacompnet_fraction: float = 0.05
    months: tuple[int, ...] = DEFAULT_MONTHS
    n_classes: int = 10  # wnids used for DataCompNet: every 100th ImageNet class (0, 100, ...)

    def wnids(self) -> list[str]:
        all_ = imagenet_wnids()
        return [all_[i * (1000 // self.n_classes)] for i in range(self.n_classes)]

    def sql(self) -> str:
        """(uid, yyyymm, task, wnid) for every distinct pool uid; parameters: see ``params``."""
        return """
            WITH h AS (SELECT DISTINCT uid, md5(?::VARCHAR || uid) AS h FROM pool),
            a AS (
                SELECT uid,
                       (?::INTEGER[])[1 + (('0x' || h[1:8])::UBIGINT % ?)::INTEGER] AS yyyymm,
                       ('0x' || h[9:16])::UBIGINT / 4294967296.0 AS r,
                       (('0x' || h[17:24])::UBIGINT % ?)::INTEGER AS k
                FROM h)
            SELECT uid, yyyymm,
                   CASE WHEN r < ? THEN 'retrieval' WHEN r < ? THEN 'datacompnet' END AS task,
                   CASE WHEN r >= ? AND r < ? THEN (?::VARCHAR[])[1 + k] END AS wnid
            FROM a"""

    def params(self) -> list:
        r, d = self.retrieval_fraction, self.retrieval_fraction + self.datacompnet_fraction
        return [str(self.seed), list(self.months), len(self.months), self.n_classes, r, d, r, d, self.wnids()]


def _pairs(uids: list[str]) -> np.ndarray:
    hi, lo = hex_array_to_pairs(pa.array(uids, pa.string()))
    return sort_pairs(hi, lo)


def _write_npy(path: Path, uids: list[str]) -> None:
    hi, lo = _pairs(uids)
    write_subset(path, hi, lo)


def make_tic_artifacts(catalog, out, *, assignment: Assignment | None = None, monthly: str = "npy",
                       formats: tuple[str, ...] = ("json", "pkl")) -> dict:
    """Write TiC-format artifacts for the pool of ``catalog`` under ``out``; return counts.

    ``monthly`` is ``"npy"`` (one file per month, as on Hugging Face) or ``"tar"`` (one
    ``{YYYY}.tar`` of monthly npy files per year, as on docs-assets). ``formats`` picks which
    of the eval maps' encodings to write.
    """
    a = assignment or Assignment()
    out = Path(out)
    con = connect(catalog)
    rows = con.execute(a.sql() + " ORDER BY yyyymm, uid", a.params()).fetchall()
    con.close()
    by_month: dict[int, list[str]] = {}
    yearly: dict[int, list[str]] = {}
    retrieval: dict[int, list[str]] = {}
    dcn: dict[int, dict[str, list[str]]] = {}
    for uid, yyyymm, task, wnid in rows:
        year = yyyymm // 100
        by_month.setdefault(yyyymm, []).append(uid)
        if task is None:
            yearly.setdefault(year, []).append(uid)
        elif task == "retrieval":
            retrieval.setdefault(year, []).append(uid)
        else:
            dcn.setdefault(year, {}).setdefault(wnid, []).append(uid)
    ydir, mdir = out / YEARLY_DIR, out / MONTHLY_DIR
    for year, uids in yearly.items():
        _write_npy(ydir / f"{year}.npy", uids)
    write_json(ydir / "sizes.json", {str(y): len(u) for y, u in sorted(yearly.items())})
    if monthly == "npy":
        for m, uids in by_month.items():
            _write_npy(mdir / f"{m}.npy", uids)
    elif monthly == "tar":
        staging = out / ".staging"
        for year in sorted({m // 100 for m in by_month}):
            with atomic_path(mdir / f"{year}.tar") as tmp, tarfile.open(tmp, "w") as tar:
                for m in sorted(x for x in by_month if x // 100 == year):
                    f = staging / f"{m}.npy"
                    _write_npy(f, by_month[m])
                    tar.add(f, arcname=f"{year}/{m}.npy")
                    f.unlink()
        staging.rmdir() if staging.exists() else None
    else:
        raise ValueError(f"monthly must be 'npy' or 'tar', not {monthly!r}")
    write_json(mdir / "sizes.json", {str(m): len(u) for m, u in sorted(by_month.items())})
    if "json" in formats:
        write_json(out / f"{RETRIEVAL_MAP}.json", {str(y): u for y, u in sorted(retrieval.items())})
        write_json(out / f"{DATACOMPNET_MAP}.json", {str(y): d for y, d in sorted(dcn.items())})
    if "pkl" in formats:
        with atomic_path(out / f"{RETRIEVAL_MAP}.pkl") as tmp:
            tmp.write_bytes(pickle.dumps({y: u for y, u in sorted(retrieval.items())}))
        with atomic_path(out / f"{DATACOMPNET_MAP}.pkl") as tmp:
            tmp.write_bytes(pickle.dumps(
                {y: {w: np.array(u, dtype=object) for w, u in d.items()} for y, d in sorted(dcn.items())}))
    counts = {
        "pool_uids": len(rows),
        "months": len(by_month),
        "train": sum(map(len, yearly.values())),
        "retrieval": sum(map(len, retrieval.values())),
        "datacompnet": sum(len(u) for d in dcn.values() for u in d.values()),
    }
    (out / "README.generated").write_text(
        "TiC-format artifacts generated by curate.tic.artifacts for a test pool (not TiC's data).\n"
        + json.dumps({"assignment": {"seed": a.seed, "retrieval_fraction": a.retrieval_fraction,
                                     "datacompnet_fraction": a.datacompnet_fraction,
                                     "n_classes": a.n_classes}, "counts": counts}, indent=2) + "\n")
    return counts
