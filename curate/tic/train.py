"""TiC continual training: a plan (:mod:`curate.tic.plan`) run step by step with the fixed trainer.

The plan's per-step ``train`` entries are the keyword arguments of
:class:`curate.train.trainer.TrainSpec`; :func:`run_plan` trains each step in order
(:func:`curate.train.trainer.train`), skipping finished steps, warm-starting where the plan says
(TiC's ``--new_run``: weights only). :func:`plan_for_scale` writes a plan whose budget and
warmup come from a training scale (``curate tic plan``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from curate.tic.plan import FIRST_YEAR, load_sizes, make_plan, parse_steps, read_plan, write_plan
from curate.train.trainer import (RECORD_NAME, DataSource, TrainError, TrainSpec, latest_checkpoint, parse_data,
                                  scale_config, train)


def plan_for_scale(strategy: str, steps: str, sizes: str | os.PathLike, out: str | os.PathLike | None = None, *,
                   budget: int | None = None, scale: str = "tic_medium", first_year: int = FIRST_YEAR,
                   **options) -> dict:
    """The plan of ``strategy`` over ``steps`` (``"2016,2017,..."``) with the sizes of an export
    dir (or a sizes.json), sized by the training ``scale``: ``budget`` defaults to the scale's
    samples seen, scratch steps use its warmup. ``options`` go to
    :func:`curate.tic.plan.make_plan` (warm_start_warmup, buffer, splits_root, replay_root,
    runs_root, seed). Written to ``out`` (JSON, or YAML for .yaml/.yml) when given."""
    cfg = scale_config(scale)
    sz, src = load_sizes(sizes)
    sizes = Path(sizes)
    plan = make_plan(strategy, parse_steps(steps, first_year), budget or int(cfg["train_num_samples"]), sz,
                     sizes_source=src, first_year=first_year, scale=scale, warmup=int(cfg["warmup"]),
                     export_dir=str(sizes if sizes.is_dir() else Path(src).parent.parent), **options)
    if out is not None:
        write_plan(plan, out)
    return plan


def _under(root: Path, p: str) -> str:
    """``p`` under ``root`` unless it is absolute or a URL."""
    if p.startswith(("s3://", "pipe:", "http://", "https://")) or Path(p).is_absolute():
        return p
    return str(root / p)


def plan_step_spec(step: dict, root: Path, **overrides) -> TrainSpec:
    """The TrainSpec of one plan step (``step['train']``), paths resolved against ``root``."""
    t = dict(step.get("train") or {})
    unknown = set(t) - set(TrainSpec.__dataclass_fields__)
    if unknown or "scale" not in t or "data" not in t or "output_dir" not in t:
        raise TrainError(f"plan step {step.get('name')!r}: bad train entry "
                         f"({', '.join(sorted(unknown)) or 'needs scale, data, output_dir'})")
    t["data"] = "::".join(_under(root, d) for d in str(t["data"]).split("::") if d)
    t["output_dir"] = Path(_under(root, str(t["output_dir"])))
    if t.get("resume") not in (None, "latest"):
        t["resume"] = _under(root, t["resume"])
    t.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSpec(**t)


def mixture_weights(step: dict, sources: list[DataSource]) -> list[float]:
    """open_clip's per-shard weight for each data dir of a plan step, so that the expected share
    of the samples drawn from dir d is the plan's ``probability`` p_d.

    With ``--dataset-resampled`` open_clip draws whole shards with probability proportional to
    their weight (every shard of a dir gets the dir's weight w_d), so dir d yields a share
    w_d * S_d / sum_e(w_e * S_e) of the samples, S_d being the samples it holds. Hence
    w_d = p_d * T / S_d with T = sum_e S_e: 1.0 for every dir when each holds exactly its
    planned samples, larger for a dir that came out short (uids never downloaded). A dir whose
    count is unknown (a remote URL, or no ``sizes.json`` / ``_stats.json``) is taken to hold its
    planned ``samples``.
    """
    data = step.get("data") or []
    name = step.get("name")
    if len(data) != len(sources):
        raise TrainError(f"plan step {name!r}: {len(data)} data entries but {len(sources)} data dirs")
    held = [s.num_samples if s.num_samples is not None else int(d.get("samples") or 0)
            for d, s in zip(data, sources)]
    total = sum(held)
    return [float(d.get("probability", 0.0)) * total / n if n else 0.0 for d, n in zip(data, held)]


def step_done(spec: TrainSpec) -> bool:
    """True when the step's run finished: a record with every checkpoint and the planned samples."""
    rec = spec.run_dir / RECORD_NAME
    if not rec.is_file() or latest_checkpoint(spec.run_dir) is None:
        return False
    try:
        r = json.loads(rec.read_text())
    except ValueError:
        return False
    return r.get("epochs_done") == spec.num_checkpoints and r.get("train_num_samples") == (
        spec.train_num_samples if spec.train_num_samples is not None else r.get("train_num_samples"))


def run_plan(plan_path, root=None, *, workers: int = 4, precision: str | None = None,
             num_checkpoints: int = 5, threads: int | None = None, only: list[str] | None = None,
             nproc: int | None = None, echo=None, say=print) -> list[dict]:
    """Run every step of a TiC plan (:mod:`curate.tic.plan`) in order; finished steps are skipped.

    A warm step (``init == "warm"``) starts from the previous step's ``epoch_latest.pt`` with
    weights only (TiC's ``--new_run``); a killed step resumes from its own last checkpoint.
    A step without ``data_weights`` trains with :func:`mixture_weights` (the plan's
    probabilities over the samples each dir holds).
    """
    plan = read_plan(plan_path)
    root = Path(root) if root is not None else Path.cwd()
    out = []
    for step in plan["steps"]:
        name = str(step.get("name"))
        if only and name not in only:
            continue
        spec = plan_step_spec(step, root, workers=workers, precision=precision, num_checkpoints=num_checkpoints,
                              threads=threads, nproc=nproc)
        if step_done(spec):
            say(f"step {name}: done already ({spec.run_dir})")
            out.append({"step": name, "status": "skipped", "run_dir": str(spec.run_dir)})
            continue
        if spec.data_weights is None:  # the plan's probabilities, as shard weights
            spec.data_weights = "::".join(repr(w) for w in mixture_weights(step, parse_data(spec.data)))
        if spec.new_run and latest_checkpoint(spec.run_dir) is None and not Path(spec.resume).is_file():
            raise TrainError(f"plan step {name}: warm start needs {spec.resume} (train the previous step first)")
        say(f"step {name}: {step.get('init')} start, {spec.train_num_samples or 'scale default'} samples "
            f"from {len(step.get('data', []))} splits -> {spec.run_dir}")
        res = train(spec, echo=echo)
        out.append({"step": name, "status": "trained", "run_dir": str(res.run_dir),
                    "checkpoint": str(res.checkpoint), "elapsed": res.elapsed})
    return out
