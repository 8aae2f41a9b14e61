-- BigQuery: each key's latest change among {changes} applied to {current}.
-- {newer} is the change_seq guard (a change never overwrites a newer one, so
-- a replay changes nothing), or TRUE when the state is rebuilt from history.
-- The clauses are chosen by the table's delete mode; sections below.

-- name: merge
MERGE {current} t
USING (
    SELECT * FROM {changes}
    WHERE TRUE
    QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {change_seq} DESC) = 1
) s
ON {key_equal}
{clauses}

-- name: delete
WHEN MATCHED AND s.{op} = 'D' AND {newer} THEN DELETE

-- name: update
WHEN MATCHED AND {newer} THEN UPDATE SET {assignments}

-- name: insert
WHEN NOT MATCHED AND {insert_when} THEN INSERT ({columns}) VALUES ({values})

-- name: drop_missing
WHEN NOT MATCHED BY SOURCE THEN DELETE

-- name: late_changes
(SELECT h.* FROM {history} h JOIN (SELECT DISTINCT {key} FROM {stage}) b ON {key_equal})
