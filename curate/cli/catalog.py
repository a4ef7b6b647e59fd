"""``curate catalog``, ``curate subset`` and ``curate sample-pool``: catalogs, subset files, generated pools."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from curate.catalog.connection import catalog_summary, init_catalog
from curate.cli.options import catalog_option, catalog_used
from curate.demo.example import build_example
from curate.errors import CurateError
from curate.pool.sample import generate_pool
from curate.progress import Progress
from curate.subset import subset_info, subset_to_parquet


@click.group("catalog")
def catalog_group():
    """Create and inspect pool catalogs."""


@catalog_group.command("init")
@catalog_option(positional=True, required=True, help="Catalog file to create.")
@click.option("--pool", type=click.Path(file_okay=False, path_type=Path), help="DataComp data dir (metadata/, shards/).")
@click.option("--metadata", type=click.Path(file_okay=False, path_type=Path), help="Metadata dir (default POOL/metadata).")
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path), help="Shards dir (default POOL/shards).")
@click.option("--relative", is_flag=True, help="Store paths relative to the catalog (for catalogs shipped with their data).")
@click.option("--overwrite", is_flag=True, help="Replace an existing catalog file.")
@click.option("--allow-duplicate-uids", is_flag=True,
              help="Accept a uid that is in two pool files (refused by default: it doubles the sample in every subset).")
def catalog_init_cmd(catalog, pool, metadata, shards, relative, overwrite, allow_duplicate_uids):
    """Create CATALOG over a DataComp pool.

    \b
    Example:
      curate catalog init small.duckdb --pool /data/datacomp_small
    """
    t0 = time.perf_counter()
    path = init_catalog(catalog, pool=pool, metadata=metadata, shards=shards, relative=relative, overwrite=overwrite,
                        allow_duplicate_uids=allow_duplicate_uids)
    d = catalog_summary(path)
    click.echo(f"wrote {path}: {d['rows']:,} samples in {d['files']} parquet files ({d['npz']} with .npz) "
               f"in {time.perf_counter() - t0:.2f}s")


@catalog_group.command("info")
@catalog_option(positional=True)
def catalog_info_cmd(catalog):
    """Show what a catalog holds (pool size, paths, views and tables).

    \b
    Example:
      curate catalog info small.duckdb
    """
    d = catalog_summary(catalog)
    click.echo(f"catalog: {catalog_used(catalog)}")
    click.echo(f"pool:    {d['rows']:,} samples in {d['files']} files")
    for k, v in sorted(d["meta"].items()):
        click.echo(f"  {k}: {v}")
    for name, kind in d["objects"]:
        click.echo(f"  {kind.lower():<10} {name}")


@catalog_group.command("example")
def catalog_example_cmd():
    """Regenerate the bundled sample pool (data/sample_pool) and catalog.duckdb.example.

    Deterministic: the same code gives the same pool (a test checks the committed copy).

    \b
    Example:
      curate catalog example && git status data/ catalog.duckdb.example
    """
    path = build_example()
    click.echo(f"wrote catalog {path} (the bundled example)")


@click.group("subset")
def subset_group():
    """Inspect and convert subset files."""


@subset_group.command("info")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def subset_info_cmd(file):
    """Count, distinct uids, duplicates, order and dtype of a subset file.

    \b
    Example:
      curate subset info subsets/no_filter.npy
    """
    if not file.is_file():
        raise CurateError(f"{file}: subset file not found")
    info = subset_info(file)
    for line in info.lines():
        click.echo(line)
    if info.count == 0:
        click.echo(f"warning: {file}: empty subset (0 uids); resharding it is an error", err=True)
    if not (info.sorted and info.dtype_ok):
        sys.exit(1)


@subset_group.command("to-parquet")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def subset_to_parquet_cmd(file, out):
    """Write a subset as parquet with a hex `uid` column (readable from the DuckDB shell).

    \b
    Example:
      curate subset to-parquet subsets/no_filter.npy no_filter.parquet
    """
    n = subset_to_parquet(file, out)
    click.echo(f"wrote {out}: {n:,} uids")


@click.command("sample-pool")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--files", default=2, show_default=True, help="Number of parquet files.")
@click.option("--rows-per-file", default=1000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--npz/--no-npz", default=True, show_default=True, help="Write .npz embeddings.")
@click.option("--shards/--no-shards", default=True, show_default=True, help="Write img2dataset-layout shards.")
@click.option("--fast", is_flag=True, help="Vectorised captions (for large benchmark pools).")
def sample_pool_cmd(out, files, rows_per_file, seed, npz, shards, fast):
    """Generate a CommonPool-format pool (for tests and benchmarks).

    \b
    Example:
      curate sample-pool /tmp/pool10m --files 10 --rows-per-file 1000000 --no-npz --no-shards --fast
    """
    t0 = time.perf_counter()
    generate_pool(out, files=files, rows_per_file=rows_per_file, seed=seed, npz=npz, shards=shards,
                  fast=fast, progress=lambda it: Progress(it, desc="files", unit="file"))
    click.echo(f"wrote {out}: {files * rows_per_file:,} samples in {files} files "
               f"in {time.perf_counter() - t0:.1f}s")
