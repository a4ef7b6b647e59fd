"""Evaluation runs: a trained model on every task of a task list that has data on disk.

``evaluate_run`` reads a training record (``info.json``, written by :mod:`curate.train.trainer`),
loads the checkpoint into open_clip (:mod:`curate.evaluate.models`), and runs every task of
``eval/tasklist.yml`` whose data is on disk in clip_benchmark's webdataset layout
(:mod:`curate.evaluate.tasks`), scoring it with :mod:`curate.evaluate.metrics` (WinoGAViL with
:mod:`curate.evaluate.winogavil`). Each image is encoded once.

Results are appended to ``eval_results.jsonl`` one line per task (DataComp's record:
``key``, ``dataset``, ``metrics`` with ``main_metric``), tasks already there are skipped, and a
task whose data is absent is reported as missing — never run against a download, never
faked. A task whose main metric needs metadata the data lacks is reported as unsupported with
the reason. :func:`aggregate` averages the main metrics over DataComp's task groups.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.atomic import write_json
from curate.evaluate import EvalError
from curate.evaluate.metrics import (COMPUTED_METRICS, GROUP_EVALS, METADATA_FIELDS, WINOGAVIL_METRICS,
                                     classification_metrics, multilabel_metrics, retrieval_metrics)
from curate.evaluate.models import (ClassifierCache, LoadedModel, encode_task_images, encode_texts, load_model,
                                    normalize)
from curate.evaluate.tasks import TaskData, first_sample_members, load_tasklist, open_task
from curate.evaluate.winogavil import run_winogavil
from curate.train.trainer import read_record

RESULTS_NAME = "eval_results.jsonl"


# --------------------------------------------------------------------------- one task


def _label(v) -> int:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode()
    return int(str(v).strip())


def _captions(v) -> list[str]:
    """A sample's captions as clip_benchmark reads them: ``str.splitlines`` (blank lines kept)."""
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8")
    return str(v).splitlines()


def _multilabel_targets(samples: list[dict], nc: int, root) -> np.ndarray:
    if any("npy" not in s for s in samples):
        raise EvalError(f"{root}: a multilabel sample lacks its .npy target vector")
    try:
        t = np.stack([np.asarray(s["npy"]).reshape(-1) for s in samples])
    except ValueError:
        raise EvalError(f"{root}: multilabel .npy targets differ in length") from None
    if t.shape[1] != nc:
        raise EvalError(f"{root}: multilabel targets have {t.shape[1]} classes, classnames.txt {nc}")
    return t


def run_task(m: LoadedModel, data: TaskData, key: str, batch_size: int = 64, progress=None,
             classifiers: ClassifierCache | None = None) -> dict:
    """Metrics of one task (clip_benchmark definitions) plus n, seconds and images/s; the seconds
    count everything the task costs (images, texts, the classifier, metrics)."""
    t0 = time.perf_counter()
    if data.kind == "winogavil":
        return run_winogavil(m, data, batch_size, progress)
    img, samples, _ = encode_task_images(m, data, batch_size, progress)
    if not samples:
        raise EvalError(f"{data.root}: no samples")
    if data.kind == "retrieval":
        texts, owner = [], []
        for i, s in enumerate(samples):
            if "txt" not in s:
                raise EvalError(f"{data.root}: sample {s.get('__key__')} has no txt member")
            caps = _captions(s["txt"])
            texts.extend(caps)
            owner.extend([i] * len(caps))
        txt = normalize(encode_texts(m, texts))
        metrics = retrieval_metrics(txt @ img.T, np.array(owner))
    elif data.kind == "multilabel":
        targets = _multilabel_targets(samples, len(data.classnames), data.root)
        w = (classifiers or ClassifierCache()).get(m, data.classnames, data.templates, str(data.root))
        metrics = multilabel_metrics(100.0 * img @ w, targets)
    else:
        if any("cls" not in s for s in samples):
            raise EvalError(f"{data.root}: a sample lacks the cls member")
        labels = np.array([_label(s["cls"]) for s in samples])
        nc = len(data.classnames)
        if labels.min() < 0 or labels.max() >= nc:
            raise EvalError(f"{data.root}: class id {int(labels.max())} outside classnames.txt ({nc} names)")
        w = (classifiers or ClassifierCache()).get(m, data.classnames, data.templates, str(data.root))
        logits = 100.0 * img @ w
        metrics = classification_metrics(logits, labels)
        ge = GROUP_EVALS.get(key)
        if ge is not None:
            # Camelyon17's main metric (acc1) needs no metadata: without .npy members its slide
            # metrics are left out; a main metric that needs them was refused before encoding.
            gone = [s.get("__key__") for s in samples if "npy" not in s]
            if gone and len(gone) < len(samples):
                raise EvalError(f"{data.root}: sample {gone[0]} has no .npy metadata ({len(gone)} of {len(samples)})")
            meta = None
            if not gone:
                try:
                    meta = np.stack([np.asarray(s["npy"]).reshape(-1) for s in samples])
                except ValueError:
                    raise EvalError(f"{data.root}: .npy metadata vectors differ in length") from None
            if meta is not None or not ge.needs_metadata:
                metrics.update(ge.fn(logits, labels, meta, data.names))
    secs = time.perf_counter() - t0
    return {"metrics": metrics, "n": len(samples), "seconds": secs,
            "images_per_second": len(samples) / secs if secs > 0 else None}



# --------------------------------------------------------------------------- runs


def set_threads(threads: int) -> None:
    """torch's intra-op threads (as ``curate train --threads``)."""
    import torch  # lazy: optional extra [torch]

    torch.set_num_threads(int(threads))


def read_results(path: Path) -> dict[str, dict]:
    """Task key -> result record of an ``eval_results.jsonl`` (empty when the file is absent)."""
    done = {}
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                raise EvalError(f"{path}: line {i} is not JSON") from None
            done[r["key"]] = r
    return done


def _append(path: Path, rec: dict) -> None:
    # One complete line per write (O_APPEND), so a kill never leaves half a record.
    line = (json.dumps(rec) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass
class EvalSummary:
    results_file: Path
    rows: list[dict] = field(default_factory=list)  # one per task: key, name, status, main, n, ips, reason
    aggregates: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'task':<44} {'status':<11} {'main metric':>12} {'n':>7} {'images/s':>9}"]
        for r in self.rows:
            v = "" if r.get("main") is None else f"{r['main']:.4f}"
            n = "" if r.get("n") is None else str(r["n"])
            ips = "" if r.get("ips") is None else f"{r['ips']:.0f}"
            why = f"  ({r['reason']})" if r.get("reason") else ""
            lines.append(f"{r['name'][:44]:<44} {r['status']:<11} {v:>12} {n:>7} {ips:>9}{why}")
        for k, v in self.aggregates.items():
            if v["value"] is not None:
                lines.append(f"{k:<44} {'aggregate':<11} {v['value']:>12.4f} {v['tasks']:>7}")
        return "\n".join(lines)


def aggregate(results: dict[str, dict], tasks: dict[str, dict]) -> dict:
    """DataComp's groups over the tasks that have results (the count says how many of how many)."""
    groups = {"ImageNet": "imagenet", "ImageNet dist. shifts": "dist_shift", "VTAB": "vtab",
              "Retrieval": "retrieval", "Average": None}
    out = {}
    for label, g in groups.items():
        keys = [k for k, t in tasks.items() if t.get("main_metric") is not None and (g is None or t.get("group") == g)]
        vals = [results[k]["metrics"]["main_metric"] for k in keys
                if k in results and results[k]["metrics"].get("main_metric") is not None]
        if keys:
            out[label] = {"value": float(np.mean(vals)) if vals else None, "tasks": f"{len(vals)}/{len(keys)}"}
    return out


def unsupported_reason(key: str, task: dict, data: TaskData) -> str | None:
    """Why a task whose data is present cannot be scored here (None = it can)."""
    mm = task["main_metric"]
    if (data.kind == "winogavil") != (task.get("task") == "winogavil"):
        return f"data is {data.kind} but the task is {task.get('task') or 'zeroshot_classification'}"
    if data.kind == "winogavil":
        return None if mm in WINOGAVIL_METRICS else f"main metric {mm} is not a WinoGAViL metric"
    if key in ("fairness/fairface", "fairness/utkface"):
        return "multi-objective race/gender/age tables not computed; DataComp's main metric is None"
    if (data.kind == "retrieval") != (mm == "mean_recall@1"):
        return f"data is {data.kind} but the main metric is {mm}"
    if (data.kind == "multilabel") != (mm == "mean_average_precision"):
        return f"data is {data.kind} but the main metric is {mm}"
    if mm is None or mm in COMPUTED_METRICS:
        return None
    ge = GROUP_EVALS.get(key)
    if ge is None or mm not in ge.provides:
        return f"main metric {mm} is not implemented for {key}"
    if ge.needs_metadata and "npy" not in first_sample_members(data.shards[0]):
        return (f"{mm} needs per-sample .npy metadata ({', '.join(METADATA_FIELDS[key])}); "
                f"{data.shards[0]} has none")
    return None


def evaluate_run(train_output_dir, tasks=None, data_dir=None, output_dir=None, batch_size: int = 64,
                 only: list[str] | None = None, progress=None, say=None, precision: str = "auto",
                 device: str | None = None, threads: int | None = None) -> EvalSummary:
    """Evaluate the model of a training run on every task with data; append to eval_results.jsonl.

    ``precision``/``device``: see :mod:`curate.evaluate.models` (auto = DataComp's: amp on CUDA,
    fp32 on the CPU); ``threads`` sets torch's intra-op threads. ``progress(iterable, total=N,
    desc=TASK)``, if given, wraps each task's samples (e.g. :class:`curate.progress.Progress`)."""
    run = Path(train_output_dir)
    rec = read_record(run)
    tasklist = load_tasklist(tasks)
    if only:
        unknown = [k for k in only if k not in tasklist]
        if unknown:
            raise EvalError(f"--task {unknown[0]!r} is not in the task list")
        tasklist = {k: v for k, v in tasklist.items() if k in only}
    data_dir = Path(data_dir) if data_dir else None
    out_dir = Path(output_dir) if output_dir else run
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / RESULTS_NAME
    done = read_results(results_file)
    info = out_dir / "eval_info.json"
    checkpoint = rec["checkpoint"]
    if info.is_file() and json.loads(info.read_text()).get("checkpoint") != checkpoint and done:
        raise EvalError(f"{results_file}: results belong to another checkpoint (see {info}); use another --output-dir")
    write_json(info, {"checkpoint": checkpoint, "model": rec["model"], "scale": rec.get("scale")})
    summary = EvalSummary(results_file)
    classifiers = ClassifierCache(out_dir / "classifiers")
    model = None
    for key, task in tasklist.items():
        row = {"key": key, "name": task["name"], "main": None, "n": None, "ips": None}
        if key in done:
            r = done[key]
            row.update(status="done", main=r["metrics"].get("main_metric"), n=r.get("n"),
                       ips=r.get("images_per_second"))
            summary.rows.append(row)
            continue
        data = open_task(data_dir, key, task) if data_dir else None
        if data is None:
            row["status"] = "missing"
            summary.rows.append(row)
            continue
        mm = task["main_metric"]
        reason = unsupported_reason(key, task, data)
        if reason:
            row.update(status="unsupported", reason=reason)
            summary.rows.append(row)
            continue
        if model is None:
            if threads:
                set_threads(threads)
            model = load_model(rec["model"], checkpoint, device=device, precision=precision,
                               model_config=rec.get("model_config"))
        if say:
            say(f"{key}: {len(data.shards)} shards ({model.device}, {model.precision})")
        task_progress = None if progress is None else (lambda it, total=None, k=key: progress(it, total=total, desc=k))
        res = run_task(model, data, key, batch_size, task_progress, classifiers)
        metrics = dict(res["metrics"])
        metrics["main_metric"] = metrics.get(mm) if mm else None
        line = {"key": key, "dataset": task["name"], "metrics": metrics, "n": res["n"],
                "seconds": round(res["seconds"], 3), "images_per_second": res["images_per_second"],
                "precision": model.precision, "device": model.device}
        if say:
            say(f"{key}: {res['n']:,} images in {res['seconds']:.1f}s")
        _append(results_file, line)
        done[key] = line
        row.update(status="evaluated", main=metrics["main_metric"], n=res["n"], ips=res["images_per_second"])
        summary.rows.append(row)
    summary.aggregates = aggregate(done, tasklist)
    return summary

