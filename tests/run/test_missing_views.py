"""A bundled filter that needs a view no producer builds names the command that adds it, in
`curate run` and `curate lint` (issue 17: DuckDB said `Did you mean "sqlite_master"?`)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from curate.cli import main
from tests.conftest import REPO

CAT = str(REPO / "catalog.duckdb.example")  # no TiC views, no cluster sets


@pytest.mark.parametrize("flt,view,command", [
    ("tic/year", "timesplit", "curate tic attach"),
    ("tic/month", "timesplit", "curate tic attach"),
    ("tic/cumulative", "timesplit", "curate tic attach"),
])
def test_run_and_lint_name_the_command(tmp_path, flt, view, command):
    r = CliRunner().invoke(main, ["run", flt, "-c", CAT, "-o", str(tmp_path / "x.npy")])
    assert r.exit_code == 1
    assert f"the catalog has no view {view}; add the TiC views with `{command} CATALOG --tic-dir DIR`" in r.output
    assert "sqlite_master" not in r.output and not (tmp_path / "x.npy").exists()
    r = CliRunner().invoke(main, ["lint", flt, "-c", CAT])
    assert r.exit_code == 1 and f"the catalog has no view {view}; add the TiC views with `{command}" in r.output
    assert "sqlite_master" not in r.output


def test_every_view_a_bundled_filter_reads_is_built_or_explained():
    """Each table a bundled filter reads is the pool, a producer's view, or has a hint."""
    import re

    from curate.features.registry import PRODUCERS
    from curate.run.query import MISSING_VIEW_HINTS

    names = set()
    for f in (REPO / "filters").rglob("*.sql"):
        names |= {m.lower() for m in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", f.read_text())}
    names -= {"pool", "read_subset"}
    assert names and names <= set(PRODUCERS) | set(MISSING_VIEW_HINTS)
