"""The ``curate`` command line: one module per command group, each a thin call of the library."""

from curate.cli.main import main

__all__ = ["main"]
