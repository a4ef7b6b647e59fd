"""The Ray engine's pure parts, without Ray: exact threshold, query analysis, bucket assembly.

Expected thresholds are worked out by hand from DataComp's definition
(``n = int(N * fraction)``; value at 0-based rank n of the non-NaN scores sorted descending).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from curate import storage
from curate.run.assemble import (concat_bucket_directory, concatenate_buckets, iter_subset_chunks,
                                         plan_buckets, write_bucket_directory)
from curate.run.plan import row_local_problem
from curate.run.ray_threshold import exact_threshold, float_keys, key_to_float, partition_histogram
from curate.run.thresholds import extract_fraction_thresholds
from curate.subset import NPY_HEADER_LEN
from curate.uids import sort_pairs, to_records

NAN, INF = float("nan"), float("inf")


def threshold_of(partitions, fraction):
    """Run the three passes over in-memory partitions (lists of float32 batches)."""
    def run_pass(level, prefix):
        return [partition_histogram(iter([np.asarray(b, np.float32) for b in part]), level, prefix)
                for part in partitions]
    return exact_threshold(run_pass, fraction)


@pytest.mark.parametrize("scores, fraction, expected", [
    ([0.1, 0.5, 0.3, 0.9], 0.5, 0.3),              # N=4, n=2: [0.9, 0.5, 0.3, 0.1][2]
    ([NAN, 0.2, 0.8, NAN, 0.5], 0.4, 0.2),         # N counts NaN: n=int(5*0.4)=2 of [0.8,0.5,0.2]
    ([NAN, NAN, 0.1], 0.5, None),                  # n=1 but one number: DataComp's NaN -> NULL
    ([0.5, 0.5, 0.5, 0.2], 0.25, 0.5),             # ties: n=1 -> 0.5
    ([0.5, 0.5, 0.5, 0.2], 0.75, 0.2),             # n=3 -> 0.2
    ([2.0, -1.5, 0.25, -0.75], 0.0, 2.0),          # fraction 0: the maximum
    ([INF, -INF, 1.0], 0.34, 1.0),                 # n=int(1.02)=1
    ([-INF, -2.0, -3.0], 0.67, -INF),              # n=int(2.01)=2 of [-2, -3, -inf]
    ([1e-40, 0.0, -1e-40], 0.34, 0.0),             # subnormals around zero: n=1 -> 0.0
])
def test_threshold_hand_worked(scores, fraction, expected):
    res = threshold_of([[scores]], fraction)
    if expected is None:
        assert res.threshold is None
    else:
        assert res.threshold == float(np.float32(expected))


def test_threshold_float_product_truncation():
    # 100 * 0.29 = 28.999999999999996 in float64, so DataComp's int() gives rank 28, not 29
    scores = [i / 100 for i in range(100)]
    res = threshold_of([[scores]], 0.29)
    assert res.rank == 28
    assert res.threshold == float(np.float32(0.71))


def test_threshold_signed_zero_compares_equal():
    res = threshold_of([[[-0.0, 0.0, 1.0, -1.0]]], 0.5)  # n=2: one of the two zeros
    assert res.threshold == 0.0


def test_threshold_independent_of_partitioning_and_batches():
    rng = np.random.default_rng(7)
    x = rng.normal(0.25, 0.05, 5000).astype(np.float32)
    x[rng.integers(0, 5000, 300)] = np.nan
    x[:50] = x[50]  # a run of ties
    one = threshold_of([[x]], 0.3)
    split = threshold_of([[x[:1000], x[1000:1700]], [x[1700:4000]], [], [x[4000:]]], 0.3)
    assert one == split


@pytest.mark.parametrize("seed", range(5))
def test_threshold_matches_datacomp_get_threshold(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    x = np.round(rng.normal(0.2, 0.1, n), int(rng.integers(1, 5))).astype(np.float32)  # many ties
    x[rng.random(n) < 0.05] = np.nan
    fraction = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.9, 0.999]))
    # DataComp: n = int(len(df) * fraction); -np.sort(-scores)[n] (NaN sorts last in -np.sort(-x))
    k = int(len(x) * fraction)
    desc = -np.sort(-x)
    want = desc[k] if k < len(desc) else np.nan
    got = threshold_of([[x[: n // 2]], [x[n // 2 :]]], fraction).threshold
    if np.isnan(want):
        assert got is None
    else:
        assert got == float(want)


def test_float_keys_preserve_order():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 10, 1000), [0.0, -0.0, INF, -INF, 1e-45, -1e-45]]).astype(np.float32)
    keys = float_keys(x)
    by_key = x[np.argsort(keys, kind="stable")]
    assert all(a <= b for a, b in zip(by_key[:-1], by_key[1:]))
    for v, k in zip(x[:20], keys[:20]):
        assert key_to_float(int(k)) == float(v)


# -- query analysis -------------------------------------------------------------------------------

PARTITIONED = ("pool", "text_features", "cluster_assignments")


@pytest.mark.parametrize("sql, problem", [
    ("SELECT uid FROM pool WHERE clip_b32_similarity_score > 0.3", None),
    ("SELECT p.uid FROM pool AS p JOIN text_features AS t ON t.file = p.file AND t.\"row\" = p.\"row\"", None),
    ("SELECT p.uid FROM pool p LEFT JOIN text_features t USING (file, \"row\")", None),
    ("SELECT a.uid FROM cluster_assignments a JOIN text_features t ON t.file = a.file AND t.row = a.row "
     "WHERE a.cluster IN (SELECT cluster FROM cluster_targets)", None),
    ("WITH x AS (SELECT uid, text FROM pool) SELECT uid FROM x WHERE length(text) > 5", None),
    ("SELECT uid FROM (SELECT uid FROM pool WHERE text IS NOT NULL) s", None),
    ("SELECT p.uid FROM pool p JOIN timesplit t ON t.uid = p.uid WHERE p.uid NOT IN (SELECT uid FROM tic_eval)", None),
    ("SELECT uid FROM pool, range(2)", None),  # copies per row: still row by row
    ("SELECT DISTINCT uid FROM pool", "DISTINCT"),
    ("SELECT uid FROM pool LIMIT 10", "LIMIT"),
    ("SELECT uid FROM pool GROUP BY uid", "GROUP BY"),
    ("SELECT uid FROM pool QUALIFY row_number() OVER (PARTITION BY uid) = 1", "QUALIFY"),
    ("SELECT uid FROM (SELECT uid, count(*) OVER () AS n FROM pool) WHERE n > 1", "window"),
    ("SELECT uid FROM pool INTERSECT SELECT uid FROM __subset_0", "INTERSECT"),
    ("SELECT uid FROM pool UNION SELECT uid FROM __subset_0", "UNION"),
    ("SELECT uid FROM __subset_0 WHERE uid IN (SELECT uid FROM pool)", "inside"),
    ("SELECT s.uid FROM __subset_0 s LEFT JOIN pool USING (uid)", "LEFT JOIN"),
    ("SELECT uid FROM __subset_0", "reads none"),
    ("WITH x AS (SELECT uid FROM pool) SELECT uid FROM x UNION ALL SELECT uid FROM x", "used 2 times"),
    ("SELECT p.uid FROM pool p JOIN text_features t ON t.uid = p.uid", "join it on `file`"),
    ("SELECT uid FROM pool WHERE uid IN (SELECT uid FROM text_features)", "join it on `file`"),
])
def test_row_local_analysis(sql, problem):
    got = row_local_problem(sql, PARTITIONED)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


@pytest.mark.parametrize("sql, rewritten, calls", [
    ("SELECT uid FROM pool WHERE datacomp_ge(s, fraction_threshold(s, getvariable('fraction')))",
     "SELECT uid FROM pool WHERE datacomp_ge(s, getvariable('__curate_fraction_threshold_0'))",
     [("s", "getvariable('fraction')")]),
    ("SELECT uid FROM pool WHERE a >= FRACTION_THRESHOLD(a, 0.1) AND b >= fraction_threshold( A ,0.1 ) "
     "AND c >= fraction_threshold(abs(c), (0.2))",
     "SELECT uid FROM pool WHERE a >= getvariable('__curate_fraction_threshold_0') AND "
     "b >= getvariable('__curate_fraction_threshold_0') AND c >= getvariable('__curate_fraction_threshold_1')",
     [("a", "0.1"), ("abs(c)", "(0.2)")]),
    ("SELECT uid FROM pool WHERE text = 'fraction_threshold(a, 1)'",
     "SELECT uid FROM pool WHERE text = 'fraction_threshold(a, 1)'", []),
])
def test_extract_fraction_thresholds(sql, rewritten, calls):
    got, found = extract_fraction_thresholds(sql)
    assert got == rewritten
    assert [(c.score_sql, c.fraction_sql) for c in found] == calls


# -- bucket assembly ------------------------------------------------------------------------------

def _runs(tmp_path, n_runs=3, n=2000, seed=0):
    """Sorted runs with their markers, as partitions write them (duplicates included)."""
    from curate.run.partition import PREFIX_BITS

    rng = np.random.default_rng(seed)
    markers, everything = [], []
    for r in range(n_runs):
        hi = rng.integers(0, 1 << 63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(r % 2)
        lo = rng.integers(0, 1 << 63, n, dtype=np.uint64)
        hi[:10], lo[:10] = hi[10], lo[10]  # ten copies of one uid
        hi, lo = sort_pairs(hi, lo)
        path = tmp_path / f"part-{r}.npy"
        np.save(path, to_records(hi, lo))
        everything.append(to_records(hi, lo))
        counts = np.bincount((hi >> np.uint64(64 - PREFIX_BITS)).astype(np.int64), minlength=1 << PREFIX_BITS)
        markers.append({"run": str(path), "count": n, "header_bytes": NPY_HEADER_LEN,
                        "prefix_counts": counts.tolist()})
    allrec = np.concatenate(everything)
    hi, lo = sort_pairs(allrec["f0"].copy(), allrec["f1"].copy())
    return markers, to_records(hi, lo)


def _buckets(tmp_path, markers, bucket_records):
    from curate.run.assemble import bucket_slices, sort_bucket

    ranges = plan_buckets(markers, bucket_records)
    return [sort_bucket(slices, str(tmp_path / f"b{i}.npy"), str(tmp_path / f"b{i}.json"))
            for i, slices in enumerate(bucket_slices(markers, ranges))]


def test_plan_buckets_cover_all_prefixes_in_order():
    counts = np.zeros(4096, np.int64)
    counts[[0, 5, 5, 100, 4095]] = [10, 7, 7, 3, 1]
    ranges = plan_buckets([{"prefix_counts": counts.tolist()}], bucket_records=5)
    assert ranges[0][0] == 0 and ranges[-1][1] == 4096
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges[:-1], ranges[1:]))
    assert plan_buckets([{"prefix_counts": [0] * 4096}], 10) == [(0, 4096)]


@pytest.mark.parametrize("bucket_records", [97, 700, 10**9])
def test_buckets_concatenate_to_np_save_bytes(tmp_path, bucket_records):
    markers, want = _runs(tmp_path)
    buckets = _buckets(tmp_path, markers, bucket_records)
    assert sum(b["distinct"] for b in buckets) == len(np.unique(want))
    concatenate_buckets(buckets, str(tmp_path / "out.npy"))
    ref = io.BytesIO()
    np.save(ref, want)
    assert (tmp_path / "out.npy").read_bytes() == ref.getvalue()


def test_bucket_directory_reads_back_in_order(tmp_path):
    markers, want = _runs(tmp_path, n=500)
    buckets = _buckets(tmp_path, markers, 300)
    d = tmp_path / "subset_dir"
    assert write_bucket_directory(buckets, str(d)) == len(want)
    index = json.loads((d / "buckets.json").read_text())
    assert len(index["buckets"]) == len(buckets) > 1
    got = np.concatenate(list(iter_subset_chunks(d, chunk=97)))
    assert np.array_equal(got, want)
    concat_bucket_directory(d, tmp_path / "joined.npy")
    ref = io.BytesIO()
    np.save(ref, want)
    assert (tmp_path / "joined.npy").read_bytes() == ref.getvalue()


def test_unfinished_bucket_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(Exception, match="no buckets.json"):
        list(iter_subset_chunks(tmp_path / "d"))


def test_failed_output_leaves_nothing(tmp_path):
    dest = tmp_path / "x.npy"
    with pytest.raises(RuntimeError):
        with storage.open_output(dest) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
