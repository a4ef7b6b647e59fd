"""``curate run`` and ``curate lint``: a filter file to a subset file, or checked without running."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from curate.cli.options import catalog_option, engine_options
from curate.errors import CurateError


@click.command("run")
@click.argument("filter_file", type=click.Path(dir_okay=False, path_type=Path))
@catalog_option()
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Subset file to write (default: subsets/FILTER.npy); a .json manifest goes beside it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a parameter the filter declares with SET VARIABLE (repeatable).")
@engine_options("one DuckDB task per pool file")
def run_cmd(filter_file, catalog, out, sets, engine):
    """Run a SQL filter and write a DataComp subset file (sorted u8,u8 .npy).

    \b
    Example:
      curate run filters/clip_score_l14_30pct.sql --set fraction=0.1 -o subsets/l14_10pct.npy
    """
    from curate.run.runner import parse_sets, run_filter

    if engine.distributed:
        from curate.run.ray import run_filter_ray

        res = run_filter_ray(filter_file, catalog=catalog, out=out, sets=parse_sets(sets),
                             progress=sys.stderr.isatty(), address=engine.address)
    else:
        res = run_filter(filter_file, catalog=catalog, out=out, sets=parse_sets(sets),
                         progress=sys.stderr.isatty())
    pct = 100.0 * res.count / res.pool_rows if res.pool_rows else 0.0
    params = ", ".join([f"{k}={v}" for k, v in res.params.items()]
                       + [f"threshold={'NaN' if t['threshold'] is None else format(t['threshold'], '.9g')}"
                          for t in res.thresholds])
    click.echo(f"{filter_file}: kept {res.count:,} of {res.pool_rows:,} samples ({pct:.2f}%), "
               f"{res.distinct:,} distinct uids" + (f" [{params}]" if params else ""))
    click.echo(f"wrote {res.out} and {res.manifest} in {res.elapsed:.2f}s")


@click.command("lint")
@click.argument("filter_file", type=click.Path(dir_okay=False, path_type=Path))
@catalog_option()
def lint_cmd(filter_file, catalog):
    """Check a filter against the catalog schema without running it.

    \b
    Example:
      curate lint filters/laion2b.sql
    """
    from curate.run.lint import lint_filter

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
