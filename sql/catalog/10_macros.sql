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
-- NaN above every number.
CREATE OR REPLACE MACRO datacomp_ge(score, threshold) AS
    coalesce(score::FLOAT >= CAST(threshold AS FLOAT) AND NOT isnan(score::FLOAT), false);

-- DataComp's get_threshold, exactly: n = int(N * fraction) over ALL N pool rows (NaN included),
-- threshold = the value at 0-based position n of the non-NaN scores sorted descending.
-- If fewer than n+1 scores are numbers DataComp's threshold is NaN and nothing is kept: NULL here.
-- Computed as histogram-then-refine (two cheap passes over one column) instead of a full sort.
-- `score` must be a column of `pool`.
CREATE OR REPLACE MACRO fraction_threshold(score, fraction) AS (
    WITH s AS (SELECT score::FLOAT AS x FROM pool),
    stats AS (
        SELECT count(*) AS n_all,
               floor(count(*)::DOUBLE * fraction::DOUBLE)::BIGINT AS k,
               min(x::DOUBLE) FILTER (WHERE NOT isnan(x)) AS lo,
               max(x::DOUBLE) FILTER (WHERE NOT isnan(x)) AS hi
        FROM s),
    b AS (
        SELECT x, CASE WHEN hi > lo THEN least(floor((x::DOUBLE - lo) / (hi - lo) * 4096), 4095)::INT
                       ELSE 0 END AS bucket
        FROM s, stats WHERE NOT isnan(x)),
    h AS (SELECT bucket, count(*) AS c FROM b GROUP BY bucket),
    cum AS (SELECT bucket, c, sum(c) OVER (ORDER BY bucket DESC) - c AS above FROM h),
    target AS (SELECT bucket, above FROM cum, stats WHERE above <= k AND k < above + c)
    SELECT CASE
        WHEN fraction::DOUBLE < 0 OR fraction::DOUBLE >= 1 OR fraction IS NULL
            THEN error('fraction must be in [0, 1), got ' || coalesce(fraction::VARCHAR, 'NULL'))
        ELSE (SELECT x FROM b, target, stats WHERE b.bucket = target.bucket
              ORDER BY x DESC LIMIT 1 OFFSET (SELECT k - above FROM stats, target))
        END
);
