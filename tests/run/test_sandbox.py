"""The filter sandbox (issue 16 §1): a filter file holds SET VARIABLE lines and one query, runs on
a connection that reads only what the catalog points at, and `curate lint` never executes it.

Every hostile filter is written here, in the test; each case checks the exit code, the one-line
message (file, statement or path named), that the file it targets is unchanged or not created,
that no subset or temp file is written and that nothing of /etc/passwd is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.catalog.connection import connect
from curate.cli import main
from curate.errors import CurateError
from curate.run.partition import filter_partition, pool_context
from tests.conftest import pool_table, uid_of

PASSWD_WORD = "root:"  # the first line of /etc/passwd starts with it


@pytest.fixture
def world(make_catalog, tmp_path):
    """A catalog, a file a filter must not overwrite, and a parquet outside the pool."""
    cat = make_catalog([[{"uid": uid_of(i), "clip_b32_similarity_score": 0.1 * i} for i in range(6)]])
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious bytes\n")
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t AS SELECT 1 AS x")
    con.close()
    pq.write_table(pool_table([{"uid": uid_of(99)}]), tmp_path / "outside.parquet")
    return {"cat": cat, "victim": victim, "other": other, "tmp": tmp_path}


# name -> (filter text, what the one line must contain)
HOSTILE = {
    "copy_over_file": ("COPY (SELECT 'owned') TO '{victim}' (FORMAT csv);\nSELECT uid FROM pool",
                       "statement 1 (COPY (SELECT 'owned') TO ...) is not allowed in a filter"),
    "attach_delete": ("ATTACH '{other}' AS o (READ_WRITE);\nDELETE FROM o.t;\nSELECT uid FROM pool",
                      "statement 1 (ATTACH "),
    "install_httpfs": ("INSTALL httpfs;\nSELECT uid FROM pool", "statement 1 (INSTALL httpfs) is not allowed"),
    "load": ("LOAD '{victim}';\nSELECT uid FROM pool", "statement 1 (LOAD "),
    "pragma": ("PRAGMA version;\nSELECT uid FROM pool", "statement 1 (PRAGMA version) is not allowed"),
    "set_setting": ("SET enable_external_access = true;\nSELECT uid FROM pool",
                    "statement 1 (SET enable_external_access = true) is not allowed"),
    "second_query": ("SELECT uid FROM pool;\nSELECT uid FROM pool", "statement 1 (SELECT uid FROM pool) is not allowed"),
    "create": ("CREATE TABLE x AS SELECT 1;\nSELECT uid FROM pool", "statement 1 (CREATE TABLE x AS ...) is not allowed"),
    "copy_last": ("COPY (SELECT uid FROM pool) TO '{victim}'", "statement 1 (COPY (SELECT uid FROM ...) is not allowed"),
    "read_text_query": ("SELECT content AS uid FROM read_text('/etc/passwd')",
                        "reads /etc/passwd, outside what the catalog points at"),
    "read_text_set": ("SET VARIABLE x = (SELECT content FROM read_text('/etc/passwd'));\n"
                      "SELECT uid FROM pool WHERE uid <> getvariable('x')",
                      "statement 1 (SET VARIABLE x = ...) is not allowed in a filter: a SET VARIABLE value must be "
                      "a constant"),
    "read_parquet_outside": ("SELECT uid FROM read_parquet('{outside}')", "reads {outside}, outside what the catalog"),
    "glob": ("SELECT file AS uid FROM glob('/etc/*')", "reads /etc/*, outside what the catalog points at"),
}


def _write(world, name):
    text, msg = HOSTILE[name]
    fmt = {k: str(world[k]) for k in ("victim", "other")} | {"outside": str(world["tmp"] / "outside.parquet")}
    path = world["tmp"] / f"{name}.sql"
    path.write_text(text.format(**fmt))
    return path, msg.format(**fmt)


def _snapshot(world):
    return {p: p.read_bytes() for p in world["tmp"].rglob("*") if p.is_file()}


def _check_refused(world, result, path, msg, before):
    out = result.output
    assert result.exit_code == 1, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert lines and all(str(path) in ln for ln in lines), out
    assert any(msg in ln for ln in lines), out
    assert "Traceback" not in out and PASSWD_WORD not in out
    assert world["victim"].read_bytes() == b"precious bytes\n"
    after = _snapshot(world)
    assert {p: b for p, b in after.items() if p.suffix != ".sql"} == {p: b for p, b in before.items()
                                                                       if p.suffix != ".sql"}
    assert not list(world["tmp"].rglob("*.npy")) and not list(world["tmp"].rglob("*.tmp"))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_run_refuses(world, name):
    path, msg = _write(world, name)
    before = _snapshot(world)
    res = CliRunner().invoke(main, ["run", str(path), "-c", str(world["cat"]), "-o", str(world["tmp"] / "o.npy")])
    _check_refused(world, res, path, msg, before)
    assert not (world["tmp"] / "o.json").exists()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_lint_refuses_without_executing(world, name):
    path, msg = _write(world, name)
    before = _snapshot(world)
    res = CliRunner().invoke(main, ["lint", str(path), "-c", str(world["cat"])])
    _check_refused(world, res, path, msg, before)


def test_lint_reports_every_problem(world):
    path = world["tmp"] / "many.sql"
    path.write_text("COPY (SELECT 1) TO '{0}';\nSET threads = 1;\nSET VARIABLE ok = 0.5;\n"
                    "SELECT uid FROM pool WHERE clip_b32_similarity_score > getvariable('ok')"
                    " AND text = getvariable('missing')".format(world["victim"]))
    before = _snapshot(world)
    res = CliRunner().invoke(main, ["lint", str(path), "-c", str(world["cat"])])
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3, res.output
    assert "statement 1 (COPY" in errors[0] and "statement 2 (SET threads = 1)" in errors[1]
    assert "statement 4 (SELECT uid FROM pool ...) reads getvariable('missing')" in errors[2]
    _check_refused(world, res, path, "statement 1 (COPY", before)


@pytest.mark.parametrize("name", ["copy_over_file", "read_text_query", "read_parquet_outside", "read_text_set"])
def test_tic_export_filter_refuses(world, name):
    # a catalog without the TiC views fails before the filter is opened: give it the two views
    # (empty) the export needs
    con = duckdb.connect(str(world["cat"]))
    con.execute("CREATE VIEW timesplit AS SELECT NULL::VARCHAR AS uid, 2016 AS year, NULL::INTEGER AS month "
                "WHERE false")
    con.execute("CREATE VIEW tic_eval AS SELECT NULL::VARCHAR AS uid, 'retrieval' AS task, 2016 AS year, "
                "NULL::INTEGER AS class_id WHERE false")
    con.close()
    path, msg = _write(world, name)
    before = _snapshot(world)
    out = world["tmp"] / "splits"
    res = CliRunner().invoke(main, ["tic", "export", str(world["cat"]), "-o", str(out), "--filter", str(path)])
    if res.exit_code == 2:  # option spelling differs: show it
        pytest.fail(res.output)
    _check_refused(world, res, path, msg, before)
    assert not out.exists() or not any(out.rglob("*"))


def test_bundled_style_filter_still_runs_and_empty_warns(world):
    path = world["tmp"] / "ok.sql"
    path.write_text("SET VARIABLE t = 0.25;\nSELECT uid FROM pool WHERE clip_b32_similarity_score >= getvariable('t')")
    out = world["tmp"] / "ok.npy"
    res = CliRunner().invoke(main, ["run", str(path), "-c", str(world["cat"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "kept 3 of 6" in res.output and "warning" not in res.output  # 0.3, 0.4, 0.5
    res = CliRunner().invoke(main, ["run", str(path), "-c", str(world["cat"]), "-o", str(out), "--set", "t=2"])
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warn == [f"warning: {path}: the filter kept no samples of 6; the subset {out} is empty"]


@pytest.mark.parametrize("sets,msg", [
    (["fraction=abc"], "--set fraction=abc: fraction is a DECIMAL(2,1) parameter (declared 0.3 in {f}); give a number"),
    (["fraction=true"], "--set fraction=true: fraction is a DECIMAL(2,1) parameter (declared 0.3 in {f}); give a number"),
    (["flag=maybe"], "--set flag=maybe: flag is a BOOLEAN parameter (declared True in {f}); give true or false"),
])
def test_set_value_of_the_wrong_type_names_parameter_and_type(world, sets, msg):
    path = world["tmp"] / "typed.sql"
    path.write_text("SET VARIABLE fraction = 0.3;\nSET VARIABLE flag = true;\n"
                    "SELECT uid FROM pool WHERE getvariable('flag') AND clip_b32_similarity_score >= getvariable('fraction')")
    args = ["run", str(path), "-c", str(world["cat"]), "-o", str(world["tmp"] / "o.npy")]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output.strip() == "error: " + msg.format(f=path)
    assert not (world["tmp"] / "o.npy").exists()


@pytest.mark.parametrize("cmd", ["run", "lint"])
def test_undeclared_getvariable_is_an_error(world, cmd):
    path = world["tmp"] / "u.sql"
    path.write_text("SET VARIABLE a = 1;\nSELECT uid FROM pool WHERE text = getvariable('nmae')")
    args = [cmd, str(path), "-c", str(world["cat"])] + (["-o", str(world["tmp"] / "o.npy")] if cmd == "run" else [])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output.strip() == (f"error: {path}: statement 2 (SELECT uid FROM pool ...) reads getvariable('nmae'), "
                                  "but no SET VARIABLE nmae = ... declares it (this filter declares: a)")
    assert not (world["tmp"] / "o.npy").exists()


def test_pool_rewritten_without_a_column_says_the_pool_changed(world):
    pool_file = world["cat"].parent / "metadata" / "0000.parquet"
    table = pq.read_table(pool_file).drop(["clip_l14_similarity_score"])
    pq.write_table(table, pool_file)
    path = world["tmp"] / "l14.sql"
    path.write_text("SELECT uid FROM pool WHERE clip_l14_similarity_score > 0")
    res = CliRunner().invoke(main, ["run", str(path), "-c", str(world["cat"]), "-o", str(world["tmp"] / "o.npy")])
    assert res.exit_code == 1
    assert res.output.strip() == (f"error: {path}: the pool changed since `curate catalog init`: {pool_file} has no "
                                  "column clip_l14_similarity_score; re-run `curate catalog init` over the pool")
    assert not (world["tmp"] / "o.npy").exists()


def test_ray_partition_is_sandboxed_too(world):
    """A partition task (what `curate ray run` ships to workers) reads only its pool file."""
    con = connect(world["cat"])
    try:
        ctx = pool_context(con, world["cat"])
    finally:
        con.close()
    run = world["tmp"] / "part.npy"
    marker = world["tmp"] / "part.json"
    for query, msg in [("SELECT content AS uid FROM read_text('/etc/passwd')", "reads /etc/passwd, outside"),
                       (f"SELECT uid FROM read_parquet('{world['tmp'] / 'outside.parquet'}')", "outside.parquet, outside")]:
        with pytest.raises(CurateError) as e:
            filter_partition(ctx, 0, query, {}, "f.sql", str(run), str(marker))
        assert str(e.value).startswith("f.sql: reads ") and msg in str(e.value)
        assert PASSWD_WORD not in str(e.value)
        assert not run.exists() and not marker.exists()
    # and the pool itself still reads
    m = filter_partition(ctx, 0, "SELECT uid FROM pool", {}, "f.sql", str(run), str(marker))
    assert m["count"] == 6 and json.loads(Path(marker).read_text())["count"] == 6


@pytest.mark.parametrize("name", ["copy_over_file", "read_text_query", "read_parquet_outside"])
def test_ray_run_refuses(world, name, ray_session):
    path, msg = _write(world, name)
    before = _snapshot(world)
    out = world["tmp"] / "r.npy"
    res = CliRunner().invoke(main, ["ray", "run", str(path), "-c", str(world["cat"]), "-o", str(out)])
    _check_refused(world, res, path, msg, before)
    assert not out.exists() and not (world["tmp"] / "r.npy.work").exists()
