"""``curate shell``: the DuckDB shell on a catalog (:mod:`curate.explore.shell`).

``-c`` here is DuckDB's own ``-c SQL`` (run and exit), as in the ``duckdb`` shell; the catalog
is the first argument or ``--catalog FILE`` (long form only, for that reason).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from curate.cli.options import CATALOG_HELP
from curate.errors import CurateError
from curate.explore.shell import run_shell


@click.command("shell")
@click.argument("catalog_arg", metavar="[CATALOG]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--catalog", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=CATALOG_HELP + " May also be given as the first argument.")
@click.option("-c", "--command", "sql", default=None, metavar="SQL",
              help="Run SQL (one statement, or several separated by ;) and exit, like `duckdb -c`.")
@click.option("--write", is_flag=True, help="Open the catalog read-write (default: read-only).")
def shell_cmd(catalog_arg, catalog, sql, write):
    """Open the DuckDB shell (duckdb-cli) on a catalog, read-only, with every view and macro
    working from any directory (a relative catalog's views are shadowed by TEMP views over
    absolute paths; the current directory stays yours).

    \b
    Example:
      curate shell
      curate shell pool.duckdb -c "SELECT count(*) FROM pool"
    """
    if catalog_arg is not None and catalog is not None and catalog_arg != catalog:
        raise CurateError(f"two catalogs given ({catalog_arg} and --catalog {catalog}): give one")
    sys.exit(run_shell(catalog or catalog_arg, sql, write))
