"""The options every command group shares, declared once and used the same way everywhere.

* ``catalog_option()``: the catalog a command reads or writes. Always ``--catalog/-c FILE``;
  commands that take the catalog as their subject (``curate features text CATALOG``) also
  accept it as the first positional argument, as the docs write it (``positional=True``). One
  ``catalog`` parameter reaches the command either way; giving both is an error. Default:
  ``$CURATE_CATALOG``, else the bundled example catalog of a source checkout
  (:func:`curate.catalog.connection.default_catalog`), unless ``required=True``.
* ``engine_options(unit)``: ``--engine {local,ray}``, ``--ray-address`` and (``workers=True``)
  ``--workers/-j``, combined into one :class:`curate.engine.Engine` parameter named ``engine``:
  the one place where a command's choice of engine is made.
* ``workers_option(...)``: ``--workers/-j`` alone, for commands whose workers are not an engine
  (data loader workers of a training run).
* ``storage_option``: fsspec options for ``s3://`` URLs, parsed to a dict.
* ``progress()``: whether to show progress (:mod:`curate.progress`: a bar at a terminal, log
  lines elsewhere; none with ``CURATE_PROGRESS=off``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from curate.catalog.connection import default_catalog
from curate.engine import Engine
from curate.errors import CurateError
from curate.progress import enabled as progress_enabled
from curate.storage import parse_storage_options

CATALOG_HELP = "Catalog file (default: $CURATE_CATALOG or the bundled catalog.duckdb.example)."


def progress() -> bool:
    return progress_enabled()


def catalog_used(catalog) -> str:
    """How a summary line names the catalog a command ran on (saying when it was the default)."""
    if catalog is not None:
        return str(catalog)
    if os.environ.get("CURATE_CATALOG"):
        return f"{os.environ['CURATE_CATALOG']} ($CURATE_CATALOG)"
    return f"{default_catalog()} (the bundled example; pass -c FILE or set CURATE_CATALOG)"


def catalog_option(positional: bool = False, required: bool = False, help: str | None = None):
    """``-c/--catalog FILE`` (and, with ``positional``, an optional leading ``CATALOG``)."""
    text = help or (CATALOG_HELP if not required else "Catalog file.")

    def decorate(f):
        if not positional:
            return click.option("--catalog", "-c", type=click.Path(dir_okay=False, path_type=Path),
                                default=None, required=required, help=text)(f)

        @functools.wraps(f)
        def wrapper(*args, catalog_arg=None, catalog=None, **kw):
            if catalog_arg is not None and catalog is not None and Path(catalog_arg) != Path(catalog):
                raise CurateError(f"two catalogs given ({catalog_arg} and --catalog {catalog}): give one")
            catalog = catalog if catalog is not None else catalog_arg
            if catalog is None and required:
                raise click.UsageError("a catalog is needed: CATALOG or --catalog FILE")
            return f(*args, catalog=catalog, **kw)

        wrapper = click.option("--catalog", "-c", type=click.Path(dir_okay=False, path_type=Path),
                               default=None, help=text + " May also be given as the first argument.")(wrapper)
        return click.argument("catalog_arg", metavar="[CATALOG]", required=False,
                              type=click.Path(dir_okay=False, path_type=Path))(wrapper)
    return decorate


def _make_engine(f, workers: bool, default_workers):
    @functools.wraps(f)
    def wrapper(*args, engine="local", ray_address=None, **kw):
        n = kw.pop("workers", default_workers) if workers else None
        return f(*args, engine=Engine(engine, workers=n, address=ray_address), **kw)
    return wrapper


def engine_options(unit: str = "one task per pool file", workers: bool = False, default_workers: int | None = None,
                   workers_help: str = "Local worker processes (default: the command's choice)."):
    """``--engine``, ``--ray-address`` (and ``--workers``) as one ``engine: Engine`` parameter.

    ``unit`` says what one task is for this command (for the help text).
    """
    def decorate(f):
        f = _make_engine(f, workers, default_workers)
        f = click.option("--ray-address", default=None, metavar="ADDRESS",
                         help="Ray cluster to join (e.g. auto, ray://head:10001); default: start Ray "
                              "locally. Only with --engine ray.")(f)
        f = click.option("--engine", "engine", type=click.Choice(["local", "ray"]), default="local",
                         show_default=True, help=f"local: this machine; ray: {unit} on a Ray cluster.")(f)
        if workers:
            f = click.option("--workers", "-j", type=click.IntRange(1, 1024), default=default_workers,
                             show_default=default_workers is not None, help=workers_help)(f)
        return f
    return decorate


def workers_option(default: int | None, help: str):
    return click.option("--workers", "-j", type=click.IntRange(0, 1024), default=default,
                        show_default=default is not None, help=help)


def _storage(ctx, param, value):
    return parse_storage_options(value, "--storage-options")


storage_option = click.option(
    "--storage-options", default=None, metavar="JSON", callback=_storage,
    help="fsspec options for s3:// and other URLs, as JSON (default: $CURATE_STORAGE_OPTIONS, then "
         "the usual AWS environment variables).")
