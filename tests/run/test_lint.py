"""curate lint: unknown columns/tables/functions and the single-uid-column rule."""

import pytest

from curate.run.lint import lint_filter
from tests.conftest import REPO, uid_of


@pytest.fixture
def cat(make_catalog):
    return make_catalog([[{"uid": uid_of(i)} for i in range(3)]])


@pytest.mark.parametrize("name", ["no_filter.sql", "clip_score_l14_30pct.sql", "clip_score_b32_threshold.sql",
                                  "clip_score_l14_threshold.sql"])
def test_bundled_filters_lint_clean(cat, name):
    rep = lint_filter(REPO / "filters" / name, cat)
    assert rep.ok, rep.errors
    assert rep.tables == ["pool"]


def test_reports_functions_and_parameters(cat):
    rep = lint_filter(REPO / "filters" / "clip_score_l14_30pct.sql", cat)
    assert {"datacomp_ge", "fraction_threshold", "getvariable"} <= set(rep.functions)
    assert rep.params == {"fraction": 0.3}


@pytest.mark.parametrize("sql,msg", [
    ("SELECT uid FROM pool WHERE clip_score > 0.3", "clip_score"),
    ("SELECT uid FROM pools", "unknown table 'pools'"),
    ("SELECT uid FROM pool WHERE lang_detect(text) = 'en'", "unknown function 'lang_detect'"),
    ("SELECT uid, text FROM pool", "exactly one column named `uid`"),
    ("SELECT length(uid) AS uid FROM pool", "expected VARCHAR"),
    ("SELECT uid FROM pool WHERE (", "syntax error"),
])
def test_errors(cat, tmp_path, sql, msg):
    p = tmp_path / "f.sql"
    p.write_text(sql)
    rep = lint_filter(p, cat)
    assert not rep.ok
    assert any(msg in e for e in rep.errors), rep.errors


def test_ctes_are_not_unknown_tables(cat, tmp_path):
    p = tmp_path / "f.sql"
    p.write_text("WITH good AS (SELECT uid FROM pool WHERE original_width >= 200) SELECT uid FROM good")
    rep = lint_filter(p, cat)
    assert rep.ok, rep.errors
