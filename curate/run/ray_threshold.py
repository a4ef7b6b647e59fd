"""DataComp's fraction -> threshold, exact, without gathering the score column on one node.

DataComp (``get_threshold``): ``n = int(N * fraction)`` over all N pool rows (NaN included) and
``threshold = (-np.sort(-scores))[n]`` over the non-NaN scores (float32); if fewer than n+1
scores are numbers the threshold is NaN and nothing is kept (NULL here, as in the
``fraction_threshold`` SQL macro).

Here the rank-n value is found by radix selection on the float32 bit pattern. Every float32
maps to a 32-bit key whose unsigned order is the float order (flip all bits of negatives, set
the sign bit of positives). Each partition returns only a histogram of key digits: the top 11
bits, then the next 11 bits inside the chosen prefix, then the last 10. Three passes over one
column; at most 2,048 counters per partition and pass travel to the driver (sent sparse: only
the non-zero ones), the driver adds them up as they arrive (constant memory), and the third
pass pins a single bit pattern: the exact value, whatever the distribution (ties, NaN, +-0,
infinities).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

#: (shift of the prefix already fixed, shift of the digit this pass counts, digit bits)
PASSES = ((32, 21, 11), (21, 10, 11), (10, 0, 10))
BATCH = 1 << 20


def float_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (NaN must be removed first)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def key_to_float(key: int) -> float:
    """Inverse of :func:`float_keys` for one key, as a Python float (exact)."""
    u = key ^ 0x80000000 if key & 0x80000000 else (~key) & 0xFFFFFFFF
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def score_batches(con, score_sql: str):
    """Stream a partition's scores as float32 arrays, NULL -> NaN (pandas reads NULL as NaN)."""
    reader = con.execute(f"SELECT ({score_sql})::FLOAT AS x FROM pool").fetch_record_batch(BATCH)
    for batch in reader:
        col = pc.fill_null(batch.column(0), float("nan"))
        yield col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def partition_histogram(batches, level: int, prefix: int | None) -> tuple[int, np.ndarray, np.ndarray]:
    """One pass over one partition: (rows seen, digits, counts) — the non-zero counts of the
    next key digit inside ``prefix``.

    ``level`` 0 counts the top 11 bits of every number (``prefix`` is None); levels 1 and 2
    count the next digit of the keys whose higher bits equal ``prefix``.
    """
    fixed_shift, shift, bits = PASSES[level]
    counts = np.zeros(1 << bits, dtype=np.int64)
    rows = 0
    for x in batches:
        rows += len(x)
        keys = float_keys(x[~np.isnan(x)])
        if level:
            keys = keys[(keys >> np.uint32(fixed_shift)) == np.uint32(prefix)]
        digits = (keys >> np.uint32(shift)) & np.uint32((1 << bits) - 1)
        counts += np.bincount(digits, minlength=1 << bits)
    nz = np.flatnonzero(counts)
    return rows, nz.astype(np.int32), counts[nz]


def pick_descending(counts: np.ndarray, k: int) -> tuple[int, int] | None:
    """The digit holding the 0-based k-th largest value, and k's rank inside it; None if absent."""
    desc = counts[::-1]
    cum = np.cumsum(desc)
    if k < 0 or k >= int(cum[-1]):
        return None
    j = int(np.searchsorted(cum, k, side="right"))
    above = int(cum[j - 1]) if j else 0
    return len(counts) - 1 - j, k - above


@dataclass
class ThresholdResult:
    threshold: float | None  # None = DataComp's NaN (fewer than n+1 numeric scores)
    n_rows: int
    n_numeric: int
    rank: int  # n = int(N * fraction)

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "n_rows": self.n_rows, "n_numeric": self.n_numeric,
                "rank": self.rank}


def merge_histograms(results, level: int) -> tuple[int, np.ndarray]:
    """Add up partition histograms (any iterable, consumed as it comes): (rows, dense counts)."""
    counts = np.zeros(1 << PASSES[level][2], dtype=np.int64)
    rows = 0
    for r, digits, c in results:
        rows += r
        np.add.at(counts, digits, c)
    return rows, counts


def exact_threshold(run_pass, fraction: float) -> ThresholdResult:
    """Drive the passes. ``run_pass(level, prefix)`` runs one pass on every partition (in
    parallel, wherever they live) and returns an iterable of :func:`partition_histogram` results."""
    n_rows, counts = merge_histograms(run_pass(0, None), 0)
    n_numeric = int(counts.sum())
    k = int(n_rows * float(fraction))  # Python float product then int(): DataComp's exact rank
    pick = pick_descending(counts, k)
    if pick is None:
        return ThresholdResult(None, n_rows, n_numeric, k)
    prefix, rank = pick
    for level in range(1, len(PASSES)):
        _, counts = merge_histograms(run_pass(level, prefix), level)
        digit, rank = pick_descending(counts, rank)
        prefix = (prefix << PASSES[level][2]) | digit
    return ThresholdResult(key_to_float(prefix), n_rows, n_numeric, k)
