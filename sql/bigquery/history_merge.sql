-- BigQuery: a batch's staged history rows ({stage}) into {history}.
-- The rows of the batch's objects replace any rows of the same objects, so a
-- replay after a crash adds nothing and a backfill replaces what was loaded.
-- {prune} limits the history rows the MERGE reads to the batch's commit days
-- (partition pruning; TRUE for a backfill, whose old rows may lie anywhere).
MERGE {history} h
USING {stage} s
ON FALSE
WHEN NOT MATCHED BY SOURCE AND {prune} AND h.{source_file} IN ({objects}) THEN DELETE
WHEN NOT MATCHED THEN INSERT ({columns}) VALUES ({values})
