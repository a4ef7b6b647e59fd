"""A query cut at its top level by DuckDB's own tokenizer: ``[WITH ...] SELECT list FROM ...
[WHERE a AND b ...] [more clauses]``, each piece the query's own text.

Used by ``curate run --explain`` (:mod:`curate.run.explain`: rows per conjunct) and by the
on-demand caption features (:mod:`curate.run.ondemand`: which conjuncts restrict the rows a
feature is computed for). It imports nothing of the runner, so both can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.sqltokens import Token, tokenize

#: clauses after WHERE that change which rows come out (ORDER BY and WINDOW do not)
_ROW_CLAUSES = {"group", "having", "qualify", "limit", "offset"}
_AFTER_WHERE = _ROW_CLAUSES | {"order", "window"}
_SET_OPERATIONS = {"union", "except", "intersect"}

@dataclass(frozen=True)
class QueryShape:
    """The final ``SELECT`` of a query, cut into its pieces (text as in the query)."""

    prefix: str  # everything before the final SELECT: a WITH chain, or ''
    projection: str  # the select list (the uid expression)
    from_sql: str  # the FROM clause without the word FROM
    conjuncts: list[str]  # the WHERE's top-level conjuncts, in order
    rest: str | None  # DISTINCT / GROUP BY / HAVING / QUALIFY / LIMIT / OFFSET, which also drop rows


def _depths(tokens: list[Token]) -> list[int]:
    """Bracket depth of each token (an opening bracket counts as outside, its closer too)."""
    out, depth = [], 0
    for t in tokens:
        if t.kind == "operator" and t.value in (")", "]", "}"):
            depth -= 1
        out.append(depth)
        if t.kind == "operator" and t.value in ("(", "[", "{"):
            depth += 1
    return out


def _kw(t: Token, *words: str) -> bool:
    return t.kind == "keyword" and (t.value or "") in words


def split_query(sql: str) -> QueryShape | str:
    """The pieces of ``sql`` by DuckDB's tokenizer; a string saying why when it has not the shape
    ``[WITH ...] SELECT expr FROM ... [WHERE a AND b ...] [more clauses]``."""
    tokens = tokenize(sql)
    if not tokens:
        return "the query is empty"
    depth = _depths(tokens)
    top = [i for i, t in enumerate(tokens) if depth[i] == 0 and t.kind == "keyword"]
    for i in top:
        if tokens[i].value in _SET_OPERATIONS:
            return f"it combines queries with {tokens[i].value.upper()}"
    if tokens[0].is_op("("):
        return "the query is in parentheses"
    selects = [i for i in top if tokens[i].value == "select"]
    if len(selects) != 1:
        return "it has no top-level SELECT" if not selects else "it has more than one top-level SELECT"
    s = selects[0]
    if s and not tokens[0].is_name("with"):
        return f"it starts with {tokens[0].value.upper() if tokens[0].value else 'something'} before SELECT"
    start = s + 1
    distinct = start < len(tokens) and _kw(tokens[start], "distinct")
    if start < len(tokens) and _kw(tokens[start], "distinct", "all"):
        start += 1
        if distinct and start < len(tokens) and _kw(tokens[start], "on"):
            return "it uses SELECT DISTINCT ON"
    after = [i for i in top if i > s]
    frm = next((i for i in after if tokens[i].value == "from"), None)
    if frm is None:
        return "it has no FROM clause"
    where = next((i for i in after if i > frm and tokens[i].value == "where"), None)
    tail = next((i for i in after if i > (where or frm) and tokens[i].value in _AFTER_WHERE), None)
    if any(i > frm and tokens[i].value in ("select", "from", "where") for i in after if i not in (frm, where)):
        return "its top-level clauses are not in the order SELECT, FROM, WHERE"
    end_from = where if where is not None else tail
    projection = sql[tokens[start].start:tokens[frm].start].strip() if start < frm else ""
    from_sql = sql[tokens[frm].end:(tokens[end_from].start if end_from is not None else len(sql))].strip()
    if not projection or not from_sql:
        return "its SELECT list or FROM clause is empty"
    conjuncts: list[str] = []
    if where is not None:
        stop = tail if tail is not None else len(tokens)
        got = _split_and(sql, tokens, depth, where + 1, stop)
        if isinstance(got, str):
            return got
        conjuncts = got
    rest_parts = []
    if distinct:
        rest_parts.append("SELECT DISTINCT")
    row_clauses = [i for i in after if tail is not None and i >= tail and tokens[i].value in _ROW_CLAUSES]
    if row_clauses:
        rest_parts.append(sql[tokens[row_clauses[0]].start:].strip())
    return QueryShape(sql[:tokens[s].start].strip(), projection, from_sql, conjuncts,
                      "; ".join(rest_parts) or None)


def _split_and(sql: str, tokens: list[Token], depth: list[int], lo: int, hi: int) -> list[str] | str:
    """The texts between the top-level ANDs of ``tokens[lo:hi]`` (not inside brackets,
    CASE ... END, or the AND of BETWEEN)."""
    base = depth[lo] if lo < hi else 0
    groups, current, case, between = [], [], 0, 0
    for i in range(lo, hi):
        t = tokens[i]
        if depth[i] == base and t.kind == "keyword":
            if t.value == "case":
                case += 1
            elif t.value == "end" and case:
                case -= 1
            elif t.value == "between" and not case:
                between += 1
            elif t.value == "and" and not case:
                if between:
                    between -= 1
                else:
                    groups.append(current)
                    current = []
                    continue
        current.append(t)
    groups.append(current)
    if any(not g for g in groups):
        return "its WHERE has an empty conjunct"
    return [sql[g[0].start:g[-1].end] for g in groups]


__all__ = ["QueryShape", "split_query"]
