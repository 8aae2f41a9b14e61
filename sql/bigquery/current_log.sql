-- BigQuery, `current = "log"`: a table's current state is `{base}` (each
-- key's latest change as of the last compaction, deleted keys kept as
-- tombstones with {deleted} = TRUE, so a late change older than the delete
-- cannot bring a key back) plus `{log}` (the changes loaded since, in the
-- history schema, truncates included and never removed). `<t>` is a view
-- over both. A batch appends to the log (billed: the batch); a compaction
-- MERGEs the log into the base (billed: base + log) only when the log has
-- grown past a share of the base, so its cost spreads over many batches.

-- name: view
-- Each key's latest change among base and log; {gone}: whether that change
-- deletes the key or is older than the latest truncate.
SELECT {select}
FROM (
    SELECT {names}, __gone
    FROM (
        SELECT {names}, {deleted} AS __gone FROM {base}
        UNION ALL
        SELECT {names}, {op} = 'D' AS __gone FROM {log} WHERE {op} <> 'T'
    )
    QUALIFY ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {change_seq} DESC) = 1
) c
CROSS JOIN (SELECT MAX(IF({op} = 'T', {change_seq}, NULL)) AS __truncated_seq FROM {log}) tr
{filter}

-- name: gone
(c.__gone OR COALESCE(c.{change_seq} < tr.__truncated_seq, FALSE))

-- name: append
-- The batch's changes into the log. A replay appends them again, which
-- changes nothing: the view and the compaction take one latest change per key.
INSERT INTO {log} ({columns}) SELECT {columns} FROM {stage}

-- name: sizes
-- COUNT(*) of whole tables reads no column (BigQuery answers it from metadata).
SELECT (SELECT COUNT(*) FROM {log}) AS log_rows, (SELECT COUNT(*) FROM {base}) AS base_rows

-- name: truncated
SELECT MAX(IF({op} = 'T', {change_seq}, NULL)) AS truncated FROM {log}

-- name: clean
-- After a compaction: the log's changes the base holds (or holds a newer
-- change of their key than). Decided by content, so a change that reached
-- the log after the compaction read it stays.
DELETE FROM {log} l
WHERE l.{op} <> 'T'
  AND EXISTS (SELECT 1 FROM {base} b WHERE {key_equal} AND b.{change_seq} >= l.{change_seq})

-- name: clear
-- After a backfill rebuilt the base from history: every change but the truncates.
DELETE FROM {log} WHERE {op} <> 'T'
