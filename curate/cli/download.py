"""``curate download``, ``curate download-status`` and ``curate byod``: thin click wrappers over
:mod:`curate.pool.download` and :mod:`curate.pool.byod`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from curate.cli.options import catalog_option, catalog_used, progress
from curate.pool.byod import init_scored_catalog, score_data_dir
from curate.pool.download import (ENCODE_FORMATS, HUB_REPOS, RESIZE_MODES, DownloadSettings, download,
                                  download_catalog, made_by_download, no_success_error, status_report)


def _print_report(report, data_dir: Path, catalog) -> None:
    """The status table, then (``--catalog``) the catalog over the download: built after the
    table is printed, so a catalog that cannot be made never hides what was downloaded."""
    for line in report.table():
        click.echo(line)
    click.echo(f"wrote {data_dir / 'download_report.json'} and {len(report.status_files)} status files "
               f"in {data_dir / 'download_status'}")
    if catalog is None:
        return
    made = download_catalog(catalog, data_dir, report.metadata, report.status_files, progress=progress())
    if made.pool_metadata is not None:
        scores = [c for c in made.missing if c.startswith("clip_")]
        click.echo(f"wrote {made.pool_metadata}: your metadata in the pool's format ({report.expected:,} rows, "
                   f"sizes of the downloaded images"
                   + (f"; {' and '.join(scores)} NULL until `curate byod score --catalog {catalog}`)" if scores else ")"))
    click.echo(("wrote" if made.created else "updated") + f" catalog {catalog_used(catalog)}: view download_status"
               + ("" if made.created else " (replaced)"))


@click.command("download")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output: DATA_DIR/metadata (from the hub), DATA_DIR/shards, status and report files.")
@click.option("--scale", type=click.Choice(list(HUB_REPOS)), default="small", show_default=True,
              help="DataComp pool to fetch from the hub (ignored with --metadata-dir).")
@click.option("--metadata-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Use these parquet files instead of the hub (your own data: uid, url, text[, face_bboxes, sha256]).")
@click.option("--skip-shards", is_flag=True, help="Fetch and check the metadata only.")
@click.option("--download-npz", is_flag=True, help="Also fetch the pool's .npz embeddings from the hub.")
@click.option("--processes", default=16, show_default=True, help="img2dataset processes.")
@click.option("--threads", default=128, show_default=True, help="img2dataset threads per process.")
@click.option("--image-size", default=512, show_default=True)
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default="keep_ratio_largest", show_default=True)
@click.option("--no-resize-only-if-bigger", is_flag=True, help="Also upscale small images.")
@click.option("--encode-format", type=click.Choice(ENCODE_FORMATS), default="jpg", show_default=True)
@click.option("--skip-bbox-blurring", is_flag=True, help="Do not blur faces (no face_bboxes column needed).")
@click.option("--no-verify-hash", is_flag=True,
              help="Keep images whose bytes differ from the metadata's sha256 (they are still reported).")
@click.option("--retries", default=2, show_default=True, help="Download retries per URL.")
@click.option("--timeout", default=10, show_default=True, help="Seconds per URL.")
@catalog_option(help="Then create this catalog over the download (your own metadata lacking pool columns: over "
                     "DATA_DIR/pool_metadata, see docs/download.md) with the download_status view; an existing "
                     "catalog gets the view only.")
def download_cmd(data_dir, scale, metadata_dir, skip_shards, download_npz, processes, threads, image_size,
                 resize_mode, no_resize_only_if_bigger, encode_format, skip_bbox_blurring, no_verify_hash,
                 retries, timeout, catalog):
    """Download a DataComp pool, or your own metadata, into img2dataset shards.

    Images whose bytes do not match the metadata's sha256 are not kept. Run the same command
    again after an interruption: finished shards are not downloaded again.

    \b
    Example:
      curate download --scale small --data-dir /data/datacomp_small --processes 16
      curate download --metadata-dir my_parquets/ --data-dir /data/mine --skip-bbox-blurring
    """
    t0 = time.perf_counter()
    s = DownloadSettings(processes=processes, threads=threads, image_size=image_size, resize_mode=resize_mode,
                         resize_only_if_bigger=not no_resize_only_if_bigger, encode_format=encode_format,
                         blur=not skip_bbox_blurring, verify_hash=not no_verify_hash, retries=retries,
                         timeout=timeout)
    report = download(data_dir, scale=scale, metadata_dir=metadata_dir, settings=s, skip_shards=skip_shards,
                      download_npz=download_npz, progress=progress())
    if report is None:
        click.echo(f"metadata ready in {metadata_dir or data_dir / 'metadata'} "
                   f"({time.perf_counter() - t0:.1f}s); shards skipped")
        return
    _print_report(report, data_dir, catalog)
    click.echo(f"done in {time.perf_counter() - t0:.1f}s")
    err = no_success_error(report)
    if err is not None:
        raise err


@click.command("download-status")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metadata-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Metadata the shards were downloaded from (default DATA_DIR/metadata).")
@catalog_option(help="Register the download_status view in this catalog (created as by `curate download "
                     "--catalog` if absent).")
def download_status_cmd(data_dir, metadata_dir, catalog):
    """Report per-status counts of an existing download (no network); optionally register
    the download_status view so SQL can join it.

    \b
    Example:
      curate download-status --data-dir /data/datacomp_small --catalog small.duckdb
      duckdb small.duckdb -c "SELECT status, count(*) FROM download_status GROUP BY ALL"
    """
    report = status_report(data_dir, metadata_dir=metadata_dir, progress=progress())
    _print_report(report, data_dir, catalog)


@click.group("byod")
def byod_group():
    """Bring your own data: score downloaded shards into the pool's metadata format."""


@byod_group.command("score")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory with shards/ from `curate download`.")
@click.option("--model", "arch", default=None, help="open_clip architecture, e.g. ViT-B-32.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Local weights file (.pt/.bin/.safetensors); nothing is downloaded.")
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="open_clip model config JSON for a custom architecture (model name = file stem).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output metadata dir (default DATA_DIR/metadata_scored).")
@click.option("--metadata-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Metadata the shards came from; its columns beyond the pool's nine are kept "
                   "(default: the one `curate download` used, else DATA_DIR/metadata).")
@click.option("--as", "embedding", type=click.Choice(["b32", "l14"]), default=None,
              help="Pool columns to fill (default: b32 for ViT-B-32 models, else l14).")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Rescore shards already scored.")
@catalog_option(help="Then create this catalog over the scored metadata and shards (with download_status); "
                     "replaces the catalog `curate download --catalog` made over DATA_DIR.")
def byod_score_cmd(data_dir, arch, checkpoint, model_config, out, metadata_dir, embedding, batch_size, device,
                   overwrite, catalog):
    """Compute CLIP image/text embeddings and similarity scores for downloaded shards.

    Writes OUT/SSSSSSSS.parquet (the pool's nine columns, then any other columns of the
    source metadata) and OUT/SSSSSSSS.npz (row-aligned float16 embeddings) per shard, so `curate catalog init --metadata OUT` and the usual
    filters work on your data. Re-running skips shards already scored.

    \b
    Example:
      curate byod score --data-dir /data/mine --model ViT-B-32 --checkpoint b32.pt
      curate byod score --data-dir /data/mine --model-config tiny.json --checkpoint tiny.pt --as l14
    """
    res = score_data_dir(data_dir, arch, checkpoint, model_config=model_config, out=out, embedding=embedding,
                         batch_size=batch_size, device=device, progress=progress(), overwrite=overwrite,
                         metadata_dir=metadata_dir)
    click.echo(f"scored {res.shards} shards ({res.skipped} already done): {res.rows:,} rows, "
               f"{res.images:,} images -> {res.out_dir} in {res.elapsed:.1f}s"
               + (f"; kept source columns {', '.join(res.carried)}" if res.carried else ""))
    if catalog is not None:
        replaced = made_by_download(catalog, data_dir)
        with_status = init_scored_catalog(catalog, data_dir, res.out_dir, overwrite=overwrite)
        click.echo(f"wrote catalog {catalog_used(catalog)} over {res.out_dir}"
                   + (" with view download_status" if with_status else "")
                   + (" (replacing the one `curate download` made over the unscored metadata)" if replaced else ""))
    else:
        click.echo(f"next: curate catalog init byod.duckdb --metadata {res.out_dir} --shards {data_dir / 'shards'}")
