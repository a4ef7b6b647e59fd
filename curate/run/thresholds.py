"""Finding ``fraction_threshold(score, fraction)`` calls in a filter query, by DuckDB's tokenizer.

The macro is the one whole-pool scalar the baselines need. Both engines cut each call out of the
query and put ``getvariable('__curate_fraction_threshold_N')`` in its place: the local engine
evaluates the call once, up front (so DuckDB can push ``score >= <constant>`` into the parquet
scan), the ray engine computes it across partitions (:mod:`curate.run.ray_threshold`).
:func:`subquery_spans` finds the parenthesised subqueries among which the ray engine looks for
the other whole-pool scalars (:func:`curate.run.ray.global_scalars`).
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.sqltokens import call_arguments, tokenize

VARIABLE_PREFIX = "__curate_fraction_threshold_"


@dataclass(frozen=True)
class ThresholdCall:
    variable: str
    score_sql: str  # an expression over the columns of `pool`
    fraction_sql: str  # evaluated once, on the driver, with the filter's variables set


def extract_fraction_thresholds(sql: str) -> tuple[str, list[ThresholdCall]]:
    """Replace every ``fraction_threshold(a, b)`` call; identical calls share one variable."""
    tokens = tokenize(sql)
    out, pos, calls, by_args = [], 0, [], {}
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.is_name("fraction_threshold"):
            found = call_arguments(tokens, i)
            if found is None or len(found[1]) != 1:
                i += 1  # leave a malformed call to DuckDB's own error message
                continue
            j, (comma,) = found
            score = sql[tokens[i + 1].end : tokens[comma].start].strip()
            fraction = sql[tokens[comma].end : tokens[j].start].strip()
            key = (" ".join(score.split()).lower(), " ".join(fraction.split()).lower())
            if key not in by_args:
                by_args[key] = ThresholdCall(f"{VARIABLE_PREFIX}{len(calls)}", score, fraction)
                calls.append(by_args[key])
            out.append(sql[pos : t.start])
            out.append(f"getvariable('{by_args[key].variable}')")
            pos = tokens[j].end
            i = j + 1
            continue
        i += 1
    out.append(sql[pos:])
    return "".join(out), calls


def mentions_fraction_threshold(sql: str) -> bool:
    return bool(extract_fraction_thresholds(sql)[1])


@dataclass(frozen=True)
class SubquerySpan:
    start: int  # the opening parenthesis
    end: int  # just after the closing one
    before: str | None  # the token before ``(`` (lower-cased name or operator), None at the start


def subquery_spans(sql: str) -> list[SubquerySpan]:
    """Every parenthesised ``(SELECT ...)`` / ``(WITH ...)`` of ``sql``, outer before inner (text
    order of the opening parentheses). The ray engine looks among them for whole-pool scalars
    (:func:`curate.run.ray.global_scalars`)."""
    tokens = tokenize(sql)
    spans, stack = [], []
    for k, t in enumerate(tokens):
        if t.is_op("("):
            stack.append(k)
        elif t.is_op(")") and stack:
            k0 = stack.pop()
            if k0 + 1 < k and (tokens[k0 + 1].is_name("select") or tokens[k0 + 1].is_name("with")):
                before = tokens[k0 - 1].value if k0 else None
                spans.append(SubquerySpan(tokens[k0].start, t.end, before and before.lower()))
    return sorted(spans, key=lambda s: s.start)
