"""Every `Example:` in `curate ... --help` is a command line the CLI accepts, and those that can
run here do run (issue 18).

Each example line is parsed by click against the real command: subcommands resolved, every
option known, required options and arguments present, choices valid, numbers numbers. Paths in
examples name the user's files, so "does not exist" is the one error allowed. Then every
`curate tic ...` example, and the other examples that run on the bundled sample pool in
seconds, are executed (substitutions and sizes documented below); the rest are listed with
the reason they are not run here.
"""

from __future__ import annotations

import shlex

import click
import pytest

from curate.cli import main


def _commands(cmd, path=()):
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(None):
            yield from _commands(cmd.get_command(None, name), (*path, name))
    else:
        yield path, cmd


def _examples(cmd: click.Command) -> list[str]:
    text = cmd.help or ""
    if "Example" not in text:
        return []
    block = text.split("Example", 1)[1]
    lines, cur = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if cur:
            cur += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                lines.append(cur)
                cur = ""
            continue
        if line.startswith("curate "):
            if line.endswith("\\"):
                cur = line.rstrip("\\").strip()
            else:
                lines.append(line)
    if cur:
        lines.append(cur)
    out = []
    for line in lines:
        line = line.split(" # ", 1)[0].split("&&", 1)[0].split(" | ", 1)[0].strip()
        out.append(line)
    return out


EXAMPLES = [(" ".join(path), ex) for path, cmd in _commands(main) for ex in _examples(cmd)]


def test_there_are_examples_for_every_command():
    paths = {" ".join(p) for p, _ in _commands(main)}
    with_examples = {p for p, _ in EXAMPLES}
    assert paths - with_examples == set()


def _parse(args: list[str]):
    ctx = main.make_context("curate", list(args))
    cmd, rest = main, list(ctx.protected_args) + list(ctx.args)
    while isinstance(cmd, click.Group):
        name, sub, rest = cmd.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd, rest = sub, list(ctx.protected_args) + list(ctx.args) if isinstance(sub, click.Group) else []


@pytest.mark.parametrize("path,example", EXAMPLES, ids=[f"{p}: {e[:60]}" for p, e in EXAMPLES])
def test_example_parses(path, example):
    args = shlex.split(example)
    assert args[0] == "curate"
    try:
        _parse(args[1:])
    except click.BadParameter as e:
        if "does not exist" not in str(e):
            raise AssertionError(f"`{example}`: {e.format_message()}") from None
    except click.ClickException as e:
        raise AssertionError(f"`{example}`: {e.format_message()}") from None


# --------------------------------------------------------------------------- running the examples
#
# Parsing is not enough (issue 18: `curate tic train --help` showed a `tic plan` line that parsed
# but failed at run time). Every `curate tic ...` example is RUN below, in one working directory,
# in the order a person would run them, each example text taken from the --help output itself.
# What the test changes, and why:
#
# * setup: `pool.duckdb` is a catalog over the bundled sample pool (data/sample_pool, with its
#   shards); `filters` links to the repository's filters/; `subsets/basic_filter.npy` is made
#   with `curate run filters/basic_filter.sql` (the subset `tic export`'s example restricts to).
# * path substitutions (SUBSTITUTIONS): the bundled `catalog.duckdb.example` -> `pool.duckdb` (a
#   catalog over the same pool, so the repository's file is never written); `/tmp/...` and
#   `/data/tic-datacomp` -> directories inside the test's directory (TiC's artifacts are the
#   ones `curate tic artifacts` generated a step earlier).
# * CPU sizes (SMALL): `tic plan` examples get `--scale tiny --budget 64` appended (the default
#   tic_medium scale trains 4,096 x 4,500 samples per step), `tic train` gets `--num-checkpoints 1
#   --threads 1 --workers 1 -q`; an appended option overrides the example's own value.
# * `tic matrix` reads each step's eval_results.jsonl: before it, `curate eval --tasks
#   eval/tic_tasklist.yml` runs on the two cumulative-all steps (retrieval tasks only), as the
#   matrix command's help says.

SUBSTITUTIONS = [("catalog.duckdb.example", "pool.duckdb"), ("/tmp/tic-artifacts", "tic-artifacts"),
                 ("/data/tic-datacomp", "tic-artifacts")]
SMALL = {("tic", "plan"): ["--scale", "tiny", "--budget", "64"],
         ("tic", "train"): ["--num-checkpoints", "1", "--threads", "1", "--workers", "1", "-q"]}
# the order the tic examples run in (by the command whose help shows them)
TIC_ORDER = ["tic artifacts", "tic attach", "tic export", "tic stats", "tic plan", "tic prepare", "tic train",
             "tic matrix"]


def _runnable(example: str) -> list[str]:
    for a, b in SUBSTITUTIONS:
        example = example.replace(a, b)
    args = shlex.split(example)[1:]
    return args + SMALL.get(tuple(args[:2]), [])


def test_every_tic_example_is_run():
    tic_paths = {p for p, _ in EXAMPLES if p.startswith("tic ")}
    assert tic_paths == set(TIC_ORDER)


def test_tic_examples_run(tmp_path, monkeypatch):
    import os

    from click.testing import CliRunner

    from curate.catalog.connection import init_catalog
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    init_catalog(tmp_path / "pool.duckdb", pool=REPO / "data" / "sample_pool")
    os.symlink(REPO / "filters", tmp_path / "filters")
    runner = CliRunner()

    def run(args):
        r = runner.invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 0, f"`curate {shlex.join(args)}` failed:\n{r.output[-3000:]}"
        return r.output

    ran = []
    for path in TIC_ORDER:
        if path == "tic export":
            run(["run", "filters/basic_filter.sql", "-c", "pool.duckdb", "-o", "subsets/basic_filter.npy"])
        if path == "tic matrix":
            retrieval = [f"tic/datacomp/retrieval/yearly/{y}" for y in range(2014, 2023)]
            for step in ("2016", "2017"):
                run(["eval", "--train-output-dir", f"runs/tic/cumulative-all/{step}", "--tasks",
                     str(REPO / "eval" / "tic_tasklist.yml"), "--data-dir", "tic", "--threads", "1",
                     *[a for t in retrieval for a in ("--task", t)]])
        for p, example in EXAMPLES:
            if p == path:
                out = run(_runnable(example))
                ran.append(example)
                if example.startswith("curate tic train"):
                    assert "steps trained" in out
                if "pool.duckdb" in _runnable(example):
                    # the summary names the catalog it ran on (curate.cli.options.catalog_used)
                    assert "catalog pool.duckdb" in out, out
    assert len(ran) == sum(1 for p, _ in EXAMPLES if p.startswith("tic "))
    # what the examples say they make is there
    assert (tmp_path / "plans" / "cumulative-exp.json").is_file() and (tmp_path / "report" / "tic_stats.png").is_file()
    assert (tmp_path / "m.png").is_file() and (tmp_path / "m.json").is_file()
    for strategy in ("cumulative-exp", "cumulative-all"):
        for step in ("2016", "2017", "2018"):
            assert (tmp_path / "runs" / "tic" / strategy / step / "checkpoints" / "epoch_latest.pt").is_file()


# Other examples that run on the bundled sample pool in seconds, in this order (same setup as
# above; `$CURATE_CATALOG` = pool.duckdb for the examples that use the default catalog).
# Substitutions: `small.duckdb`, `catalog.duckdb` -> `pool.duckdb`; `/data/pool/shards` -> the bundled pool's
# shards; `/data/l14_30pct` -> a directory inside the test's. Setup: `subsets/no_filter.npy` is
# made with `curate run filters/no_filter.sql` (the subset the `subset` examples read).
# Examples not run, with why, are in NOT_RUN; every example is in one of the two lists.
OTHER_ORDER = ["catalog info", "filters", "lint", "run", "subset info", "subset to-parquet", "shell",
               "shards index", "reshard", "shards verify", "targets list", "clusters list",
               "decontam list"]
OTHER_SUBSTITUTIONS = [("small.duckdb", "pool.duckdb"), ("catalog.duckdb", "pool.duckdb"),
                       ("/data/l14_30pct", "l14_30pct")]
NOT_RUN = {
    "curate shell": "interactive (a DuckDB prompt)",
    "curate shards index pool.duckdb --shards /data/tic/eval/all": "needs TiC's eval shards",
    "curate run laion2b --explain --dropped dropped.parquet --plot laion2b.png":
        "laion2b needs the pool's L14 text-image features and fastText text features (minutes)",
}
NOT_RUN_PATHS = {  # command -> why its examples are not run here
    "byod score": "needs a CLIP checkpoint and the user's shards (tests/pool/test_byod*.py run it)",
    "catalog example": "rewrites the repository's bundled pool",
    "catalog init": "names the user's DataComp pool (tests/catalog run it on fixtures)",
    "clusters build": "needs embedding targets (in1k.npy)", "clusters import": "needs DataComp's centroid files",
    "clusters targets": "needs target embedding files",
    "decontam": "needs eval sets and an open_clip checkpoint (tests/features/test_decontam.py run it)",
    "decontam encode": "needs eval sets and an open_clip checkpoint", "decontam import": "needs eval embeddings",
    "decontam build": "needs an eval set", "decontam report": "needs an eval set",
    "demo": "trains twelve models (minutes; tests/demo run its data path)",
    "download": "downloads from the internet", "download-status": "needs a download directory",
    "embeddings convert": "needs the pool's .npz embeddings in another layout",
    "embeddings dedup": "needs clusters built first", "embeddings neighbors": "the uid is a placeholder",
    "eval": "needs a trained run (tests/evaluate run curate eval)",
    "eval-export-folder": "needs an image folder / captions file of the user's",
    "eval-export-winogavil": "needs a local copy of the HF dataset",
    "explore": "starts a web server (tests/explore run it)",
    "features cld3": "minutes of language ID (tests/features)", "features clusters": "needs DataComp's centroids",
    "features negcliploss": "needs embeddings and targets", "features normsim": "needs target embeddings",
    "features semdedup": "needs a cluster set (tests/features/test_semdedup.py run it)",
    "features dbp": "needs a cluster set (tests/features/test_dbp.py run it)",
    "features text": "needs lid.176.bin in ~/models",
    "pool export-splits": "needs a TiC-YFCC15M catalog", "pool from-table": "needs the user's photos.csv",
    "pool recipe redcaps": "needs RedCaps files", "pool recipe yfcc15m": "needs the YFCC15M csv",
    "pool timesplit": "needs a pool made by pool from-table",
    "ray catalog-init": "needs S3", "ray features-text": "needs a Ray cluster", "ray run": "needs a Ray cluster and S3",
    "ray subset-concat": "needs a Ray run's output", "sample-pool": "writes a 10M-row pool",
    "targets import": "needs target embedding files", "train": "needs resharded data (tests/train run curate train)",
}


def test_every_example_is_run_or_says_why_not():
    covered = set(TIC_ORDER) | set(OTHER_ORDER) | set(NOT_RUN_PATHS)
    assert {p for p, _ in EXAMPLES} <= covered
    assert not set(NOT_RUN_PATHS) & (set(TIC_ORDER) | set(OTHER_ORDER))
    assert set(NOT_RUN) <= {e for _, e in EXAMPLES}


def test_other_examples_run(tmp_path, monkeypatch):
    import os

    from click.testing import CliRunner

    from curate.catalog.connection import init_catalog
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    init_catalog(tmp_path / "pool.duckdb", pool=REPO / "data" / "sample_pool")
    os.symlink(REPO / "filters", tmp_path / "filters")
    monkeypatch.setenv("CURATE_CATALOG", str(tmp_path / "pool.duckdb"))
    subs = OTHER_SUBSTITUTIONS + [("/data/pool/shards", str(REPO / "data" / "sample_pool" / "shards"))]
    runner = CliRunner()

    def run(args):
        r = runner.invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 0, f"`curate {shlex.join(args)}` failed:\n{r.output[-3000:]}"
        return r.output

    ran = 0
    for path in OTHER_ORDER:
        if path == "subset info":
            run(["run", "filters/no_filter.sql", "-o", "subsets/no_filter.npy"])
        for p, example in EXAMPLES:
            if p != path or example in NOT_RUN:
                continue
            for a, b in subs:
                example = example.replace(a, b)
            run(shlex.split(example)[1:])
            ran += 1
    assert ran >= 14
    assert (tmp_path / "subsets" / "l14_10pct.npy").is_file() and (tmp_path / "no_filter.parquet").is_file()
    assert list((tmp_path / "l14_30pct").glob("*.tar"))
