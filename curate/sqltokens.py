"""DuckDB's own SQL tokenizer, with token ends and values.

``duckdb.tokenize`` (DuckDB's parser, in C++, microseconds) gives each token's start and kind
only; this adds where it ends and what it means: the unquoted text of a string literal or a
quoted identifier, the lower-cased name of an unquoted one. The runner uses it on every filter
(to find ``read_subset(...)``, ``fraction_threshold(...)`` and producer views) because it agrees
with DuckDB by construction, and importing sqlglot's DuckDB dialect for the same job costs more
than a small filter takes to run.

Comments are not tokens; text between tokens (whitespace, comments) belongs to no token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import duckdb

_WORD = re.compile(r"[^\s()\[\]{},;:'\"+\-*/%<>=!|&^~@#?]+")
_OPERATOR = re.compile(r"[^\s\w'\"$]+")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F_]+|0[bB][01_]+|(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Token:
    kind: str  # identifier, numeric_const, string_const, operator, keyword
    start: int
    end: int  # exclusive
    value: str | None  # identifiers/keywords: the name (unquoted ones lower-cased);
    #                    string literals: the content (None for E'...' and other prefixed forms);
    #                    operators and numbers: the text

    def is_op(self, op: str) -> bool:
        return self.kind == "operator" and self.value == op

    def is_name(self, name: str) -> bool:
        """An identifier or keyword spelling ``name`` (lower case), quoted or not."""
        return self.kind in ("identifier", "keyword") and (self.value or "").lower() == name


def _quoted(sql: str, start: int, quote: str) -> tuple[int, str] | None:
    """End and unescaped content of a literal quoted with ``quote`` (doubled = escaped)."""
    j, parts = start + 1, []
    while True:
        k = sql.find(quote, j)
        if k < 0:
            return None
        parts.append(sql[j:k])
        if sql.startswith(quote * 2, k):
            parts.append(quote)
            j = k + 2
            continue
        return k + 1, "".join(parts)


def _string(sql: str, start: int) -> tuple[int, str | None]:
    c = sql[start]
    if c == "'":
        got = _quoted(sql, start, "'")
        if got:
            return got
    elif c == "$":
        close = sql.find("$", start + 1)
        if close > 0:
            tag = sql[start : close + 1]
            k = sql.find(tag, close + 1)
            if k >= 0:
                return k + len(tag), sql[close + 1 : k]
    elif sql[start + 1 : start + 2] == "'":  # E'..', X'..', B'..': prefixed, escapes differ
        j = start + 2
        while j < len(sql):
            if sql[j] == "\\" and c in "eE":
                j += 2
            elif sql[j] == "'":
                if not sql.startswith("''", j):
                    return j + 1, None
                j += 2
            else:
                j += 1
    return len(sql), None


def tokenize(sql: str) -> list[Token]:
    """The tokens of ``sql`` (an unterminated literal ends the list, as in DuckDB's tokenizer)."""
    raw = duckdb.tokenize(sql)
    if not sql.isascii():  # DuckDB counts UTF-8 bytes; Python strings count code points
        char_at = {}
        b = 0
        for i, ch in enumerate(sql):
            char_at[b] = i
            b += len(ch.encode("utf-8"))
        raw = [(char_at[start], ttype) for start, ttype in raw]
    out = []
    for n, (start, ttype) in enumerate(raw):
        kind = ttype.name
        if kind == "comment":
            continue
        if kind == "string_const":
            end, value = _string(sql, start)
        elif kind == "identifier" and sql[start] == '"':
            got = _quoted(sql, start, '"')
            end, value = got if got else (len(sql), None)
        elif kind == "numeric_const" and (m := _NUMBER.match(sql, start)):
            end, value = m.end(), m.group()
        elif kind in ("identifier", "keyword") and (m := _WORD.match(sql, start)):
            end, value = m.end(), m.group().lower()
        elif sql[start] in "(),;[]{}":
            end, value = start + 1, sql[start]
        else:
            m = _OPERATOR.match(sql, start)
            end = m.end() if m else start + 1
            value = sql[start:end]
        if n + 1 < len(raw) and end > raw[n + 1][0]:
            end = raw[n + 1][0]  # our patterns may run on; DuckDB's token starts are the truth
            value = sql[start:end] if kind in ("operator", "numeric_const") else value
        out.append(Token(kind, start, end, value))
    return out


def call_arguments(tokens: list[Token], i: int) -> tuple[int, list[int]] | None:
    """For a function name at ``tokens[i]`` followed by ``(``: the index of the closing ``)`` and
    of the top-level commas between; None if the call is not closed."""
    if i + 1 >= len(tokens) or not tokens[i + 1].is_op("("):
        return None
    depth, commas = 0, []
    for j in range(i + 1, len(tokens)):
        t = tokens[j]
        if t.kind != "operator":
            continue
        if t.value in ("(", "["):
            depth += 1
        elif t.value in (")", "]"):
            depth -= 1
            if depth == 0:
                return j, commas
        elif t.value == "," and depth == 1:
            commas.append(j)
    return None


__all__ = ["Token", "tokenize", "call_arguments"]


def sql_literal(value) -> str:
    """Quote a string as a SQL literal. Used only for file paths in SQL text (view DDL,
    ``read_parquet(...)``), which DuckDB cannot bind as parameters; every value from the
    command line is bound instead."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(values) -> str:
    """A SQL list literal of quoted strings: ``['a', 'b']``."""
    return "[" + ", ".join(sql_literal(v) for v in values) + "]"
