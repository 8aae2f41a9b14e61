-- Current state from the latest change of each key ({latest}: latest_change.sql
-- over the whole history for a backfill, or the batch's latest changes taken
-- as they streamed into history for a first load): deletes dropped (or
-- flagged under soft delete).
SELECT {columns}, {commit_ts}, {change_seq}{deleted}
FROM ({latest}) latest
WHERE {keep}
