-- TiC-DataComp "bestpool": one year's training data ∩ the DataComp-1B recipe (image-based
-- clustering ∩ CLIP L/14 top 30%). `bestpool` is the subset file written by
-- `curate run filters/image_based_clip_score_l14_30pct.sql`.
SET VARIABLE year = 2016;
SET VARIABLE bestpool = 'subsets/image_based_clip_score_l14_30pct.npy';

SELECT p.uid
FROM pool AS p
JOIN timesplit AS t ON t.uid = p.uid
WHERE t.year = getvariable('year')
  AND p.uid NOT IN (SELECT uid FROM tic_eval)
  AND p.uid IN (SELECT uid FROM read_subset(getvariable('bestpool')))
