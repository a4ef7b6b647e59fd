-- Macros every catalog carries; they also work in the DuckDB shell.
--
-- uids: DataComp stores uid u as (int(u[:16],16), int(u[16:32],16)) in a 'u8,u8' record, so the
-- numeric order of (uid_hi, uid_lo) is the order of the lowercase hex string.
CREATE OR REPLACE MACRO is_uid(u) AS coalesce(regexp_full_match(u, '[0-9a-fA-F]{32}'), false);
CREATE OR REPLACE MACRO uid_hi(u) AS CASE WHEN is_uid(u) THEN ('0x' || u[1:16])::UBIGINT END;
CREATE OR REPLACE MACRO uid_lo(u) AS CASE WHEN is_uid(u) THEN ('0x' || u[17:32])::UBIGINT END;
CREATE OR REPLACE MACRO uid_hex(hi, lo) AS printf('%016x%016x', hi, lo);

-- DataComp keeps `score >= threshold`, compared in float32 (numpy casts the Python float to the
-- column's float32), and never keeps a NaN or NULL score. DuckDB alone would keep NaN: it orders
-- NaN above every number. (Not wrapped in coalesce() so DuckDB can push it into the parquet
-- scan; it is NULL, i.e. not kept, for a NULL score.)
CREATE OR REPLACE MACRO datacomp_ge(score, threshold) AS
    (score >= CAST(threshold AS FLOAT) AND NOT isnan(score));

-- A monotonic histogram bucket for a float32 score: equal scores share a bucket and a higher
-- bucket holds only higher scores (scaling by a power of two is exact in float32; + 0.0 folds
-- -0.0 into 0.0). NaN scores land in the NaN bucket and NULL in the NULL one; both are skipped.
CREATE OR REPLACE MACRO score_bucket(x) AS floor(x::FLOAT * 4096) + 0.0;

-- DataComp's get_threshold, exactly: n = int(N * fraction) over ALL N pool rows (NaN included),
-- threshold = the value at 0-based position n of the non-NaN scores sorted descending; rows with
-- score >= threshold are kept, so ties at the threshold are all kept. If fewer than n+1 scores
-- are numbers, DataComp's threshold is NaN and nothing is kept: NULL here.
-- Histogram-then-refine: one pass counts rows per bucket, a second sorts only the bucket that
-- holds position n, instead of sorting the whole column. `score` must be a column of `pool`.
CREATE OR REPLACE MACRO fraction_threshold(score, fraction) AS (
    WITH s AS (SELECT score::FLOAT AS x FROM pool),
    h AS (SELECT score_bucket(x) AS bucket, count(*) AS c FROM s GROUP BY ALL),
    stats AS (SELECT sum(c) AS n_all, floor(sum(c)::DOUBLE * fraction::DOUBLE)::BIGINT AS k FROM h),
    cum AS (SELECT bucket, c, sum(c) OVER (ORDER BY bucket DESC ROWS UNBOUNDED PRECEDING) - c AS above
            FROM h WHERE bucket IS NOT NULL AND NOT isnan(bucket)),
    target AS (SELECT bucket, above FROM cum, stats WHERE above <= k AND k < above + c)
    SELECT CASE
        WHEN fraction IS NULL OR fraction::DOUBLE < 0 OR fraction::DOUBLE >= 1
            THEN error('fraction must be in [0, 1), got ' || coalesce(fraction::VARCHAR, 'NULL'))
        ELSE (SELECT x FROM s, target WHERE score_bucket(x) = target.bucket
              ORDER BY x DESC LIMIT 1 OFFSET (SELECT k - above FROM stats, target))
        END
);
