-- TiC replay buffer: a fixed pseudo-random `fraction` of years first_year..last_year
-- (training data, eval uids removed), chosen by md5(seed || uid). Buffers are nested: the
-- buffer at fraction f/2 is a subset of the one at f, so "keep half of the old buffer"
-- (Cumulative-Exp) discards samples instead of drawing new ones. `curate tic plan` names this
-- filter and its parameters for every replayed split.
SET VARIABLE first_year = 2014;
SET VARIABLE last_year = 2016;
SET VARIABLE fraction = 0.5;
SET VARIABLE seed = 0;

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year BETWEEN getvariable('first_year') AND getvariable('last_year')
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
  AND ('0x' || md5(getvariable('seed')::VARCHAR || p.uid)[1:13])::UBIGINT
      < getvariable('fraction') * 4503599627370496
