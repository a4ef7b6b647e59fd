-- DataComp baseline `image_based`: keep a sample when its caption passes DataComp's caption
-- prefilter (fastText tokens > 1, more than 5 characters, fastText language 'en') and the
-- centroid nearest to its L/14 image embedding -- by INNER PRODUCT, first index on ties -- is
-- nearest to some target (ImageNet-1k) image too. `clusters` names a cluster set made with
-- `curate clusters import` (DataComp's released centroids) or `curate clusters build`;
-- cluster_assignments is computed on first use and cached.
SET VARIABLE clusters = 'xlarge';

SELECT a.uid
FROM cluster_assignments AS a
JOIN text_features AS t ON t.file = a.file AND t."row" = a."row"
WHERE a.cluster_set = getvariable('clusters')
  AND t.n_tokens_fasttext > 1 AND t.n_chars > 5 AND t.lang_fasttext = 'en'
  AND a.cluster IN (SELECT cluster FROM cluster_targets WHERE cluster_set = getvariable('clusters'))
