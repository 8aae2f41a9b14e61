-- Backfill: the current-state table rebuilt from the whole history of the
-- table (registered as {history}): each key's latest change, deletes
-- dropped (or flagged under soft delete).
SELECT {columns}, {commit_ts}, {change_seq}{deleted}
FROM ({latest}) latest
WHERE {keep}
