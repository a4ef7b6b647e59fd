"""``curate pool ...``: pools from timestamped tables, the TiC-YFCC15M / TiC-RedCaps recipes, and
time views over a pool's own time column. Thin click commands over :mod:`curate.pool.build` and
:mod:`curate.pool.recipes`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.catalog.connection import check_new_catalog, init_catalog
from curate.cli.options import catalog_option, catalog_used
from curate.errors import CurateError
from curate.pool.build import TIME_COLUMN, build_pool, failures
from curate.pool.recipes import redcaps, yfcc15m
from curate.pool.recipes.periods import YFCC15M_GROUPS, create_time_views, export_period_splits, parse_groups


@click.group("pool")
def pool_group():
    """Build pools from your own images and timestamped tables."""


def _echo_build(result, t0: float) -> None:
    if result.already_complete:
        click.echo(f"{result.out}: already complete ({result.samples:,} samples in {result.shards} shards)")
        return
    failed = ", ".join(f"{k} {v:,}" for k, v in result.failed.items() if v) or "none"
    resumed = f" (resumed at table row {result.resumed_from_row:,})" if result.resumed_from_row else ""
    click.echo(f"wrote {result.out}: {result.samples:,} samples from {result.rows:,} table rows in "
               f"{result.shards} shards{resumed} in {time.perf_counter() - t0:.1f}s; left out: {failed}")
    if any(result.failed.values()):
        rows = failures(result.out)
        for r in rows.slice(0, 10).to_pylist():
            click.echo(f"  row {r['source_row']}: {r['path']}: {r['status']}: {r['error_message']}")
        if rows.num_rows > 10:
            click.echo(f"  ... {rows.num_rows - 10:,} more in {result.out / 'failures'}/*.parquet")


def _check_catalog_target(catalog: Path | None, overwrite: bool) -> None:
    """Fail before a long build, not after it, when --catalog would be refused."""
    if catalog is not None:
        check_new_catalog(catalog, overwrite)


def _catalog_and_views(catalog: Path | None, out: Path, overwrite: bool, time_views: bool, **view_args) -> None:
    """--catalog: the catalog over the built pool and, when the pool has a time column (parsed
    into time_utc), its time views."""
    if catalog is None:
        click.echo(f"next: curate catalog init CATALOG --pool {out}")
        return
    init_catalog(catalog, pool=out, overwrite=overwrite)
    click.echo(f"wrote catalog {catalog_used(catalog)}")
    if time_views:
        _echo_periods(catalog, create_time_views(catalog, time_col=TIME_COLUMN, **view_args))


def _echo_periods(catalog, counts) -> None:
    click.echo(f"{catalog_used(catalog)}: views timesplit, period_split, tic_eval")
    click.echo(f"  {'period':<12} {'train':>10} {'test':>8}")
    for period, train, test in counts:
        if period is None:
            click.echo(f"  {'(none)':<12} {train:>10,} {'':>8}  (no time or year in no period: left out)")
        else:
            click.echo(f"  {period:<12} {train:>10,} {test:>8,}")


catalog_opt = catalog_option(help="Also create this catalog over the pool (and its time views).")
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace an existing --catalog file.")
workers_opt = click.option("--workers", type=click.IntRange(1, 256), default=None,
                           help="Threads reading and decoding images (default: cores + 2, at most 8).")
seed_opt = click.option("--seed", default="0", show_default=True,
                        help="Seed of the train/test split (part of the hashed key).")
test_opt = click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                        default=0.01, show_default=True, help="Test share per period.")


@pool_group.command("from-table")
@click.argument("table", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--image-col", required=True, help="Column with the image file path (relative to --image-root).")
@click.option("--caption-col", required=True, help="Column with the caption (becomes `text`).")
@click.option("--time-col", default=None, help="Column with the time; parsed into the pool column time_utc.")
@click.option("--time-format", type=click.Choice(["auto", "unix", "unix_ms", "iso", "year"]), default="auto",
              show_default=True, help="How --time-col is written (auto: numbers are Unix seconds, text ISO 8601).")
@click.option("--url-col", default=None, help="Column for the pool's `url` (default: the image path).")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory relative image paths start from (default: the table's directory).")
@click.option("--columns", default=None, help="Comma-separated columns to keep (default: all but caption/url).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pool directory to write.")
@click.option("--groups", default=None, help="Year groups for the periods, e.g. 2004-2008,2009-2010 (with --catalog).")
@catalog_opt
@overwrite_opt
@workers_opt
@seed_opt
@test_opt
def from_table_cmd(table, image_col, caption_col, time_col, time_format, url_col, image_root, columns, out,
                   groups, catalog, overwrite, workers, seed, test_fraction):
    """Build a CommonPool-format pool from TABLE (.csv, .tsv or .parquet) and its image files.

    Writes OUT/metadata/*.parquet (uid = content hash of image + caption, the 9 CommonPool
    columns, the table's other columns, time_utc) and OUT/shards/ in img2dataset's layout.
    Source files are only read. Missing or corrupt images are listed and left out. Re-run the
    same command to resume after an interruption.

    \b
    Example:
      curate pool from-table photos.csv --image-col file --caption-col title \\
          --time-col taken_at --out /data/mypool --catalog mypool.duckdb
    """
    _check_catalog_target(catalog, overwrite)
    t0 = time.perf_counter()
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    group_list = parse_groups(groups) if groups else None
    if group_list and not time_col:
        raise CurateError("--groups needs --time-col")
    result = build_pool(table, out, image_col, caption_col, time_col=time_col, time_format=time_format,
                        url_col=url_col, image_root=image_root, columns=cols, workers=workers)
    _echo_build(result, t0)
    _catalog_and_views(catalog, out, overwrite, time_views=time_col is not None, groups=group_list, seed=seed,
                       test_fraction=test_fraction)


@pool_group.group("recipe")
def recipe_group():
    """TiC-CLIP's time-continual collections: yfcc15m, redcaps."""


@recipe_group.command("yfcc15m")
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="YFCC15M metadata (columns key, title, description, usertags, dateuploaded, ...).")
@click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding {key[:3]}/{key[3:6]}/{key}.jpg.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pool directory to write.")
@catalog_opt
@overwrite_opt
@workers_opt
@seed_opt
@test_opt
def yfcc15m_cmd(csv_path, images, out, catalog, overwrite, workers, seed, test_fraction):
    """TiC-YFCC15M: captions cleaned as TiC does, upload-year groups 2004-08/2009-10/2011-12/2013-14,
    a reproducible 99/1 train/test split per group (views in --catalog).

    \b
    Example:
      curate pool recipe yfcc15m --csv yfcc15m.csv --images /data/yfcc/images \\
          --out /data/tic-yfcc15m --catalog tic-yfcc15m.duckdb
    """
    _check_catalog_target(catalog, overwrite)
    t0 = time.perf_counter()
    counts, result = yfcc15m.build(csv_path, images, out, workers=workers)
    click.echo(f"{csv_path}: {counts['rows']:,} rows, {counts['kept']:,} uploaded in 2004-2014, "
               f"{counts['unmapped']:,} not mapped (other years, left out as in TiC)")
    _echo_build(result, t0)
    _catalog_and_views(catalog, out, overwrite, time_views=True, groups=YFCC15M_GROUPS, seed=seed,
                       test_fraction=test_fraction)


@recipe_group.command("redcaps")
@click.option("--annotations", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of RedCaps annotation files {subreddit}_{year}.json.")
@click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding {subreddit}/{image_id}.jpg.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pool directory to write.")
@click.option("--years", default="2017,2018,2019,2020", show_default=True, help="Annotation years to read.")
@catalog_opt
@overwrite_opt
@workers_opt
@seed_opt
@test_opt
def redcaps_cmd(annotations, images, out, years, catalog, overwrite, workers, seed, test_fraction):
    """TiC-RedCaps: one period per annotation-file year, a reproducible 99/1 train/test split
    per year (views in --catalog).

    \b
    Example:
      curate pool recipe redcaps --annotations redcaps/annotations --images redcaps/images \\
          --out /data/tic-redcaps --catalog tic-redcaps.duckdb
    """
    try:
        year_list = tuple(int(y) for y in years.split(","))
    except ValueError:
        raise CurateError(f"--years {years!r} is not a comma-separated list of years") from None
    _check_catalog_target(catalog, overwrite)
    t0 = time.perf_counter()
    counts, result = redcaps.build(annotations, images, out, years=year_list, workers=workers)
    click.echo(f"{annotations}: " + ", ".join(f"{y}: {n:,}" for y, n in counts.items()) + " annotations")
    _echo_build(result, t0)
    _catalog_and_views(catalog, out, overwrite, time_views=True, period_col="annotation_year",
                       seed=seed, test_fraction=test_fraction)


@pool_group.command("timesplit")
@catalog_option(positional=True, required=True)
@click.option("--time-col", default="time_utc", show_default=True, help="Pool column holding the time.")
@click.option("--groups", default=None, help="Year groups as periods, e.g. 2004-2008,2009-2010,2011-2012,2013-2014.")
@click.option("--period-col", default=None, help="Pool column holding the period instead (e.g. annotation_year).")
@seed_opt
@test_opt
def timesplit_cmd(catalog, time_col, groups, period_col, seed, test_fraction):
    """Create the views timesplit(uid, year, month, period), period_split(uid, period, split)
    and tic_eval in CATALOG from the pool's time column.

    \b
    Example:
      curate pool timesplit mypool.duckdb --groups 2004-2008,2009-2010,2011-2012,2013-2014
    """
    counts = create_time_views(catalog, time_col=time_col, groups=parse_groups(groups) if groups else None,
                               period_col=period_col, seed=seed, test_fraction=test_fraction)
    _echo_periods(catalog, counts)


@pool_group.command("export-splits")
@catalog_option(positional=True, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
def export_splits_cmd(catalog, out):
    """Write OUT/{period}/{train,test}.npy subset files (and sizes.json) from period_split.

    \b
    Example:
      curate pool export-splits tic-yfcc15m.duckdb --out splits/
      curate reshard -i /data/tic-yfcc15m/shards -o train/2004-2008 -s splits/2004-2008/train.npy
    """
    t0 = time.perf_counter()
    sizes = export_period_splits(catalog, out)
    for period, s in sizes.items():
        click.echo(f"  {period}: train {s['train']:,}, test {s['test']:,}")
    click.echo(f"wrote {out}: {2 * len(sizes)} subset files from catalog {catalog_used(catalog)} "
               f"in {time.perf_counter() - t0:.1f}s")
