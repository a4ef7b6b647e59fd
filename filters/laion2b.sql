-- DataComp baseline `laion2b` (LAION-2B's recipe): captions CLD3 (gcld3) says are English and
-- an OpenAI CLIP ViT-B/32 image-text similarity >= 0.28 (hard-coded in DataComp; compared in
-- float32, NaN never kept). CLD3 labels: curate features cld3 (built on first run otherwise).
SET VARIABLE threshold = 0.28;

SELECT p.uid
FROM pool AS p
JOIN text_lang_cld3 AS c ON c.file = p.file AND c."row" = p."row"
WHERE c.lang_cld3 = 'en'
  AND datacomp_ge(p.clip_b32_similarity_score, getvariable('threshold'))
