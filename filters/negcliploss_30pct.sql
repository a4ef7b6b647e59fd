-- negCLIPLoss (Wang et al., NeurIPS 2024): the top 30% of the pool by the CLIP score minus its CLIP-loss normalisation over K random batches.
-- Built from the pool's npz embeddings on first use (view negcliploss; docs/negcliploss-normsim.md).
-- fraction_threshold() gives DataComp's fraction semantics: n = int(N * fraction) over ALL N
-- pool rows, ties at the threshold kept, NaN (or a row without a value) never kept.
-- arch, tau, batch_size, k, seed: the settings of the negcliploss table (the paper's defaults).
SET VARIABLE fraction = 0.3;
SET VARIABLE arch = 'l14';
SET VARIABLE tau = 0.01;
SET VARIABLE batch_size = 32768;
SET VARIABLE k = 10;
SET VARIABLE seed = 0;

SELECT p.uid
FROM pool AS p
JOIN negcliploss AS n ON n.file = p.file AND n."row" = p."row"
WHERE n.arch = getvariable('arch')
  AND datacomp_ge(n.value, fraction_threshold(
        (SELECT v.value FROM negcliploss AS v
         WHERE v.file = pool.file AND v."row" = pool."row" AND v.arch = getvariable('arch')),
        getvariable('fraction')))
