"""The resharder: webdataset training shards holding exactly the samples of a subset file.

Output contract (DataComp's ``resharder.py``, reference spec section 3): ``{:08d}.tar`` shards of
at most ``shard_size`` samples whose members are the input sample's *data* members renamed
``{uid}-{j}.{ext}``, one copy per occurrence of the uid in the subset (j = 0..k-1);
``{:08d}_stats.json`` with ``successes``; ``sample_ids.npy`` (the subset file's bytes);
``meta.json`` (``output_count``, ``output_shard_count``, ``output_shard_format``, and what was
skipped and why); and ``sizes.json`` (``{"00000000.tar": n}``) so open_clip needs no
``--train-num-samples``.

How it differs from DataComp's (deliberately):

* It plans before it reads (:mod:`curate.shards.plan`). The shard index (:mod:`curate.shards.index`)
  is joined with the subset in DuckDB, so input shards with no selected sample are never opened
  and, inside a shard, only the byte ranges of selected samples are read (adjacent ranges are
  coalesced).
* Numbering is deterministic: the selected samples are ordered by (input shard, position in the
  tar), copies adjacent, and cut into output shards of ``shard_size`` samples (or 3e9 bytes);
  output shard N is therefore a fixed slice of that order and is one unit of work. Workers write
  whole output shards (one task each, run where the :class:`~curate.engine.Engine` says), each
  under a temporary name renamed on completion, its ``_stats.json`` last, so a killed run resumes
  by skipping completed shards and the result is byte-identical.
* Tar headers are written by us (:class:`curate.shards.tar.TarWriter`): USTAR, integer mtime 0,
  no PAX headers, fixed owner, so the same inputs give the same bytes.
* Several outputs can be planned at once (``reshard_many``): one index pass routes every sample
  to each output whose subset contains it; each selected byte is read once per output using it.
* Only data members are copied (:data:`DATA_EXTS`: jpg, jpeg, png, webp, txt, json, cls; DataComp
  copies every member). Any other type (``pyd``, ``pickle``, ``pth``, ``pt``, ``npy``, ...) is
  dropped and counted per type in the result, the command's output, each ``_stats.json``
  (``dropped_members``, only when some were) and ``meta.json``: webdataset's default decoders
  unpickle some types, so a crafted member in a downloaded shard would run code during training.
* Nothing that existed is destroyed: an output equal to, inside or containing an input is
  refused; ``--overwrite`` replaces only an earlier reshard output (its marker, and nothing in it
  that a reshard did not write), building the new one beside it and swapping it in when
  complete. A failed run leaves the old output as it was and no half output; a killed one
  leaves the output for the same command to resume (in place) or to rebuild (``--overwrite``).
* Input shards without ``_stats.json`` are read (DataComp silently skips them); a uid present in
  the input twice is copied from its first occurrence only (DataComp would write both under the
  same keys); a truncated tar (cut inside a member, its padding or before its end-of-archive
  blocks) loses only its possibly incomplete last sample, and is reported with the byte it ends at.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.atomic import atomic_path, file_sha256, write_json
from curate.engine import LOCAL, Engine, map_tasks
from curate.errors import CurateError
from curate.shards.plan import (
    MAX_SHARD_BYTES,
    OUTPUT_SHARD_FORMAT,
    OUTPUT_STATS_FORMAT,
    Output,
    ReshardError,
    ReshardPlan,
    ShardTask,
    load_cls_map,
    plan_reshard,
    pool_boxes,
    shard_tasks,
)
from curate.shards.tar import ShardError, TarWriter, sample_members
from curate.subset import open_subset
from curate.uids import pairs_to_hex_array

MARKER = ".curate_reshard.json"  # records the job in an output dir, so a rerun can resume it
COALESCE_GAP = 16 * 1024  # read through gaps smaller than this; larger gaps cost more to copy than a new read
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# member types copied to an output: data only (img2dataset's image types, caption, metadata,
# class). Anything else (pyd, pickle, pth, pt, npy, ...) is dropped and counted: webdataset's
# default decoders unpickle some types, so a crafted member would run code during training.
# The whole extension must match ("0.pyd" is not "pyd", and "a.pyd" is not "jpg").
DATA_EXTS = frozenset(IMAGE_EXTS + ("txt", "json", "cls"))


# ----------------------------------------------------------------------------------- results

@dataclass
class ReshardResult:
    """What a reshard did for one output: counts of the plan, of what was written and read."""

    output_dir: str
    subset_file: str
    subset_count: int = 0
    subset_entries_present: int = 0
    output_count: int = 0
    output_shard_count: int = 0
    absent_uids: int = 0  # subset entries whose uid is in no input sample
    no_json_entries: int = 0  # subset entries whose only input sample has no json member
    input_duplicates: int = 0  # selected uids found in more than one input sample (first used)
    shards_written: int = 0
    shards_resumed: int = 0  # complete output shards found from an earlier run, not rewritten
    blurred: int = 0
    input_shards_read: int = 0
    input_shards_total: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    truncated_inputs: list = field(default_factory=list)
    inputs_without_stats: list = field(default_factory=list)
    truncated_at: dict = field(default_factory=dict)  # truncated input tar name -> byte where it ends
    dropped_members: dict = field(default_factory=dict)  # member type -> members not copied (not data)
    elapsed: float = 0.0

    def summary(self) -> list[str]:
        lines = [
            f"{self.output_dir}: {self.output_count:,} samples in {self.output_shard_count} shards "
            f"({self.shards_written} written, {self.shards_resumed} already complete) from "
            f"{self.subset_count:,} subset entries",
            f"  read {self.input_shards_read} of {self.input_shards_total} input shards, "
            f"{self.bytes_read:,} of {self.bytes_total:,} bytes "
            f"({100.0 * self.bytes_read / self.bytes_total if self.bytes_total else 0:.1f}%)",
        ]
        skipped = [
            (self.absent_uids, "subset entries whose uid is not in the input"),
            (self.no_json_entries, "subset entries whose input sample has no json (DataComp drops them too)"),
            (self.input_duplicates, "selected uids present in several input samples (first one copied)"),
        ]
        for n, why in skipped:
            if n:
                lines.append(f"  skipped {n:,} {why}")
        if self.dropped_members:
            kinds = ", ".join(f"{n:,} .{ext}" for ext, n in sorted(self.dropped_members.items()))
            lines.append(f"  dropped {sum(self.dropped_members.values()):,} members that are not data "
                         f"(only {', '.join(sorted(DATA_EXTS))} are copied): {kinds}")
        if self.blurred:
            lines.append(f"  blurred faces in {self.blurred:,} images (re-encoded as webp)")
        if self.truncated_inputs:
            named = [f"{n} (ends at byte {self.truncated_at[n]})" if n in self.truncated_at else n
                     for n in self.truncated_inputs[:3]]
            lines.append(f"  {len(self.truncated_inputs)} truncated input tars (cut inside a member or "
                         f"missing the end-of-archive blocks; last sample dropped): {', '.join(named)}")
        if self.inputs_without_stats:
            lines.append(f"  {len(self.inputs_without_stats)} input tars without _stats.json were read "
                         f"anyway (DataComp skips them): {', '.join(self.inputs_without_stats[:3])}")
        return lines


def _make_readable(path) -> None:
    # temporary files are created 0600; published outputs get the usual umask-based mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json_readable(dest: Path, obj) -> None:
    write_json(dest, obj)
    _make_readable(dest)


# ------------------------------------------------------------------------------------- blurring

def blur_faces(img_bytes: bytes, bboxes, quality: int = 100, where: str = "") -> bytes:
    """Blur face boxes (fractions of width/height) and re-encode as webp, like DataComp.

    The algorithm is img2dataset's ``BoundingBoxBlurrer``: each box grows by 10% of its longer
    side, the union mask and the image are Gaussian-blurred with sigma = 0.1 * the longest box
    side (odd kernel 2*ceil(sigma)+1, at least 3), and the result is ``img*(1-m) + blurred*m``.
    We call cv2 directly (img2dataset goes through albumentations, which wraps the same
    ``cv2.GaussianBlur``) and encode webp at quality 100 like DataComp's resharder.
    """
    import cv2  # lazy: optional (OpenCV comes with img2dataset, extra [download]); only blurring needs it

    img = cv2.imdecode(np.frombuffer(img_bytes, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ReshardError(f"{where}: cannot decode the image to blur it")
    height, width = img.shape[:2]
    f = img.astype(np.float32) / 255.0
    mask = np.zeros_like(f)
    max_diag = 0
    for box in bboxes:
        b = [int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)]
        diag = max(b[2] - b[0], b[3] - b[1])
        max_diag = max(max_diag, diag)
        b = [int(b[0] - 0.1 * diag), int(b[1] - 0.1 * diag), int(b[2] + 0.1 * diag), int(b[3] + 0.1 * diag)]
        b = [int(np.clip(b[0], 0, width - 1)), int(np.clip(b[1], 0, height - 1)),
             int(np.clip(b[2], 0, width - 1)), int(np.clip(b[3], 0, height - 1))]
        mask[b[1] : b[3], b[0] : b[2], ...] = 1
    if bboxes:
        sigma = 0.1 * max_diag
        ks = max(3, int(2 * np.ceil(sigma) + 1))
        ks += ks % 2 == 0
        blurred = cv2.GaussianBlur(f, (ks, ks), 0)
        m = cv2.GaussianBlur(mask, (ks, ks), 0)
        img = ((f * (1 - m) + blurred * m) * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".webp", img, [int(cv2.IMWRITE_WEBP_QUALITY), quality])
    if not ok:
        raise ReshardError(f"{where}: webp encoding failed")
    return buf.tobytes()


# ---------------------------------------------------------------------------------- the writer

def _ranges(offsets: list, lengths: list) -> list[tuple[int, int, int, int]]:
    """Coalesce sorted sample ranges: (read start, read end, first row, last row + 1)."""
    out, i, n = [], 0, len(offsets)
    while i < n:
        a, e, s = offsets[i], offsets[i] + lengths[i], i
        i += 1
        while i < n and offsets[i] <= e + COALESCE_GAP:
            e = max(e, offsets[i] + lengths[i])
            i += 1
        out.append((a, e, s, i))
    return out


def _data_members(members, dropped: dict, copies: int) -> list:
    """The members of one sample that are data (:data:`DATA_EXTS`); the others are counted in
    ``dropped`` (per type, ``copies`` times: once per output copy of the sample)."""
    out = []
    for ext, body in members:
        if ext in DATA_EXTS:
            out.append((ext, body))
        else:
            dropped[ext] = dropped.get(ext, 0) + copies
    return out


def _write_task(t: ShardTask) -> tuple[int, int, int, dict]:
    """Write one output shard; returns (samples, bytes read, images blurred, dropped members per type)."""
    out_dir = Path(t.out_dir)
    tar_path = out_dir / OUTPUT_SHARD_FORMAT.format(t.index)
    stats_path = out_dir / OUTPUT_STATS_FORMAT.format(t.index)
    # plain Python lists: indexing numpy arrays per sample costs more than the copy itself
    keys = [f"{u}-{j}".encode() for u, j in zip(pairs_to_hex_array(t.hi, t.lo).to_pylist(), t.j.tolist())]
    offsets, lengths, shards = t.offset.tolist(), t.length.tolist(), t.shard.tolist()
    cls = None if t.cls is None else [str(c).encode() for c in t.cls.tolist()]
    transform = t.apply_blur or t.inject_blur
    n_read = n_blur = 0
    dropped: dict[str, int] = {}
    with atomic_path(tar_path) as tmp, open(tmp, "wb", buffering=0) as f:
        tar = TarWriter(f)
        # rows are in (shard, offset) order: handle each input shard's run of rows together
        a, n = 0, len(shards)
        while a < n:
            b = a
            while b < n and shards[b] == shards[a]:
                b += 1
            path = t.paths[shards[a]]
            with open(path, "rb") as src:
                fd = src.fileno()
                for ra, re_, s, e in _ranges(offsets[a:b], lengths[a:b]):
                    data = os.pread(fd, re_ - ra, ra)
                    n_read += len(data)
                    if len(data) != re_ - ra:
                        raise ShardError(f"{path}: shorter than the shard index says (reindex it)")
                    prev = None
                    for r in range(a + s, a + e):
                        off = offsets[r]
                        if off != prev:  # copies of one sample are adjacent: parse it once
                            members = sample_members(data, ra, off, lengths[r], path)
                            copies = 1
                            while r + copies < a + e and offsets[r + copies] == off:
                                copies += 1
                            members = _data_members(members, dropped, copies)
                            if transform:
                                members, blurred = _transform(members, t, (int(t.hi[r]), int(t.lo[r])),
                                                              f"{path} at byte {off}")
                                n_blur += blurred
                            if cls is not None:
                                members = [m for m in members if m[0] != "cls"]
                            members = [(b"." + ext.encode(), body) for ext, body in members]
                            prev = off
                        key = keys[r]
                        for ext, body in members:
                            tar.add(key + ext, body)
                        if cls is not None:
                            tar.add(key + b".cls", cls[r])
            a = b
        tar.close()
        _make_readable(tmp)
    stats = {"successes": n}
    if dropped:  # only then: shards of data members keep DataComp's exact stats bytes
        stats["dropped_members"] = dict(sorted(dropped.items()))
    _write_json_readable(stats_path, stats)
    return n, n_read, n_blur, dropped


def _transform(members, t: ShardTask, hi_lo, where):
    """Face blurring and blur metadata for one sample (no-op unless asked for)."""
    if not (t.apply_blur or t.inject_blur):
        return members, 0
    js = next((bytes(b) for ext, b in members if ext == "json"), None)
    meta = json.loads(js) if js is not None else {}
    if t.boxes is not None:
        boxes = t.boxes.get(hi_lo, [])
    else:
        boxes = meta.get("face_bboxes") or []
    out, blurred = [], 0
    for ext, body in members:
        if t.apply_blur and boxes and ext in IMAGE_EXTS:
            try:
                body = blur_faces(bytes(body), boxes, where=where)
            except ReshardError:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt input image
                raise ReshardError(f"{where}: cannot blur the {ext} image ({e})") from None
            ext = "webp"
            blurred += 1
        elif ext == "json" and t.inject_blur:
            body = json.dumps({**meta, "face_bboxes": boxes}).encode()
        out.append((ext, body))
    return out, blurred


# ----------------------------------------------------------------------------- output directory

def _fingerprint(job: ReshardPlan, k: int, apply_blur: bool, inject_blur: bool) -> dict:
    """What identifies output ``k``'s job (recorded in its directory): a rerun resumes only the same job."""
    out, cls_map = job.outputs[k], job.cls_maps[k]
    cls_digest = None
    if cls_map is not None:
        cls_digest = hashlib.sha256(json.dumps(sorted(cls_map.items())).encode()).hexdigest()
    return {
        "inputs": [str(Path(i).resolve()) for i in job.inputs],
        "subset_sha256": file_sha256(out.subset_file),
        "subset_bytes": Path(out.subset_file).stat().st_size,
        "shard_size": job.shard_size,
        "max_shard_bytes": job.max_shard_bytes,
        # the input tars as planned (name, size, mtime): a rerun after they changed must not
        # mix shards of two different plans
        "inputs_sha256": hashlib.sha256(json.dumps(job.input_files).encode()).hexdigest(),
        "cls_sha256": cls_digest,
        "apply_blur": apply_blur,
        "inject_blur_metadata": inject_blur,
    }


# what a reshard writes in its output directory: only these are ever removed by --overwrite
_OWN = re.compile(r"^(?:[0-9]{8}[.]tar|[0-9]{8}_stats[.]json|sizes[.]json|sample_ids[.]npy|meta[.]json|"
                  + re.escape(MARKER) + r"|[.].+[.]tmp)$")


def _building_dir(out_dir: Path) -> Path:
    """Where an --overwrite run builds the new output, beside the old one."""
    return out_dir.with_name(f".{out_dir.name}.curate-new")


def _trash_dir(out_dir: Path) -> Path:
    """Where the old output goes for the moment of the swap."""
    return out_dir.with_name(f".{out_dir.name}.curate-old")


def _recover(out_dir: Path) -> None:
    """Finish or undo what a killed --overwrite run left beside ``out_dir`` (our names only)."""
    new, old = _building_dir(out_dir), _trash_dir(out_dir)
    if old.is_dir() and not out_dir.exists():  # killed between the two renames of the swap
        if (new / "meta.json").is_file():
            new.rename(out_dir)
        else:
            old.rename(out_dir)
    for d in (new, old):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)


def _prepare_dir(out_dir: Path, fp: dict, overwrite: bool) -> tuple[Path, bool, bool, bool]:
    """Check the output dir; returns (where to build, resuming an earlier run of the same job,
    whether this run made or found it empty, whether this run made it).

    Without --overwrite: a new or empty directory is written in place, one holding the same job
    is resumed in place, anything else is refused. With --overwrite, a directory holding an
    earlier reshard output (its marker, and nothing curate did not write) is replaced: the new
    output is built beside it and swapped in only when complete (:func:`_swap`).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ReshardError(f"{out_dir}: exists and is not a directory")
    try:
        _recover(out_dir)
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(out_dir.iterdir())
    except OSError as e:
        raise ReshardError(f"{out_dir}: cannot create or read the output directory "
                           f"({e.strerror or e.__class__.__name__})") from None
    if not entries:
        return out_dir, False, True, created
    marker = out_dir / MARKER
    if not overwrite and marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = None
        if old == fp:
            for p in entries:  # temporaries of a killed run
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink()
            return out_dir, True, False, False
        raise ReshardError(
            f"{out_dir}: holds the output of a different reshard job (other inputs, subset or "
            f"options); use --overwrite to replace it")
    if not overwrite:
        raise ReshardError(f"{out_dir}: not empty ({len(entries)} entries, e.g. {entries[0].name}); "
                           f"use --overwrite to replace its contents")
    foreign = [p for p in entries if not (_OWN.match(p.name) and p.is_file() and not p.is_symlink())]
    if foreign:
        raise ReshardError(f"{out_dir}: --overwrite replaces only a reshard output, and {foreign[0].name} "
                           f"was not written by curate reshard ({len(foreign)} such entries); nothing was "
                           f"changed: move them away or choose another output directory")
    if not marker.is_file():
        raise ReshardError(f"{out_dir}: --overwrite replaces only a reshard output, and this directory has "
                           f"no {MARKER}; nothing was changed: choose another output directory")
    build = _building_dir(out_dir)
    try:
        build.mkdir()
    except OSError as e:
        raise ReshardError(f"{build}: cannot create the new output beside the old one "
                           f"({e.strerror or e.__class__.__name__})") from None
    return build, False, False, False


def _swap(build: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete output in ``build``: old -> trash, new -> out, drop trash."""
    trash = _trash_dir(out_dir)
    out_dir.rename(trash)
    build.rename(out_dir)
    shutil.rmtree(trash)


def _discard(build: Path, out_dir: Path, fresh: bool, created: bool) -> None:
    """After a failed run: remove what it built (the new output beside an old one, or the files of
    a run that started in a new or empty directory). A resumed output is left for the next run."""
    if build != out_dir:
        shutil.rmtree(build, ignore_errors=True)
    elif fresh and build.is_dir():
        for p in build.iterdir():
            if _OWN.match(p.name) and p.is_file():
                p.unlink()
        if created:
            try:
                build.rmdir()
            except OSError:
                pass


def _shard_done(out_dir: Path, i: int, expected: int) -> bool:
    stats = out_dir / OUTPUT_STATS_FORMAT.format(i)
    if not (stats.is_file() and (out_dir / OUTPUT_SHARD_FORMAT.format(i)).is_file()):
        return False
    try:
        return json.loads(stats.read_text()).get("successes") == expected
    except ValueError:
        return False


# ---------------------------------------------------------------------------------- entry points

def reshard_many(inputs, outputs, *, shard_size: int = 10000, apply_blur: bool = False,
                 inject_blur_metadata: bool = False, overwrite: bool = False, catalog=None,
                 blur_from_catalog: bool | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                 progress: bool = False, engine: Engine | None = None) -> list[ReshardResult]:
    """Reshard input shard dirs into several outputs in one planning pass.

    ``outputs`` is a list of ``Output`` or ``(out_dir, subset_file, cls)`` tuples, where ``cls``
    is None, a dict uid -> class id or a cls file path. Every sample is routed to each output
    whose subset lists it (e.g. all TiC years at once). The catalog's shard index is used for
    inputs it covers; other input dirs are indexed on the fly (tar headers only).
    Face boxes for ``apply_blur``/``inject_blur_metadata`` come from the catalog's pool when
    ``blur_from_catalog`` is True, or is None (the default) and a ``catalog`` is given; else from
    each sample's json. ``engine`` says where the output shards are written, one task each
    (default: local processes, one per core; ``Engine(workers=1)``: in this process;
    ``Engine(kind="ray")``: Ray tasks, retried if a worker dies); the bytes are the same.

    >>> reshard_many("pool/shards", [("out/2016", "train/2016.npy", None),
    ...                              ("out/2017", "train/2017.npy", None)])  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    engine = (engine or LOCAL).with_workers(os.cpu_count() or 1)
    boxes_catalog = _boxes_catalog(catalog, blur_from_catalog, apply_blur or inject_blur_metadata)
    job = plan_reshard(inputs, outputs, shard_size=shard_size, max_shard_bytes=max_shard_bytes, catalog=catalog,
                       workers=engine.workers, progress=progress)
    results, tasks, dirs = [], [], []  # dirs: (where built, output dir, fresh, created) per output started
    try:
        for k in range(len(job.outputs)):
            res, todo = _start_output(job, k, apply_blur, inject_blur_metadata, overwrite,
                                                    boxes_catalog, dirs)
            results.append(res)
            tasks += [(k, t) for t in todo]
        written = map_tasks(_write_task, [(t,) for _, t in tasks], engine, desc="reshard", unit="sample",
                            sizes=[len(t.shard) for _, t in tasks], progress=progress, start="fork")
        for (k, _), (n, nread, nblur, _dropped) in zip(tasks, written):
            _account(results[k], n, nread, nblur)
        for k, res in enumerate(results):
            res.elapsed = time.perf_counter() - t0
            _finish_output(job, k, res, apply_blur, inject_blur_metadata, dirs[k][0])
    except CurateError:
        # a data error (an undecodable image, a shorter tar...): what existed stays as it was and
        # nothing half-written remains. A kill leaves the output for the same command to resume.
        for build, out_dir, fresh, created in dirs:
            _discard(build, out_dir, fresh, created)
        raise
    for build, out_dir, _, _ in dirs:
        if build != out_dir:
            _swap(build, out_dir)
    return results


def _boxes_catalog(catalog, blur_from_catalog: bool | None, blurring: bool):
    """The catalog whose pool gives the face boxes, or None (boxes from each sample's json)."""
    if blur_from_catalog and catalog is None:
        raise ReshardError("face boxes from the pool need --catalog")
    if blur_from_catalog is None:
        blur_from_catalog = catalog is not None
    return catalog if blur_from_catalog and blurring else None


def _start_output(job: ReshardPlan, k: int, apply_blur: bool, inject_blur: bool, overwrite: bool,
                  boxes_catalog, dirs: list) -> tuple[ReshardResult, list[ShardTask]]:
    """Prepare output ``k``'s directory (new, resumed or replaced) and list its shards to write;
    appends (where it is built, the output dir, fresh, created) to ``dirs``."""
    o, plan, d = job.outputs[k], job.plans[k], job.dirs[k]
    fp = _fingerprint(job, k, apply_blur, inject_blur)
    build, resumed, fresh, created = _prepare_dir(d, fp, overwrite)
    dirs.append((build, d, fresh, created))
    if not resumed:
        _write_json_readable(build / MARKER, fp)
    res = ReshardResult(str(d), str(o.subset_file), **plan.counts)
    res.output_count = int(len(plan.shard))
    res.output_shard_count = plan.shard_count
    res.input_shards_read = int(len(np.unique(plan.shard)))
    res.input_shards_total = len(job.files)
    res.bytes_total = job.bytes_total
    res.truncated_inputs = job.truncated_inputs
    res.truncated_at = {n: size for _, _, n, size, tr, _ in job.files if tr}
    res.inputs_without_stats = job.inputs_without_stats
    boxes = None
    if boxes_catalog is not None and len(plan.hi):
        boxes = pool_boxes(boxes_catalog, plan.hi, plan.lo)
    done = (lambda i, n: _shard_done(d, i, n)) if resumed else None
    tasks = shard_tasks(plan, build, job.paths, boxes, apply_blur, inject_blur, done)
    res.shards_resumed = res.output_shard_count - len(tasks)
    return res, tasks


def _account(res: ReshardResult, n: int, nread: int, nblur: int) -> None:
    res.shards_written += 1
    res.bytes_read += nread
    res.blurred += nblur


def _dropped_totals(d: Path, shard_count: int) -> dict[str, int]:
    """Members not copied, per type, summed over the output's ``_stats.json`` (resumed shards too)."""
    total: dict[str, int] = {}
    for i in range(shard_count):
        try:
            stats = json.loads((d / OUTPUT_STATS_FORMAT.format(i)).read_text())
        except (OSError, ValueError):
            continue
        for ext, n in (stats.get("dropped_members") or {}).items():
            total[ext] = total.get(ext, 0) + int(n)
    return dict(sorted(total.items()))


def _finish_output(job: ReshardPlan, k: int, res: ReshardResult, apply_blur: bool, inject_blur: bool,
                   d: Path) -> None:
    """``sample_ids.npy``, ``sizes.json`` and, last (it marks a complete output), ``meta.json``, in ``d``
    (the output dir, or where an --overwrite run builds it)."""
    o, plan = job.outputs[k], job.plans[k]
    res.dropped_members = _dropped_totals(d, plan.shard_count)
    with atomic_path(d / "sample_ids.npy") as tmp:
        shutil.copyfile(o.subset_file, tmp)
        _make_readable(tmp)
    _write_json_readable(d / "sizes.json", plan.sizes())
    meta = {
        "output_count": res.output_count,
        "output_shard_count": res.output_shard_count,
        "output_shard_format": OUTPUT_SHARD_FORMAT,
        "output_shard_stats_format": OUTPUT_STATS_FORMAT,
        "shard_size": job.shard_size,
        "input_dirs": [str(Path(i).resolve()) for i in job.inputs],
        "subset_file": str(Path(o.subset_file).resolve()),
        "subset_count": res.subset_count,
        "subset_entries_present": res.subset_entries_present,
        "skipped": {"absent_uids": res.absent_uids, "no_json_entries": res.no_json_entries,
                    "input_duplicates": res.input_duplicates},
        "truncated_inputs": res.truncated_inputs,
        "inputs_without_stats": res.inputs_without_stats,
        "dropped_members": res.dropped_members,
        "cls": o.cls is not None,
        "apply_blur": apply_blur,
        "inject_blur_metadata": inject_blur,
        "index": job.index,
    }
    _write_json_readable(d / "meta.json", meta)


def reshard(input_dirs, output_dir, subset_file, *, cls=None, **kw) -> ReshardResult:
    """Reshard one subset: ``reshard("pool/shards", "out", "subset.npy")``; see ``reshard_many``.

    An empty subset is an error here (it would write an empty training set with exit 0);
    ``reshard_many`` accepts empty outputs among others (e.g. a TiC year with no samples).
    """
    if len(open_subset(subset_file, check_sorted=False)) == 0:
        raise ReshardError(f"{subset_file}: empty subset (0 uids); nothing to reshard, nothing was written")
    return reshard_many(input_dirs, [Output(Path(output_dir), Path(subset_file), cls)], **kw)[0]


__all__ = ["Output", "ReshardError", "ReshardResult", "reshard", "reshard_many", "load_cls_map", "blur_faces"]
