"""`curate run --plot PNG` (issue 20): the histogram of each score a filter thresholds, counted by
DuckDB, checked by hand on a ten-row pool; the PNG opened with PIL; the one-line error."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli.main import main
from curate.resources import filters_dir
from curate.run.explain import score_histograms, threshold_targets
from curate.run.plot import png_size
from curate.run.query import open_filter, precompute_thresholds
from tests.conftest import REPO, uid_of
from tests.run.test_explain import C1, C2, C3, ROWS, write_filter

EXAMPLE = REPO / "catalog.duckdb.example"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def small(make_catalog):
    rows = [{"uid": uid_of(i), "clip_l14_similarity_score": s, "original_width": w, "text": t}
            for i, (s, w, t) in enumerate(ROWS)]
    return make_catalog([rows])


def test_histogram_counts_by_hand(small, tmp_path):
    opened = open_filter(write_filter(tmp_path, "f", [C1, C2, C3]), small)
    try:
        query, _ = precompute_thresholds(opened.con, opened.query)
        split, targets = threshold_targets(opened.con, opened.flt, query)
        assert [(t.conjunct, t.shown_column) for t in targets] == [(1, "clip_l14_similarity_score")]
        (h,) = score_histograms(opened.con, opened.flt, split, targets, bins=5)
    finally:
        opened.con.close()
    # finite scores 0.9 0.1 0.65 0.75 0.72 0.2 0.6 0.5 (NULL and NaN are not drawn): 5 bins of
    # width 0.16 from 0.1 to 0.9: [0.1, 0.2] [] [0.5] [0.6, 0.65, 0.72] [0.75, 0.9]; kept: 0.9, 0.6, 0.5
    assert h.rows == [2, 0, 1, 3, 2]
    assert h.kept == [0, 0, 1, 1, 1]
    assert h.missing == 2 and h.total == 10
    assert h.edges[0] == pytest.approx(0.1) and h.edges[-1] == pytest.approx(0.9) and len(h.edges) == 6
    assert h.thresholds == [(C1, 0.5)]


def test_plot_writes_a_png_of_the_expected_size(small, tmp_path):
    out = tmp_path / "f.png"
    res = invoke("run", write_filter(tmp_path, "f", [C1, C2, C3]), "-c", small, "-o", tmp_path / "f.npy",
                 "--plot", out)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"wrote {out}"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == png_size(1) == (800, 350)


@pytest.mark.parametrize("name, panels", [("laion2b", 1), ("clip_score_l14_30pct", 1), ("basic_filter", 2)])
def test_plot_of_bundled_filters(name, panels, tmp_path):
    # laion2b thresholds the B/32 score, the 30% filter the L/14 score; basic_filter n_words and n_chars
    out = tmp_path / f"{name}.png"
    res = invoke("run", name, "-c", EXAMPLE, "-o", tmp_path / f"{name}.npy", "--plot", out)
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.size == (800, 350 * panels)


def test_a_filter_without_a_thresholded_column_is_one_line_error(tmp_path):
    out = tmp_path / "t.npy"
    res = invoke("run", "text_based", "-c", EXAMPLE, "-o", out, "--plot", tmp_path / "t.png")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"error: {filters_dir() / 'text_based.sql'}: --plot: the filter compares no numeric column with a "
        "threshold (col >= value, col < value, datacomp_ge(col, value), ...): nothing to draw"]
    assert not out.exists() and not (tmp_path / "t.png").exists()  # the run stopped before writing


def test_plot_refuses_to_overwrite_an_input(small, tmp_path):
    flt = write_filter(tmp_path, "f", [C1])
    res = invoke("run", flt, "-c", small, "-o", tmp_path / "f.npy", "--plot", flt)
    assert res.exit_code == 1 and "refusing to overwrite" in res.output
    assert flt.read_text().startswith("SET VARIABLE t = 0.5;")
