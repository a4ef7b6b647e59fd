"""``curate tic ...``: thin click commands over :mod:`curate.tic` (attach, export, plan, stats, artifacts)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from curate.cli.ray import engine_options

catalog_arg = click.argument("catalog", type=click.Path(dir_okay=False, path_type=Path))
filter_opt = click.option("--filter", "filter_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Restrict training splits to a subset file (.npy) or a filter's result (.sql).")
set_opt = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                       help="Parameter of the --filter .sql file (repeatable).")


@click.group("tic")
def tic():
    """TiC-DataComp: time splits, split export, eval sets and continual-training plans."""


@tic.command("attach")
@catalog_arg
@click.option("--tic-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory with TiC's artifacts (yearly/monthly uid files, eval maps).")
def attach_cmd(catalog, tic_dir):
    """Ingest TiC's published artifacts as the views timesplit, tic_yearly and tic_eval.

    \b
    Example:
      curate tic attach pool.duckdb --tic-dir /data/tic-datacomp
    """
    from curate.tic.attach import attach

    r = attach(catalog, tic_dir, progress=sys.stderr.isatty())
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
    click.echo(f"views {', '.join(r.views)} registered in {catalog} in {r.elapsed:.2f}s")


@tic.command("export")
@catalog_arg
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (yearly/, monthly/, eval/).")
@filter_opt
@set_opt
@click.option("--eval-sets/--no-eval-sets", default=None,
              help="Reshard the eval sets into clip_benchmark webdatasets (default: when shards exist).")
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Pool shard dir for the eval sets (default: the catalog's shards dir).")
@click.option("--workers", "-j", type=int, default=None, help="Reshard worker processes.")
@engine_options("a .sql --filter per pool file and the eval-set shards as tasks (the streaming "
                "pass that writes the split files stays here)")
def export_cmd(catalog, out, filter_path, sets, eval_sets, shards, workers, engine, ray_address):
    """Write every yearly and monthly subset file (one pass) and the eval sets.

    \b
    Example:
      curate tic export pool.duckdb --out tic/ --filter subsets/basic_filter.npy
    """
    from curate.catalog.connection import catalog_meta, connect, resolve_path
    from curate.run.runner import parse_sets
    from curate.tic.export import export_splits

    sets = parse_sets(sets)
    if engine == "ray" and filter_path and str(filter_path).endswith(".sql"):
        from curate.run.ray import run_filter_ray

        subset = Path(out) / "filter" / (Path(filter_path).stem + ".npy")
        fr = run_filter_ray(filter_path, catalog=catalog, out=subset, sets=sets, progress=sys.stderr.isatty(),
                            address=ray_address)
        click.echo(f"filter {filter_path} on ray: {fr.count:,} uids -> {subset}")
        filter_path, sets = subset, {}
    r = export_splits(catalog, out, filter_path, sets, progress=sys.stderr.isatty())
    n_train = sum(r.yearly.values())
    click.echo(f"read {r.rows_read:,} timestamped samples of {r.pool_rows:,}"
               + (f" (training splits ∩ {r.filter})" if r.filter else ""))
    click.echo(f"wrote {len(r.yearly)} yearly files ({n_train:,} uids) and {len(r.monthly)} monthly files "
               f"under {out} in {r.elapsed:.2f}s")
    click.echo(f"eval subsets: retrieval {sum(r.retrieval.values()):,} uids, "
               f"datacompnet {sum(r.datacompnet.values()):,} uids in {len(r.retrieval) + len(r.datacompnet)} files")
    if eval_sets is False or not (r.retrieval or r.datacompnet):
        return
    if shards is None:
        con = connect(catalog)
        stored = catalog_meta(con).get("shards_dir")
        shards = resolve_path(con, stored, catalog) if stored else None
        con.close()
    if shards is None or not Path(shards).is_dir():
        if eval_sets:
            from curate.tic import TicError

            raise TicError(f"{catalog}: no pool shard directory to reshard the eval sets from; pass --shards DIR")
        click.echo("eval sets not resharded: the catalog has no shard directory (pass --shards DIR)")
        return
    from curate.tic.evalsets import reshard_eval_sets

    t0 = time.perf_counter()
    e = reshard_eval_sets(out, shards, catalog=catalog, workers=workers, progress=sys.stderr.isatty(),
                          engine=engine, ray_address=ray_address)
    click.echo(f"eval sets: {sum(e.dirs.values()):,} samples in {len(e.dirs)} clip_benchmark dirs under "
               f"{out / 'eval'} (read {e.input_shards_read} of {e.input_shards_total} pool shards) "
               f"in {time.perf_counter() - t0:.2f}s")
    if e.missing:
        click.echo(f"note: {sum(e.missing.values()):,} eval uids have no downloaded sample in {shards}")
    click.echo(f"wrote {e.tasklist} (curate eval --tasks {e.tasklist} --data-dir {out})")


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
    from curate.tic.plan import load_sizes, make_plan, parse_steps, write_plan
    from curate.train.trainer import scale_config

    cfg = scale_config(scale)
    sz, src = load_sizes(sizes)
    plan = make_plan(strategy, parse_steps(steps, first_year), budget or int(cfg["train_num_samples"]), sz,
                     sizes_source=src, first_year=first_year,
                     scale=scale, warmup=int(cfg["warmup"]), warm_start_warmup=warm_start_warmup, buffer=buffer,
                     splits_root=splits_root, replay_root=replay_root, runs_root=runs_root, seed=seed,
                     export_dir=str(sizes if sizes.is_dir() else Path(src).parent.parent))
    write_plan(plan, out)
    for s in plan["steps"]:
        parts = ", ".join(f"{'+'.join(map(str, d['years']))}:{d['samples']:,}"
                          + ("(replay)" if d["role"] == "replay" else "") for d in s["data"])
        click.echo(f"step {s['name']}: {s['init']:<7} warmup {s['train']['warmup']:>5} "
                   f"samples {s['train']['train_num_samples']:,}  data {parts}")
    click.echo(f"wrote {out} ({strategy}, {len(plan['steps'])} steps)")


@tic.command("prepare")
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--catalog", "-c", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Catalog with the TiC views (the replay filters run on it).")
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Pool shard dir (default: the catalog's shards dir).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory the plan's relative paths are under (default: the working directory).")
@click.option("--only", default=None, help="Only these step names (comma-separated).")
@click.option("--workers", "-j", type=int, default=None, help="Reshard worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace data dirs that hold another reshard job's output.")
def prepare_cmd(plan, catalog, shards, root, only, workers, overwrite):
    """Make a plan's replay subsets and reshard all its data dirs (one multi-output job).

    \b
    Example:
      curate tic plan --strategy cumulative-exp --steps 2016,2017,2018 --sizes tic --out plan.json
      curate tic prepare plan.json --catalog pool.duckdb
      curate tic train plan.json
    """
    from curate.catalog.connection import catalog_meta, connect, resolve_path
    from curate.tic import TicError
    from curate.tic.prepare import prepare_plan

    if shards is None:
        con = connect(catalog)
        stored = catalog_meta(con).get("shards_dir")
        shards = resolve_path(con, stored, catalog) if stored else None
        con.close()
        if shards is None:
            raise TicError(f"{catalog}: no shards dir recorded; pass --shards DIR")
    r = prepare_plan(plan, catalog, shards, root=root, only=[s for s in (only or "").split(",") if s] or None,
                     workers=workers, overwrite=overwrite, progress=sys.stderr.isatty())
    click.echo(f"replay subsets: {len(r.subsets_made)} made, {len(r.subsets_kept)} already there")
    for d, n in r.dirs.items():
        click.echo(f"  {d}: {n:,} samples")
    click.echo(f"prepared {len(r.dirs)} data dirs for {plan} in {r.elapsed:.2f}s")


@tic.command("stats")
@catalog_arg
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
    from curate.run.runner import parse_sets
    from curate.tic.analytics import time_stats, write_stats

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


@tic.command("artifacts")
@catalog_arg
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
    from curate.tic.artifacts import Assignment, make_tic_artifacts

    t0 = time.perf_counter()
    c = make_tic_artifacts(catalog, out, monthly=monthly, assignment=Assignment(
        seed=seed, retrieval_fraction=retrieval_fraction, datacompnet_fraction=datacompnet_fraction))
    click.echo(f"wrote {out}: {c['pool_uids']:,} uids over {c['months']} months; {c['train']:,} training, "
               f"{c['retrieval']:,} retrieval eval, {c['datacompnet']:,} DataCompNet eval "
               f"in {time.perf_counter() - t0:.2f}s")


# moved here from their modules by the owners of those groups (temporary wiring)
from curate.cli.train import tic_train_cmd  # noqa: E402
from curate.cli.evaluate import tic_matrix_cmd  # noqa: E402

tic.add_command(tic_train_cmd)
tic.add_command(tic_matrix_cmd)
