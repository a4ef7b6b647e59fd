"""``curate ray ...``: the Ray engine's own commands.

``curate ray run`` is ``curate run`` on a Ray cluster (same filter files, byte-identical subset
files) with the Ray runner's own options (work directory, bucket layout, object storage);
``catalog-init`` makes a catalog over a pool in object storage; ``subset-concat`` joins a
bucket-directory subset. Other commands take ``--engine ray`` (:func:`curate.cli.options.engine_options`).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.catalog.connection import connect
from curate.catalog.remote import init_remote_catalog
from curate.cli.options import catalog_option, catalog_used, progress, storage_option
from curate.cli.run import echo_run_summary
from curate.engine import Engine
from curate.features.text import build_text_features
from curate.run import run_filter
from curate.run.assemble import concat_bucket_directory
from curate.run.query import parse_sets
from curate.storage import options_given, storage_options_from_env


@click.group("ray")
def ray_group():
    """Run curate's steps on a Ray cluster (pool files as partitions)."""


@ray_group.command("run")
@click.argument("filter_file", type=click.Path(dir_okay=False, path_type=Path))
@catalog_option()
@click.option("--out", "-o", default=None, metavar="PATH|URL",
              help="Subset to write (default: subsets/FILTER.npy); may be s3://...; a .json manifest goes beside it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a parameter the filter declares with SET VARIABLE (repeatable).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join (auto, ray://head:10001); default: start Ray on this machine.")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a Ray started here (default: all).")
@click.option("--max-in-flight", type=int, default=None, help="At most this many tasks at once.")
@click.option("--layout", type=click.Choice(["file", "buckets"]), default="file", show_default=True,
              help="file: one sorted .npy; buckets: a directory of sorted bucket files + buckets.json.")
@click.option("--bucket-records", type=int, default=1 << 22, show_default=True,
              help="Records per sort bucket (16 bytes each).")
@click.option("--work-dir", default=None, metavar="PATH|URL",
              help="Where partitions are kept until the run ends (default: OUT.work); rerun to resume.")
@click.option("--keep-work", is_flag=True, help="Keep the work directory after success.")
@storage_option
def ray_run(filter_file, catalog, out, sets, ray_address, num_cpus, max_in_flight, layout, bucket_records,
            work_dir, keep_work, storage_options):
    """Run a SQL filter per pool file on Ray; same subset file as `curate run`.

    \b
    Example:
      ray start --head --num-cpus 8          # or join an existing cluster
      curate ray run filters/clip_score_l14_30pct.sql --ray-address auto \\
          -c pool.duckdb -o s3://bucket/subsets/l14_30pct.npy
    """
    engine = Engine("ray", address=ray_address, num_cpus=num_cpus, max_in_flight=max_in_flight)
    res = run_filter(filter_file, catalog=catalog, out=out, sets=parse_sets(sets), progress=progress(),
                     engine=engine, work_dir=work_dir, keep_work=keep_work, bucket_records=bucket_records,
                     layout=layout, storage_options=storage_options)
    echo_run_summary(filter_file, res, catalog, thresholds=False, note=" (ray engine)")


@ray_group.command("catalog-init")
@catalog_option(positional=True, required=True, help="Catalog file to create.")
@click.option("--metadata", required=True, metavar="URL", help="The pool's metadata dir, e.g. s3://bucket/pool/metadata.")
@click.option("--shards", default=None, metavar="URL", help="The pool's shards dir (recorded in the catalog).")
@click.option("--features-dir", default=None, metavar="DIR",  # a str: a Path would turn s3:// into s3:/
              help="Local directory for the pool's feature tables (default: CATALOG.features beside the catalog); "
                   "never the pool's bucket.")
@click.option("--overwrite", is_flag=True, help="Replace an existing catalog file.")
@storage_option
def ray_catalog_init(catalog, metadata, shards, features_dir, overwrite, storage_options):
    """Create a local CATALOG over a pool in object storage (read through fsspec).

    \b
    Example:
      curate ray catalog-init pool.duckdb --metadata s3://bucket/datacomp/small/metadata
      curate ray catalog-init pool.duckdb --metadata s3://bucket/small/metadata --features-dir /shared/features
    """
    t0 = time.perf_counter()
    opts = storage_options if storage_options is not None else storage_options_from_env()
    path = init_remote_catalog(catalog, metadata, shards, storage_options=opts, overwrite=overwrite,
                               features_dir=features_dir)
    con = connect(path)
    n, files = con.execute("SELECT sum(num_rows), count(*) FROM pool_files").fetchone()
    feats = con.execute("SELECT value FROM curate_meta WHERE key = 'features_dir'").fetchone()[0]
    con.close()
    click.echo(f"wrote {path}: {n:,} samples in {files} parquet files under {metadata} "
               f"in {time.perf_counter() - t0:.2f}s; feature tables go to {feats}")


@ray_group.command("subset-concat")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def ray_subset_concat(directory, out):
    """Join a bucket-directory subset (--layout buckets) into one sorted .npy subset file.

    \b
    Example:
      curate ray subset-concat subsets/no_filter_xlarge/ subsets/no_filter_xlarge.npy
    """
    t0 = time.perf_counter()
    n = concat_bucket_directory(directory, out)
    click.echo(f"wrote {out}: {n:,} uids from {directory} in {time.perf_counter() - t0:.2f}s")


@ray_group.command("features-text")
@catalog_option()
@click.option("--lid-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="fastText LID model (default: as `curate features text`).")
@click.option("--force", is_flag=True, help="Recompute every pool file.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to join (auto, ray://head:10001); default: start Ray on this machine.")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a Ray started here (default: all).")
@storage_option
def ray_features_text(catalog, lid_model, force, ray_address, num_cpus, storage_options):
    """Compute the text_features table with one Ray task per stale pool file.

    \b
    Example:
      curate ray features-text -c pool.duckdb --ray-address auto
    """
    with options_given(storage_options):  # a pool in object storage is read with them
        res = build_text_features(catalog, lid_model=lid_model, progress=progress(), force=force,
                                  engine=Engine(kind="ray", address=ray_address, num_cpus=num_cpus))
    click.echo(f"text_features: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions), "
               f"{len(res.skipped)} up to date, in {res.elapsed:.1f}s -> {res.out_dir}")
    click.echo(f"on catalog {catalog_used(catalog)}")
