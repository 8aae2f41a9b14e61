-- BigQuery: a batch's staged history rows ({stage}) into {history}.

-- name: append
-- Inserts only the changes history does not hold yet, so a replay after a
-- crash adds nothing. {prune} limits the history rows the MERGE reads to the
-- batch's commit days (partition pruning): a replayed row has the same day.
MERGE {history} h
USING {stage} s
ON h.{change_seq} = s.{change_seq} AND h.{source_file} = s.{source_file} AND {prune}
WHEN NOT MATCHED THEN INSERT ({columns}) VALUES ({values})

-- name: replace
-- Backfill: the staged rows replace every row of the batch's objects (their
-- old rows may lie in any partition), atomically; a replay gives the same.
-- @objects: the object keys, a query parameter (keys may hold any character).
MERGE {history} h
USING {stage} s
ON FALSE
WHEN NOT MATCHED BY SOURCE AND h.{source_file} IN UNNEST(@objects) THEN DELETE
WHEN NOT MATCHED THEN INSERT ({columns}) VALUES ({values})
