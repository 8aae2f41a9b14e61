-- The database warehouse's statements both engines share (PostgreSQL, and
-- MySQL / MariaDB in ANSI_QUOTES mode: identifiers are "quoted" in both).
-- Parameters in {braces} are quoted identifiers or literals, filled in by
-- src/warehouse/database/mod.rs.

-- name: ledger_last
-- The table's last recorded batch, or ({number}) one batch's row; {lock}
-- holds it until the load's transaction ends.
SELECT number, batch_id, store, stats, columns, lease_token
FROM {ledger}
WHERE pipeline = {pipeline} AND table_name = {table} {number}
ORDER BY number DESC
LIMIT 1
{lock}

-- name: ledger_record
-- The batch's row, written in the transaction that applies the batch.
INSERT INTO {ledger} (pipeline, table_name, number, batch_id, store, lease_token, stats, columns, objects)
VALUES ({pipeline}, {table}, {number}, {batch_id}, {store}, {lease_token}, {stats}, {columns}, {objects})

-- name: ledger_all
-- Every batch of the table, in order: what `repair --from-warehouse` restores.
SELECT number, batch_id, stats, objects
FROM {ledger}
WHERE pipeline = {pipeline} AND table_name = {table}
ORDER BY number

-- name: history_forget
-- A backfill: the history rows of the batch's objects go, and come again.
DELETE FROM {history} WHERE {source_file} IN ({objects})

-- name: delete_where
-- Rows of {target} for which {filter} holds (a truncate: every row changed
-- before it; a rebuild: every row).
DELETE FROM {target} WHERE {filter}

-- name: rebuild
-- The current rows of the keys in {scope} from their whole history: each
-- key's newest change unless it deletes the row, newer than the latest
-- truncate.
INSERT INTO {target} ({target_columns})
SELECT {select_columns} FROM (
  SELECT h.*, ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY {change_seq} DESC) AS cdcflow_rn
  FROM {history} h
  WHERE {scope}
) x
WHERE cdcflow_rn = 1 AND {keep}
  AND {change_seq} > COALESCE((SELECT MAX({change_seq}) FROM {history} WHERE {op} = 'T'), '')

-- name: versions
CREATE OR REPLACE VIEW {view} AS {query}

-- name: columns
-- The columns a table has (none: no such table).
SELECT column_name FROM information_schema.columns
WHERE table_schema = {schema} AND table_name = {table}
