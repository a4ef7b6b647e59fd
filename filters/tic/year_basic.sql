-- TiC-DataComp "basic": one year's training data ∩ DataComp's basic filter. TiC builds it by
-- resharding a basic-filtered pool with the yearly uid file; here it is the same intersection.
-- `basic` is the subset file written by `curate run filters/basic_filter.sql`.
SET VARIABLE year = 2016;
SET VARIABLE basic = 'subsets/basic_filter.npy';

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year = getvariable('year')
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
  AND p.uid IN (SELECT uid FROM read_subset(getvariable('basic')))
