"""The summary of `curate run` names the catalog it ran on, and says when that was the bundled
example chosen by default (issue 17)."""

from __future__ import annotations

from click.testing import CliRunner

from curate.cli import main
from tests.conftest import REPO


def test_default_catalog_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("CURATE_CATALOG", raising=False)
    r = CliRunner().invoke(main, ["run", "no_filter", "-o", str(tmp_path / "a.npy")])
    assert r.exit_code == 0, r.output
    assert f"on catalog {REPO / 'catalog.duckdb.example'} (the bundled example; pass -c FILE" in r.output


def test_explicit_and_environment_catalogs_are_named(tmp_path, monkeypatch):
    cat = REPO / "catalog.duckdb.example"
    r = CliRunner().invoke(main, ["run", "no_filter", "-c", str(cat), "-o", str(tmp_path / "a.npy")])
    assert r.exit_code == 0 and f"on catalog {cat}\n" in r.output
    monkeypatch.setenv("CURATE_CATALOG", str(cat))
    r = CliRunner().invoke(main, ["run", "no_filter", "-o", str(tmp_path / "b.npy")])
    assert r.exit_code == 0 and f"on catalog {cat} ($CURATE_CATALOG)" in r.output
