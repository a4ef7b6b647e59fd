-- TiC-DataComp: one year's training data (TiC's tic-datacomp_training_yearly_noeval/{year}.npy):
-- pool samples whose Common Crawl snapshot falls in `year`, evaluation uids removed.
-- Needs `curate tic attach` (views timesplit, tic_eval).
SET VARIABLE year = 2016;

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year = getvariable('year')
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
