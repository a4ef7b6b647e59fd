"""The command line: exit codes, one-line errors, and what the commands print."""

import json
import os
import signal
import threading

import click
import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from curate.cli.main import main
from tests.conftest import REPO, uid_of


def invoke(*args, cwd=None):
    runner = CliRunner()
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def test_run_default_catalog_is_the_bundled_example(tmp_path):
    res = invoke("run", REPO / "filters" / "no_filter.sql", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert "kept 2,000 of 2,000 samples" in res.output
    assert np.load(tmp_path / "subsets" / "no_filter.npy").shape == (2000,)
    assert json.loads((tmp_path / "subsets" / "no_filter.json").read_text())["count"] == 2000


def test_run_with_set_and_out(tmp_path):
    out = tmp_path / "l14.npy"
    res = invoke("run", REPO / "filters" / "clip_score_l14_30pct.sql", "--set", "fraction=0.1", "-o", out)
    assert res.exit_code == 0, res.output
    assert "[fraction=0.1, threshold=" in res.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    shown = float(res.output.split("threshold=")[1].split("]")[0])
    assert shown == pytest.approx(manifest["thresholds"][0]["threshold"], rel=1e-8)
    # int(2000 * 0.1) = 200 -> at least 201 rows kept (more only on ties)
    assert len(np.load(out)) >= 201


def test_errors_are_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.sql"
    bad.write_text("SELECT uid, url FROM pool")
    res = invoke("run", bad, "-o", tmp_path / "o.npy")
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    assert not (tmp_path / "o.npy").exists()
    res = invoke("run", REPO / "filters" / "no_filter.sql", "--set", "nokey")
    assert res.exit_code == 1 and "expected KEY=VALUE" in res.output


def test_subset_info_and_to_parquet(tmp_path):
    invoke("run", REPO / "filters" / "no_filter.sql", "-o", tmp_path / "s.npy")
    res = invoke("subset", "info", tmp_path / "s.npy")
    assert res.exit_code == 0 and "count:       2,000" in res.output and "sorted:      yes" in res.output
    np.save(tmp_path / "u.npy", np.array([(2, 0), (1, 0)], np.dtype("u8,u8")))
    res = invoke("subset", "info", tmp_path / "u.npy")
    assert res.exit_code == 1 and "sorted:      NO" in res.output
    res = invoke("subset", "to-parquet", tmp_path / "s.npy", tmp_path / "s.parquet")
    assert res.exit_code == 0 and "2,000 uids" in res.output


def test_catalog_init_and_info(tmp_path):
    from tests.conftest import pool_table
    import pyarrow.parquet as pq
    (tmp_path / "p" / "metadata").mkdir(parents=True)
    pq.write_table(pool_table([{"uid": uid_of(i)} for i in range(5)]), tmp_path / "p" / "metadata" / "a.parquet")
    res = invoke("catalog", "init", tmp_path / "c.duckdb", "--pool", tmp_path / "p")
    assert res.exit_code == 0 and "5 samples in 1 parquet files" in res.output
    res = invoke("catalog", "init", tmp_path / "c.duckdb", "--pool", tmp_path / "p")
    assert res.exit_code == 1 and "already exists" in res.output
    res = invoke("catalog", "info", tmp_path / "c.duckdb")
    assert res.exit_code == 0 and "5 samples in 1 files" in res.output


def test_lint_exit_codes(tmp_path):
    assert invoke("lint", REPO / "filters" / "no_filter.sql").exit_code == 0
    bad = tmp_path / "bad.sql"
    bad.write_text("SELECT uid FROM pool WHERE nope = 1")
    res = invoke("lint", bad)
    assert res.exit_code == 1 and "nope" in res.output


def _commands(cmd, path=()):
    import click

    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(None):  # the top-level group loads its commands lazily
            yield from _commands(cmd.get_command(None, name), (*path, name))
    else:
        yield path


def test_every_command_has_help_with_an_example():
    paths = list(_commands(main))
    assert len(paths) > 30  # every command group registered
    for args in paths:
        res = invoke(*args, "--help")
        assert res.exit_code == 0 and "Example" in res.output, args


def test_run_engine_ray_gives_the_same_bytes(tmp_path):
    flt = REPO / "filters" / "clip_score_l14_30pct.sql"
    assert invoke("run", flt, "-o", tmp_path / "local.npy").exit_code == 0
    res = invoke("run", flt, "--engine", "ray", "-o", tmp_path / "ray.npy")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ray.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()
    res = invoke("run", flt, "--ray-address", "auto", "-o", tmp_path / "x.npy")
    assert res.exit_code == 1 and "--ray-address needs --engine ray" in res.output


def test_features_text_engine_ray(tmp_path):
    from curate.catalog.connection import connect, init_catalog

    cat = init_catalog(tmp_path / "c.duckdb", pool=REPO / "data" / "sample_pool", features_dir=tmp_path / "feat")
    res = invoke("features", "text", cat, "--engine", "ray")
    assert res.exit_code == 0, res.output
    assert "computed 2 file(s)" in res.output
    con = connect(cat)
    assert con.execute("SELECT count(*), count(DISTINCT uid) FROM text_features").fetchone() == (2000, 2000)


@click.command("slow-query")
@click.option("--how", type=click.Choice(["sigint", "interrupt"]))
def _slow_query_cmd(how):
    con = duckdb.connect()
    stop = (lambda: os.kill(os.getpid(), signal.SIGINT)) if how == "sigint" else con.interrupt
    threading.Timer(0.3, stop).start()
    # ~20 s on 2 cores if nothing interrupts it (then the command ends with status 0: the test fails)
    con.execute("SELECT count(*) FROM range(2000000000) AS a(i) WHERE a.i % 7 = 3").fetchall()


@pytest.mark.parametrize("how", ["sigint", "interrupt"])
def test_ctrl_c_during_a_duckdb_query_ends_as_an_interrupt(monkeypatch, how):
    # DuckDB turns Ctrl-C (SIGINT) into RuntimeError("Query interrupted"), and an interrupted
    # connection into InterruptException: both end like any Ctrl-C, no traceback
    import importlib

    monkeypatch.setitem(importlib.import_module("curate.cli.main").COMMANDS, "slow-query", "tests.cli.test_main:_slow_query_cmd")
    # Python's own Ctrl-C handler, as in a `curate` process (an in-process Ray, started by an
    # earlier test, installs its own)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = CliRunner().invoke(main, ["slow-query", "--how", how])
    finally:
        signal.signal(signal.SIGINT, old)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    assert res.output.strip() == "Aborted!"
