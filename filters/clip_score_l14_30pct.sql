-- DataComp baseline `clip_score --arch l14 --fraction 0.3`: the top 30% of the pool by
-- CLIP ViT-L/14 image-text similarity. fraction_threshold() follows DataComp's get_threshold
-- exactly (n = int(N * fraction) over all rows; ties at the threshold are kept; NaN never is).
SET VARIABLE fraction = 0.3;

SELECT uid
FROM pool
WHERE datacomp_ge(clip_l14_similarity_score,
                  fraction_threshold(clip_l14_similarity_score, getvariable('fraction')))
