"""Keep pandas out of a ``curate`` command process that never uses it.

DuckDB's Python client imports pandas the first time a Python value crosses into it (a bound
parameter, a registered Arrow table), and pyarrow does when it converts a numpy array: both only
to ask whether the value is a pandas object. In ``curate run`` that import cost 0.25-0.3 s of
every run and of every worker process the run starts, and nothing in the run uses pandas (a warm
run takes about one second). A command that knows it needs no pandas calls :func:`keep_out`
first: ``import pandas`` then fails in that process, and in the local worker processes
:mod:`curate.engine` starts for it, exactly as if pandas were not installed, which DuckDB and
pyarrow both handle (they retry the import on their next check).

Only in a command's own process (the ``curate`` console script and ``python -m curate`` call
:func:`command_process` first): pyarrow remembers a failed import for the life of the process,
so in a library caller's process (a test, a notebook, click's test runner) :func:`keep_out` does
nothing.
"""

from __future__ import annotations

import os
import sys

#: set in the environment of a process that keeps pandas out; its worker processes read it
ENV = "CURATE_WITHOUT_PANDAS"


class _Finder:
    """A ``sys.meta_path`` entry that answers "no such module" for pandas."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r} (curate keeps pandas out of this command's "
                                      f"processes; unset {ENV} in a worker that needs it)", name=name)
        return None


_FINDER = _Finder()
_COMMAND = False


def command_process() -> None:
    """Say that this process is the ``curate`` command itself (its entry point calls this)."""
    global _COMMAND
    _COMMAND = True


def keep_out() -> bool:
    """From now on ``import pandas`` fails in this process and in the local worker processes it
    starts (see :func:`in_worker`). False, changing nothing, where this is not the ``curate``
    command's process (:func:`command_process`) or pandas is imported already."""
    if not _COMMAND or "pandas" in sys.modules:
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    os.environ[ENV] = "1"
    return True


def in_worker() -> None:
    """In a worker process: keep pandas out too if the process that started it does."""
    if os.environ.get(ENV) == "1":
        command_process()  # a worker of the command: its own process, no library caller's
        keep_out()
