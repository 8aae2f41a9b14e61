-- BigQuery: each key's latest change among {changes} applied to {current}.
-- {newer} is the change_seq guard (a change never overwrites a newer one, so
-- a replay changes nothing), or TRUE when the state is rebuilt from history.
-- The clauses are chosen by the table's delete mode; sections below.
-- __gone: the change is a delete, or older than a truncate (op T, no key)
-- among the changes.

-- name: merge
MERGE {current} t
USING (
    SELECT c.*, COALESCE(c.{op} = 'D' OR c.{change_seq} < tr.__truncated_seq, FALSE) AS __gone
    FROM {changes} c
    CROSS JOIN (SELECT MAX(IF({op} = 'T', {change_seq}, NULL)) AS __truncated_seq FROM {changes}) tr
    WHERE c.{op} <> 'T'
    QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY c.{change_seq} DESC) = 1
) s
ON {key_equal}
{clauses}

-- name: delete
WHEN MATCHED AND s.__gone AND {newer} THEN DELETE

-- name: update
WHEN MATCHED AND {newer} THEN UPDATE SET {assignments}

-- name: insert
WHEN NOT MATCHED AND {insert_when} THEN INSERT ({columns}) VALUES ({values})

-- name: drop_missing
WHEN NOT MATCHED BY SOURCE THEN DELETE

-- name: truncate
WHEN NOT MATCHED BY SOURCE AND t.{change_seq} < @truncated THEN {action}

-- name: late_changes
(SELECT h.* FROM {history} h JOIN (SELECT DISTINCT {key} FROM {stage}) b ON {key_equal})
