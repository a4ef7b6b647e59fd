"""``curate explore``: the local web app over a catalog (:mod:`curate.explore.app`)."""

from __future__ import annotations

import click

from curate.cli.options import catalog_option, catalog_used
from curate.explore.app import LOOPBACK, is_loopback, serve


@click.command("explore")
@catalog_option(positional=True)
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on.")
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Address to listen on; anything but loopback lets other machines read the pool.")
def explore_cmd(catalog, port, host):
    """Open the explorer, a local web page over a catalog: run a filter or a query (same result
    as `curate run`), page through kept and dropped samples read from the pool's tars, open a
    sample (all columns, features, nearest neighbours), compare two filters or subset files,
    plot score histograms, export a subset file or a CSV. Read-only on the catalog and pool.

    \b
    Example:
      curate explore
      curate explore pool.duckdb --port 8800
    """
    if not is_loopback(host):
        click.echo(f"warning: --host {host}: the explorer is reachable from other machines and has no "
                   f"login; anyone who can connect can read the pool and run filters", err=True)
    click.echo(f"curate explore: http://{host if ':' not in host else f'[{host}]'}:{port}/ on catalog "
               f"{catalog_used(catalog)} (Ctrl-C to stop)")
    serve(catalog, host, port)
