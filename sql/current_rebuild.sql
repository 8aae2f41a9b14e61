-- Current state from the latest change of each key (table {latest}: of the whole
-- history for a backfill, of the batch for a first load; see
-- src/merge/latest.rs): deletes dropped (or flagged under soft delete).
SELECT {columns}, {commit_ts}, {change_seq}{deleted}
FROM {latest} latest
WHERE {keep}
