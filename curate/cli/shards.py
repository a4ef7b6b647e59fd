"""Command line for resharding and shard directories: ``curate reshard`` and ``curate shards ...``.

Thin click wrappers over :mod:`curate.shards.reshard`, :mod:`curate.shards.index` and
:mod:`curate.shards.verify`; each prints what it did.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from curate.cli.options import catalog_option, catalog_used, engine_options, progress
from curate.errors import CurateError
from curate.shards.index import index_catalog
from curate.shards.reshard import reshard
from curate.shards.verify import verify_dir


@click.command("reshard")
@click.option("--input-dir", "-i", "inputs", multiple=True, required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Input shard directory (img2dataset tars or a reshard output); repeatable.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (created if missing).")
@click.option("--subset-file", "-s", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Subset file (sorted u8,u8 .npy or raw memmap).")
@click.option("--shard-size", default=10000, show_default=True, help="Samples per output shard.")
@click.option("--cls-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="uid -> class id (TiC pickle, parquet uid/cls, or JSON); adds a `cls` member.")
@click.option("--apply-blur", is_flag=True, help="Blur faces (boxes from each sample's json, or the pool "
              "with --catalog) and re-encode those images as webp.")
@click.option("--inject-blur-metadata", is_flag=True, help="Write face_bboxes into each sample's json.")
@catalog_option(help="Catalog whose shard index covers the input (from `curate shards index`); "
                     "also the source of face boxes for --apply-blur.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier reshard output: the new one is built beside "
              "it and swapped in when complete; a directory holding files reshard did not write is refused.")
@engine_options("one task per output shard", workers=True, workers_help="Worker processes (default: all cores).")
def reshard_cmd(inputs, output_dir, subset_file, shard_size, cls_file, apply_blur, inject_blur_metadata,
                catalog, overwrite, engine):
    """Write webdataset shards holding exactly the samples of a subset file.

    Only input shards holding selected samples are read (planned from the shard index). A
    killed run resumes when given the same command; completed output shards are kept. Only data
    members (images, txt, json, cls) are copied; others (pyd, pickle, pth, ...) are dropped and
    counted. The output may not be, contain or lie inside an input.

    \b
    Example:
      curate shards index pool.duckdb
      curate reshard -i /data/pool/shards -o /data/l14_30pct -s subsets/l14_30pct.npy --catalog pool.duckdb
    """
    res = reshard(list(inputs), output_dir, subset_file, cls=cls_file, shard_size=shard_size,
                  apply_blur=apply_blur, inject_blur_metadata=inject_blur_metadata, overwrite=overwrite,
                  catalog=catalog, progress=progress(), engine=engine)
    for line in res.summary():
        click.echo(line)
    rate = res.output_count / res.elapsed if res.elapsed else 0.0
    click.echo(f"done in {res.elapsed:.2f}s ({rate:,.0f} samples/s)"
               + (f" with catalog {catalog_used(catalog)}" if catalog is not None else " (no catalog)"))


@click.group("shards")
def shards_group():
    """Index and check webdataset shard directories."""


@shards_group.command("index")
@catalog_option(positional=True, required=True)
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Shard directory to index (default: the catalog's shards dir).")
@click.option("--workers", "-j", type=int, default=2, show_default=True)
def shards_index_cmd(catalog, shards, workers):
    """Record which uid is in which tar (and where) as tables in CATALOG.

    Reads tar headers and each sample's json (img2dataset's per-shard parquet for samples
    without one); tars already indexed and unchanged are skipped.

    \b
    Example:
      curate shards index pool.duckdb
      curate shards index pool.duckdb --shards /data/tic/eval/all
    """
    t0 = time.perf_counter()
    r = index_catalog(catalog, shards, workers=workers, progress=progress())
    click.echo(f"{r.root}: {r.samples:,} samples in {r.tars} tars ({r.scanned} scanned now) "
               f"indexed in catalog {catalog_used(catalog)} in {time.perf_counter() - t0:.2f}s")
    if r.truncated:
        click.echo(f"  {len(r.truncated)} truncated tars (cut inside a member or missing the end-of-archive "
                   f"blocks; last sample left out): {', '.join(r.truncated[:5])}")
    if r.without_stats:
        click.echo(f"  {len(r.without_stats)} tars without _stats.json: {', '.join(r.without_stats[:5])}")
    if r.no_uid:
        click.echo(f"  {r.no_uid:,} samples without a readable uid (no json and no parquet row)")


@shards_group.command("verify")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--input-dir", "-i", "inputs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="For a reshard output: its input dir(s), to recount the subset entries they hold.")
@catalog_option(help="Catalog with a shard index of the input (saves scanning it).")
def shards_verify_cmd(directory, inputs, catalog):
    """Check every tar of DIRECTORY parses, counts match _stats.json / sizes.json, keys are sound.

    For a reshard output also checks meta.json's output_count and that every output uid is in
    sample_ids.npy with copies 0..k-1; with -i, that output_count equals the number of subset
    entries present in the input.

    \b
    Example:
      curate shards verify /data/l14_30pct -i /data/pool/shards --catalog pool.duckdb
    """
    if not directory.is_dir():
        raise CurateError(f"{directory}: directory not found")
    t0 = time.perf_counter()
    rep = verify_dir(directory, progress=progress(), inputs=list(inputs), catalog=catalog)
    for p in rep.problems:
        click.echo(f"problem: {p}", err=True)
    kind = "reshard output" if rep.reshard_output else "shard directory"
    status = "ok" if rep.ok else f"{len(rep.problems)} problems"
    click.echo(f"{directory}: {kind}, {rep.samples:,} samples in {rep.tars} tars: {status} "
               f"({time.perf_counter() - t0:.2f}s" + (f", catalog {catalog_used(catalog)})" if catalog is not None else ")"))
    if not rep.ok:
        sys.exit(1)
