-- SCD type 2 over history: one row per change with the interval it was valid.
-- A delete closes the previous version; the delete row itself is never current.
SELECT h.*,
       {commit_ts} AS valid_from,
       lead({commit_ts}) OVER (PARTITION BY {key} ORDER BY {change_seq}) AS valid_to,
       (lead({change_seq}) OVER (PARTITION BY {key} ORDER BY {change_seq}) IS NULL
        AND {op} <> 'D') AS is_current
FROM {history} h
