-- Density-based pruning (Abbas et al. 2024): after SemDeDup, a budget of fraction x the pool shared among clusters by softmax(d_inter * d_intra / temperature), the least prototypical kept.
-- clusters: a cluster set over the L/14 image embeddings; eps: SemDeDup's threshold (run first);
-- fraction: the budget, int(N * fraction) of ALL N pool rows (capped at SemDeDup's survivors);
-- temperature, neighbors (nearest centroids in d_inter), balance (the code's cls_bal_ratio: each
-- cluster keeps at least int(budget / K * balance)): the paper code's defaults. Within a cluster
-- the samples farthest from the centroid are kept. View dbp, built on first use for these
-- settings (docs/semdedup-dbp.md).
SET VARIABLE clusters = 'xlarge';
SET VARIABLE eps = 0.07;
SET VARIABLE fraction = 0.5;
SET VARIABLE temperature = 0.5;
SET VARIABLE neighbors = 20;
SET VARIABLE balance = 0.5;

SELECT p.uid
FROM pool AS p
JOIN dbp AS d ON d.file = p.file AND d."row" = p."row"
WHERE d.clusters = getvariable('clusters')
  AND d.keep
