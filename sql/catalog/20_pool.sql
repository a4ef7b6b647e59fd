-- The pool: every metadata parquet file of the pool, one row per sample, plus where it came
-- from (`file` = the parquet's stem, shared with its .npz; `row` = 0-based row in that file),
-- so embeddings (row i of the npz) and shards (img2dataset's file/row -> shard/key rule) join.
-- @pool_files@ is filled in by `curate catalog init` with the list of parquet paths.
CREATE OR REPLACE VIEW pool AS
SELECT
    uid, url, text,
    original_width, original_height,
    clip_b32_similarity_score, clip_l14_similarity_score,
    face_bboxes, sha256,
    @extra_columns@
    parse_filename(filename, true) AS file,
    file_row_number AS "row"
FROM read_parquet(@pool_files@, filename = true, file_row_number = true, union_by_name = true);
