"""Errors show the filter's own `read_subset('...')` text, never curate's internal table names
(issue 17: lint output showed `__subset_0`)."""

from __future__ import annotations

from click.testing import CliRunner

from curate.cli import main
from tests.conftest import REPO

CAT = str(REPO / "catalog.duckdb.example")


def test_read_subset_text_in_run_and_lint(tmp_path):
    sub = tmp_path / "s.npy"
    assert CliRunner().invoke(main, ["run", "no_filter", "-c", CAT, "-o", str(sub)]).exit_code == 0
    flt = tmp_path / "bad.sql"
    flt.write_text(f"SELECT q.uid FROM read_subset('{sub}')\n")
    for cmd in (["run", str(flt), "-c", CAT, "-o", str(tmp_path / "o.npy")], ["lint", str(flt), "-c", CAT]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 1, r.output
        assert "__subset_" not in r.output
        assert f"read_subset('{sub}')" in r.output
