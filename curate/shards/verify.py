"""Verification of a shard directory, the way a trainer will use it.

``verify_dir`` checks that every tar parses to its end, per-tar sample counts match
``_stats.json`` and ``sizes.json``, and keys are well-formed; for a reshard output, that the
totals agree with ``meta.json`` and ``sample_ids.npy`` and, given the inputs, that the number
of samples written equals the subset entries the input holds (recounted with the resharder's
own planning, :func:`curate.shards.plan.present_count`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.errors import CurateError
from curate.progress import Progress
from curate.shards.index import list_tars
from curate.shards.plan import present_count
from curate.shards.reshard import MARKER
from curate.shards.tar import ShardError, scan_tar
from curate.subset import open_subset
from curate.uids import hex_array_to_pairs

_UID_KEY = re.compile(r"^[0-9a-f]{32}-[0-9]+$")
_IMG2DATASET_KEY = re.compile(r"^[0-9]+$")


@dataclass
class VerifyReport:
    """What :func:`verify_dir` found: counts, and one line per problem (none: the directory is sound)."""

    root: Path
    tars: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    reshard_output: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dir(root: str | os.PathLike, progress: bool = False, inputs=None, catalog=None) -> VerifyReport:
    """Check a shard directory: tars parse, counts match stats/sizes, keys are well-formed.

    For a reshard output, ``inputs`` (the input shard dirs) recomputes independently how many
    entries of ``sample_ids.npy`` the input holds and compares it with the samples written.
    """
    root = Path(root)
    rep = VerifyReport(root)
    tars = list_tars(root, required=False)  # an empty reshard output (empty subset) is valid
    rep.tars = len(tars)
    sizes = _read_json(root / "sizes.json", rep)
    meta = _read_json(root / "meta.json", rep)
    rep.reshard_output = meta is not None and "output_count" in meta
    if meta is None and (root / MARKER).is_file():
        rep.problems.append(f"{root}: an unfinished reshard (no meta.json); run the same command again to finish it")
    seen_uid_counts: dict[tuple[int, int], set] = {}
    for tar in Progress(tars, desc="verify", unit="tar", disable=not progress):
        _check_tar(tar, sizes, rep, seen_uid_counts)
    if sizes is not None:
        extra = sorted(set(sizes) - {t.name for t in tars})
        if extra:
            rep.problems.append(f"{root / 'sizes.json'}: lists {extra[0]} which does not exist")
    if rep.reshard_output:
        _check_reshard_output(root, meta, seen_uid_counts, rep, inputs, catalog)
    return rep


def _read_json(path: Path, rep: VerifyReport):
    """A JSON file's contents; None if it is missing or not JSON (which is a problem)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        rep.problems.append(f"{path}: not JSON ({e})")
        return None


def _check_tar(tar: Path, sizes: dict | None, rep: VerifyReport, seen_uid_counts: dict) -> None:
    """One tar: it parses, its keys are unique and well-formed, its count matches stats and sizes."""
    try:
        scan = scan_tar(tar)
    except ShardError as e:
        rep.problems.append(str(e))
        return
    n = len(scan.keys)
    rep.samples += n
    if scan.truncated:
        rep.problems.append(scan.truncation())
    keys = scan.keys
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        rep.problems.append(f"{tar}: key {dup!r} appears in two samples")
    key_re = _UID_KEY if rep.reshard_output else None
    for k in keys:
        base = os.path.basename(k)
        if key_re is not None:
            bad = not key_re.match(base)
        else:
            bad = not (_UID_KEY.match(base) or _IMG2DATASET_KEY.match(base))
        if bad:
            rep.problems.append(f"{tar}: malformed key {k!r}")
            break
    if rep.reshard_output:
        _count_copies(keys, seen_uid_counts)
    stats = tar.with_name(tar.name[: -len(".tar")] + "_stats.json")
    if stats.is_file():
        try:
            succ = json.loads(stats.read_text()).get("successes")
        except ValueError:
            succ = None
        if succ != n:
            rep.problems.append(f"{stats}: successes={succ} but {tar.name} holds {n} samples")
    else:
        rep.problems.append(f"{stats}: missing")
    if sizes is not None and sizes.get(tar.name) != n:
        rep.problems.append(f"{tar.parent / 'sizes.json'}: {tar.name}={sizes.get(tar.name)} but the tar holds {n} samples")


def _check_reshard_output(root: Path, meta: dict, seen_uid_counts: dict, rep: VerifyReport, inputs, catalog) -> None:
    """A reshard output's totals against meta.json, sample_ids.npy and (given) its inputs."""
    if meta.get("output_count") != rep.samples:
        rep.problems.append(f"{root / 'meta.json'}: output_count={meta.get('output_count')} but the tars hold {rep.samples}")
    if meta.get("output_shard_count") != rep.tars:
        rep.problems.append(f"{root / 'meta.json'}: output_shard_count={meta.get('output_shard_count')} but there are {rep.tars} tars")
    present = meta.get("subset_entries_present")
    if present is not None and present != rep.samples:
        rep.problems.append(f"{root / 'meta.json'}: {present} subset entries were present in the input but {rep.samples} samples were written")
    ids = root / "sample_ids.npy"
    if not ids.is_file():
        rep.problems.append(f"{ids}: missing")
        return
    _check_sample_ids(ids, seen_uid_counts, rep)
    if inputs:
        want = present_count(inputs, ids, catalog)["subset_entries_present"]
        if want != rep.samples:
            rep.problems.append(f"{root}: the input holds {want} entries of sample_ids.npy but "
                                f"{rep.samples} samples were written")


def _count_copies(keys: list[str], seen: dict) -> None:
    """Record the copy numbers j of each uid among reshard output keys ``{uid}-{j}``."""
    parts = [os.path.basename(k).partition("-") for k in keys if _UID_KEY.match(os.path.basename(k))]
    hi, lo = hex_array_to_pairs(pa.array([uid for uid, _, _ in parts], pa.string()))
    for h, l_, (_, _, j) in zip(hi.tolist(), lo.tolist(), parts):
        seen.setdefault((h, l_), set()).add(int(j))


def _check_sample_ids(ids: Path, seen: dict, rep: VerifyReport) -> None:
    """Every output uid is in the subset, with copies j = 0..k-1 where k is its multiplicity."""
    try:
        arr = open_subset(ids)
    except CurateError as e:
        rep.problems.append(str(e))
        return
    if not seen:
        return
    hi, lo = np.asarray(arr["f0"]), np.asarray(arr["f1"])
    for (h, l_), js in seen.items():
        a = int(np.searchsorted(hi, np.uint64(h), "left"))
        b = int(np.searchsorted(hi, np.uint64(h), "right"))
        k = int((lo[a:b] == np.uint64(l_)).sum())
        if js != set(range(k)):
            rep.problems.append(f"{ids}: uid {h:016x}{l_:016x} is listed {k} times but the output "
                                f"has copies {sorted(js)[:5]}")
            return
