-- TiC-DataComp: one month's training data. TiC's monthly uid files include eval uids; TiC
-- trains on a month by resharding the yearly (eval-free) data with them, so eval uids drop out.
-- `month` is YYYYMM, as in TiC's file names. Needs `curate tic attach` with monthly files.
SET VARIABLE month = 201610;

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year = getvariable('month') // 100
  AND t.month = getvariable('month') % 100
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
