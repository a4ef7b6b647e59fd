"""``curate shell``: the real DuckDB shell (the ``duckdb`` executable of the ``duckdb-cli``
package) on a catalog, with every view working whatever the current directory.

A catalog with absolute paths opens as it is. A relative catalog (the bundled example) stores
its views over paths relative to its own directory, which DuckDB resolves against the current
directory: opened from elsewhere they fail with ``No files found that match the pattern``. So
the shell is started with ``-cmd ".read INIT"``, an init file holding what
:func:`curate.catalog.connection.connect` does on open: ``SET file_search_path`` to the
catalog's directory and the same views as TEMP views over absolute paths (their SQL read back
from ``duckdb_views()`` of such a connection). The current directory stays the user's own, so
relative paths typed in the shell mean what they always mean. The macros are stored in the
catalog and need nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from curate.catalog.connection import connect, default_catalog
from curate.errors import CurateError
from curate.sqltokens import sql_literal


def duckdb_executable() -> Path:
    """The ``duckdb`` shell installed with curate (beside this Python), else the one on PATH."""
    here = Path(sys.executable).parent / "duckdb"
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which("duckdb")
    if found is None:
        raise CurateError("the duckdb shell is not installed (pip install duckdb-cli==1.5.6)")
    return Path(found)


def shell_init_sql(catalog) -> str:
    """SQL that makes ``catalog``'s views read the right files from any directory ('' when the
    catalog stores absolute paths and needs nothing)."""
    path = Path(catalog)
    con = connect(path)  # checks it is a curate catalog; shadows relative views with TEMP ones
    try:
        temp = con.execute("SELECT sql FROM duckdb_views() WHERE temporary AND NOT internal "
                           "ORDER BY view_name").fetchall()
        if not temp:
            return ""
        base = str(path.resolve().parent)
        lines = [f"SET file_search_path = {sql_literal(base)};"]
        lines += [s.rstrip().rstrip(";") + ";" for (s,) in temp]
        return "\n".join(lines) + "\n"
    finally:
        con.close()


def shell_command(catalog, init_file: Path | None, sql: str | None, write: bool) -> list[str]:
    """The ``duckdb`` command line: read-only unless ``write``; ``-c SQL`` runs one statement."""
    cmd = [str(duckdb_executable())]
    if not write:
        cmd.append("-readonly")
    if init_file is not None:
        cmd += ["-cmd", f".read {sql_literal(str(init_file))}"]
    cmd.append(str(catalog))
    if sql is not None:
        cmd += ["-c", sql]
    return cmd


def run_shell(catalog=None, sql: str | None = None, write: bool = False) -> int:
    """Open the DuckDB shell on ``catalog`` (interactive, or one statement with ``sql``); returns
    the shell's exit status."""
    catalog = Path(catalog) if catalog else default_catalog()
    init = shell_init_sql(catalog)
    with tempfile.TemporaryDirectory(prefix="curate-shell-") as tmp:
        init_file = None
        if init:
            init_file = Path(tmp) / "init.sql"
            init_file.write_text(init)
        return subprocess.call(shell_command(catalog, init_file, sql, write))
