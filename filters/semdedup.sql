-- SemDeDup (Abbas et al. 2023): per k-means cluster, drop each sample whose cosine similarity to one farther from the centroid exceeds 1 - eps; one of each duplicate group is kept.
-- clusters: a cluster set (`curate clusters import` / `curate clusters build`) over the L/14 image
-- embeddings; the view semdedup is built on first use (docs/semdedup-dbp.md). Within a cluster,
-- members are ordered farthest from the centroid first (the paper's code, keep_hard); max_sim is
-- a member's largest cosine similarity with an earlier member (NULL for the first: 0 in the
-- paper's code), which removes it when max_sim > 1 - eps (compared in float32). eps = 0.07 is
-- our default: the paper picks eps for the fraction of data to keep (see --explain).
SET VARIABLE clusters = 'xlarge';
SET VARIABLE eps = 0.07;

SELECT p.uid
FROM pool AS p
JOIN semdedup AS s ON s.file = p.file AND s."row" = p."row"
WHERE s.clusters = getvariable('clusters')
  AND coalesce(s.max_sim, 0) <= CAST(1 - getvariable('eps') AS FLOAT)
