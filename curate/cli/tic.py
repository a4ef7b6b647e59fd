"""``curate tic ...``: the whole ``tic`` group, thin click commands over :mod:`curate.tic` (attach,
export, plan, prepare, train, stats, artifacts) and :mod:`curate.evaluate.matrix` (matrix)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.cli.options import catalog_option, catalog_used, engine_options, progress
from curate.run.query import parse_sets
from curate.tic.analytics import time_stats, write_stats
from curate.tic.artifacts import Assignment, make_tic_artifacts
from curate.tic.attach import attach
from curate.tic.export import export_tic
from curate.tic.prepare import prepare_plan

filter_opt = click.option("--filter", "filter_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Restrict training splits to a subset file (.npy) or a filter's result (.sql).")
set_opt = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                       help="Parameter of the --filter .sql file (repeatable).")


@click.group("tic")
def tic():
    """TiC-DataComp: time splits, split export, eval sets and continual-training plans."""


@tic.command("attach")
@catalog_option(positional=True, required=True)
@click.option("--tic-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory with TiC's artifacts (yearly/monthly uid files, eval maps).")
def attach_cmd(catalog, tic_dir):
    """Ingest TiC's published artifacts as the views timesplit, tic_yearly and tic_eval.

    \b
    Example:
      curate tic attach pool.duckdb --tic-dir /data/tic-datacomp
    """
    r = attach(catalog, tic_dir, progress=progress())
    if r.yearly:
        click.echo(f"yearly:  {sum(r.yearly.values()):,} uids in {len(r.yearly)} years "
                   f"({min(r.yearly)}..{max(r.yearly)}) from {r.sources['yearly']}")
    if r.monthly:
        click.echo(f"monthly: {sum(r.monthly.values()):,} uids in {len(r.monthly)} months "
                   f"({min(r.monthly)}..{max(r.monthly)}) from {r.sources['monthly']}")
    for task in ("retrieval", "datacompnet"):
        src = r.sources.get(task)
        click.echo(f"eval {task}: {r.eval_counts.get(task, 0):,} uids" + (f" from {src}" if src else " (no map)"))
    for m in r.mismatches:
        click.echo(f"warning: {m}", err=True)
    click.echo(f"views {', '.join(r.views)} registered in catalog {catalog_used(catalog)} in {r.elapsed:.2f}s")


@tic.command("export")
@catalog_option(positional=True, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (yearly/, monthly/, eval/).")
@filter_opt
@set_opt
@click.option("--eval-sets/--no-eval-sets", default=None,
              help="Reshard the eval sets into clip_benchmark webdatasets (default: when shards exist).")
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Pool shard dir for the eval sets (default: the catalog's shards dir).")
@engine_options("a .sql --filter per pool file and the eval-set shards as tasks (the streaming "
                "pass that writes the split files stays here)", workers=True,
                workers_help="Reshard worker processes.")
def export_cmd(catalog, out, filter_path, sets, eval_sets, shards, engine):
    """Write every yearly and monthly subset file (one pass) and the eval sets.

    \b
    Example:
      curate tic export pool.duckdb --out tic/ --filter subsets/basic_filter.npy
    """
    export_tic(catalog, out, filter_path, parse_sets(sets), eval_sets=eval_sets, shards=shards, engine=engine,
               progress=progress(), echo=click.echo)
    click.echo(f"exported {out} from catalog {catalog_used(catalog)}")


@tic.command("plan")
@click.option("--strategy", required=True,
              type=click.Choice(["sequential", "cumulative-all", "cumulative-exp", "cumulative-equal",
                                 "restart", "oracle"]))
@click.option("--steps", required=True, help="Comma-separated step years; the first covers --first-year..it.")
@click.option("--budget", type=int, default=None, help="Samples seen per step (default: the scale's).")
@click.option("--sizes", required=True, type=click.Path(path_type=Path),
              help="Export dir of `curate tic export` (uses yearly/sizes.json) or a sizes.json.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Plan file (.json, or .yaml).")
@click.option("--scale", default="tic_medium", show_default=True, help="Training scale (train/scales.yaml).")
@click.option("--buffer", type=int, default=None, help="Replay buffer size (default: the new step's size).")
@click.option("--warm-start-warmup", type=int, default=0, show_default=True,
              help="Warmup steps of warm-started steps (TiC scripts: 0; TiC's xlarge params: 2000).")
@click.option("--splits-root", default="tic/train", show_default=True, help="Where resharded year dirs live.")
@click.option("--replay-root", default="tic/replay", show_default=True, help="Where replay buffers are resharded.")
@click.option("--runs-root", default="runs/tic", show_default=True, help="Training output root.")
@click.option("--seed", default=0, show_default=True, help="Seed of the replay-buffer sampling.")
@click.option("--first-year", default=2014, show_default=True,
              help="First year of the first step (TiC-DataComp: 2014; TiC-YFCC15M: 2004; TiC-RedCaps: 2017).")
def plan_cmd(strategy, steps, budget, sizes, out, scale, buffer, warm_start_warmup, splits_root, replay_root,
             runs_root, seed, first_year):
    """Write a continual-training plan (per step: data mixture, warm start, warmup, samples).

    \b
    Example:
      curate tic plan --strategy cumulative-exp --steps 2016,2017,2018,2019,2020,2021,2022 \\
          --sizes tic/ --out plans/cumulative-exp.json
    """
    from curate.tic.train import plan_for_scale  # lazy: optional extra [torch] (curate.train needs pyyaml)

    plan = plan_for_scale(strategy, steps, sizes, out, budget=budget, scale=scale, first_year=first_year,
                          warm_start_warmup=warm_start_warmup, buffer=buffer, splits_root=splits_root,
                          replay_root=replay_root, runs_root=runs_root, seed=seed)
    for s in plan["steps"]:
        parts = ", ".join(f"{'+'.join(map(str, d['years']))}:{d['samples']:,}"
                          + ("(replay)" if d["role"] == "replay" else "") for d in s["data"])
        click.echo(f"step {s['name']}: {s['init']:<7} warmup {s['train']['warmup']:>5} "
                   f"samples {s['train']['train_num_samples']:,}  data {parts}")
    click.echo(f"wrote {out} ({strategy}, {len(plan['steps'])} steps)")


@tic.command("prepare")
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@catalog_option(required=True, help="Catalog with the TiC views (the replay filters run on it).")
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Pool shard dir (default: the catalog's shards dir).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory the plan's relative paths are under (default: the working directory).")
@click.option("--only", default=None, help="Only these step names (comma-separated).")
@engine_options("one task per output shard", workers=True, workers_help="Reshard worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace data dirs that hold another reshard job's output.")
def prepare_cmd(plan, catalog, shards, root, only, engine, overwrite):
    """Make a plan's replay subsets and reshard all its data dirs (one multi-output job).

    \b
    Example:
      curate tic plan --strategy cumulative-exp --steps 2016,2017,2018 --sizes tic --out plan.json
      curate tic prepare plan.json --catalog pool.duckdb
      curate tic train plan.json
    """
    r = prepare_plan(plan, catalog, shards, root=root, only=[s for s in (only or "").split(",") if s] or None,
                     engine=engine, overwrite=overwrite, progress=progress())
    click.echo(f"replay subsets: {len(r.subsets_made)} made, {len(r.subsets_kept)} already there")
    for d, n in r.dirs.items():
        click.echo(f"  {d}: {n:,} samples")
    click.echo(f"prepared {len(r.dirs)} data dirs for {plan} from catalog {catalog_used(catalog)} in {r.elapsed:.2f}s")


@tic.command("stats")
@catalog_option(positional=True, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the CSV tables and tic_stats.png.")
@filter_opt
@set_opt
def stats_cmd(catalog, out, filter_path, sets):
    """Samples per year/month and a filter's keep rate per year, as tables and a PNG.

    \b
    Example:
      curate tic stats pool.duckdb --out report/ --filter filters/clip_score_l14_30pct.sql
    """
    st = time_stats(catalog, filter_path, parse_sets(sets))
    click.echo("year   samples    eval" + ("   kept  keep%" if st.keep else ""))
    keep = {y: (k, r) for y, _, k, r in st.keep}
    for y, n, e in st.by_year:
        line = f"{y}  {n:>8,} {e:>7,}"
        if y in keep:
            line += f" {keep[y][0]:>6,} {100 * keep[y][1]:6.2f}"
        click.echo(line)
    for f in write_stats(st, out):
        click.echo(f"wrote {f}")
    click.echo(f"on catalog {catalog_used(catalog)}")


@tic.command("artifacts")
@catalog_option(positional=True, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--monthly", type=click.Choice(["npy", "tar"]), default="npy", show_default=True,
              help="Monthly files as .npy (Hugging Face) or one .tar per year (docs-assets).")
@click.option("--seed", default=0, show_default=True)
@click.option("--retrieval-fraction", default=0.05, show_default=True)
@click.option("--datacompnet-fraction", default=0.05, show_default=True)
def artifacts_cmd(catalog, out, monthly, seed, retrieval_fraction, datacompnet_fraction):
    """Generate TiC-format artifacts for a pool (deterministic months and eval uids; for tests/demos).

    \b
    Example:
      curate tic artifacts catalog.duckdb.example --out /tmp/tic-artifacts --monthly tar
    """
    t0 = time.perf_counter()
    c = make_tic_artifacts(catalog, out, monthly=monthly, assignment=Assignment(
        seed=seed, retrieval_fraction=retrieval_fraction, datacompnet_fraction=datacompnet_fraction))
    click.echo(f"wrote {out} from catalog {catalog_used(catalog)}: {c['pool_uids']:,} uids over {c['months']} months; "
               f"{c['train']:,} training, "
               f"{c['retrieval']:,} retrieval eval, {c['datacompnet']:,} DataCompNet eval "
               f"in {time.perf_counter() - t0:.2f}s")



@tic.command("train")
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory the plan's relative paths are relative to (default: current dir).")
@click.option("--workers", default=4, show_default=True)
@click.option("--precision", default=None)
@click.option("--num-checkpoints", default=5, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads per trainer process (OMP_NUM_THREADS).")
@click.option("--only", default=None, help="Run only these step names (comma-separated).")
@click.option("--nproc", type=click.IntRange(1, 1024), default=None,
              help="Training processes per step under torchrun (default: one per visible GPU).")
@click.option("--quiet", "-q", is_flag=True)
def train_cmd(plan, root, workers, precision, num_checkpoints, threads, only, nproc, quiet):
    """Run a TiC continual plan step by step (warm starts where the plan says; done steps skipped).

    \b
    Example:
      curate tic plan --strategy cumulative-all --steps 2016,2017,2018 --sizes tic/ --budget 20000 -o plan.json
      curate tic prepare plan.json --catalog pool.duckdb
      curate tic train plan.json --workers 2
    """
    from curate.tic.train import run_plan  # lazy: optional extra [torch] (open_clip's trainer)

    t0 = time.perf_counter()
    done = run_plan(plan, root=root, workers=workers, precision=precision, num_checkpoints=num_checkpoints,
                    threads=threads, only=[s for s in (only or "").split(",") if s] or None, nproc=nproc,
                    echo=None if quiet else (lambda line: click.echo(line, err=True)),
                    say=click.echo)
    click.echo(f"{plan}: {sum(1 for d in done if d['status'] == 'trained')} steps trained, "
               f"{sum(1 for d in done if d['status'] == 'skipped')} already done, in {time.perf_counter() - t0:.1f}s")


@tic.command("matrix")
@click.argument("runs", nargs=-1, required=True, metavar="STEP=EVAL_DIR...")
@click.option("--kind", type=click.Choice(["retrieval", "datacompnet"]), default="retrieval", show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("tic_matrix.png"),
              show_default=True, help="Heatmap PNG; the numbers go to the same name with .json.")
def matrix_cmd(runs, kind, out):
    """TiC dynamic evaluation matrix with ID / backward / forward transfer and a heatmap.

    Give the models in training order as STEP=DIR, where DIR holds the eval_results.jsonl of
    `curate eval --tasks TIC_TASKLIST` for that step's model.

    \b
    Example:
      curate tic matrix 2016=runs/tic/cumulative-all/2016 2017=runs/tic/cumulative-all/2017 -o m.png
    """
    from curate.evaluate.matrix import parse_step_dirs, write_matrix  # lazy: optional extra [torch] (pyyaml)

    res, png, js = write_matrix(parse_step_dirs(runs), out, kind=kind)
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    click.echo(f"{kind}: ID {f(res['id'])}, backward transfer {f(res['backward'])}, forward transfer {f(res['forward'])}")
    click.echo(f"wrote {png} and {js}")
