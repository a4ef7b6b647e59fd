"""DuckDB's tokenizer with ends and values: literals, quoted names, comments, non-ASCII text."""

import pytest

from curate.features.registry import needed_producers
from curate.sqltokens import call_arguments, tokenize
from curate.run.thresholds import extract_fraction_thresholds


def spans(sql):
    return [(t.kind, sql[t.start : t.end], t.value) for t in tokenize(sql)]


@pytest.mark.parametrize("sql,expected", [
    ("SELECT 'it''s'", [("keyword", "SELECT", "select"), ("string_const", "'it''s'", "it's")]),
    ("SELECT $$a(b'c$$", [("keyword", "SELECT", "select"), ("string_const", "$$a(b'c$$", "a(b'c")]),
    ("SELECT $q$ ) $q$", [("keyword", "SELECT", "select"), ("string_const", "$q$ ) $q$", " ) ")]),
    # a prefixed literal has its own escapes: no value, so it is never read as a file path
    ("SELECT E'a\\'b'", [("keyword", "SELECT", "select"), ("string_const", "E'a\\'b'", None)]),
    ('SELECT "My ""Col"""', [("keyword", "SELECT", "select"), ("identifier", '"My ""Col"""', 'My "Col"')]),
    ("SELECT Read_Subset", [("keyword", "SELECT", "select"), ("identifier", "Read_Subset", "read_subset")]),
    ("a>=(1)", [("identifier", "a", "a"), ("operator", ">=", ">="), ("operator", "(", "("),
                ("numeric_const", "1", "1"), ("operator", ")", ")")]),
    ("x -- f(1, 2)\n/* g( */ + 1e-5", [("identifier", "x", "x"), ("operator", "+", "+"),
                                       ("numeric_const", "1e-5", "1e-5")]),
    # DuckDB reports UTF-8 byte offsets; these are code-point offsets into the Python string
    ("-- ∩\nSELECT 'é∩' AS \"∩x\"", [("keyword", "SELECT", "select"), ("string_const", "'é∩'", "é∩"),
                                     ("keyword", "AS", "as"), ("identifier", '"∩x"', "∩x")]),
])
def test_tokens(sql, expected):
    assert spans(sql) == expected


def test_call_arguments_ignores_nested_commas():
    sql = "f(g(a, b), [1, 2], 'x,y')"
    toks = tokenize(sql)
    close, commas = call_arguments(toks, 0)
    assert sql[toks[close].start] == ")" and toks[close].end == len(sql)
    assert [sql[toks[c].start : toks[c].end] for c in commas] == [",", ","]
    assert [toks[c].start for c in commas] == [9, 17]
    assert call_arguments(tokenize("f(a, b"), 0) is None


def test_threshold_calls_in_comments_strings_and_lists():
    sql = ("SELECT uid FROM pool -- fraction_threshold(a, 0.1)\n"
           "WHERE s >= fraction_threshold(list_max([a, b]), 0.3) AND t = 'fraction_threshold(a, 1)'")
    rewritten, calls = extract_fraction_thresholds(sql)
    assert [(c.score_sql, c.fraction_sql) for c in calls] == [("list_max([a, b])", "0.3")]
    assert rewritten.endswith("WHERE s >= getvariable('__curate_fraction_threshold_0') "
                              "AND t = 'fraction_threshold(a, 1)'")


def test_producer_views_are_identifiers_not_strings():
    assert needed_producers('SELECT uid FROM "text_features"') == ["text_features"]
    assert needed_producers("SELECT 'text_features' AS uid FROM pool -- cluster_assignments") == []
