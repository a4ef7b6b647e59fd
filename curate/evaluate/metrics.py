"""Metrics, computed the way clip_benchmark and DataComp compute them (spec §6.2).

Classification: a zero-shot classifier is the re-normalised mean of the L2-normalised text
embeddings of every template per class, logits are ``100 * normalize(image) @ W``, acc1/acc5
are top-k accuracy and ``mean_per_class_recall`` is sklearn's balanced accuracy. Retrieval:
scores are normalised text x image embeddings, ``image_retrieval_recall@k`` is the fraction of
captions whose image is in their top k, ``text_retrieval_recall@k`` the fraction of images with
at least one of their captions in their top k, ``mean_recall@1`` their mean.

WILDS and fairness tasks (DataComp's ``eval_utils/{wilds,fairness}_eval.py``) add group
metrics from each sample's ``.npy`` metadata vector: iWildCam ``F1-macro_all`` (macro F1 over
the classes present), Camelyon17 ``acc1`` (plus per-slide accuracy), FMoW
``acc_worst_region`` (worst non-empty region, a region named "Other" ignored), Dollar Street
``acc_top5_wg`` (worst income group's top-5 accuracy), GeoDE ``acc_wg`` (worst region's
accuracy). WinoGAViL's ``jaccard_score_10-12`` is DataComp's ``wino_eval.py``.

Pure functions of arrays: no model, no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curate.evaluate import EvalError

COMPUTED_METRICS = {"acc1", "acc5", "mean_per_class_recall", "mean_recall@1", "mean_average_precision"}


# --------------------------------------------------------------------------- classification, retrieval


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
    import torch  # lazy: optional extra [torch]

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
    # clip_benchmark gives NaN below 5 classes; DataComp's results carry it as null
    out["acc5"] = topk_accuracy(logits, labels, 5) if logits.shape[1] >= 5 else None
    out["mean_per_class_recall"] = balanced_accuracy(labels, pred)
    return out


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """clip_benchmark's multi-label AP (from torchnet's meter): per class, rank the samples by
    score (descending), precision at each rank, averaged over the ranks of the positives
    (0 for a class without positives). Ties keep sample order (a stable sort)."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets)
    n, c = scores.shape
    ranks = np.arange(1, n + 1, dtype=np.float64)
    ap = np.zeros(c)
    for k in range(c):
        order = np.argsort(-scores[:, k], kind="stable")
        truth = targets[order, k] > 0
        precision = np.cumsum(truth) / ranks
        ap[k] = precision[truth].sum() / max(float(truth.sum()), 1.0)
    return ap


def multilabel_metrics(logits: np.ndarray, targets: np.ndarray) -> dict:
    """clip_benchmark's multi-label result: ``mean_average_precision`` over the classes."""
    return {"mean_average_precision": float(average_precision_per_class(logits, targets).mean())}


def retrieval_metrics(scores: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """``scores``: texts x images; ``text_image[i]``: the image caption i belongs to.

    image retrieval = for each caption, is its image in the caption's top k images;
    text retrieval = for each image, is any of its captions in the image's top k captions.
    """
    import torch  # lazy: optional extra [torch]

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


# --------------------------------------------------------------------------- WILDS, fairness
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
    """How one WILDS/fairness task's group metrics are computed."""

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


# --------------------------------------------------------------------------- WinoGAViL


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
