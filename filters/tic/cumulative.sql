-- TiC-DataComp: all training data from `first_year` to `last_year` inclusive (TiC's first time
-- step "2016" is 2014..2016), evaluation uids removed.
SET VARIABLE first_year = 2014;
SET VARIABLE last_year = 2016;

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year BETWEEN getvariable('first_year') AND getvariable('last_year')
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
