"""TiC's dynamic eval sets as clip_benchmark webdatasets, resharded from the pool in one pass.

Input: the eval subsets ``curate tic export`` wrote (``eval/retrieval/{YYYY}.npy``,
``eval/datacompnet/{YYYY}.npy``, ``eval/uid2classid/{YYYY}.json``). All of them go to
:func:`curate.shards.reshard.reshard_many` as one multi-output job (one planning pass over the pool's
shard index; only the byte ranges of eval samples are read), DataCompNet outputs with their
uid -> ImageNet class id map, which adds the ``cls`` member. Each resharder output (kept under
``.reshard/`` so a killed run resumes) is then laid out the way TiC's ``convert_wds.sh`` leaves
it for clip_benchmark's ``build_wds_dataset(split="")``::

    eval/{retrieval|datacompnet}/{YYYY}/0.tar .. N-1.tar   (hard links to the resharder's tars)
    nshards.txt  count.txt  dataset_type.txt  [classnames.txt  zeroshot_classification_templates.txt]
    sizes.json {"0.tar": n, ...}  0.json .. N-1.json (the resharder's per-shard stats)

Class names and templates are those of DataComp's ``wds_imagenet1k_test`` (OpenAI's ImageNet
class names and 80 prompt templates), read from open_clip's ``zero_shot_metadata.py`` as text
(``ast``, no import of torch).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from curate.atomic import atomic_path
from curate.engine import Engine
from curate.shards.reshard import Output, ReshardError, reshard_many
from curate.tic import TicError

TASK_TYPE = {"retrieval": "retrieval", "datacompnet": "classification"}


def imagenet_names_and_templates() -> tuple[list[str], list[str]]:
    """OpenAI's 1000 ImageNet class names and 80 templates (``{c}`` placeholders)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TicError("ImageNet class names and templates come from open_clip_torch: pip install open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    names = list(ast.literal_eval(found["IMAGENET_CLASSNAMES"]))
    templates = []
    for lam in found["OPENAI_IMAGENET_TEMPLATES"].elts:
        body = lam.body  # lambda c: f'a photo of a {c}.'
        parts = []
        for v in body.values:
            parts.append("{c}" if isinstance(v, ast.FormattedValue) else v.value)
        templates.append("".join(parts))
    if len(names) != 1000 or len(templates) != 80:
        raise TicError(f"{path}: expected 1000 class names and 80 templates, found {len(names)} and {len(templates)}")
    return names, templates


@dataclass
class EvalSetResult:
    dirs: dict[str, int] = field(default_factory=dict)  # clip_benchmark dir -> sample count
    missing: dict[str, int] = field(default_factory=dict)  # dir -> eval uids not found in the shards
    input_shards_read: int = 0
    input_shards_total: int = 0
    tasklist: str | None = None


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: copy
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def reshard_eval_sets(export_dir, shards, catalog=None, progress: bool = False, shard_size: int = 10000,
                      engine: Engine | None = None) -> EvalSetResult:
    """Reshard every eval subset under ``export_dir/eval`` from ``shards`` (one multi-output job
    whose output shards are written where ``engine`` says; default: local processes, all cores)."""
    export_dir = Path(export_dir)
    ev = export_dir / "eval"
    outputs, targets = [], []
    for task in ("retrieval", "datacompnet"):
        for npy in sorted((ev / task).glob("*.npy")):
            year = npy.stem
            cls = None
            if task == "datacompnet":
                cls_file = ev / "uid2classid" / f"{year}.json"
                if not cls_file.is_file():
                    raise TicError(f"{cls_file}: class map for {npy} not found (written by curate tic export)")
                cls = json.loads(cls_file.read_text())
            staging = ev / ".reshard" / task / year
            outputs.append(Output(staging, npy, cls))
            targets.append((task, ev / task / year, staging))
    if not outputs:
        raise TicError(f"{ev}: no eval subsets (run `curate tic export` on a catalog with tic_eval first)")
    inputs = [Path(s) for s in ([shards] if isinstance(shards, (str, os.PathLike)) else shards)]
    for _ in range(len(outputs) + 1):
        try:
            results = reshard_many(inputs, outputs, catalog=catalog, progress=progress, shard_size=shard_size,
                                   engine=engine)
            break
        except ReshardError as e:
            # .reshard/ is ours: a staging dir left by an earlier export of other eval uids (or by
            # another curate version) is replaced; the resharder names it first in its message
            stale = next((o.out_dir for o in outputs
                          if str(e).startswith(f"{Path(o.out_dir).resolve()}: holds the output of a different")), None)
            if stale is None:
                raise
            shutil.rmtree(stale)
    names, templates = (imagenet_names_and_templates() if any(t == "datacompnet" for t, *_ in targets)
                        else (None, None))
    res = EvalSetResult()
    for (task, final, staging), r in zip(targets, results):
        final.mkdir(parents=True, exist_ok=True)
        for old in final.glob("*.tar"):
            old.unlink()
        for i in range(r.output_shard_count):
            _link(staging / f"{i:08d}.tar", final / f"{i}.tar")
            _link(staging / f"{i:08d}_stats.json", final / f"{i}.json")
        sizes = json.loads((staging / "sizes.json").read_text())
        _write_text(final / "sizes.json", json.dumps({f"{i}.tar": sizes[f"{i:08d}.tar"]
                                                      for i in range(r.output_shard_count)}) + "\n")
        _write_text(final / "nshards.txt", f"{r.output_shard_count}\n")
        _write_text(final / "count.txt", f"{r.output_count}\n")
        _write_text(final / "dataset_type.txt", f"{TASK_TYPE[task]}\n")
        if task == "datacompnet":
            _write_text(final / "classnames.txt", "\n".join(names) + "\n")
            _write_text(final / "zeroshot_classification_templates.txt", "\n".join(templates) + "\n")
        res.dirs[str(final)] = r.output_count
        if r.absent_uids or r.no_json_entries:
            res.missing[str(final)] = r.absent_uids + r.no_json_entries
        res.input_shards_read = max(res.input_shards_read, r.input_shards_read)
        res.input_shards_total = r.input_shards_total
    write_tasklist(ev / "tasklist.yml", [(task, final.name, r.output_count)
                                         for (task, final, _), r in zip(targets, results)])
    res.tasklist = str(ev / "tasklist.yml")
    return res


def write_tasklist(path: Path, sets: list[tuple[str, str, int]]) -> None:
    """A task list for ``curate eval`` covering the eval sets written (TiC's generate_tasklist.py:
    keys ``tic/datacomp/{retrieval|datacompnet}/yearly/{YYYY}``, mean_recall@1 / acc1)."""
    import yaml  # lazy: optional extra [torch] (pyyaml); only the eval sets' task list needs it

    tasks = {}
    # retrieval first: it is cheap, while each DataCompNet task encodes 1000 classes x 80 templates
    for task, year, count in sorted(sets, key=lambda x: (x[0] != "retrieval", x[1])):
        if not count:
            continue
        key = f"tic/datacomp/{task}/yearly/{year}"
        if task == "retrieval":
            tasks[key] = {"name": f"TiC-DataComp-Retrieval {year}", "size": count,
                          "main_metric": "mean_recall@1", "task": "retrieval", "tags": ["tic", "retrieval"]}
        else:
            tasks[key] = {"name": f"TiC-DataCompNet {year}", "size": count, "num_classes": 1000,
                          "main_metric": "acc1", "task": "zeroshot_classification", "tags": ["tic"]}
    with atomic_path(path) as tmp:
        tmp.write_text("# TiC dynamic eval tasks written by `curate tic export`; data: --data-dir = the export dir\n"
                       + yaml.safe_dump(tasks, sort_keys=False))
