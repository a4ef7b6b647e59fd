-- Eval-set decontamination: a subset minus every sample whose image has cosine >= threshold with an image of an eval set.
-- subset: the subset file to clean (another filter's output, e.g. `curate run clip_score_l14_30pct
-- -o subsets/l14_30pct.npy`): each of its rows, duplicates included (DataComp's upsampling), is
-- kept unless its uid is a pool sample near an eval image. An anti-join on the eval_neighbors
-- table that reads no pool rows: the ray engine runs it whole, as one task (docs/distributed.md).
-- eval_set: eval images encoded with `curate decontam encode` (or `decontam import`); view
-- eval_neighbors, built on first use at this threshold (docs/decontamination.md). The default
-- threshold, 0.95, is ours: DataComp's own removal used another model (see the docs).
SET VARIABLE subset = 'subsets/subset.npy';
SET VARIABLE eval_set = 'evals';
SET VARIABLE threshold = 0.95;

SELECT s.uid
FROM read_subset(getvariable('subset')) AS s
WHERE NOT EXISTS (SELECT 1 FROM eval_neighbors AS e
                  WHERE e.uid = s.uid AND e.eval_set = getvariable('eval_set')
                    AND e.sim::DOUBLE >= getvariable('threshold'))
