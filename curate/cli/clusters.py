"""The ``curate clusters ...`` and ``curate embeddings ...`` command groups: cluster sets, and pool
embeddings as float32 files, neighbours and near-duplicates. Thin wrappers over
:mod:`curate.features.clusters`, :mod:`curate.features.embeddings` and
:mod:`curate.features.neighbors` (``curate features clusters`` is in :mod:`curate.cli.features`).

The catalog is the first argument or ``-c/--catalog FILE``. Target files can be listed after
``--targets`` (``--targets a.pt b.pt c.pt``): click options take one value, so extra positional
arguments after CATALOG are collected as more target files (with ``-c``, give each target its
own ``--targets``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from curate.cli.options import catalog_option, catalog_used, progress
from curate.errors import CurateError
from curate.features.clusters import build_cluster_set, import_cluster_set, list_cluster_sets, set_targets
from curate.features.embeddings import convert_embeddings
from curate.features.neighbors import near_duplicates, nearest

_catalog_arg = catalog_option(positional=True)
_file = click.Path(dir_okay=False, path_type=Path)


def _targets(first, more) -> list[Path]:
    out = list(first or ()) + list(more or ())
    if more and not first:
        raise CurateError(f"unexpected argument {more[0]} (target files follow --targets)")
    return out


@click.group("clusters")
def clusters_group():
    """Cluster sets for the image-based baselines: k-means centroids and target clusters."""


@clusters_group.command("build")
@_catalog_arg
@click.argument("more_targets", nargs=-1, type=_file)
@click.option("--name", required=True, help="Cluster set name (the filters' `clusters` parameter).")
@click.option("--key", default="l14_img", show_default=True, help="npz embedding key to cluster.")
@click.option("--k", "k", type=int, default=100_000, show_default=True, help="Number of clusters.")
@click.option("--sample-ratio", type=float, default=-1.0, show_default=True,
              help="Per-file sample (with replacement) of the caption-filtered rows; <= 0 uses all.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--niter", type=int, default=20, show_default=True, help="k-means iterations (DataComp: 20).")
@click.option("--caption-filter/--no-caption-filter", default=True, show_default=True,
              help="DataComp's caption prefilter (needs text features).")
@click.option("--targets", multiple=True, type=_file, help="Target embedding files (.pt/.npy), e.g. ImageNet-1k.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cluster set of this name.")
def build_cmd(catalog, more_targets, name, key, k, sample_ratio, seed, niter, caption_filter, targets, overwrite):
    """k-means (faiss, L2, DataComp's settings) over the pool's embeddings.

    \b
    Example:
      curate clusters build pool.duckdb --name small --k 1024 --sample-ratio 0.3 --targets in1k.npy
    """
    t0 = time.perf_counter()
    cs = build_cluster_set(catalog, name, key=key, k=k, sample_ratio=sample_ratio, seed=seed,
                           caption_filter=caption_filter, target_files=_targets(targets, more_targets),
                           niter=niter, overwrite=overwrite, progress=progress())
    km = cs.meta["source"]["kmeans"]
    click.echo(f"cluster set {name}: k-means of {km['points']:,} {key} embeddings into {cs.meta['k']:,} "
               f"clusters ({niter} iterations) in {km['seconds']}s")
    _echo_set(cs, t0, catalog)


@clusters_group.command("import")
@_catalog_arg
@click.argument("more_targets", nargs=-1, type=_file)
@click.option("--name", required=True, help="Cluster set name (the filters' `clusters` parameter).")
@click.option("--centroids", required=True, type=_file,
              help="DataComp centroid file (torch.save'd numpy array) or .npy, K x d.")
@click.option("--targets", multiple=True, type=_file,
              help="Target embeddings: .pt with key image_features, torch.save'd array or .npy.")
@click.option("--key", default="l14_img", show_default=True, help="Pool embedding key the centroids live in.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cluster set of this name.")
def import_cmd(catalog, more_targets, name, centroids, targets, key, overwrite):
    """Import DataComp's released centroids and ImageNet-1k target embeddings.

    \b
    Example:
      curate clusters import pool.duckdb --name xlarge --centroids xlarge_centroids.pt \\
          --targets in1k_clip_vit_l14_0.pt in1k_clip_vit_l14_1.pt in1k_clip_vit_l14_2.pt \\
                    in1k_clip_vit_l14_3.pt in1k_clip_vit_l14_4.pt
    """
    t0 = time.perf_counter()
    cs = import_cluster_set(catalog, name, centroids, _targets(targets, more_targets), key=key, overwrite=overwrite)
    click.echo(f"cluster set {name}: imported {cs.meta['k']:,} x {cs.meta['dim']} centroids from {centroids}")
    _echo_set(cs, t0, catalog)


@clusters_group.command("targets")
@_catalog_arg
@click.argument("more_targets", nargs=-1, type=_file)
@click.option("--name", required=True, help="Existing cluster set.")
@click.option("--targets", multiple=True, type=_file, required=True, help="Target embedding files.")
def targets_cmd(catalog, more_targets, name, targets):
    """(Re)compute a cluster set's target clusters from target embedding files.

    \b
    Example:
      curate clusters targets pool.duckdb --name small --targets in1k_0.pt in1k_1.pt
    """
    t0 = time.perf_counter()
    _echo_set(set_targets(catalog, name, _targets(targets, more_targets)), t0, catalog)


@clusters_group.command("list")
@_catalog_arg
def list_cmd(catalog):
    """List the catalog's cluster sets.

    \b
    Example:
      curate clusters list pool.duckdb
    """
    sets = list_cluster_sets(catalog)
    for cs in sets:
        t = cs.meta.get("targets")
        click.echo(f"{cs.name}: key {cs.key}, {cs.meta['k']:,} x {cs.meta['dim']} centroids, "
                   + (f"{t['clusters']:,} target clusters from {t['rows']:,} target rows" if t else "no targets"))
    click.echo(f"{len(sets)} cluster set(s) in catalog {catalog_used(catalog)}")


def _echo_set(cs, t0, catalog) -> None:
    t = cs.meta.get("targets")
    if t:
        click.echo(f"target clusters: {t['clusters']:,} distinct of {cs.meta['k']:,} "
                   f"(from {t['rows']:,} target embeddings in {len(t['files'])} files)")
    else:
        click.echo("no target embeddings given: add them with `curate clusters targets`")
    click.echo(f"wrote {cs.dir} in {time.perf_counter() - t0:.2f}s on catalog {catalog_used(catalog)}")


@click.group("embeddings")
def embeddings_group():
    """Pool embeddings (.npz) as memory-mapped float32 files; neighbours and near-duplicates."""


@embeddings_group.command("convert")
@_catalog_arg
@click.option("--key", default="l14_img", show_default=True, help="npz key (b32_img, b32_txt, l14_img, l14_txt, dedup).")
def convert_cmd(catalog, key):
    """Convert one npz key of every pool file to float32 .npy (resumable).

    \b
    Example:
      curate embeddings convert pool.duckdb --key l14_img
    """
    t0 = time.perf_counter()
    r = convert_embeddings(catalog, key, progress=progress())
    click.echo(f"embeddings {key}: {r['rows']:,} rows x {r['dim']} in {r['files']} files "
               f"({r['converted']} converted now) in {time.perf_counter() - t0:.2f}s")
    click.echo(f"wrote {r['dir']} on catalog {catalog_used(catalog)}")


@embeddings_group.command("neighbors")
@_catalog_arg
@click.option("--uid", help="Query with this sample's embedding.")
@click.option("--vector", type=_file, help="Query vector as a .npy file (d floats).")
@click.option("--key", default="l14_img", show_default=True)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of neighbours.")
@click.option("--format", "fmt", type=click.Choice(["tsv", "csv", "json"]), default="tsv", show_default=True,
              help="tsv/csv: a header line (score, uid, file, row), then one line per neighbour; json: a list.")
def neighbors_cmd(catalog, uid, vector, key, k, fmt):
    """Nearest pool samples by inner product to a uid's embedding or a vector.

    \b
    Example:
      curate embeddings neighbors pool.duckdb --uid 0a1b...ff -k 5
      curate embeddings neighbors pool.duckdb --uid 0a1b...ff --format json
    """
    t0 = time.perf_counter()
    vec = None
    if vector is not None:
        try:
            vec = np.load(vector, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CurateError(f"{vector}: not a readable .npy vector ({e})") from None
    hits = nearest(catalog, key, vector=vec, uid=uid, k=k)
    if fmt == "json":
        click.echo(json.dumps([{"score": float(h.score), "uid": h.uid, "file": h.file, "row": int(h.row)}
                               for h in hits], indent=1))
    else:
        sep = "\t" if fmt == "tsv" else ","
        click.echo(sep.join(("score", "uid", "file", "row")))
        for h in hits:
            click.echo(sep.join((f"{h.score:.6f}", h.uid, h.file, str(h.row))))
    click.echo(f"{len(hits)} neighbours in {time.perf_counter() - t0:.2f}s on catalog {catalog_used(catalog)}",
               err=True)


@embeddings_group.command("dedup")
@_catalog_arg
@click.option("--clusters", "cluster_set", required=True, help="Cluster set whose clusters bound the comparisons.")
@click.option("--threshold", type=float, default=0.95, show_default=True, help="Inner product at or above which two samples are duplicates.")
@click.option("--key", default=None, help="Embedding key (default: the cluster set's key; e.g. dedup).")
@click.option("--name", default=None, help="dedup_set name (default CLUSTERS_KEY_THRESHOLD).")
def dedup_cmd(catalog, cluster_set, threshold, key, name):
    """Near-duplicate groups within clusters, as the uid-keyed `near_duplicates` view.

    \b
    Example:
      curate embeddings dedup pool.duckdb --clusters small --threshold 0.97
    """
    r = near_duplicates(catalog, cluster_set, threshold, key=key, name=name, progress=progress())
    click.echo(f"near_duplicates[{r['dedup_set']}]: {r['in_groups']:,} samples in duplicate groups, "
               f"{r['drop']:,} to drop (keep = first in pool order) in {r['seconds']}s")
    click.echo(f"wrote {r['dir']} on catalog {catalog_used(catalog)}")
