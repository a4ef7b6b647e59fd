"""Bundled filters by name (`curate run NAME`, `curate lint NAME`, `tic export --filter NAME`) and
their listing (`curate filters`), checked against the files themselves."""

import re

import numpy as np
from click.testing import CliRunner

from curate.cli.main import main
from curate.resources import filters_dir
from curate.run.query import bundled_filters
from curate.run.runner import run_filter
from tests.conftest import REPO, uid_of

FILES = sorted((REPO / "filters").rglob("*.sql"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def declared_in(path) -> dict:
    """``SET VARIABLE name = literal;`` lines of a filter, read with a regex (not curate's parser)."""
    out = {}
    for m in re.finditer(r"^SET VARIABLE (\w+) = (.+?);", path.read_text(), re.MULTILINE):
        value = m.group(2).strip()
        out[m.group(1)] = value[1:-1] if value.startswith("'") else value
    return out


def test_listing_covers_every_file_with_its_parameters():
    listed = {f.name: f for f in bundled_filters()}
    names = {p.relative_to(REPO / "filters").with_suffix("").as_posix() for p in FILES}
    assert set(listed) == names and "laion2b" in names and "tic/year" in names
    for p in FILES:
        f = listed[p.relative_to(REPO / "filters").with_suffix("").as_posix()]
        assert {k: str(v) for k, v in f.params.items()} == declared_in(p), p
        first = p.read_text().splitlines()[0]
        assert f.summary == (first[2:].strip() if first.startswith("--") else None)
    # by hand
    assert listed["clip_score_l14_30pct"].params == {"fraction": 0.3}
    assert listed["clip_score_b32_threshold"].params == {"threshold": 0.25}
    assert listed["tic/replay"].params == {"first_year": 2014, "last_year": 2016, "samples": 100, "seed": 0}
    assert listed["image_based"].params == {"clusters": "xlarge"}
    assert listed["no_filter"].params == {}
    assert listed["no_filter"].summary == "DataComp baseline `no_filter`: every sample of the pool."


def test_filters_command():
    res = invoke("filters")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "clip_score_l14_30pct: fraction=0.3" in lines
    assert "no_filter: no parameters" in lines
    assert "tic/year: year=2016" in lines
    assert "    DataComp baseline `no_filter`: every sample of the pool." in lines
    assert sum(1 for ln in lines if not ln.startswith(" ")) == len(FILES)


def test_run_and_lint_a_bundled_filter_by_name(make_catalog, tmp_path):
    cat = make_catalog([[{"uid": uid_of(i), "clip_l14_similarity_score": i / 10} for i in range(10)]])
    out = tmp_path / "by_name.npy"
    res = invoke("run", "clip_score_l14_30pct", "-c", cat, "-o", out)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("clip_score_l14_30pct: kept 4 of 10 samples") and "[fraction=0.3, threshold=" in res.output
    run_filter(filters_dir() / "clip_score_l14_30pct.sql", catalog=cat, out=tmp_path / "by_path.npy")
    assert out.read_bytes() == (tmp_path / "by_path.npy").read_bytes()
    assert len(np.load(out)) == 4  # rank int(10 * 0.3) = 3 of 0.9..0.0: threshold 0.6
    res = invoke("lint", "clip_score_l14_30pct", "-c", cat)
    assert res.exit_code == 0 and "parameters: fraction=0.3" in res.output
    res = invoke("run", "no_such_filter", "-c", cat, "-o", tmp_path / "x.npy")
    assert res.exit_code == 1 and "no_such_filter: filter file not found" in res.output
