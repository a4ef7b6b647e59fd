"""curate tic ... from the command line, and the time analytics (tables + PNG)."""

import csv

from click.testing import CliRunner

from curate.cli.main import main
from curate.subset import write_subset
from tests.tic.test_attach import expected, pairs, pool_uids


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_end_to_end(make_catalog, tmp_path):
    uids = pool_uids(200)
    cat = make_catalog([[{"uid": u} for u in uids[:120]], [{"uid": u} for u in uids[120:]]])
    r = run("tic", "artifacts", cat, "--out", tmp_path / "art", "--monthly", "tar")
    assert r.exit_code == 0, r.output
    r = run("tic", "attach", cat, "--tic-dir", tmp_path / "art")
    assert r.exit_code == 0, r.output
    assert "views tic_yearly, timesplit, tic_eval, imagenet_classes registered" in r.output
    r = run("tic", "export", cat, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    n_train = sum(1 for u in uids if expected(u)[1] is None)
    assert f"({n_train:,} uids)" in r.output
    assert "eval sets not resharded: the catalog has no shard directory" in r.output
    r = run("tic", "export", cat, "--out", tmp_path / "out2", "--eval-sets")
    assert r.exit_code == 1 and "error:" in r.output and "pass --shards DIR" in r.output

    # stats: per-year samples and the keep rate of a subset, checked against the rule
    keep = uids[::4]
    p = pairs(keep)
    write_subset(tmp_path / "keep.npy", p["f0"], p["f1"])
    r = run("tic", "stats", cat, "--out", tmp_path / "rep", "--filter", tmp_path / "keep.npy")
    assert r.exit_code == 0, r.output
    by_year = {}
    for u in uids:
        yyyymm, task, _ = expected(u)
        y = yyyymm // 100
        n, e, train, kept = by_year.get(y, (0, 0, 0, 0))
        is_train = task is None
        by_year[y] = (n + 1, e + (not is_train), train + is_train, kept + (is_train and u in set(keep)))
    with open(tmp_path / "rep" / "samples_by_year.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["year"]): (int(r["samples"]), int(r["eval_samples"])) for r in rows} == \
        {y: (n, e) for y, (n, e, _, _) in by_year.items()}
    with open(tmp_path / "rep" / "keep_rate_by_year.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["year"]): (int(r["train_samples"]), int(r["kept"])) for r in rows} == \
        {y: (t, k) for y, (_, _, t, k) in by_year.items()}
    with open(tmp_path / "rep" / "samples_by_month.csv") as f:
        months = list(csv.DictReader(f))
    assert sum(int(m["samples"]) for m in months) == 200
    png = (tmp_path / "rep" / "tic_stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line(make_catalog, tmp_path):
    cat = make_catalog([[{"uid": pool_uids(1)[0]}]])
    r = run("tic", "attach", cat, "--tic-dir", tmp_path / "missing")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "TiC artifact directory not found" in r.output
    r = run("tic", "stats", cat, "--out", tmp_path / "rep")
    assert r.exit_code == 1 and "no timesplit view" in r.output
    r = run("tic", "--help")
    assert all(c in r.output for c in ("attach", "export", "plan", "stats", "artifacts"))


def test_export_engine_ray_matches_local(tmp_path):
    from curate.catalog.connection import init_catalog
    from tests.conftest import REPO

    cat = init_catalog(tmp_path / "c.duckdb", pool=REPO / "data" / "sample_pool", features_dir=tmp_path / "feat")
    assert run("tic", "artifacts", cat, "--out", tmp_path / "art").exit_code == 0
    assert run("tic", "attach", cat, "--tic-dir", tmp_path / "art").exit_code == 0
    flt = REPO / "filters" / "clip_score_b32_threshold.sql"
    for engine in ("local", "ray"):
        r = run("tic", "export", cat, "--out", tmp_path / engine, "--filter", flt, "--engine", engine)
        assert r.exit_code == 0, r.output
    assert "on ray" in r.output

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and "filter" not in p.parts and ".reshard" not in p.parts
                and p.name not in ("meta.json", "export.json")}  # these record paths and times

    local, ray = files(tmp_path / "local"), files(tmp_path / "ray")
    assert local.keys() == ray.keys() and any(str(k).endswith(".tar") for k in local)
    assert all(local[k] == ray[k] for k in local)
    import json
    manifests = [json.loads((tmp_path / e / "export.json").read_text()) for e in ("local", "ray")]
    assert manifests[0]["yearly"] == manifests[1]["yearly"] and manifests[0]["monthly"] == manifests[1]["monthly"]
