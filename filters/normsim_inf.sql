-- NormSim_inf (Wang et al., NeurIPS 2024): the top 30% of the pool by the largest similarity of its L/14 image embedding to a target set's.
-- targets: a target set imported with `curate targets import` (e.g. DataComp's ImageNet-1k
-- in1k_clip_vit_l14_*.pt); view normsim, built on first use (docs/negcliploss-normsim.md).
-- fraction_threshold() gives DataComp's fraction semantics: n = int(N * fraction) over ALL N
-- pool rows, ties at the threshold kept, NaN (or a row without a value) never kept.
SET VARIABLE targets = 'in1k';
SET VARIABLE fraction = 0.3;

SELECT p.uid
FROM pool AS p
JOIN normsim AS s ON s.file = p.file AND s."row" = p."row"
WHERE s.target_set = getvariable('targets')
  AND datacomp_ge(s.normsim_inf, fraction_threshold(
        (SELECT w.normsim_inf FROM normsim AS w
         WHERE w.file = pool.file AND w."row" = pool."row" AND w.target_set = getvariable('targets')),
        getvariable('fraction')))
