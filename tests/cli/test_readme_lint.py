"""README's sentence on `curate lint` (issue 17): every unknown table, every unknown function and
every undeclared variable are reported, one line each; of the unknown columns, the first one the
binder meets (it stops there), with its line and column."""

from __future__ import annotations

from click.testing import CliRunner

from curate.cli.main import main
from tests.conftest import REPO


def test_lint_reports_what_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    f = tmp_path / "four.sql"
    f.write_text("SET VARIABLE t = 0.3;\n"
                 "SELECT uid FROM pool p JOIN nosuch_a a USING (uid) JOIN nosuch_b b USING (uid)\n"
                 "WHERE fn_a(text) = 1 AND fn_b(text) = 2 AND getvariable('nope') IS NULL\n")
    r = CliRunner().invoke(main, ["lint", str(f)])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert all(line.startswith(f"error: {f}: ") for line in lines), r.output
    text = "\n".join(lines)
    for name in ("nosuch_a", "nosuch_b"):
        assert f"unknown table '{name}'" in text
    for name in ("fn_a", "fn_b"):
        assert f"unknown function '{name}'" in text
    assert "getvariable('nope')" in text and "no SET VARIABLE nope" in text
    # two unknown columns: the binder names the first, with where it is
    g = tmp_path / "columns.sql"
    g.write_text("SELECT uid FROM pool\nWHERE nope_col > 1\n  AND other_missing > 1\n")
    r = CliRunner().invoke(main, ["lint", str(g), "-c", str(REPO / "catalog.duckdb.example")])
    assert r.exit_code == 1
    assert f"error: {g}: Column 'nope_col' could not be resolved. Line: 2, Col: 14" in r.output
    assert "other_missing" not in r.output
