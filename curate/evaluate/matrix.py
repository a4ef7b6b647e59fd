"""TiC's dynamic evaluation matrix (spec §7.3-7.4): every model on every time step.

``tic_matrix`` collects every model's metric on every year's dynamic task (the ``tic/...``
keys of ``eval_results.jsonl``) into the evaluation matrix (rows: models in training order,
columns: time steps) and reports in-distribution (diagonal), backward transfer (lower
triangle) and forward transfer (upper triangle) averages; ``plot_matrix`` draws the heatmap
and ``write_matrix`` does both and writes the numbers as JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from curate.atomic import atomic_path, write_json
from curate.evaluate import EvalError
from curate.evaluate.run import RESULTS_NAME, read_results
from curate.evaluate.tasks import TIC_KEY


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
    """ID (diagonal), backward (below it) and forward (above it) means of a T x T matrix, NaN
    entries left out; None where no entry counts."""
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
    import matplotlib  # lazy: optional extra [plot]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional extra [plot]

    m = np.asarray(result["matrix"], dtype=float)
    steps = result["steps"]
    # sized from its content: the cells, and a two-line title that must fit for any step count
    fig, ax = plt.subplots(figsize=(max(4.8, 1.8 + 0.7 * len(steps)), max(3.8, 1.6 + 0.6 * len(steps))))
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
    ax.set_title(f"TiC {result['kind']}\nID {f(result['id'])}, backward {f(result['backward'])}, "
                 f"forward {f(result['forward'])}", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return out


def parse_step_dirs(runs: list[str]) -> list[tuple[str, str]]:
    """``["STEP=EVAL_DIR", ...]`` -> ``[(step, eval_dir), ...]`` for :func:`tic_matrix`."""
    pairs = []
    for r in runs:
        if "=" not in r:
            raise EvalError(f"{r!r}: expected STEP=EVAL_DIR")
        step, d = r.split("=", 1)
        pairs.append((step, d))
    return pairs


def write_matrix(runs: list[tuple[str, str | os.PathLike]], out: str | os.PathLike,
                 kind: str = "retrieval") -> tuple[dict, Path, Path]:
    """:func:`tic_matrix` of ``runs``, its heatmap at ``out`` (PNG) and its numbers at ``out``
    with a .json suffix; returns (result, png path, json path)."""
    res = tic_matrix(runs, kind=kind)
    png = plot_matrix(res, out)
    js = png.with_suffix(".json")
    write_json(js, res)
    return res, png, js
