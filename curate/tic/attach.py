"""Ingest TiC-DataComp's published artifacts into a catalog as uid-keyed views.

Input is a directory holding the artifacts as TiC ships them (any subset of):

* ``tic-datacomp_training_yearly_noeval/{YYYY}.npy`` + ``sizes.json`` ``{year: count}``,
* ``tic-datacomp_training_monthly/{YYYYMM}.npy`` or ``{YYYY}.tar`` archives of them,
  + ``sizes.json`` ``{YYYYMM: count}``,
* ``tic-datacomp_retrieval_evals_year2uids.{json,pkl}`` ``{year: [uid, ...]}``,
* ``tic-datacompnet_year2uids.{json,pkl}`` ``{year: {wnid: [uid, ...]}}``.

Each uid file becomes one parquet file under ``FEATURES/tic/`` (written atomically; a rerun
skips files already written with the right row count, so a killed attach resumes), and the
catalog gets the views ``tic_yearly(uid, year)``, ``timesplit(uid, year, month)`` (from the
monthly files, which include eval uids; from the yearly files with ``month`` NULL when no
monthly files are given), ``tic_eval(uid, task, year, wnid, class_id)`` and
``imagenet_classes(class_id, wnid)`` (timm's ImageNet-1k synset list, standard order).

Safety: monthly archives are read member by member from the tar stream, never extracted;
only regular files named ``YYYYMM.npy`` are read, links and devices are refused. Pickles go
through :func:`curate.safepickle.safe_load`; when a map exists as both JSON and pickle the JSON
is used. Every count is checked against ``sizes.json``; a month that ``sizes.json`` lists but
the archive lacks is an error.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path
from curate.catalog.connection import connect, features_dir, register_parquet_view
from curate.progress import Progress
from curate.safepickle import safe_load
from curate.subset import BadSubset, read_subset_header
from curate.tic import (DATACOMPNET_MAP, MONTHLY_DIR, RETRIEVAL_MAP, YEARLY_DIR, TicError, check_month,
                        check_year, imagenet_wnids, wnid_to_class_id)
from curate.uids import SUBSET_DTYPE, BadUid, hex_array_to_pairs, pairs_to_hex_array

CHUNK = 1 << 20  # uid records per parquet batch when converting a uid file

TIMESPLIT_SCHEMA = pa.schema([("uid", pa.string()), ("year", pa.int32()), ("month", pa.int32())])
YEARLY_SCHEMA = pa.schema([("uid", pa.string()), ("year", pa.int32())])
EVAL_SCHEMA = pa.schema([("uid", pa.string()), ("task", pa.string()), ("year", pa.int32()),
                         ("wnid", pa.string()), ("class_id", pa.int32())])


# ---- reading uid .npy files from disk or from a tar stream -------------------------------

def _read_records(f, count: int, origin: str):
    """Yield record arrays of at most CHUNK uids from an npy body stream."""
    left = count
    while left:
        n = min(left, CHUNK)
        buf = f.read(n * SUBSET_DTYPE.itemsize)
        if len(buf) != n * SUBSET_DTYPE.itemsize:
            raise TicError(f"{origin}: truncated: header says {count} uids, file ends after "
                           f"{count - left + len(buf) // SUBSET_DTYPE.itemsize}")
        yield np.frombuffer(buf, dtype=SUBSET_DTYPE)
        left -= n


def _write_uid_parquet(f, origin: str, source_id: str, dest: Path, schema: pa.Schema, consts: dict,
                       expected: int | None) -> int:
    """Convert one uid npy stream to parquet (uid + constant columns); skip if already done.

    ``source_id`` (path, size, mtime of the input) is stored in the parquet metadata, so a
    rerun skips exactly the files converted from the same input.
    """
    try:
        count = read_subset_header(f, origin)
    except BadSubset as e:
        raise TicError(str(e)) from None
    if expected is not None and count != expected:
        raise TicError(f"{origin}: holds {count} uids but sizes.json says {expected}")
    if dest.exists():
        try:
            meta = pq.read_schema(dest).metadata or {}
            if meta.get(b"curate.source") == source_id.encode():
                return count  # written by an earlier (possibly killed) run from the same input
        except Exception:  # noqa: BLE001 - a damaged output is simply rewritten
            pass
    schema = schema.with_metadata({"curate.source": source_id})
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema) as w:
        for rec in _read_records(f, count, origin):
            cols = {"uid": pairs_to_hex_array(rec["f0"], rec["f1"])}
            for k, v in consts.items():
                cols[k] = pa.array(np.full(len(rec), v, dtype=np.int32))
            w.write_table(pa.table(cols, schema=schema))
        if count == 0:
            w.write_table(schema.empty_table())
    return count


def _file_id(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read_sizes(path: Path, kind: str) -> dict[str, int]:
    if not path.is_file():
        raise TicError(f"{path}: sizes.json not found; TiC ships one beside the {kind} uid files "
                       f"and curate checks every file's count against it")
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TicError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(sizes, dict):
        raise TicError(f"{path}: expected an object {{split: count}}, got {type(sizes).__name__}")
    for k, v in sizes.items():
        (check_year if kind == "yearly" else check_month)(k, f"{path}: key {k!r}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise TicError(f"{path}: count for {k!r} is {v!r}, expected a non-negative integer")
    return {str(k): v for k, v in sizes.items()}


# ---- eval maps -----------------------------------------------------------------------------

def _load_map(tic_dir: Path, stem: str):
    """The JSON map if present (preferred), else the pickle through the restricted loader."""
    js, pk = tic_dir / f"{stem}.json", tic_dir / f"{stem}.pkl"
    if js.is_file():
        try:
            return json.loads(js.read_text()), js
        except json.JSONDecodeError as e:
            raise TicError(f"{js}: not valid JSON ({e})") from None
    if pk.is_file():
        return safe_load(pk), pk
    return None, None


def _uid_list(values, origin: str) -> list[str]:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TicError(f"{origin}: expected a list of uids, got {type(values).__name__}")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise TicError(f"{origin}: uid #{bad} is {values[bad]!r}, not a 32-character hex string")
    try:
        hex_array_to_pairs(pa.array(values, pa.string()))
    except BadUid as e:
        raise TicError(f"{origin}: uid #{e.position} {e.value!r} is not 32 hexadecimal characters") from None
    return [v.lower() for v in values]


def eval_rows(retrieval, retrieval_src, datacompnet, datacompnet_src) -> pa.Table:
    """The ``tic_eval`` table from the two maps (validated: years, uids, wnids)."""
    uids, tasks, years, wnids, classes = [], [], [], [], []
    if retrieval is not None:
        if not isinstance(retrieval, dict):
            raise TicError(f"{retrieval_src}: expected {{year: [uid, ...]}}, got {type(retrieval).__name__}")
        for y, lst in retrieval.items():
            year = check_year(y, f"{retrieval_src}: key {y!r}")
            got = _uid_list(lst, f"{retrieval_src}: year {year}")
            uids += got
            tasks += ["retrieval"] * len(got)
            years += [year] * len(got)
            wnids += [None] * len(got)
            classes += [None] * len(got)
    if datacompnet is not None:
        cid = wnid_to_class_id()
        if not isinstance(datacompnet, dict):
            raise TicError(f"{datacompnet_src}: expected {{year: {{wnid: [uid, ...]}}}}, got {type(datacompnet).__name__}")
        for y, per in datacompnet.items():
            year = check_year(y, f"{datacompnet_src}: key {y!r}")
            if not isinstance(per, dict):
                raise TicError(f"{datacompnet_src}: year {year}: expected {{wnid: [uid, ...]}}, got {type(per).__name__}")
            for w, lst in per.items():
                if w not in cid:
                    raise TicError(f"{datacompnet_src}: year {year}: {w!r} is not an ImageNet-1k wnid")
                got = _uid_list(lst, f"{datacompnet_src}: year {year} wnid {w}")
                uids += got
                tasks += ["datacompnet"] * len(got)
                years += [year] * len(got)
                wnids += [w] * len(got)
                classes += [cid[w]] * len(got)
    return pa.table([pa.array(uids, pa.string()), pa.array(tasks, pa.string()), pa.array(years, pa.int32()),
                     pa.array(wnids, pa.string()), pa.array(classes, pa.int32())], schema=EVAL_SCHEMA)


# ---- attach ---------------------------------------------------------------------------------

@dataclass
class AttachResult:
    yearly: dict[int, int] = field(default_factory=dict)
    monthly: dict[int, int] = field(default_factory=dict)
    eval_counts: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    views: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def _tar_months(tar_path: Path, year: int, listed: dict[str, int]):
    """(member, yyyymm) for the monthly npy files of one yearly archive, checked against sizes.json."""
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise TicError(f"{tar_path}: not a readable tar archive ({e})") from None
    found = {}
    for m in tar.getmembers():
        base = os.path.basename(m.name.rstrip("/"))
        if m.isdir() or base.startswith("._") or not base.endswith(".npy"):
            continue  # directories, macOS resource forks, READMEs
        if not m.isfile():
            raise TicError(f"{tar_path}: member {m.name!r} is a link or device, not a file; refused")
        y, mo = check_month(base[:-4], f"{tar_path}: member {m.name!r}")
        if y != year:
            raise TicError(f"{tar_path}: member {m.name!r} is a month of {y}, not of {year}")
        key = f"{y}{mo:02d}"
        if key in found:
            raise TicError(f"{tar_path}: month {key} appears twice ({found[key].name!r}, {m.name!r})")
        found[key] = m
    want = sorted(k for k in listed if k.startswith(str(year)))
    missing = [k for k in want if k not in found]
    if missing:
        raise TicError(f"{tar_path}: month {missing[0]} is listed in sizes.json but missing from the archive"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in found if k not in listed]
    if extra:
        raise TicError(f"{tar_path}: month {extra[0]} is in the archive but not in sizes.json")
    return tar, [(found[k], k) for k in sorted(found)]


def attach(catalog, tic_dir, progress: bool = False) -> AttachResult:
    """Ingest the TiC artifacts under ``tic_dir`` into ``catalog`` (see the module docstring)."""
    t0 = time.perf_counter()
    tic_dir = Path(tic_dir)
    if not tic_dir.is_dir():
        raise TicError(f"{tic_dir}: TiC artifact directory not found")
    catalog = Path(catalog)
    con = connect(catalog)
    out = features_dir(con, catalog) / "tic"
    con.close()
    res = AttachResult()

    ydir, mdir = tic_dir / YEARLY_DIR, tic_dir / MONTHLY_DIR
    yearly_files: list[Path] = []
    if ydir.is_dir():
        sizes = _read_sizes(ydir / "sizes.json", "yearly")
        npys = {p.stem: p for p in ydir.glob("*.npy")}
        for stem in npys:
            check_year(stem, f"{npys[stem]}")
        for key in sizes:
            if key not in npys:
                raise TicError(f"{ydir}: {key}.npy is listed in sizes.json but missing")
        for stem, p in Progress(sorted(npys.items()), desc="tic yearly", unit="file", disable=not progress):
            if stem not in sizes:
                raise TicError(f"{p}: year {stem} is not in sizes.json")
            year = int(stem)
            dest = out / "yearly" / f"{year}.parquet"
            with open(p, "rb") as f:
                res.yearly[year] = _write_uid_parquet(f, str(p), _file_id(p), dest, YEARLY_SCHEMA,
                                                      {"year": year}, sizes[stem])
            yearly_files.append(dest)
        res.sources["yearly"] = str(ydir)

    monthly_files: list[Path] = []
    if mdir.is_dir():
        sizes = _read_sizes(mdir / "sizes.json", "monthly")
        npys = sorted(mdir.glob("*.npy"))
        tars = sorted(mdir.glob("*.tar"))
        jobs = []  # (opener, origin, yyyymm)
        for p in npys:
            y, mo = check_month(p.stem, str(p))
            jobs.append((p, f"{y}{mo:02d}"))
        have = {k for _, k in jobs}
        tar_jobs = []
        for t in tars:
            year = check_year(t.stem, str(t))
            tar, members = _tar_months(t, year, sizes)
            tar_jobs.append((t, tar, members))
            twice = next((k for _, k in members if k in have), None)
            if twice:
                raise TicError(f"{t}: month {twice} is also given as {mdir / (twice + '.npy')} or in another archive")
            have |= {k for _, k in members}
        missing = [k for k in sorted(sizes) if k not in have]
        if missing:
            raise TicError(f"{mdir}: month {missing[0]} is listed in sizes.json but has no {missing[0]}.npy "
                           f"(nor a {missing[0][:4]}.tar holding it)")
        bar = Progress(total=len(have), desc="tic monthly", unit="month", disable=not progress)
        for p, key in jobs:
            if key not in sizes:
                raise TicError(f"{p}: month {key} is not in sizes.json")
            dest = out / "monthly" / f"{key}.parquet"
            with open(p, "rb") as f:
                res.monthly[int(key)] = _write_uid_parquet(
                    f, str(p), _file_id(p), dest, TIMESPLIT_SCHEMA,
                    {"year": int(key[:4]), "month": int(key[4:])}, sizes[key])
            monthly_files.append(dest)
            bar.update()
        for t, tar, members in tar_jobs:
            with tar:
                for member, key in members:
                    dest = out / "monthly" / f"{key}.parquet"
                    f = tar.extractfile(member)  # a stream over the member's bytes; nothing is written
                    res.monthly[int(key)] = _write_uid_parquet(
                        f, f"{t}:{member.name}", f"{_file_id(t)}:{member.name}", dest, TIMESPLIT_SCHEMA,
                        {"year": int(key[:4]), "month": int(key[4:])}, sizes[key])
                    monthly_files.append(dest)
                    bar.update()
        bar.close()
        res.sources["monthly"] = str(mdir)

    retrieval, rsrc = _load_map(tic_dir, RETRIEVAL_MAP)
    dcn, dsrc = _load_map(tic_dir, DATACOMPNET_MAP)
    if rsrc:
        res.sources["retrieval"] = str(rsrc)
    if dsrc:
        res.sources["datacompnet"] = str(dsrc)
    table = eval_rows(retrieval, rsrc, dcn, dsrc)
    eval_file = out / "eval.parquet"
    with atomic_path(eval_file) as tmp:
        pq.write_table(table, tmp)
    for task in ("retrieval", "datacompnet"):
        res.eval_counts[task] = int(pa.compute.sum(pa.compute.equal(table["task"], task)).as_py() or 0)

    if not yearly_files and not monthly_files:
        raise TicError(f"{tic_dir}: no {YEARLY_DIR}/ or {MONTHLY_DIR}/ directory with uid files")
    if yearly_files:
        register_parquet_view(catalog, "tic_yearly", yearly_files)
        res.views.append("tic_yearly")
    if monthly_files:
        register_parquet_view(catalog, "timesplit", monthly_files)
    else:  # eval uids are absent from the yearly files: they have no timesplit row then
        register_parquet_view(catalog, "timesplit", yearly_files, "uid, year, CAST(NULL AS INTEGER) AS month")
    register_parquet_view(catalog, "tic_eval", [eval_file])
    classes_file = out / "imagenet_classes.parquet"
    with atomic_path(classes_file) as tmp:
        wnids = imagenet_wnids()
        pq.write_table(pa.table({"class_id": pa.array(range(len(wnids)), pa.int32()),
                                 "wnid": pa.array(wnids, pa.string())}), tmp)
    register_parquet_view(catalog, "imagenet_classes", [classes_file])
    res.views += ["timesplit", "tic_eval", "imagenet_classes"]

    if yearly_files and monthly_files:
        # The yearly files are the monthly ones minus eval uids; say where that does not hold.
        con = connect(catalog)
        got = dict(con.execute(
            "SELECT year, count(*) FROM timesplit WHERE uid NOT IN (SELECT uid FROM tic_eval) GROUP BY year"
        ).fetchall())
        con.close()
        for year in sorted(set(got) | set(res.yearly)):
            if got.get(year, 0) != res.yearly.get(year, 0):
                res.mismatches.append(f"year {year}: yearly file has {res.yearly.get(year, 0)} uids, "
                                      f"monthly files minus eval uids have {got.get(year, 0)}")
    res.elapsed = time.perf_counter() - t0
    return res
