-- TiC replay buffer: exactly `samples` samples of years first_year..last_year (training data,
-- eval uids removed): the ones with the lowest md5(seed || uid), ties broken by uid. Buffers
-- are nested: the buffer of n/2 samples is a subset of the one of n (the first n/2 in the same
-- order), so "keep half of the old buffer" (Cumulative-Exp) discards samples instead of drawing
-- new ones. `curate tic plan` names this filter and its parameters for every replayed split.
SET VARIABLE first_year = 2014;
SET VARIABLE last_year = 2016;
SET VARIABLE samples = 100;
SET VARIABLE seed = 0;

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year BETWEEN getvariable('first_year') AND getvariable('last_year')
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
ORDER BY md5(getvariable('seed')::VARCHAR || p.uid), p.uid
LIMIT getvariable('samples')
