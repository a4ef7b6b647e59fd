-- DataComp baseline `basic_filter`: English captions (fastText) of more than two words and
-- more than five characters, on images whose shorter side is >= 200 px and whose aspect ratio
-- (long side / short side) is <= 3. Words = Python str.split(), characters = code points;
-- a zero side fails (DataComp's aspect is inf there). Text features: curate features text.
SELECT p.uid
FROM pool AS p
JOIN text_features AS t ON t.file = p.file AND t."row" = p."row"
WHERE t.lang_fasttext = 'en'
  AND t.n_words > 2
  AND t.n_chars > 5
  AND least(p.original_width, p.original_height) >= 200
  AND greatest(p.original_width, p.original_height)::DOUBLE
      / least(p.original_width, p.original_height) <= 3.0
