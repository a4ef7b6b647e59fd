"""Download a pool (or your own data) into img2dataset shards: verified, resumable, reported.

This is DataComp's ``download_upstream.py`` with three additions. Metadata comes from the
Hugging Face hub through ``huggingface_hub.snapshot_download`` (resumable; offline it fails at
once and says how to place the files by hand) or from a directory you give (bring your own
data: parquet files with ``uid``, ``url``, ``text`` and, unless blurring is skipped,
``face_bboxes``). Images are fetched by the real img2dataset with DataComp's settings (10,000
samples per shard, 8-digit shard names, ``uid`` saved in each sample's json, face blurring from
``face_bboxes``, sha256 of the downloaded bytes, incremental mode so a re-run skips every shard
whose ``_stats.json`` exists) plus ``verify_hash=["sha256", "sha256"]`` when the metadata has a
``sha256`` column: bytes whose hash differs from the pool's are not written to the tars.

After img2dataset returns, every finished shard's per-shard parquet is turned into a
``download_status`` parquet (``data_dir/download_status/SSSSSSSS.parquet``: uid, shard, key,
status, error, sha256, sha256_ok), joined back to the metadata row it came from, so the statuses
(success, failed_to_download, failed_to_resize, hash_mismatch) are a table SQL can join (e.g.
which selected uids are really in the shards). State files live in ``data_dir``, never in
``shards/``: img2dataset treats every ``shards/*.json`` as a finished shard's stats.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import atomic_path, write_json
from curate.catalog.connection import catalog_meta, connect, init_catalog, register_parquet_view
from curate.catalog.schema import POOL_COLUMNS, POOL_SCHEMA, check_columns, extra_columns, read_footer
from curate.engine import die_with_parent
from curate.errors import CurateError
from curate.progress import Progress

#: DataComp's hub repositories per scale (download_upstream.py).
HUB_REPOS = {
    "small": "mlfoundations/datacomp_small",
    "medium": "mlfoundations/datacomp_medium",
    "large": "mlfoundations/datacomp_large",
    "xlarge": "mlfoundations/datacomp_xlarge",
    "datacomp_1b": "mlfoundations/datacomp_1b",
}
SAMPLES_PER_SHARD = 10_000  # DataComp's number_sample_per_shard; the (file, row) -> shard rule needs it
OOM_SHARD_COUNT = 8  # 8-digit shard names
STATUSES = ("success", "failed_to_download", "failed_to_resize", "hash_mismatch")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
HUB_COMPLETE = ".curate_metadata_complete"  # dot-name: ignored by img2dataset and the catalog
MANIFEST = "download_manifest.json"
REPORT = "download_report.json"
STATUS_DIR = "download_status"
POOL_METADATA_DIR = "pool_metadata"  # bring-your-own metadata in the CommonPool format (--catalog)

#: The pool columns img2dataset reads (``face_bboxes`` too, unless blurring is skipped).
REQUIRED_COLUMNS = ("uid", "url", "text")


class DownloadError(CurateError):
    """Metadata, paths or network conditions that stop a download before it can do harm."""


# ---------------------------------------------------------------------------------------------
# metadata


@dataclass
class MetadataFile:
    path: Path
    num_rows: int
    first_shard: int  # img2dataset numbering: ceil(rows / 10000) shards per file, continued

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // SAMPLES_PER_SHARD)


@dataclass
class Metadata:
    files: list[MetadataFile]
    has_sha256: bool
    has_face_bboxes: bool

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def num_shards(self) -> int:
        return sum(f.num_shards for f in self.files)

    def file_of_shard(self, shard: int) -> MetadataFile:
        for f in self.files:
            if f.first_shard <= shard < f.first_shard + f.num_shards:
                return f
        raise DownloadError(f"shard {shard:08d}: no metadata file maps to it ({self.num_shards} shards expected)")

    def rows_of_shard(self, shard: int, columns: list[str]) -> tuple[MetadataFile, int, pa.Table]:
        """img2dataset's rule: shard S holds rows ``first .. first + 10,000`` of one file, with
        ``first = (S - first_shard) * 10,000``; sample key ``S * 10**4 + r`` is row ``first + r``.
        Returns (file, first, those rows' ``columns``), reading only the row groups that hold them."""
        f = self.file_of_shard(shard)
        first = (shard - f.first_shard) * SAMPLES_PER_SHARD
        return f, first, read_rows(f.path, columns, first, min(first + SAMPLES_PER_SHARD, f.num_rows))


def read_rows(path: Path, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a parquet file, reading only the row groups that overlap them."""
    pf = pq.ParquetFile(path)
    groups, offset, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def _null_count(path: Path, meta: pq.FileMetaData, column: str) -> int:
    """Nulls in one column: from row-group statistics when every group has them, else a scan."""
    idx = meta.schema.names.index(column)
    total = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(idx).statistics
        if stats is None or not stats.has_null_count:
            break
        total += stats.null_count
    else:
        return total
    pf = pq.ParquetFile(path)
    return sum(b.column(0).null_count for b in pf.iter_batches(columns=[column], batch_size=65536))


def check_metadata(metadata_dir: str | os.PathLike, blur: bool = True, verify: bool = True) -> Metadata:
    """Check every parquet in ``metadata_dir`` before a single byte is downloaded.

    Columns img2dataset reads must exist with the same types in every file (a mixed directory
    would otherwise fail halfway through, or shift shard numbers; types are checked as the
    catalog checks them, :mod:`curate.catalog.schema`). ``sha256`` is optional; when
    present and ``verify`` is on, it may hold no nulls (img2dataset would count a null as a
    mismatch and drop the image).
    """
    metadata_dir = Path(metadata_dir)
    if not metadata_dir.is_dir():
        raise DownloadError(f"{metadata_dir}: metadata directory not found")
    # the same order img2dataset reads them in: sorted(glob('*.parquet'))
    paths = sorted(p for p in metadata_dir.glob("*.parquet") if not p.name.startswith("."))
    if not paths:
        raise DownloadError(f"{metadata_dir}: no .parquet files (put your metadata there, or omit "
                            f"--metadata-dir to fetch a DataComp pool from the hub)")
    needed = {c: POOL_COLUMNS[c] for c in REQUIRED_COLUMNS + (("face_bboxes",) if blur else ())}
    files, first_types, first_path = [], None, None
    shard = 0
    has_sha = []
    for path in paths:
        meta, types = read_footer(path, path, DownloadError)

        def missing(col: str) -> str:
            hint = " (or pass --skip-bbox-blurring)" if col == "face_bboxes" else ""
            return f"; download needs {', '.join(needed)}{hint}; found {', '.join(types) or 'no columns'}"

        check_columns(path, types, needed, DownloadError, missing)
        if "sha256" in types:  # optional; when present, a string like the pool's
            check_columns(path, types, {"sha256": POOL_COLUMNS["sha256"]}, DownloadError)
        watched = {c: str(types[c]) for c in [*needed, "sha256"] if c in types}
        if first_types is None:
            first_types, first_path = watched, path
        elif watched != first_types:
            diff = sorted(set(watched.items()) ^ set(first_types.items()))[0][0]
            raise DownloadError(
                f"{path}: column '{diff}' is {watched.get(diff, 'absent')} here but "
                f"{first_types.get(diff, 'absent')} in {first_path.name}; all metadata files must "
                f"have the same schema (mixed schemas)")
        has_sha.append("sha256" in types)
        if "sha256" in types and verify:
            nulls = _null_count(path, meta, "sha256")
            if nulls:
                raise DownloadError(f"{path}: column 'sha256' has {nulls} null values; img2dataset would "
                                    f"drop those images as hash mismatches (pass --no-verify-hash)")
        files.append(MetadataFile(path.resolve(), meta.num_rows, shard))
        shard += -(-meta.num_rows // SAMPLES_PER_SHARD)
    if sum(f.num_rows for f in files) == 0:
        raise DownloadError(f"{metadata_dir}: the parquet files hold no rows")
    return Metadata(files, has_sha256=all(has_sha), has_face_bboxes="face_bboxes" in first_types)


# ---------------------------------------------------------------------------------------------
# hub


def fetch_metadata(scale: str, metadata_dir: Path, cache_dir: Path, npz: bool = False) -> bool:
    """Download a DataComp pool's parquet (and npz) files from the hub; returns False if done before.

    ``snapshot_download`` skips files already in ``local_dir``, so an interrupted fetch resumes
    (DataComp's skips the step whenever ``metadata_dir`` exists, complete or not). A marker file
    records completion so that re-runs (e.g. to resume images) need no network.
    """
    if scale not in HUB_REPOS:
        raise DownloadError(f"--scale {scale!r}: expected one of {', '.join(HUB_REPOS)}")
    repo = HUB_REPOS[scale]
    marker = metadata_dir / HUB_COMPLETE
    if marker.is_file() and (not npz or json.loads(marker.read_text()).get("npz")):
        return False
    ext = ["parquet", "npz"] if npz else ["parquet"]
    # xlarge is stored as part_*/...; DataComp downloads */*.parquet and flattens it
    patterns = [f"*/*.{e}" if scale == "xlarge" else f"*.{e}" for e in ext]
    by_hand = (f"offline? place the pool's files by hand: on a machine with access run "
               f"`{hub_cli()} download {repo} --repo-type dataset --include '{patterns[0]}' "
               f"--local-dir {metadata_dir}`, copy {metadata_dir} here and re-run with "
               f"--metadata-dir {metadata_dir}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DownloadError(f"{repo}: HF_HUB_OFFLINE is set, cannot fetch metadata; {by_hand}")
    try:
        from huggingface_hub import snapshot_download  # lazy: optional extra [download]
    except ImportError:
        raise DownloadError(f"{repo}: huggingface_hub is not installed (pip install 'curate[download]'); "
                            f"{by_hand}") from None
    metadata_dir.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, local_dir=metadata_dir,
                          cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types; all end here
        msg = " ".join(str(e).split())[:300]
        raise DownloadError(f"{repo}: cannot fetch metadata from the Hugging Face hub "
                            f"({type(e).__name__}: {msg}); {by_hand}") from None
    if scale == "xlarge":
        for p in sorted(metadata_dir.glob("*/*")):
            if p.suffix in (".parquet", ".npz") and not p.parent.name.startswith("."):
                os.replace(p, metadata_dir / p.name)
        for d in metadata_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and not any(d.iterdir()):
                d.rmdir()
    shutil.rmtree(cache_dir, ignore_errors=True)
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"repo": repo, "npz": npz, "at": time.time()}))
    return True


# ---------------------------------------------------------------------------------------------
# images


@dataclass
class DownloadSettings:
    processes: int = 16
    threads: int = 128
    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    blur: bool = True
    verify_hash: bool = True
    retries: int = 2
    timeout: int = 10


def _check_writable(d: Path) -> None:
    """Fail before img2dataset starts if ``d`` cannot take new files (read-only, full, no perms)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".curate-write-probe-", dir=d)
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise DownloadError(f"{d}: cannot write there ({e.strerror or e}); nothing was downloaded "
                            f"or deleted") from None


def done_shards(shards_dir: Path) -> list[int]:
    """Shards img2dataset considers finished: those with ``SSSSSSSS_stats.json``."""
    out = []
    for p in shards_dir.glob("*_stats.json"):
        head = p.name.split("_")[0]
        if head.isdigit():
            out.append(int(head))
    return sorted(out)


def _check_manifest(data_dir: Path, md: Metadata, shards_dir: Path, verified: bool) -> None:
    """Refuse to resume over shards that were numbered from different metadata."""
    path = data_dir / MANIFEST
    files = [[f.path.name, f.num_rows] for f in md.files]
    for shard in done_shards(shards_dir):
        stats = shards_dir / f"{shard:08d}_stats.json"
        try:
            json.loads(stats.read_text())
        except ValueError:
            # img2dataset writes stats in place: a kill mid-write leaves a stub that would mark the
            # shard done; removing it makes img2dataset download that shard again
            stats.unlink()
    before = json.loads(path.read_text()) if path.is_file() else {}
    if before and done_shards(shards_dir):
        verified = verified and before.get("verify_hash", False)
        before = before.get("files", [])
        if before != files:
            old, new = dict(map(tuple, before)), dict(map(tuple, files))
            name = next((n for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)), "?")
            raise DownloadError(
                f"{name}: metadata changed since the shards in {shards_dir} were downloaded "
                f"({old.get(name, 'absent')} rows then, {new.get(name, 'absent')} now); shard numbers "
                f"would shift, so use a new --data-dir")
    write_json(path, {"files": files, "samples_per_shard": SAMPLES_PER_SHARD, "verify_hash": verified,
                      "metadata_dir": str(md.files[0].path.parent)})  # `curate byod score` reads it


def probe_hosts(md: Metadata, sample: int = 64, max_hosts: int = 8, timeout: float = 5.0) -> None:
    """Fail at once if none of the hosts of the first URLs accepts a connection.

    Without this, a run with the network down would record every shard as finished with 100%
    failed_to_download, and img2dataset's incremental mode would never retry them. Skipped
    when an HTTP proxy is configured (urllib would go through it, not straight to the hosts).
    """
    if any(k in urllib.request.getproxies() for k in ("http", "https")):
        return
    urls = []
    for f in md.files:
        for batch in pq.ParquetFile(f.path).iter_batches(columns=["url"], batch_size=sample):
            urls += [u for u in batch.column(0).to_pylist() if u]
            break
        if len(urls) >= sample:
            break
    hosts = {}
    for u in urls[:sample]:
        p = urllib.parse.urlsplit(u)
        if p.scheme in ("http", "https") and p.hostname:
            hosts.setdefault((p.hostname, p.port or (443 if p.scheme == "https" else 80)), u)
    if not hosts:
        return  # file:// or other schemes: nothing to probe
    errors = []
    for (host, port), url in list(hosts.items())[:max_hosts]:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return
        except OSError as e:
            errors.append((url, host, port, e))
    url, host, port, e = errors[0]
    raise DownloadError(f"{url}: cannot connect to {host}:{port} ({e.strerror or e}); none of the {len(errors)} "
                        f"hosts of the first URLs answered, so nothing was downloaded (is the network down?)")


_ARMED = False  # in an img2dataset worker process: whether it already dies with its parent


def _arm_dies_with_parent(parent: int) -> None:
    """Runs where a :class:`_DiesWithParent` is unpickled: in img2dataset's worker processes."""
    global _ARMED
    if not _ARMED and os.getpid() != parent:
        die_with_parent(parent)
        _ARMED = True


class _DiesWithParent:
    """Pickled along with img2dataset's Downloader (sent with every shard task to its pool
    workers) and its LoggerProcess (sent to that spawned process): unpickling it there makes the
    process die with the `curate download` process that started it.

    img2dataset's spawned processes do not notice their parent's death: after a ``kill -9`` of
    the command, the logger polls ``shards/`` forever and a pool worker finishes its shard,
    writing into ``shards/`` next to the re-run (which rewrites that same shard)."""

    def __init__(self, parent: int):
        self.parent = parent

    def __reduce__(self):
        return _arm_dies_with_parent, (self.parent,)


class _WorkersDieWithParent:
    """While active, the Downloader and LoggerProcess img2dataset creates carry a
    :class:`_DiesWithParent` (img2dataset has no hook for its workers' start-up)."""

    NAMES = ("Downloader", "LoggerProcess")

    def __init__(self, module):
        self.module = module
        self.saved = {n: getattr(module, n) for n in self.NAMES if hasattr(module, n)}

    def __enter__(self):
        guard = _DiesWithParent(os.getpid())

        def guarded(cls):
            def make(*args, **kwargs):
                obj = cls(*args, **kwargs)
                obj._curate_dies_with_parent = guard
                return obj
            return make

        for name, cls in self.saved.items():
            setattr(self.module, name, guarded(cls))
        return self

    def __exit__(self, *exc):
        for name, cls in self.saved.items():
            setattr(self.module, name, cls)


def run_img2dataset(metadata_dir: Path, shards_dir: Path, md: Metadata, s: DownloadSettings) -> None:
    """Call the real img2dataset with DataComp's arguments (plus hash verification); its worker
    processes die with this one (:class:`_DiesWithParent`)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI at import
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        from img2dataset import download as i2d_download  # lazy: optional extra [download]
        i2d_main = sys.modules[i2d_download.__module__]  # `img2dataset.main` is shadowed by a function
    except ImportError:
        raise DownloadError("img2dataset is not installed (pip install 'curate[download]')") from None
    verify = ["sha256", "sha256"] if (s.verify_hash and md.has_sha256) else None
    old_sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own; give ours back
    try:
        with _WorkersDieWithParent(i2d_main):
            i2d_download(
                url_list=str(metadata_dir),
                output_folder=str(shards_dir),
                input_format="parquet",
                output_format="webdataset",
                url_col="url",
                caption_col="text",
                bbox_col="face_bboxes" if s.blur else None,
                save_additional_columns=["uid"],
                number_sample_per_shard=SAMPLES_PER_SHARD,
                oom_shard_count=OOM_SHARD_COUNT,
                processes_count=s.processes,
                thread_count=s.threads,
                image_size=s.image_size,
                resize_mode=s.resize_mode,
                resize_only_if_bigger=s.resize_only_if_bigger,
                encode_format=s.encode_format,
                compute_hash="sha256",
                verify_hash=verify,
                retries=s.retries,
                timeout=s.timeout,
                incremental_mode="incremental",
                enable_wandb=False,
                distributor="multiprocessing",
            )
    finally:
        signal.signal(signal.SIGINT, old_sigint)


# ---------------------------------------------------------------------------------------------
# status table and report

STATUS_SCHEMA = pa.schema([
    ("uid", pa.string()), ("shard", pa.int32()), ("key", pa.int64()), ("status", pa.string()),
    ("error", pa.string()), ("sha256", pa.string()), ("sha256_ok", pa.bool_()),
])

_STATUS_SQL = """
SELECT s.uid,
       CAST(CAST(s.key AS BIGINT) // 10000 AS INTEGER) AS shard,
       CAST(s.key AS BIGINT) AS key,
       CASE WHEN s.status = 'failed_to_download' AND s.error_message = 'hash mismatch'
            THEN 'hash_mismatch' ELSE s.status END AS status,
       s.error_message AS error,
       s.sha256,
       CASE WHEN s.status = 'failed_to_download' AND s.error_message = 'hash mismatch' THEN false
            WHEN s.status = 'success' AND s.sha256 IS NOT NULL AND p.sha256 IS NOT NULL
            THEN s.sha256 = lower(p.sha256)
            ELSE NULL END AS sha256_ok,
       p.uid AS pool_uid, p.row AS pool_row
FROM shard_rows s LEFT JOIN pool_rows p ON p.row = ? + CAST(s.key AS BIGINT) % 10000
ORDER BY key
"""


def shard_status(con, shard: int, shards_dir: Path, md: Metadata) -> pa.Table:
    """One shard's rows with their status, checked against the metadata rows they came from."""
    path = shards_dir / f"{shard:08d}.parquet"
    try:
        shard_rows = pq.read_table(path, columns=["uid", "key", "status", "error_message", "sha256"])
    except Exception as e:  # noqa: BLE001
        raise DownloadError(f"{path}: cannot read img2dataset's shard parquet ({e})") from None
    f, first_row, pool_rows = md.rows_of_shard(shard, ["uid", "sha256"] if md.has_sha256 else ["uid"])
    if not md.has_sha256:
        pool_rows = pool_rows.append_column("sha256", pa.nulls(pool_rows.num_rows, pa.string()))
    pool_rows = pool_rows.append_column("row", pa.array(range(first_row, first_row + pool_rows.num_rows), pa.int64()))
    con.register("shard_rows", shard_rows)
    con.register("pool_rows", pool_rows)
    try:
        t = con.execute(_STATUS_SQL, [first_row]).to_arrow_table()
    finally:
        con.unregister("shard_rows")
        con.unregister("pool_rows")
    bad = con.execute("SELECT key, uid, pool_uid, pool_row FROM t WHERE pool_uid IS DISTINCT FROM uid "
                      "LIMIT 1").fetchone()
    if bad:
        raise DownloadError(
            f"{path}: key {bad[0]:012d} has uid {bad[1]} but {f.path.name} row {bad[3]} has uid {bad[2]}; "
            f"the metadata changed since this shard was downloaded")
    return t.select(STATUS_SCHEMA.names).cast(STATUS_SCHEMA)


def update_status(data_dir: Path, md: Metadata, progress: bool = True) -> list[Path]:
    """Write ``download_status/SSSSSSSS.parquet`` for every finished shard that lacks a fresh one."""
    shards_dir = data_dir / "shards"
    status_dir = data_dir / STATUS_DIR
    status_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    out = []
    for shard in Progress(done_shards(shards_dir), desc="status", unit="shard", disable=not progress):
        dest = status_dir / f"{shard:08d}.parquet"
        stats = shards_dir / f"{shard:08d}_stats.json"
        if not (dest.is_file() and dest.stat().st_mtime_ns >= stats.stat().st_mtime_ns):
            t = shard_status(con, shard, shards_dir, md)
            with atomic_path(dest) as tmp:
                pq.write_table(t, tmp)
        out.append(dest)
    con.close()
    return out


@dataclass
class DownloadReport:
    data_dir: Path
    counts: dict[str, int]
    expected: int  # rows in the metadata
    shards_done: int
    shards_expected: int
    sha256_differs_kept: int  # successes whose bytes differ from the pool's (only without verification)
    verified: bool
    top_errors: list[tuple[str, str, int]] = field(default_factory=list)
    status_files: list[Path] = field(default_factory=list)
    elapsed: float = 0.0
    metadata: Metadata | None = None  # the metadata the shards came from
    catalog: DownloadCatalog | None = None  # what ``catalog=`` made (see :func:`download_catalog`)

    @property
    def attempted(self) -> int:
        return sum(self.counts.values())

    def table(self) -> list[str]:
        n = self.attempted or 1
        lines = [f"{'status':<20}{'count':>10}{'rate':>9}"]
        for st in STATUSES:
            c = self.counts.get(st, 0)
            lines.append(f"{st:<20}{c:>10,}{100.0 * c / n:>8.2f}%")
        lines.append(f"{'attempted':<20}{self.attempted:>10,}")
        pending = self.expected - self.attempted
        lines.append(f"{'not yet attempted':<20}{pending:>10,}  "
                     f"({self.shards_done} of {self.shards_expected} shards done"
                     + ("; run the same command again to finish them)" if pending else ")"))
        if not self.verified:
            lines.append("sha256 not verified by img2dataset (no sha256 column or --no-verify-hash); "
                         f"{self.sha256_differs_kept:,} kept images differ from the metadata's sha256")
        for st, err, c in self.top_errors:
            lines.append(f"  {st}: {c:,} x {err}")
        return lines

    def to_json(self) -> dict:
        n = self.attempted or 1
        return {
            "counts": {st: self.counts.get(st, 0) for st in STATUSES},
            "rates": {st: self.counts.get(st, 0) / n for st in STATUSES},
            "attempted": self.attempted, "expected": self.expected,
            "shards_done": self.shards_done, "shards_expected": self.shards_expected,
            "verified": self.verified, "sha256_differs_kept": self.sha256_differs_kept,
            "top_errors": [list(e) for e in self.top_errors],
        }


def build_report(data_dir: Path, md: Metadata, status_files: list[Path], verified: bool) -> DownloadReport:
    counts, differs, top = {}, 0, []
    if status_files:
        con = duckdb.connect()
        con.read_parquet([str(p) for p in status_files]).create_view("st")  # DDL cannot bind file lists
        counts = dict(con.execute("SELECT status, count(*) FROM st GROUP BY status").fetchall())
        differs = con.execute("SELECT count(*) FROM st WHERE status = 'success' AND sha256_ok = false"
                              ).fetchone()[0]
        top = con.execute("SELECT status, error, count(*) AS n FROM st WHERE status <> 'success' "
                          "GROUP BY ALL ORDER BY n DESC, status, error LIMIT 5").fetchall()
        con.close()
    unknown = set(counts) - set(STATUSES)
    if unknown:
        raise DownloadError(f"{data_dir / STATUS_DIR}: unexpected img2dataset status {sorted(unknown)[0]!r}")
    return DownloadReport(data_dir, counts, md.num_rows, len(status_files), md.num_shards, differs, verified,
                          [(s, e, int(n)) for s, e, n in top], status_files, metadata=md)


def register_status_view(catalog: str | os.PathLike, status_files: list[Path], data_dir: Path,
                         metadata_dir: Path | None = None) -> None:
    """Register ``download_status`` in a catalog (creating the catalog over ``data_dir`` if absent)."""
    if not status_files:
        raise DownloadError(f"{data_dir}: no finished shard yet, nothing to register")
    if not Path(catalog).exists():
        init_catalog(catalog, metadata=metadata_dir or data_dir / "metadata", shards=data_dir / "shards")
    register_parquet_view(catalog, "download_status", status_files)


def lacks_pool_columns(md: Metadata) -> list[str]:
    """The CommonPool columns the metadata files do not have (none for a CommonPool download)."""
    names = set(pq.read_schema(md.files[0].path).names)
    return [c for c in POOL_COLUMNS if c not in names]


def _shard_sizes(shards_dir: Path, shard: int) -> dict[int, tuple[int | None, int | None]]:
    """Row in the shard -> (original_width, original_height) img2dataset recorded for the
    samples it downloaded (``status = 'success'``) of a finished shard; {} for an unfinished one."""
    path = shards_dir / f"{shard:08d}.parquet"
    if not (shards_dir / f"{shard:08d}_stats.json").is_file() or not path.is_file():
        return {}
    try:
        t = pq.read_table(path, columns=["key", "status", "original_width", "original_height"])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DownloadError(f"{path}: cannot read img2dataset's shard parquet ({e})") from None
    out = {}
    for key, status, w, h in zip(*(t.column(c).to_pylist() for c in t.column_names)):
        if status == "success":
            out[int(key) % SAMPLES_PER_SHARD] = (w, h)
    return out


def write_pool_metadata(data_dir: str | os.PathLike, md: Metadata, progress: bool = True) -> Path:
    """``DATA_DIR/pool_metadata/``: your metadata in the CommonPool format, one parquet per
    metadata file (same name, same rows in the same order, so the catalog's ``(file, row) ->
    (shard, key)`` rule holds), for a catalog over a bring-your-own-data download.

    The nine columns: those your metadata has are kept (cast to the pool's types);
    ``original_width``/``original_height`` otherwise come from img2dataset's record of each
    downloaded image (NULL where the image was not downloaded, or its shard is not finished);
    ``clip_b32_similarity_score``/``clip_l14_similarity_score`` are NULL (``curate byod score``
    computes them); ``face_bboxes`` is empty and ``sha256`` NULL when absent. Your other columns
    follow the nine. Written per shard (10,000 rows at a time), each file under a temporary
    name; rewritten on every call, so a resumed download's newly finished shards show up.
    """
    data_dir = Path(data_dir)
    out_dir, shards_dir = data_dir / POOL_METADATA_DIR, data_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Progress(md.files, desc="pool metadata", unit="file", disable=not progress):
        src = pq.read_schema(f.path)
        extra = [src.field(n) for n in extra_columns(src.names)]
        schema = pa.schema(list(POOL_SCHEMA) + extra)
        with atomic_path(out_dir / f.path.name) as tmp:
            with pq.ParquetWriter(tmp, schema) as w:
                for shard in range(f.first_shard, f.first_shard + f.num_shards):
                    _, first, rows = md.rows_of_shard(shard, src.names)
                    w.write_table(_pool_rows(rows, schema, _shard_sizes(shards_dir, shard), f.path))
    return out_dir


def _pool_rows(rows: pa.Table, schema: pa.Schema, sizes: dict, where: Path) -> pa.Table:
    n = rows.num_rows
    cols = []
    for field_ in schema:
        name = field_.name
        if name in rows.column_names:
            try:
                cols.append(rows.column(name).cast(field_.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DownloadError(f"{where}: column '{name}' cannot be read as {field_.type} ({e})") from None
        elif name in ("original_width", "original_height"):
            i = 0 if name == "original_width" else 1
            cols.append(pa.array([sizes.get(r, (None, None))[i] for r in range(n)], field_.type))
        elif name == "face_bboxes":
            cols.append(pa.array([[]] * n, field_.type))
        else:
            cols.append(pa.nulls(n, field_.type))
    return pa.Table.from_arrays(cols, schema=schema)


def made_by_download(catalog: str | os.PathLike, data_dir: str | os.PathLike) -> bool:
    """Whether ``catalog`` is one :func:`download_catalog` made over ``DATA_DIR/pool_metadata``
    (bring-your-own metadata, not scored yet)."""
    if not Path(catalog).is_file():
        return False
    try:
        con = connect(catalog)
    except CurateError:
        return False
    try:
        recorded = catalog_meta(con).get("metadata_dir")
    finally:
        con.close()
    return recorded is not None and Path(recorded) == (Path(data_dir) / POOL_METADATA_DIR).resolve()


@dataclass
class DownloadCatalog:
    path: Path
    pool_metadata: Path | None  # DATA_DIR/pool_metadata, when written (the catalog's pool is there)
    missing: list[str]  # the pool columns your metadata lacked
    created: bool  # False: the catalog existed, only its download_status view was replaced


def download_catalog(catalog: str | os.PathLike, data_dir: str | os.PathLike, md: Metadata,
                     status_files: list[Path], progress: bool = True) -> DownloadCatalog:
    """``--catalog`` of `curate download` / `download-status`: a catalog over what was downloaded,
    with the ``download_status`` view.

    Metadata with the nine CommonPool columns (a hub pool, or your own in that format) is the
    catalog's pool as it is. Bring-your-own metadata with fewer columns (``uid, url, text``...)
    becomes :func:`write_pool_metadata`'s ``DATA_DIR/pool_metadata`` first (rewritten while the
    catalog's pool is there, so newly finished shards show up), except when it came from the hub
    (``--scale``): a CommonPool file without its columns is an error there. An existing catalog
    keeps its pool (e.g. the scored one of ``curate byod score --catalog``); its
    ``download_status`` view is replaced.
    """
    data_dir, catalog = Path(data_dir), Path(catalog)
    if not status_files:
        raise DownloadError(f"{data_dir}: no finished shard yet, nothing to register")
    missing = lacks_pool_columns(md)
    metadata_dir = md.files[0].path.parent
    if missing and (metadata_dir / HUB_COMPLETE).is_file():
        missing = []  # a CommonPool download: the catalog's own check names the missing column
    created = not catalog.exists()
    ours = missing and (created or made_by_download(catalog, data_dir))
    pool_dir = write_pool_metadata(data_dir, md, progress) if ours else None
    register_status_view(catalog, status_files, data_dir, pool_dir or metadata_dir)
    return DownloadCatalog(catalog, pool_dir, missing, created)


# ---------------------------------------------------------------------------------------------
# the whole job


def download(data_dir: str | os.PathLike, scale: str | None = "small", metadata_dir: str | os.PathLike | None = None,
             settings: DownloadSettings | None = None, skip_shards: bool = False, download_npz: bool = False,
             catalog: str | os.PathLike | None = None, progress: bool = True) -> DownloadReport | None:
    """Fetch metadata (hub or ``metadata_dir``), download images, write status files and a report.

    Re-running after a kill skips the metadata already fetched and every shard img2dataset
    finished. Returns None with ``skip_shards``. ``catalog``: then :func:`download_catalog`.
    """
    t0 = time.perf_counter()
    s = settings or DownloadSettings()
    if s.resize_mode not in RESIZE_MODES:
        raise DownloadError(f"--resize-mode {s.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    if s.encode_format not in ENCODE_FORMATS:
        raise DownloadError(f"--encode-format {s.encode_format!r}: expected one of {', '.join(ENCODE_FORMATS)}")
    data_dir = Path(data_dir)
    _check_writable(data_dir)
    if metadata_dir is None:
        metadata_dir = data_dir / "metadata"
        fetch_metadata(scale or "small", metadata_dir, data_dir / "hf", npz=download_npz)
    metadata_dir = Path(metadata_dir)
    md = check_metadata(metadata_dir, blur=s.blur, verify=s.verify_hash)
    if skip_shards:
        return None
    shards_dir = data_dir / "shards"
    _check_writable(shards_dir)
    _check_manifest(data_dir, md, shards_dir, verified=s.verify_hash and md.has_sha256)
    if len(done_shards(shards_dir)) < md.num_shards:
        probe_hosts(md)
        run_img2dataset(metadata_dir, shards_dir, md, s)
    status_files = update_status(data_dir, md, progress=progress)
    report = build_report(data_dir, md, status_files, verified=_was_verified(data_dir))
    report.elapsed = time.perf_counter() - t0
    write_json(data_dir / REPORT, report.to_json())
    if catalog is not None:
        report.catalog = download_catalog(catalog, data_dir, md, status_files, progress=progress)
    return report


def source_metadata_dir(data_dir: Path) -> Path | None:
    """The metadata ``DATA_DIR/shards`` were downloaded from: as recorded by `curate download`
    in ``download_manifest.json``, else ``DATA_DIR/metadata``; None if neither exists."""
    try:
        recorded = json.loads((Path(data_dir) / MANIFEST).read_text()).get("metadata_dir")
    except (OSError, ValueError):
        recorded = None
    for d in ([Path(recorded)] if recorded else []) + [Path(data_dir) / "metadata"]:
        if d.is_dir() and any(d.glob("*.parquet")):
            return d
    return None


def hub_cli() -> str:
    """The Hugging Face command line the installed huggingface_hub provides: ``hf`` (0.34 and
    later; the only one from 1.0) or the older ``huggingface-cli``; ``hf`` when it is absent."""
    try:
        names = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points
                 if ep.group == "console_scripts"}
    except importlib.metadata.PackageNotFoundError:
        return "hf"
    return "hf" if "hf" in names or "huggingface-cli" not in names else "huggingface-cli"


def status_report(data_dir: str | os.PathLike, metadata_dir: str | os.PathLike | None = None,
                  catalog: str | os.PathLike | None = None, progress: bool = True) -> DownloadReport:
    """Rebuild the status files and report of an existing download (no network). The metadata
    is ``metadata_dir``, else the directory the download recorded, else ``DATA_DIR/metadata``."""
    data_dir = Path(data_dir)
    metadata_dir = Path(metadata_dir) if metadata_dir else (source_metadata_dir(data_dir) or data_dir / "metadata")
    if not (data_dir / "shards").is_dir():
        raise DownloadError(f"{data_dir / 'shards'}: no shards directory (run `curate download` first)")
    md = check_metadata(metadata_dir, blur=False, verify=False)
    status_files = update_status(data_dir, md, progress=progress)
    report = build_report(data_dir, md, status_files, verified=_was_verified(data_dir))
    write_json(data_dir / REPORT, report.to_json())
    if catalog is not None:
        report.catalog = download_catalog(catalog, data_dir, md, status_files, progress=progress)
    return report


def _was_verified(data_dir: Path) -> bool:
    """Whether every img2dataset run over these shards had verify_hash (recorded in the manifest)."""
    path = data_dir / MANIFEST
    return bool(path.is_file() and json.loads(path.read_text()).get("verify_hash"))


def no_success_error(report: DownloadReport) -> DownloadError | None:
    """An error to raise when nothing at all could be downloaded (e.g. every host unreachable)."""
    if report.attempted and not report.counts.get("success"):
        err = report.top_errors[0][1] if report.top_errors else "unknown"
        return DownloadError(f"{report.data_dir}: none of {report.attempted:,} images could be downloaded "
                             f"(most common error: {err}); check that the hosts in the url column are reachable")
    return None


__all__ = ["download", "status_report", "download_catalog", "write_pool_metadata", "DownloadCatalog", "check_metadata", "fetch_metadata", "DownloadSettings",
           "DownloadReport", "DownloadError", "HUB_REPOS", "STATUSES"]
