"""Evaluation: DataComp's zero-shot suite and TiC's dynamic evaluation, from local webdatasets.

``evaluate_run`` reads a training record (``info.json``, written by :mod:`curate.train.trainer`), loads
the checkpoint into open_clip, and runs every task of ``eval/tasklist.yml`` whose data is on
disk in clip_benchmark's webdataset layout. Metrics are computed the way clip_benchmark does
(spec §6.2): a zero-shot classifier is the re-normalised mean of the L2-normalised text
embeddings of every template per class, logits are ``100 * normalize(image) @ W``, acc1/acc5
are top-k accuracy and ``mean_per_class_recall`` is sklearn's balanced accuracy; retrieval
scores are normalised text x image embeddings, ``image_retrieval_recall@k`` is the fraction of
captions whose image is in their top k, ``text_retrieval_recall@k`` the fraction of images with
at least one of their captions in their top k, ``mean_recall@1`` their mean. Each image is
encoded once per task.

Results are appended to ``eval_results.jsonl`` one line per task (DataComp's record:
``key``, ``dataset``, ``metrics`` with ``main_metric``), tasks already there are skipped, and a
task whose data is absent is reported as missing — never run against a download, never
faked. WILDS and fairness tasks (spec §6.2, DataComp's ``eval_utils/{wilds,fairness}_eval.py``)
add their group metrics from each sample's ``.npy`` metadata vector: iWildCam ``F1-macro_all``
(macro F1 over the classes present), Camelyon17 ``acc1`` (plus per-slide accuracy), FMoW
``acc_worst_region`` (worst non-empty region, a region named "Other" ignored), Dollar Street
``acc_top5_wg`` (worst income group's top-5 accuracy), GeoDE ``acc_wg`` (worst region's
accuracy). WinoGAViL's ``jaccard_score_10-12`` (DataComp's ``wino_eval.py``) is computed from a
local webdataset of instances that :func:`export_winogavil` writes from the HF dataset. A task
whose main metric needs metadata the data lacks is reported as unsupported with the reason.

TiC (spec §7.3-7.4): ``tic_matrix`` collects every model's metric on every year's dynamic task
into the evaluation matrix (rows: models in training order, columns: time steps) and reports
in-distribution (diagonal), backward transfer (lower triangle) and forward transfer (upper
triangle) averages; ``plot_matrix`` draws the heatmap.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from curate import resources
from curate.atomic import atomic_path, write_json
from curate.errors import CurateError

TASKLIST = resources.eval_dir() / "tasklist.yml"
RESULTS_NAME = "eval_results.jsonl"
TIC_KEY = re.compile(r"^tic/(?P<ds>[^/]+)/(?P<kind>retrieval|datacompnet)/(?P<scale>yearly|monthly)/(?P<split>\d{4,6})$")
COMPUTED_METRICS = {"acc1", "acc5", "mean_per_class_recall", "mean_recall@1"}
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


class EvalError(CurateError):
    """Bad evaluation input (record, checkpoint, task list, dataset layout)."""


# --------------------------------------------------------------------------- metrics


def zero_shot_weights(class_text_embeddings: list[np.ndarray]) -> np.ndarray:
    """clip_benchmark's classifier: per class, normalise each template's embedding, average,
    re-normalise; returns D x C."""
    cols = []
    for e in class_text_embeddings:
        e = np.asarray(e, dtype=np.float64)
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        m = e.mean(axis=0)
        cols.append(m / np.linalg.norm(m))
    return np.stack(cols, axis=1)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: is the label among the k largest logits (torch.topk order on ties, as
    clip_benchmark and DataComp's ``return_topk``)."""
    import torch

    t = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    pred = t.topk(min(k, t.shape[1]), dim=1, largest=True, sorted=True)[1].numpy()
    return (pred == np.asarray(labels)[:, None]).any(axis=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits (torch.topk order on ties)."""
    return float(topk_correct(logits, labels, k).mean())


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's balanced_accuracy_score: mean recall over the classes present in ``labels``."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    logits, labels = np.asarray(logits), np.asarray(labels)
    pred = logits.argmax(axis=1)
    out = {"acc1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
        out["acc5"] = topk_accuracy(logits, labels, 5)
    out["mean_per_class_recall"] = balanced_accuracy(labels, pred)
    return out


def retrieval_metrics(scores: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """``scores``: texts x images; ``text_image[i]``: the image caption i belongs to.

    image retrieval = for each caption, is its image in the caption's top k images;
    text retrieval = for each image, is any of its captions in the image's top k captions.
    """
    import torch

    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    n_t, n_i = s.shape
    pos = torch.zeros((n_t, n_i), dtype=torch.bool)
    pos[torch.arange(n_t), torch.as_tensor(np.asarray(text_image))] = True
    out = {}
    for k in ks:
        ki = min(k, n_i)
        top = s.topk(ki, dim=1)[1]
        out[f"image_retrieval_recall@{k}"] = float(pos.gather(1, top).any(dim=1).float().mean())
        kt = min(k, n_t)
        top_t = s.T.topk(kt, dim=1)[1]
        out[f"text_retrieval_recall@{k}"] = float(pos.T.gather(1, top_t).any(dim=1).float().mean())
    out["mean_recall@1"] = 0.5 * (out["text_retrieval_recall@1"] + out["image_retrieval_recall@1"])
    return out


# --------------------------------------------------------------------------- WILDS, fairness, WinoGAViL
#
# DataComp (eval_utils/wilds_eval.py, fairness_eval.py) scores these with WILDS' metric classes
# over the argmax predictions (top-5 index lists for Dollar Street) and a per-sample integer
# metadata vector (the ``.npy`` member of each webdataset sample). Groups follow WILDS'
# CombinatorialGrouper on one field: group ids 0..max(value), a group's metric is the mean over
# its samples, empty groups (count 0) are reported but never the worst, worst = minimum.

# Column order of the ``.npy`` vector per task (DataComp's ``_metadata_fields``); only the
# grouping column is read, by position, so extra trailing columns are harmless.
METADATA_FIELDS = {
    "wilds/iwildcam": ("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"),
    "wilds/camelyon17": ("hospital", "slide", "y"),
    "wilds/fmow": ("region", "year", "y"),
    "fairness/dollar_street": ("income_ds", "income_meta", "region"),
    "fairness/geode": ("region", "country"),
}


def _column(metadata, key: str, field: str) -> np.ndarray:
    m = np.asarray(metadata)
    col = METADATA_FIELDS[key].index(field)
    if m.ndim != 2 or m.shape[1] <= col:
        raise EvalError(f"{key}: metadata has shape {m.shape}, needs column {col} ({field})")
    v = m[:, col]
    if not np.all(v == np.round(v)) or (v.size and v.min() < 0):
        raise EvalError(f"{key}: metadata column {field} must hold non-negative integers")
    return v.astype(np.int64)


def group_metrics(values, groups, name: str, field: str, names: list[str] | None = None,
                  ignore: str | None = None) -> tuple[dict, float | None]:
    """WILDS group-wise metric of per-sample ``values`` (e.g. 1.0 = correct).

    Returns ({"{name}_{field}:{g}": mean or None when empty, "count_{field}:{g}": n}, worst),
    g = 0..max(groups) (or ``names[g]``, spaces removed, as WILDS' group_field_str). worst is
    the minimum over non-empty groups whose "{field}:{g}" string does not contain ``ignore``;
    None if no group qualifies.
    """
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups, dtype=np.int64)
    if values.shape != groups.shape:
        raise EvalError(f"{field}: {values.shape[0]} predictions but {groups.shape[0]} metadata rows")
    out, kept = {}, []
    for g in range(int(groups.max()) + 1 if groups.size else 0):
        sel = groups == g
        n = int(sel.sum())
        label = str(names[g]).replace(" ", "") if names is not None and g < len(names) else str(g)
        val = float(values[sel].mean()) if n else None
        out[f"{name}_{field}:{label}"] = val
        out[f"count_{field}:{label}"] = n
        if n and not (ignore and ignore in f"{field}:{label}"):
            kept.append(val)
    return out, (min(kept) if kept else None)


def f1_macro(labels, pred) -> float:
    """sklearn ``f1_score(average="macro", labels=unique(labels))`` (WILDS' F1-macro): mean over
    the classes present in ``labels`` of 2TP / (2TP + FP + FN); predicted classes that never
    occur as a label only count as false positives of nothing (they are not averaged)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    scores = []
    for c in np.unique(labels):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def iwildcam_metrics(logits, labels, metadata=None, names=None) -> dict:
    """DataComp's IWildCamEvaluator: accuracy, macro recall, macro F1 over all samples (no
    grouping, so the metadata is not needed)."""
    labels = np.asarray(labels)
    pred = np.asarray(logits).argmax(axis=1)
    return {"acc_all": float((pred == labels).mean()), "recall-macro_all": balanced_accuracy(labels, pred),
            "F1-macro_all": f1_macro(labels, pred)}


def camelyon17_metrics(logits, labels, metadata, names=None) -> dict:
    """Camelyon17Evaluator: accuracy overall and per slide, worst slide (``acc_wg``)."""
    correct = np.asarray(logits).argmax(axis=1) == np.asarray(labels)
    out, worst = group_metrics(correct, _column(metadata, "wilds/camelyon17", "slide"), "acc", "slide",
                               (names or {}).get("slide"))
    return {"acc_all": float(correct.mean()), **out, "acc_wg": worst}


def fmow_metrics(logits, labels, metadata, names=None) -> dict:
    """FMoWEvaluator: accuracy overall, per year (worst = ``acc_worst_year``) and per region,
    ``acc_worst_region`` = worst non-empty region whose name contains no "Other"."""
    names = names or {}
    correct = np.asarray(logits).argmax(axis=1) == np.asarray(labels)
    years, worst_year = group_metrics(correct, _column(metadata, "wilds/fmow", "year"), "acc", "year",
                                      names.get("year"))
    regions, worst_region = group_metrics(correct, _column(metadata, "wilds/fmow", "region"), "acc", "region",
                                          names.get("region"), ignore="Other")
    return {"acc_all": float(correct.mean()), **years, "acc_worst_year": worst_year, **regions,
            "acc_worst_region": worst_region}


def dollar_street_metrics(logits, labels, metadata, names=None) -> dict:
    """DollarStreetEvaluator: top-5 accuracy overall and per ``income_ds`` group (the income
    bucket id stored in the metadata), ``acc_top5_wg`` = worst group."""
    correct = topk_correct(logits, labels, 5)
    out, worst = group_metrics(correct, _column(metadata, "fairness/dollar_street", "income_ds"), "acc_top5",
                               "income_ds", (names or {}).get("income_ds"))
    return {"acc_top5_all": float(correct.mean()), **out, "acc_top5_wg": worst}


def geode_metrics(logits, labels, metadata, names=None) -> dict:
    """GeoDEEvaluator: accuracy overall and per region, ``acc_wg`` = worst region."""
    correct = np.asarray(logits).argmax(axis=1) == np.asarray(labels)
    out, worst = group_metrics(correct, _column(metadata, "fairness/geode", "region"), "acc", "region",
                               (names or {}).get("region"))
    return {"acc_all": float(correct.mean()), **out, "acc_wg": worst}


@dataclass(frozen=True)
class GroupEval:
    fn: object  # (logits, labels, metadata | None, names | None) -> metrics
    provides: tuple[str, ...]  # main metrics it yields
    needs_metadata: bool


GROUP_EVALS = {
    "wilds/iwildcam": GroupEval(iwildcam_metrics, ("F1-macro_all", "recall-macro_all", "acc_all"), False),
    "wilds/camelyon17": GroupEval(camelyon17_metrics, ("acc_wg", "acc_all"), True),
    "wilds/fmow": GroupEval(fmow_metrics, ("acc_worst_region", "acc_worst_year", "acc_all"), True),
    "fairness/dollar_street": GroupEval(dollar_street_metrics, ("acc_top5_wg", "acc_top5_all"), True),
    "fairness/geode": GroupEval(geode_metrics, ("acc_wg", "acc_all"), True),
}


def jaccard_top_n(scores, truth) -> float:
    """One WinoGAViL instance: pick the n = |truth| candidates with the highest cue-image score
    and return |picked ∩ truth| / |picked ∪ truth| (sklearn binary jaccard_score; 0 when the
    union is empty). Ties: a stable ascending sort, the last n win (higher index first)."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    n = int(truth.sum())
    order = np.argsort(scores, kind="stable")
    picked = np.zeros(len(scores), dtype=bool)
    picked[order[len(order) - n:] if n else order] = True  # DataComp's argsort()[-0:] picks all
    union = int((picked | truth).sum())
    return int((picked & truth).sum()) / union if union else 0.0


WINOGAVIL_METRICS = ("avg_jaccard_score", "jaccard_score_5", "jaccard_score_6", "jaccard_score_10",
                     "jaccard_score_12", "jaccard_score_5-6", "jaccard_score_10-12")


def winogavil_prompt(cue: str) -> str:
    """DataComp's prompt for a cue: lower-cased, "An ..." before a vowel letter, else "A ..."."""
    item = cue.lower()
    return f"An {item}" if item[:1] in ("a", "e", "i", "o", "u") else f"A {item}"


def winogavil_metrics(instances) -> dict:
    """``instances``: (scores over the candidates, ground-truth association mask) per cue.
    Means of the per-instance Jaccard by number of candidates, as DataComp's wino_eval; the
    main metric is ``jaccard_score_10-12`` (instances with >= 10 candidates). Empty -> None."""
    scores = np.array([jaccard_top_n(s, t) for s, t in instances], dtype=np.float64)
    sizes = np.array([len(np.asarray(t)) for _, t in instances])

    def mean(sel):
        return float(scores[sel].mean()) if sel.any() else None

    return {"avg_jaccard_score": mean(np.ones(len(scores), dtype=bool)),
            "jaccard_score_5": mean(sizes == 5), "jaccard_score_6": mean(sizes == 6),
            "jaccard_score_10": mean(sizes == 10), "jaccard_score_12": mean(sizes == 12),
            "jaccard_score_5-6": mean(sizes <= 6), "jaccard_score_10-12": mean(sizes >= 10)}



# --------------------------------------------------------------------------- task list and data


def load_tasklist(path: str | os.PathLike | None = None) -> dict[str, dict]:
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
    root: Path
    kind: str  # "classification" | "retrieval"
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
    classnames = templates = None
    if kind == "classification":
        cfile, tfile = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
        for f in (cfile, tfile):
            if not f.is_file():
                raise EvalError(f"{f}: missing (needed for zero-shot classification of {key})")
        classnames = [ln.strip() for ln in _read(cfile).splitlines()]
        templates = [ln.strip() for ln in _read(tfile).splitlines() if ln.strip()]
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise EvalError(f"{tfile}: template {bad[0]!r} lacks the {{c}} placeholder")
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
    import tarfile

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
    import io

    try:  # never unpickle: object arrays are refused
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EvalError(f"{where}: bad .npy member ({str(e).splitlines()[0]})") from None


def iter_samples(shards: list[str]):
    """(key, image PIL, sample dict) from webdataset shards, in shard order.

    Members are decoded here, not by webdataset's default handlers (which would unpickle
    ``.pyd``/``.pth`` members): the image with PIL, ``.npy`` with numpy (no pickles), the rest
    kept as bytes."""
    import io

    import webdataset as wds
    from PIL import Image

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


# --------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: object
    preprocess: object
    tokenizer: object
    name: str
    checkpoint: str


def load_model(model_name: str, checkpoint: str | os.PathLike) -> LoadedModel:
    """open_clip model ``model_name`` with the weights of a training checkpoint (ours)."""
    import logging

    import open_clip
    import torch

    ck = Path(checkpoint)
    if not ck.is_file():
        raise EvalError(f"{ck}: checkpoint not found")
    torch.manual_seed(0)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights are loaded: we load ours next
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    finally:
        root.setLevel(level)
    try:
        state = torch.load(ck, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is the user's input
        raise EvalError(f"{ck}: not a torch checkpoint ({str(e).splitlines()[0]})") from None
    sd = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise EvalError(f"{ck}: no state_dict inside")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise EvalError(f"{ck}: does not fit model {model_name} ({str(e).splitlines()[0]})") from None
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(model_name), model_name, str(ck))


def encode_texts(m: LoadedModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(m.model.encode_text(m.tokenizer(texts[i:i + batch_size])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def encode_task_images(m: LoadedModel, data: TaskData, batch_size: int, progress=None):
    """Encode every image once; returns (normalised image features, per-sample dicts, seconds)."""
    import torch

    feats, samples, batch = [], [], []
    t0 = time.perf_counter()

    def flush():
        with torch.no_grad():
            f = m.model.encode_image(torch.stack(batch)).float().numpy()
        feats.append(_normalize(f))
        batch.clear()

    it = iter_samples(data.shards)
    if progress is not None:
        it = progress(it, total=data.count)
    for key, img, s in it:
        batch.append(m.preprocess(img))
        samples.append({k: s[k] for k in ("cls", "txt", "npy", "__key__") if k in s})
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    secs = time.perf_counter() - t0
    return (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)), samples, secs


def _label(v) -> int:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode()
    return int(str(v).strip())


def _captions(v) -> list[str]:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8")
    return [c for c in str(v).splitlines() if c.strip()] or [str(v)]


def run_task(m: LoadedModel, data: TaskData, key: str, batch_size: int = 64, progress=None) -> dict:
    """Metrics of one task (clip_benchmark definitions) plus n and images/s."""
    if data.kind == "winogavil":
        return run_winogavil(m, data, batch_size, progress)
    img, samples, secs = encode_task_images(m, data, batch_size, progress)
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
        txt = _normalize(encode_texts(m, texts))
        metrics = retrieval_metrics(txt @ img.T, np.array(owner))
    else:
        if any("cls" not in s for s in samples):
            raise EvalError(f"{data.root}: a sample lacks the cls member")
        labels = np.array([_label(s["cls"]) for s in samples])
        nc = len(data.classnames)
        if labels.min() < 0 or labels.max() >= nc:
            raise EvalError(f"{data.root}: class id {int(labels.max())} outside classnames.txt ({nc} names)")
        embs = [encode_texts(m, [t.replace("{c}", c) for t in data.templates]) for c in data.classnames]
        w = zero_shot_weights(embs)
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
    return {"metrics": metrics, "n": len(samples), "seconds": secs,
            "images_per_second": len(samples) / secs if secs > 0 else None}


# --------------------------------------------------------------------------- WinoGAViL
#
# DataComp reads WinoGAViL from the HF hub (nlphuji/winogavil, test split: cue, candidates,
# associations, candidate_images). Here it is a webdataset like every other task, in
# {data_dir}/wds_misc-winogavil_test/test/*.tar, one sample per instance: KEY.json
# {"cue", "candidates", "associations"} and one image per candidate, KEY.0.png, KEY.1.png, ...
# in candidate order; dataset_type.txt says "winogavil". `export_winogavil` writes that layout
# from the HF rows (`curate eval-export-winogavil`), read from a local copy of the dataset as
# data (`winogavil_rows_from_hf`): the hub repository is a loading-script dataset, and running
# its script would run the repository's code.

WINOGAVIL_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def iter_winogavil(shards: list[str]):
    """(key, cue, candidates, associations, [PIL image per candidate]) per instance."""
    import io

    import webdataset as wds
    from PIL import Image

    pipe = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    for s in pipe:
        where = f"{s.get('__url__')}: sample {s.get('__key__')}"
        if "json" not in s:
            raise EvalError(f"{where} has no json member")
        try:
            inst = json.loads(s["json"])
        except ValueError:
            raise EvalError(f"{where}: json member is not JSON") from None
        cue, cands, assoc = (inst.get(k) if isinstance(inst, dict) else None
                             for k in ("cue", "candidates", "associations"))
        if not (isinstance(cue, str) and cue.strip() and isinstance(cands, list) and cands
                and isinstance(assoc, list) and all(isinstance(c, str) for c in cands + assoc)):
            raise EvalError(f"{where}: json needs a non-empty cue and lists of candidate and association names")
        images = []
        for i in range(len(cands)):
            ext = next((f"{i}.{e}" for e in WINOGAVIL_IMAGE_EXTS if f"{i}.{e}" in s), None)
            if ext is None:
                raise EvalError(f"{where}: no image for candidate {i} ({cands[i]!r})")
            try:
                images.append(Image.open(io.BytesIO(s[ext])).convert("RGB"))
            except OSError as e:
                raise EvalError(f"{where}: undecodable {ext} ({e})") from None
        yield s["__key__"], cue, cands, assoc, images


def run_winogavil(m: LoadedModel, data: TaskData, batch_size: int = 64, progress=None) -> dict:
    """DataComp's wino_eval: score each candidate image against the cue's prompt, pick the top
    n = |associations| (see :func:`jaccard_top_n`), Jaccard with the truth. Each image is
    encoded once; images/s counts candidate images."""
    import torch

    feats, batch, spans, prompts, truths = [], [], [], [], []
    t0 = time.perf_counter()

    def flush():
        with torch.no_grad():
            feats.append(_normalize(m.model.encode_image(torch.stack(batch)).float().numpy()))
        batch.clear()

    n_images = 0
    it = iter_winogavil(data.shards)
    if progress is not None:
        it = progress(it, total=data.count)
    for _, cue, cands, assoc, images in it:
        spans.append((n_images, n_images + len(images)))
        n_images += len(images)
        prompts.append(winogavil_prompt(cue))
        truths.append(np.isin(cands, assoc))
        for img in images:
            batch.append(m.preprocess(img))
            if len(batch) >= batch_size:
                flush()
    if batch:
        flush()
    if not spans:
        raise EvalError(f"{data.root}: no samples")
    img = np.concatenate(feats)
    txt = _normalize(encode_texts(m, prompts))
    secs = time.perf_counter() - t0
    instances = [(img[a:b] @ txt[i], truths[i]) for i, (a, b) in enumerate(spans)]
    return {"metrics": winogavil_metrics(instances), "n": len(spans), "seconds": secs,
            "images_per_second": n_images / secs if secs > 0 else None}


WINOGAVIL_FIELDS = ("cue", "candidates", "associations", "candidate_images")


def hf_table_batches(source: str | os.PathLike, split: str = "test"):
    """Record batches of a local copy of a HF dataset, read as data only (no dataset script or
    pickle is run): a ``save_to_disk`` directory (``state.json`` + Arrow stream files), a
    ``DatasetDict`` directory (``dataset_dict.json``; the ``split`` subdirectory), a parquet
    file, or a directory of parquet files (the hub's parquet export; files under a ``split``
    directory or with ``split`` in their name if there are any, else all of them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path(source)
    if not src.exists():
        raise EvalError(f"{src}: not found")
    if src.is_dir() and (src / "dataset_dict.json").is_file():
        if not (src / split / "state.json").is_file():
            raise EvalError(f"{src}: no '{split}' split in this DatasetDict")
        src = src / split
    if src.is_dir() and (src / "state.json").is_file():
        try:
            files = [f["filename"] for f in json.loads((src / "state.json").read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{src / 'state.json'}: not a datasets save_to_disk state file") from None
        for name in files:
            path = src / Path(name).name  # a bare file name: never a path out of the directory
            try:
                with pa.memory_map(str(path)) as mm:
                    reader = pa.ipc.open_stream(mm)
                    yield from reader
            except (OSError, pa.ArrowInvalid) as e:
                raise EvalError(f"{path}: not an Arrow stream file ({e})") from None
        return
    if src.is_dir():
        files = sorted(src.rglob("*.parquet"))
        picked = [f for f in files if split in f.relative_to(src).parts or split in f.stem.split("-")]
        files = picked or files
        if not files:
            raise EvalError(f"{src}: no save_to_disk dataset (state.json) and no .parquet files")
    else:
        files = [src]
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            yield from pf.iter_batches(batch_size=64)
        except (OSError, pa.ArrowInvalid) as e:
            raise EvalError(f"{f}: not a readable parquet file ({e})") from None


def _name_list(v, where: str) -> list[str]:
    """A list of names as HF stores them: a list, or its JSON / Python-literal text."""
    import ast

    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            try:
                v = ast.literal_eval(v)  # literals only: never evaluates code
            except (ValueError, SyntaxError):
                raise EvalError(f"{where}: not a list of names: {v[:80]!r}") from None
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise EvalError(f"{where}: expected a list of names, got {type(v).__name__}")
    return list(v)


def winogavil_rows_from_hf(source: str | os.PathLike, split: str = "test"):
    """WinoGAViL rows (for :func:`export_winogavil`) from a local HF copy (:func:`hf_table_batches`).
    ``candidate_images`` must hold the image bytes (HF's Image feature stores ``{bytes, path}``)."""
    n = 0
    for batch in hf_table_batches(source, split):
        missing = [c for c in WINOGAVIL_FIELDS if c not in batch.schema.names]
        if missing:
            raise EvalError(f"{source}: WinoGAViL needs columns {', '.join(WINOGAVIL_FIELDS)}; "
                            f"missing {', '.join(missing)} (found {', '.join(batch.schema.names)})")
        cols = {c: batch.column(c).to_pylist() for c in WINOGAVIL_FIELDS}
        for i in range(batch.num_rows):
            where = f"{source}: row {n}"
            images = []
            for j, im in enumerate(cols["candidate_images"][i] or []):
                data = im.get("bytes") if isinstance(im, dict) else im
                if not isinstance(data, (bytes, bytearray)) or not data:
                    raise EvalError(f"{where}: candidate image {j} has no embedded bytes "
                                    f"(only a path: {im.get('path') if isinstance(im, dict) else None!r})")
                images.append(bytes(data))
            yield {"cue": cols["cue"][i], "candidates": _name_list(cols["candidates"][i], f"{where}, candidates"),
                   "associations": _name_list(cols["associations"][i], f"{where}, associations"),
                   "candidate_images": images}
            n += 1


def export_winogavil(rows, out_dir: str | os.PathLike, shard_size: int = 500) -> int:
    """Write WinoGAViL rows (dicts with cue, candidates, associations and candidate_images: PIL
    images or encoded bytes, as the HF dataset yields them) in the layout above, atomically.
    Returns the number of instances."""
    import io
    import shutil
    import tarfile

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    n, tf = 0, None

    def add(name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    try:
        for row in rows:
            if n % shard_size == 0:
                if tf is not None:
                    tf.close()
                tf = tarfile.open(tmp / "test" / f"{n // shard_size}.tar", "w")
            cands, imgs = list(row["candidates"]), list(row["candidate_images"])
            if len(cands) != len(imgs):
                raise EvalError(f"WinoGAViL row {n}: {len(cands)} candidates but {len(imgs)} images")
            key = f"{n:06d}"
            meta = {"cue": row["cue"], "candidates": cands, "associations": list(row["associations"])}
            add(f"{key}.json", json.dumps(meta).encode())
            for i, im in enumerate(imgs):
                if isinstance(im, (bytes, bytearray)):
                    add(f"{key}.{i}.png" if im[:8] == b"\x89PNG\r\n\x1a\n" else f"{key}.{i}.jpg", bytes(im))
                else:
                    buf = io.BytesIO()
                    im.convert("RGB").save(buf, format="PNG")
                    add(f"{key}.{i}.png", buf.getvalue())
            n += 1
        if tf is not None:
            tf.close()
            tf = None
        (tmp / "test" / "nshards.txt").write_text(f"{-(-n // shard_size)}\n")
        (tmp / "dataset_type.txt").write_text("winogavil\n")
        (tmp / "count.txt").write_text(f"{n}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tf is not None:
            tf.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return n


# --------------------------------------------------------------------------- runs


def read_results(path: Path) -> dict[str, dict]:
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
                 only: list[str] | None = None, progress=None, say=None) -> EvalSummary:
    """Evaluate the model of a training run on every task with data; append to eval_results.jsonl."""
    from curate.train.trainer import read_record

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
            model = load_model(rec["model"], checkpoint)
        if say:
            say(f"{key}: {len(data.shards)} shards")
        res = run_task(model, data, key, batch_size, progress)
        metrics = dict(res["metrics"])
        metrics["main_metric"] = metrics.get(mm) if mm else None
        line = {"key": key, "dataset": task["name"], "metrics": metrics, "n": res["n"],
                "seconds": round(res["seconds"], 3), "images_per_second": res["images_per_second"]}
        _append(results_file, line)
        done[key] = line
        row.update(status="evaluated", main=metrics["main_metric"], n=res["n"], ips=res["images_per_second"])
        summary.rows.append(row)
    summary.aggregates = aggregate(done, tasklist)
    return summary


# --------------------------------------------------------------------------- TiC dynamic evaluation


def step_of_split(split: str, steps: list[str]) -> int | None:
    """Index of the time step an eval split (YYYY or YYYYMM) belongs to: the first step whose
    year is >= the split's year (TiC merges 2014-2016 into the first step "2016")."""
    y = int(split[:4])
    for i, s in enumerate(steps):
        if y <= int(str(s)[:4]):
            return i
    return None


def tic_matrix(runs: list[tuple[str, str | os.PathLike]], kind: str = "retrieval") -> dict:
    """The T x T evaluation matrix of models (in training order) on TiC dynamic tasks.

    ``runs``: (step name e.g. "2016", eval output dir holding eval_results.jsonl). Entry
    [i][j] = mean main metric of model i over the ``kind`` splits of step j. ID = mean of the
    diagonal, backward transfer = mean of the entries below it (older steps), forward transfer
    = mean of the entries above it (future steps), as in TiC / CLEAR.
    """
    steps = [str(s) for s, _ in runs]
    T = len(steps)
    m = np.full((T, T), np.nan)
    for i, (_, d) in enumerate(runs):
        res = read_results(Path(d) / RESULTS_NAME)
        per: dict[int, list[float]] = {}
        for key, r in res.items():
            mt = TIC_KEY.match(key)
            if not mt or mt["kind"] != kind:
                continue
            j = step_of_split(mt["split"], steps)
            v = r["metrics"].get("main_metric")
            if j is not None and v is not None:
                per.setdefault(j, []).append(float(v))
        for j, vs in per.items():
            m[i, j] = float(np.mean(vs))
    return {"kind": kind, "steps": steps, "matrix": m.tolist(), **transfer_scores(m)}


def transfer_scores(m) -> dict:
    m = np.asarray(m, dtype=float)
    T = m.shape[0]

    def mean(vals):
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else None

    return {
        "id": mean([m[i, i] for i in range(T)]),
        "backward": mean([m[i, j] for i in range(T) for j in range(T) if j < i]),
        "forward": mean([m[i, j] for i in range(T) for j in range(T) if j > i]),
    }


def plot_matrix(result: dict, out: str | os.PathLike) -> Path:
    """Heatmap PNG of a tic_matrix result (rows: trained up to step, columns: evaluated on step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(result["matrix"], dtype=float)
    steps = result["steps"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(steps), 0.8 + 0.6 * len(steps)))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(steps)), steps, rotation=45)
    ax.set_yticks(range(len(steps)), steps)
    ax.set_xlabel("evaluated on step")
    ax.set_ylabel("trained through step")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not math.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    ax.set_title(f"TiC {result['kind']}: ID {f(result['id'])}, backward {f(result['backward'])}, "
                 f"forward {f(result['forward'])}", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out
