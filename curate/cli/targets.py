"""The ``curate targets`` command group: target sets for NormSim (:mod:`curate.features.targets`).

``targets import`` reads target image embeddings (DataComp's ``in1k_clip_vit_l14_*.pt``,
``torch.save``'d arrays or ``.npy``; never running pickled code) into a named set under the
catalog's features dir; ``targets list`` shows the sets. Thin wrappers over the library.
"""

from __future__ import annotations

from pathlib import Path

import click

from curate.cli.options import catalog_option, catalog_used
from curate.features.targets import import_target_set, list_target_sets


@click.group("targets")
def targets_group():
    """Target sets: image embeddings a NormSim filter compares the pool with.

    \b
    Example:
      curate targets import catalog.duckdb --name in1k --embeddings in1k_clip_vit_l14_0.pt
      curate targets list catalog.duckdb
    """


@targets_group.command("import")
@catalog_option(positional=True)
@click.option("--name", required=True, help="Name of the target set (the filters' `targets` parameter).")
@click.option("--embeddings", "files", required=True, multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Target embedding file (.pt with image_features, torch.save'd array, or .npy); repeat for more.")
@click.option("--overwrite", is_flag=True, help="Replace a target set of the same name.")
def import_cmd(catalog, name, files, overwrite):
    """Import target image embeddings (rows L2-normalised) as a named target set.

    Pickled files are read with curate's restricted unpickler or torch.load(weights_only=True):
    a file that would run code is refused. Files are concatenated in the order given.

    \b
    Example:
      curate targets import catalog.duckdb --name in1k \\
          --embeddings in1k_clip_vit_l14_0.pt --embeddings in1k_clip_vit_l14_1.pt
    """
    ts = import_target_set(catalog, name, files, overwrite=overwrite)
    click.echo(f"target set '{ts.name}': {ts.meta['rows']:,} rows x {ts.meta['dim']} (L2-normalised) from "
               f"{len(files)} file(s), sha256 {ts.meta['sha256'][:12]}..., in {ts.dir}, "
               f"on catalog {catalog_used(catalog)}")


@targets_group.command("list")
@catalog_option(positional=True)
def list_cmd(catalog):
    """List the catalog's target sets (name, rows, dimension, source files).

    \b
    Example:
      curate targets list catalog.duckdb
    """
    sets = list_target_sets(catalog)
    for ts in sets:
        srcs = ", ".join(Path(f["path"]).name for f in ts.meta.get("files", []))
        click.echo(f"{ts.name}: {ts.meta['rows']:,} rows x {ts.meta['dim']} ({srcs})")
    click.echo(f"{len(sets)} target set(s) on catalog {catalog_used(catalog)}")
