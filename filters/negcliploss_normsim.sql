-- negCLIPLoss then NormSim_inf (Wang et al., NeurIPS 2024, the paper's combined recipe): the top 30% by negCLIPLoss, of which the top 20% of the pool by NormSim_inf.
-- As the paper's code does it: first the top `fraction` of the pool by negCLIPLoss, then, among
-- those, the rows with the highest NormSim_inf to the target set, int(N * normsim_fraction) of
-- them, N counting ALL pool rows (DataComp's fraction semantics at both steps: ties at a
-- threshold kept, NaN never). The paper's values (its code's DataComp-medium runs): 0.3 and
-- 0.2, K = 10 batches of 32768 at tau = 0.01. The second step ranks within the
-- first step's rows: on the ray engine that rank (the scalar subquery below) is evaluated once,
-- on the driver, then each pool file is filtered (docs/distributed.md). docs/negcliploss-normsim.md.
SET VARIABLE fraction = 0.3;
SET VARIABLE normsim_fraction = 0.2;
SET VARIABLE targets = 'in1k';
SET VARIABLE arch = 'l14';
SET VARIABLE tau = 0.01;
SET VARIABLE batch_size = 32768;
SET VARIABLE k = 10;
SET VARIABLE seed = 0;

SELECT p.uid
FROM pool AS p
JOIN negcliploss AS n ON n.file = p.file AND n."row" = p."row"
JOIN normsim AS s ON s.file = p.file AND s."row" = p."row"
WHERE n.arch = getvariable('arch') AND s.target_set = getvariable('targets')
  AND datacomp_ge(n.value, fraction_threshold(
        (SELECT v.value FROM negcliploss AS v
         WHERE v.file = pool.file AND v."row" = pool."row" AND v.arch = getvariable('arch')),
        getvariable('fraction')))
  -- the second threshold: position int(N * normsim_fraction), N all pool rows, of the NormSim_inf
  -- of the rows the first step kept, sorted descending (none there: NULL, nothing kept)
  AND datacomp_ge(s.normsim_inf, (
        SELECT CASE WHEN getvariable('normsim_fraction') IS NULL OR getvariable('normsim_fraction') < 0
                         OR getvariable('normsim_fraction') >= 1
                    THEN error('normsim_fraction must be in [0, 1), got '
                               || coalesce(getvariable('normsim_fraction')::VARCHAR, 'NULL'))
                    ELSE x END
        FROM (SELECT (SELECT w.normsim_inf FROM negcliploss AS v JOIN normsim AS w
                      ON w.file = v.file AND w."row" = v."row"
                      WHERE v.file = pool.file AND v."row" = pool."row" AND v.arch = getvariable('arch')
                        AND w.target_set = getvariable('targets')
                        AND datacomp_ge(v.value, fraction_threshold(
                              (SELECT v.value FROM negcliploss AS v
                               WHERE v.file = pool.file AND v."row" = pool."row" AND v.arch = getvariable('arch')),
                              getvariable('fraction'))))::FLOAT AS x
              FROM pool)
        WHERE x IS NOT NULL AND NOT isnan(x)
        ORDER BY x DESC
        LIMIT 1 OFFSET (SELECT floor(count(*) * getvariable('normsim_fraction')::DOUBLE)::BIGINT FROM pool)))
