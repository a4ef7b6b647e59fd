"""Evaluation tasks: the task list and each task's data, read from local webdatasets.

The task list (``eval/tasklist.yml``, DataComp's 40 tasks; any YAML of the same form) maps a
task key to its name, main metric and kind. A task's data is a clip_benchmark webdataset on
disk (``{data_dir}/wds_{task}_test/``, TiC's ``tic/...`` layout or ``curate tic export``'s
``eval/{kind}/{YYYY}``): :func:`open_task` finds it (None when absent: reported as missing,
never downloaded) and :func:`iter_samples` decodes its samples without unpickling anything.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from curate import resources
from curate.evaluate import EvalError

TASKLIST = resources.eval_dir() / "tasklist.yml"
TIC_KEY = re.compile(r"^tic/(?P<ds>[^/]+)/(?P<kind>retrieval|datacompnet)/(?P<scale>yearly|monthly)/(?P<split>\d{4,6})$")
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def load_tasklist(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Task key -> settings (``name``, ``main_metric``, ...) from ``path`` or ``eval/tasklist.yml``."""
    p = Path(path or TASKLIST)
    try:
        tasks = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EvalError(f"{p}: cannot read task list: {str(e).splitlines()[0]}") from None
    if not isinstance(tasks, dict) or not tasks:
        raise EvalError(f"{p}: expected a mapping of task key -> settings")
    for k, v in tasks.items():
        if not isinstance(v, dict) or "name" not in v or "main_metric" not in v:
            raise EvalError(f"{p}: task {k!r} needs name and main_metric")
    return tasks


@dataclass
class TaskData:
    """A task's data on disk: its shards and what zero-shot classification needs."""

    root: Path
    kind: str  # "classification" | "multilabel" | "retrieval" | "winogavil"
    shards: list[str]
    classnames: list[str] | None
    templates: list[str] | None
    count: int | None
    names: dict | None = None  # metadata_names.json: {field: [name of value 0, 1, ...]}


def task_dir(data_dir: Path, key: str) -> tuple[Path, str]:
    """Where a task's webdataset lives, and its split subdir ('' for TiC's flat layout)."""
    m = TIC_KEY.match(key)
    if m:
        tic = data_dir / "tic" / m["ds"] / m["scale"] / "eval" / m["kind"] / m["split"]
        if not tic.is_dir():  # `curate tic export` layout: {export}/eval/{kind}/{YYYY}
            alt = data_dir / "eval" / m["kind"] / m["split"]
            tic = alt if alt.is_dir() else tic
        return tic, ""
    if key.startswith("fairness/"):
        # DataComp strips the prefix for fairness sets: wds_dollar_street_test, wds_geode_test
        short = data_dir / f"wds_{key[len('fairness/'):].replace('/', '-')}_test"
        if short.is_dir() or not (data_dir / f"wds_{key.replace('/', '-')}_test").is_dir():
            return short, "test"
    return data_dir / f"wds_{key.replace('/', '-')}_test", "test"


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8")


def open_task(data_dir: Path, key: str, task: dict) -> TaskData | None:
    """The task's data, or None when it is not on disk."""
    root, split = task_dir(Path(data_dir), key)
    sdir = root / split if split else root
    if not sdir.is_dir():
        return None
    nfile = sdir / "nshards.txt"
    if nfile.is_file():
        try:
            n = int(_read(nfile).strip())
        except ValueError:
            raise EvalError(f"{nfile}: not an integer") from None
        shards = [str(sdir / f"{i}.tar") for i in range(n)]
        gone = [s for s in shards if not Path(s).is_file()]
        if gone:
            raise EvalError(f"{gone[0]}: missing ({n} shards per {nfile})")
    else:
        shards = sorted((str(p) for p in sdir.glob("*.tar")),
                        key=lambda s: (len(Path(s).stem), Path(s).stem))
        if not shards:
            return None
    tfile = root / "dataset_type.txt"
    kind = _read(tfile).strip().lower() if tfile.is_file() else (
        task.get("task") if task.get("task") in ("retrieval", "winogavil") else "classification")
    if kind not in ("classification", "multilabel", "retrieval", "winogavil"):
        raise EvalError(f"{tfile}: dataset type {kind!r} is not supported (classification, multilabel, "
                        f"retrieval, winogavil)")
    classnames = templates = None
    if kind in ("classification", "multilabel"):
        cfile, tfile = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
        for f in (cfile, tfile):
            if not f.is_file():
                raise EvalError(f"{f}: missing (needed for zero-shot classification of {key})")
        # as clip_benchmark reads them: every line, stripped, blank lines kept (a blank template
        # is the empty prompt, averaged in like the others)
        classnames = [ln.strip() for ln in _read(cfile).splitlines()]
        templates = [ln.strip() for ln in _read(tfile).splitlines()]
        bad = [t for t in templates if t and "{c}" not in t]
        if bad:
            raise EvalError(f"{tfile}: template {bad[0]!r} lacks the {{c}} placeholder")
        if not templates:
            raise EvalError(f"{tfile}: no templates")
    count = None
    cf = root / "count.txt"
    if cf.is_file():
        try:
            count = int(_read(cf).strip())
        except ValueError:
            raise EvalError(f"{cf}: not an integer") from None
    names = None
    nf = root / "metadata_names.json"
    if nf.is_file():
        try:
            names = json.loads(_read(nf))
        except ValueError:
            raise EvalError(f"{nf}: not JSON") from None
        if not isinstance(names, dict) or not all(isinstance(v, list) for v in names.values()):
            raise EvalError(f"{nf}: expected {{field: [name, ...]}}")
    return TaskData(root, kind, shards, classnames, templates, count, names)


def first_sample_members(shard: str) -> set[str]:
    """Extensions of the first sample of a shard (reads tar headers up to the second key)."""
    exts, first = set(), None
    try:
        with tarfile.open(shard, "r|*") as tf:
            for ti in tf:
                if not ti.isfile():
                    continue
                name = ti.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if first is None:
                    first = key
                elif key != first:
                    break
                exts.add(ext)
    except (OSError, tarfile.TarError) as e:
        raise EvalError(f"{shard}: not a readable tar ({e})") from None
    return exts


def _npy(data: bytes, where: str) -> np.ndarray:
    try:  # never unpickle: object arrays are refused
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EvalError(f"{where}: bad .npy member ({str(e).splitlines()[0]})") from None


def iter_samples(shards: list[str]):
    """(key, image PIL, sample dict) from webdataset shards, in shard order.

    Members are decoded here, not by webdataset's default handlers (which would unpickle
    ``.pyd``/``.pth`` members): the image with PIL, ``.npy`` with numpy (no pickles), the rest
    kept as bytes."""
    import webdataset as wds  # lazy: webdataset imports torch; only reading samples needs it

    pipe = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    for s in pipe:
        where = f"{s.get('__url__')}: sample {s.get('__key__')}"
        ext = next((k for k in IMAGE_EXTS if k in s), None)
        if ext is None:
            raise EvalError(f"{where} has no image member")
        try:
            img = Image.open(io.BytesIO(s[ext])).convert("RGB")
        except OSError as e:
            raise EvalError(f"{where}: undecodable {ext} ({e})") from None
        if "npy" in s:
            s["npy"] = _npy(s["npy"], where)
        yield s["__key__"], img, s

