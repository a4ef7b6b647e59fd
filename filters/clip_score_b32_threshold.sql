-- DataComp baseline `clip_score --arch b32 --threshold 0.25`: keep samples whose CLIP ViT-B/32
-- similarity is >= threshold (compared in float32, like DataComp; NaN scores are never kept).
SET VARIABLE threshold = 0.25;

SELECT uid
FROM pool
WHERE datacomp_ge(clip_b32_similarity_score, getvariable('threshold'))
