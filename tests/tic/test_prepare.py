"""curate tic prepare: a plan's replay subsets and data dirs, resharded from real pool tars."""

import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from curate.catalog.connection import init_catalog
from curate.cli.main import main
from curate.engine import Engine
from curate.errors import CurateError
from curate.tic.artifacts import make_tic_artifacts
from curate.tic.attach import attach
from curate.tic.export import export_splits
from curate.tic.plan import make_plan, write_plan
from curate.tic.prepare import prepare_plan
from tests.conftest import REPO

SHARDS = REPO / "data" / "sample_pool" / "shards"
ONE_WORKER = Engine(workers=1)


def downloaded_uids():
    """uids of the samples actually in the bundled pool's tars (read with tarfile + json)."""
    out = set()
    for tar in sorted(SHARDS.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out.add(json.loads(t.extractfile(m).read())["uid"])
    return out


def hexes(path):
    return {f"{int(a):016x}{int(b):016x}" for a, b in np.load(path)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cat = init_catalog(root / "c.duckdb", pool=REPO / "data" / "sample_pool")
    make_tic_artifacts(cat, root / "art")
    attach(cat, root / "art")
    res = export_splits(cat, root / "tic")
    plan = make_plan("cumulative-exp", [2016, 2017, 2018], 100, res.yearly, export_dir="tic")
    write_plan(plan, root / "plan.json")
    r = prepare_plan(root / "plan.json", cat, SHARDS, root=root, engine=ONE_WORKER)
    return root, cat, plan, r


def test_every_data_dir_holds_its_subset(prepared):
    root, _, plan, r = prepared
    have = downloaded_uids()
    dirs = {d["dir"]: d["subset"] for s in plan["steps"] for d in s["data"]}
    assert set(r.dirs) == {str(root / d) for d in dirs}
    for d, subset in dirs.items():
        want = hexes(root / "tic" / subset) & have
        got = set()
        for tar in (root / d).glob("*.tar"):
            with tarfile.open(tar) as t:
                got |= {m.name.split("-")[0] for m in t.getmembers()}
        assert got == want and r.dirs[str(root / d)] == len(want), d
        assert (root / d / "sample_ids.npy").read_bytes() == (root / "tic" / subset).read_bytes()


def test_replay_subsets_follow_the_plan(prepared):
    root, _, plan, r = prepared
    assert len(r.subsets_made) == 3  # 2017: one buffer; 2018: two
    s2017 = hexes(root / "tic" / "replay/cumulative-exp/2017/2016.npy")
    s2018 = hexes(root / "tic" / "replay/cumulative-exp/2018/2016.npy")
    assert s2018 <= s2017  # Exp halves the old buffer: a subset, not a new draw
    step1 = set().union(*(hexes(root / "tic" / "yearly" / f"{y}.npy") for y in (2014, 2015, 2016)))
    assert s2017 <= step1
    planned = plan["steps"][1]["data"][0]["samples"]
    assert len(s2017) == planned  # exact: the planned number of lowest-md5 uids
    assert len(s2018) == plan["steps"][2]["data"][0]["samples"]


def test_rerun_keeps_subsets(prepared):
    root, cat, _, _ = prepared
    r = prepare_plan(root / "plan.json", cat, SHARDS, root=root, engine=ONE_WORKER, only=["2018"])
    assert r.subsets_made == [] and len(r.subsets_kept) == 2


def test_changed_plan_remakes_subsets_and_guards_data_dirs(prepared, tmp_path):
    root, cat, plan, _ = prepared
    other = make_plan("cumulative-exp", [2016, 2017, 2018], 100, plan["sizes"], export_dir="tic", buffer=50)
    write_plan(other, root / "plan_b.json")
    with pytest.raises(CurateError, match="holds the output of a different reshard job"):
        prepare_plan(root / "plan_b.json", cat, SHARDS, root=root, engine=ONE_WORKER, only=["2017"])
    assert len(hexes(root / "tic" / "replay/cumulative-exp/2017/2016.npy")) == 50  # remade: exactly 50 of 581
    r = prepare_plan(root / "plan_b.json", cat, SHARDS, root=root, engine=ONE_WORKER, only=["2017"], overwrite=True)
    d = str(root / "tic/replay/cumulative-exp/2017/2016")
    assert r.dirs[d] == len(hexes(root / "tic" / "replay/cumulative-exp/2017/2016.npy") & downloaded_uids())
    # restore the module fixture's state for the other tests
    prepare_plan(root / "plan.json", cat, SHARDS, root=root, engine=ONE_WORKER, only=["2017"], overwrite=True)


def test_cli_and_errors(prepared, tmp_path):
    root, cat, plan, _ = prepared
    out = CliRunner().invoke(main, ["tic", "prepare", str(root / "plan.json"), "-c", str(cat), "--root", str(root),
                                    "-j", "1", "--only", "2016"])
    assert out.exit_code == 0, out.output
    assert "prepared 3 data dirs" in out.output
    bad = dict(plan, export_dir="nowhere")
    write_plan(bad, tmp_path / "p.json")
    with pytest.raises(CurateError, match="split subset not found"):
        prepare_plan(tmp_path / "p.json", cat, SHARDS, root=tmp_path)
