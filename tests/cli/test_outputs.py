"""An output that cannot be written is one line naming it, before any work, and leaves
nothing behind (issue 16 §4: `--out` under a regular file was a traceback)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from curate.cli import main
from tests.conftest import REPO

CAT = str(REPO / "catalog.duckdb.example")


def _tree(root):
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("args,out", [
    (["run", "no_filter", "-c", CAT, "-o", "{d}/afile/x.npy"], "{d}/afile/x.npy"),
    (["run", "no_filter", "-c", CAT, "-o", "{d}/afile/deeper/x.npy"], "{d}/afile/deeper/x.npy"),
    (["subset", "to-parquet", "{d}/good.npy", "{d}/afile/x.parquet"], "{d}/afile/x.parquet"),
])
def test_output_under_a_file_is_one_line(tmp_path, args, out):
    CliRunner().invoke(main, ["run", "no_filter", "-c", CAT, "-o", str(tmp_path / "good.npy")])
    (tmp_path / "afile").write_text("keep me\n")
    before = _tree(tmp_path)
    r = CliRunner().invoke(main, [a.format(d=tmp_path) for a in args])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1] == f"error: {out.format(d=tmp_path)}: cannot write the output ({tmp_path / 'afile'} is a file, not a directory)"
    assert "Traceback" not in r.output
    assert _tree(tmp_path) == before


def test_output_in_missing_directories_is_created(tmp_path):
    r = CliRunner().invoke(main, ["run", "no_filter", "-c", CAT, "-o", str(tmp_path / "a" / "b" / "x.npy")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "b" / "x.npy").is_file() and (tmp_path / "a" / "b" / "x.json").is_file()
