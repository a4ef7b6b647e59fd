-- DataComp baseline `image_based_intersect_clip_score --arch l14 --fraction 0.3`, the recipe of
-- DataComp-1B (with the xlarge cluster set on the xlarge pool). The L/14 CLIP-score threshold is
-- computed over the WHOLE pool first (DataComp's get_threshold), then a sample is kept when its
-- score is >= that threshold (NaN never), its caption passes the caption prefilter and its
-- nearest centroid (inner product) is a target cluster -- see image_based.sql.
SET VARIABLE clusters = 'xlarge';
SET VARIABLE fraction = 0.3;

SELECT p.uid
FROM pool AS p
JOIN cluster_assignments AS a ON a.file = p.file AND a."row" = p."row"
JOIN text_features AS t ON t.file = p.file AND t."row" = p."row"
WHERE a.cluster_set = getvariable('clusters')
  AND datacomp_ge(p.clip_l14_similarity_score,
                  fraction_threshold(clip_l14_similarity_score, getvariable('fraction')))
  AND t.n_tokens_fasttext > 1 AND t.n_chars > 5 AND t.lang_fasttext = 'en'
  AND a.cluster IN (SELECT cluster FROM cluster_targets WHERE cluster_set = getvariable('clusters'))
