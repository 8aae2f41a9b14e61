-- SCD type 2 over history: one row per change with the interval it was valid.
-- A delete closes the previous version; the delete row itself is never current.
-- A truncate (op T) has no key: it is in history, not a version. The versions
-- it removed are no longer current; their valid_to stays open (history has
-- the truncate's time).
SELECT h.*,
       {commit_ts} AS valid_from,
       lead({commit_ts}) OVER (PARTITION BY {key} ORDER BY {change_seq}) AS valid_to,
       (lead({change_seq}) OVER (PARTITION BY {key} ORDER BY {change_seq}) IS NULL
        AND {op} <> 'D'
        AND {change_seq} > COALESCE((SELECT max({change_seq}) FROM {history} WHERE {op} = 'T'), '')) AS is_current
FROM {history} h
WHERE {op} <> 'T'
