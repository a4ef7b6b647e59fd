"""Finding ``fraction_threshold(score, fraction)`` calls in a filter query, by DuckDB's tokenizer.

The macro is the one whole-pool scalar the baselines need. Both engines cut each call out of the
query and put ``getvariable('__curate_fraction_threshold_N')`` in its place: the local engine
evaluates the call once, up front (so DuckDB can push ``score >= <constant>`` into the parquet
scan), the ray engine computes it across partitions (:mod:`curate.run.ray_threshold`).
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
