"""The ``curate`` command line: the top-level group and the table of its commands.

Every command prints what it did (counts, paths, time). Errors caused by input are
:class:`curate.errors.CurateError` and end as one ``error: ...`` line with exit status 1.

Each command group lives in one module of this package that owns the whole group; the table
below names them, and a group's module is imported only when that command runs (so
``curate run`` does not pay for torch, img2dataset or sqlglot).
"""

from __future__ import annotations

import importlib

import click

from curate import nopandas
from curate.errors import CurateError

#: command name -> "module:attribute" of its click command or group
COMMANDS: dict[str, str] = {
    "run": "curate.cli.run:run_cmd",
    "lint": "curate.cli.run:lint_cmd",
    "filters": "curate.cli.run:filters_cmd",
    "catalog": "curate.cli.catalog:catalog_group",
    "subset": "curate.cli.catalog:subset_group",
    "sample-pool": "curate.cli.catalog:sample_pool_cmd",
    "download": "curate.cli.download:download_cmd",
    "download-status": "curate.cli.download:download_status_cmd",
    "byod": "curate.cli.download:byod_group",
    "pool": "curate.cli.pool:pool_group",
    "features": "curate.cli.features:features",
    "clusters": "curate.cli.clusters:clusters_group",
    "embeddings": "curate.cli.clusters:embeddings_group",
    "targets": "curate.cli.targets:targets_group",
    "decontam": "curate.cli.decontam:decontam_group",
    "reshard": "curate.cli.shards:reshard_cmd",
    "shards": "curate.cli.shards:shards_group",
    "train": "curate.cli.train:train_cmd",
    "eval": "curate.cli.evaluate:eval_cmd",
    "eval-export-winogavil": "curate.cli.evaluate:export_winogavil_cmd",
    "eval-export-folder": "curate.cli.eval_export:export_folder_cmd",
    "tic": "curate.cli.tic:tic",
    "ray": "curate.cli.ray:ray_group",
    "demo": "curate.cli.demo:demo_cmd",
    "shell": "curate.cli.shell:shell_cmd",
    "explore": "curate.cli.explore:explore_cmd",
}


class CurateGroup(click.Group):
    """The top-level group: commands from :data:`COMMANDS`, ``CurateError`` as one line."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CurateError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except Exception as e:
            # Ctrl-C during a DuckDB query reaches Python as RuntimeError("Query interrupted"), and
            # an interrupted connection raises duckdb's InterruptException, neither as
            # KeyboardInterrupt: end them the way click ends an interrupt ("Aborted!", status 1)
            if (type(e) is RuntimeError and str(e) == "Query interrupted") or type(e).__name__ == "InterruptException":
                raise KeyboardInterrupt from None
            raise


@click.group(cls=CurateGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="curate")
def main():
    """SQL-first curation of image-text data for CLIP (DataComp / TiC-CLIP compatible).

    \b
    Example:
      curate run filters/clip_score_l14_30pct.sql --set fraction=0.2
    """


def entry():
    """The ``curate`` console script and ``python -m curate``."""
    nopandas.command_process()
    main()


if __name__ == "__main__":
    entry()
