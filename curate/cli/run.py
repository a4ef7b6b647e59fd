"""``curate run``, ``curate lint`` and ``curate filters``: a filter file to a subset file, checked
without running, and the bundled filters listed. Thin calls of :mod:`curate.run`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from curate import nopandas
from curate.catalog.connection import default_catalog
from curate.cli.options import catalog_option, catalog_used, engine_options, progress
from curate.run import run_filter, runner
from curate.run.explain import explain_filter, format_explanation, inspect_prepared
from curate.run.lint import lint_filter
from curate.run.query import bundled_filters, parse_sets


@click.command("run")
@click.argument("filter_file", type=click.Path(dir_okay=False, path_type=Path))
@catalog_option()
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Subset file to write (default: subsets/FILTER.npy); a .json manifest goes beside it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a parameter the filter declares with SET VARIABLE (repeatable).")
@click.option("--explain", is_flag=True,
              help="Also print the funnel: rows each WHERE conjunct rejects, alone and in order (docs/explain.md).")
@click.option("--dropped", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every dropped uid with the first conjunct that rejected it (parquet).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the histogram of each score the filter thresholds, kept part overlaid (PNG).")
@engine_options("one DuckDB task per pool file")
def run_cmd(filter_file, catalog, out, sets, explain, dropped, plot, engine):
    """Run a SQL filter (a file, or a bundled filter's name: see `curate filters`) and write a
    DataComp subset file (sorted u8,u8 .npy).

    \b
    Example:
      curate run filters/clip_score_l14_30pct.sql --set fraction=0.1 -o subsets/l14_10pct.npy
      curate run clip_score_l14_30pct -c pool.duckdb -o subsets/l14_30pct.npy
      curate run laion2b --explain --dropped dropped.parquet --plot laion2b.png
    """
    sets = parse_sets(sets)
    if not engine.distributed:
        nopandas.keep_out()  # nothing here uses pandas; DuckDB and pyarrow would import it (0.3 s)
    inspect = explain or dropped is not None or plot is not None
    subset = out or runner.default_out(filter_file)
    outputs = [subset, subset.with_suffix(".json")]
    found = []
    if inspect and engine.distributed:
        click.echo("note: --explain, --dropped and --plot run locally, on this machine's DuckDB", err=True)
        found.append(explain_filter(filter_file, catalog, sets, dropped=dropped, plot=plot, progress=progress(),
                                    outputs=outputs))
        res = run_filter(filter_file, catalog=catalog, out=out, sets=sets, progress=progress(), engine=engine)
    elif inspect:
        def before_fetch(con, query, opened):  # on the connection and query the subset comes from
            found.append(inspect_prepared(con, opened.flt, query, opened.params, catalog or default_catalog(),
                                          explain, dropped, plot, outputs))

        res = runner.run_filter(filter_file, catalog, out, sets, progress(), before_fetch=before_fetch,
                                row_level=False)  # per-conjunct counts need whole feature columns
    else:
        res = run_filter(filter_file, catalog=catalog, out=out, sets=sets, progress=progress(), engine=engine)
    if explain:
        for line in format_explanation(found[0], filter_file):
            click.echo(line)
    echo_run_summary(filter_file, res, catalog)
    if dropped is not None:
        click.echo(f"wrote {found[0].dropped_rows:,} dropped rows to {dropped}")
    if plot is not None:
        click.echo(f"wrote {plot}")


def echo_run_summary(filter_file, res, catalog, thresholds: bool = True, note: str = "") -> None:
    """What a filter run kept, on which catalog, where it wrote (`curate run`, `curate ray run`);
    a warning on standard error when it kept nothing."""
    pct = 100.0 * res.count / res.pool_rows if res.pool_rows else 0.0
    params = [f"{k}={v}" for k, v in res.params.items()]
    if thresholds:
        params += [f"threshold={'NaN' if t['threshold'] is None else format(t['threshold'], '.9g')}"
                   for t in res.thresholds]
    click.echo(f"{filter_file}: kept {res.count:,} of {res.pool_rows:,} samples ({pct:.2f}%), "
               f"{res.distinct:,} distinct uids" + (f" [{', '.join(params)}]" if params else ""))
    click.echo(f"on catalog {catalog_used(catalog)}")
    click.echo(f"wrote {res.out} and {res.manifest} in {res.elapsed:.2f}s{note}")
    if res.count == 0:
        click.echo(f"warning: {filter_file}: the filter kept no samples of {res.pool_rows:,}; "
                   f"the subset {res.out} is empty", err=True)


@click.command("lint")
@click.argument("filter_file", type=click.Path(dir_okay=False, path_type=Path))
@catalog_option()
def lint_cmd(filter_file, catalog):
    """Check a filter (a file or a bundled filter's name) against the catalog schema without running it.

    \b
    Example:
      curate lint filters/laion2b.sql
    """
    rep = lint_filter(filter_file, catalog)
    for err in rep.errors:
        click.echo(f"error: {err}", err=True)
    for note in rep.notes:
        click.echo(f"note: {note}")
    if rep.ok:
        click.echo(f"{filter_file}: ok; reads {', '.join(rep.tables) or 'no table'}; "
                   f"functions: {', '.join(rep.functions) or 'none'}; "
                   f"parameters: {', '.join(f'{k}={v}' for k, v in rep.params.items()) or 'none'}")
    else:
        sys.exit(1)


@click.command("filters")
def filters_cmd():
    """List the bundled filters: the name `curate run NAME` takes, the parameters each declares
    with their defaults (override with --set), and what it keeps.

    \b
    Example:
      curate filters
      curate run clip_score_l14_30pct --set fraction=0.1 -o subsets/l14_10pct.npy
    """
    for f in bundled_filters():
        params = ", ".join(f"{k}={v}" for k, v in f.params.items()) or "no parameters"
        click.echo(f"{f.name}: {params}")
        if f.summary:
            click.echo(f"    {f.summary}")
