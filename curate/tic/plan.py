"""Continual-training plans: TiC-CLIP's strategies as a step-by-step schedule a trainer can run.

A plan is a JSON (or YAML) file with one entry per time step. Each step says which data to
mix (the new years' splits, and for replay strategies a buffer of older data with the exact
number of samples taken from each earlier step), how to start (from scratch, or warm-started
from the previous step's checkpoint with a fresh optimizer and schedule, TiC's ``--new_run``)
and how long to train (samples seen = the per-step budget C). The first step covers 2014 up
to the first ``--steps`` year (TiC's first step "2016" is 2014-2016).

Strategies (TiC-CLIP, arXiv 2310.16226, Sec. 4 and ``tic:scripts``), with D_t the data of step
t and B the replay-buffer size (default |D_t|, the size of the new data; ``--buffer`` fixes it):

* ``sequential``: warm start; D_t only.
* ``cumulative-all``: warm start; D_1 ∪ … ∪ D_t, every sample equally likely.
* ``cumulative-exp``: warm start; D_t plus a buffer of B samples where step t-1 gets B/2,
  t-2 gets B/4, …, and the two oldest steps share the last equal pair (the paper's example:
  step 3 keeps B/2, B/2 of steps 1, 2; step 4 keeps B/4, B/4, B/2 of steps 1, 2, 3). Each
  step halves what it keeps of every older step, so buffers are nested.
* ``cumulative-equal``: warm start; D_t plus a buffer of B split equally over steps 1..t-1.
* ``restart``: from scratch every step on D_1 ∪ … ∪ D_t with budget C.
* ``oracle``: one run from scratch on all steps' data with budget T·C (T = number of steps),
  as ``tic:scripts`` trains it (7 × C for 2016..2022).

A buffer share larger than the data of that step is capped at its size (``capped: true``).
Buffers are materialised with ``filters/tic/replay.sql``: exactly ``samples`` uids, those with
the lowest ``md5(seed || uid)`` (nested as shares shrink). Each step's entries carry a
``probability`` (samples / the step's mixture); ``curate tic train`` turns them into
open_clip's per-shard weights (:func:`curate.tic.train.mixture_weights`) from the samples each
dir actually holds, so the draws follow the plan even where some uids were never downloaded.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

from curate.atomic import atomic_path, write_json
from curate.tic import TicError, check_year

STRATEGIES = ("sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "restart", "oracle")
FORMAT = "curate.tic.plan/1"
FIRST_YEAR = 2014


def parse_steps(text: str, first_year: int = FIRST_YEAR) -> list[int]:
    """``"2016,2017,...,2022"`` -> years; strictly increasing, each in TiC's range (or, for other
    timestamped pools such as TiC-YFCC15M, from ``first_year`` on)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise TicError("--steps is empty; give years like 2016,2017,2018")
    if first_year == FIRST_YEAR:
        years = [check_year(p, f"--steps {text!r}") for p in parts]
    else:
        years = []
        for p in parts:
            if not p.isdigit() or len(p) != 4:
                raise TicError(f"--steps {text!r}: {p!r} is not a year (YYYY)")
            years.append(int(p))
    if years[0] < first_year:
        raise TicError(f"--steps {text!r}: the first step {years[0]} is before the first year {first_year}")
    for a, b in zip(years, years[1:]):
        if b <= a:
            raise TicError(f"--steps {text!r}: years must increase ({a} then {b})")
    return years


def step_years(steps: list[int], first_year: int = FIRST_YEAR) -> list[list[int]]:
    """The years each step covers: first_year..steps[0], then (steps[i-1], steps[i]]."""
    out, prev = [], first_year - 1
    for y in steps:
        out.append(list(range(prev + 1, y + 1)))
        prev = y
    return out


def buffer_shares(strategy: str, t: int) -> list[Fraction]:
    """Share of the replay buffer for each earlier step 1..t-1 at step t (1-based), summing to 1."""
    if t < 2:
        return []
    if strategy == "cumulative-exp":
        # step t-j gets 1/2^j (j = 1..t-2); step 1 gets the same as step 2: 1/2^(t-2)
        return [Fraction(1, 2 ** (t - 2))] + [Fraction(1, 2 ** (t - k)) for k in range(2, t)]
    if strategy == "cumulative-equal":
        return [Fraction(1, t - 1)] * (t - 1)
    raise ValueError(strategy)


def _sizes(sizes: dict, years: list[int], where: str) -> dict[int, int]:
    got = {}
    for y in years:
        if str(y) not in sizes and y not in sizes:
            raise TicError(f"{where}: no size for year {y} (export the splits first: curate tic export)")
        v = sizes.get(str(y), sizes.get(y))
        if not isinstance(v, int) or v < 0:
            raise TicError(f"{where}: size of year {y} is {v!r}, expected a non-negative integer")
        got[y] = v
    return got


def load_sizes(path) -> tuple[dict, str]:
    """``{year: count}`` from an export dir (``yearly/sizes.json``) or a sizes.json file."""
    p = Path(path)
    if p.is_dir():
        p = p / "yearly" / "sizes.json"
    if not p.is_file():
        raise TicError(f"{p}: sizes.json not found (write it with `curate tic export`)")
    try:
        return json.loads(p.read_text()), str(p)
    except json.JSONDecodeError as e:
        raise TicError(f"{p}: not valid JSON ({e})") from None


def make_plan(strategy: str, steps: list[int], budget: int, sizes: dict, *, sizes_source: str = "sizes",
              scale: str = "tic_medium", warmup: int = 500, warm_start_warmup: int = 0,
              buffer: int | None = None, splits_root: str = "tic/train", replay_root: str = "tic/replay",
              runs_root: str = "runs/tic", seed: int = 0, export_dir: str | None = None,
              first_year: int = FIRST_YEAR) -> dict:
    """Build the plan (a dict ready for JSON) for one strategy; see the module docstring."""
    if strategy not in STRATEGIES:
        raise TicError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if not isinstance(budget, int) or budget <= 0:
        raise TicError(f"--budget {budget!r}: must be a positive number of samples")
    if buffer is not None and buffer < 0:
        raise TicError(f"--buffer {buffer}: must be >= 0")
    groups = step_years(steps, first_year)
    size = _sizes(sizes, [y for g in groups for y in g], sizes_source)
    step_size = [sum(size[y] for y in g) for g in groups]
    run_dir = f"{runs_root}/{strategy}"

    def split(y: int, role: str) -> dict:
        return {"role": role, "years": [y], "dir": f"{splits_root}/{y}", "subset": f"yearly/{y}.npy",
                "available": size[y], "fraction": 1.0, "samples": size[y]}

    def splits(ys: list[int], role: str) -> list[dict]:
        return [split(y, role) for y in ys if size[y]]  # a year with no samples has nothing to train on

    for name, g, n in zip(steps, groups, step_size):
        if not n:
            raise TicError(f"step {name} (years {g[0]}..{g[-1]}): no training samples in {sizes_source} "
                           f"(every year's size is 0); choose other --steps")
    plan_steps = []
    if strategy == "oracle":
        years = [y for g in groups for y in g]
        data = splits(years, "new")
        plan_steps.append(_step(0, str(steps[-1]), years, data, "scratch", None, warmup,
                                budget * len(steps), scale, run_dir))
    for t, (name, years) in enumerate(zip(steps, groups), start=1):
        if strategy == "oracle":
            break
        data = splits(years, "new")
        warm = strategy not in ("restart",) and t > 1
        if strategy in ("cumulative-all", "restart"):
            data = splits([y for g in groups[: t - 1] for y in g], "old") + data
        elif strategy in ("cumulative-exp", "cumulative-equal"):
            b = step_size[t - 1] if buffer is None else buffer
            for k, share in enumerate(buffer_shares(strategy, t), start=1):
                want = b * share  # exact; floored once below
                avail = step_size[k - 1]
                take = min(int(want), avail)
                frac = Fraction(take, avail) if avail else Fraction(0)
                g = groups[k - 1]
                data.insert(k - 1, {
                    "role": "replay", "years": g, "from_step": str(steps[k - 1]),
                    "dir": f"{replay_root}/{strategy}/{name}/{steps[k - 1]}",
                    "subset": f"replay/{strategy}/{name}/{steps[k - 1]}.npy",
                    "make": {"filter": "filters/tic/replay.sql",
                             "set": {"first_year": g[0], "last_year": g[-1], "samples": take, "seed": seed}},
                    "available": avail, "share_of_buffer": str(share), "fraction": float(frac),
                    "samples": take, "capped": int(want) > avail,
                })
        prev = str(steps[t - 2]) if warm else None
        plan_steps.append(_step(t - 1, str(name), years, data, "warm" if warm else "scratch", prev,
                                warm_start_warmup if warm else warmup, budget, scale, run_dir))
    return {
        "format": FORMAT,
        "strategy": strategy,
        "steps_arg": [str(s) for s in steps],
        "budget": budget,
        "buffer": buffer,
        "scale": scale,
        "sizes": {str(y): size[y] for y in sorted(size)},
        "sizes_source": sizes_source,
        "export_dir": export_dir,  # `subset` paths are relative to it
        "seed": seed,
        "steps": plan_steps,
    }


def _step(index, name, years, data, init, prev, warmup, samples, scale, run_dir) -> dict:
    total = sum(d["samples"] for d in data)
    for d in data:
        d["probability"] = round(d["samples"] / total, 12) if total else 0.0
    return {
        "index": index,
        "name": name,
        "years": list(years),
        "data": data,
        "mixture_samples": total,
        "init": init,  # "scratch" | "warm"
        "warm_start_from": prev,
        "train": {  # keyword arguments of curate.train.trainer.TrainSpec
            "scale": scale,
            "data": "::".join(d["dir"] for d in data),
            "data_weights": None,  # curate tic train sets them from each entry's probability
            "output_dir": run_dir,
            "exp_name": name,
            "new_run": init == "warm",
            "resume": (f"{run_dir}/{prev}/checkpoints/epoch_latest.pt" if prev else "latest"),
            "warmup": warmup,
            "train_num_samples": samples,
        },
    }


def write_plan(plan: dict, out) -> Path:
    """Write a plan as JSON, or YAML when ``out`` ends in .yaml/.yml."""
    out = Path(out)
    if out.suffix in (".yaml", ".yml"):
        import yaml  # lazy: optional extra [torch] (pyyaml); only .yaml plans need it

        with atomic_path(out) as tmp:
            tmp.write_text(yaml.safe_dump(plan, sort_keys=False))
    else:
        write_json(out, plan)
    return out


def read_plan(path) -> dict:
    """Load and check a plan file (for :mod:`curate.tic.prepare` and :mod:`curate.tic.train`)."""
    p = Path(path)
    if not p.is_file():
        raise TicError(f"{p}: plan file not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # lazy: optional extra [torch] (pyyaml); only .yaml plans need it

            plan = yaml.safe_load(text)
        else:
            plan = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise TicError(f"{p}: not a readable plan ({str(e).splitlines()[0]})") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise TicError(f"{p}: not a curate TiC plan (format {FORMAT!r} expected)")
    return plan
