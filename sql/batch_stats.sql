-- The figures of a batch, read back from its history rows ({rows}): changes
-- per op, the range of change_seq (a batch older than what is loaded is a
-- late batch) and the newest commit time (for lag).
SELECT {op} AS op,
       count(*) AS changes,
       min({change_seq}) AS min_seq,
       max({change_seq}) AS max_seq,
       max({commit_ts}) AS max_commit_ts
FROM {rows}
GROUP BY {op}
