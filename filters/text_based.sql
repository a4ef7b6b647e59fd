-- DataComp baseline `text_based`: English captions (fastText) in which some word
-- (str.split(), punctuation kept) has a first WordNet synset whose offset is an ImageNet-21k
-- class id -- e.g. "dog", "mice" (-> mouse), "geese" (-> goose). Text features: curate features text.
SELECT p.uid
FROM pool AS p
JOIN text_features AS t ON t.file = p.file AND t."row" = p."row"
WHERE t.lang_fasttext = 'en'
  AND t.in21k_entity
