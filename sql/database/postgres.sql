-- The database warehouse's PostgreSQL statements (see common.sql).

-- name: ledger_create
CREATE TABLE IF NOT EXISTS {ledger} (
  pipeline text NOT NULL,
  table_name text NOT NULL,
  number bigint NOT NULL,
  batch_id text NOT NULL,
  store text NOT NULL,
  lease_token bigint,
  stats text NOT NULL,
  columns text NOT NULL,
  objects text NOT NULL,
  loaded_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (pipeline, table_name, number)
)

-- name: upsert
-- The batch's newest change of each key (an in-order batch: newer than
-- every row).
INSERT INTO {target} ({target_columns})
SELECT {select_columns} FROM {stage} s WHERE {filter}
ON CONFLICT ({key}) DO UPDATE SET {assignments}

-- name: delete_join
-- Rows of {target} whose key is in the stage and {filter} holds.
DELETE FROM {target} t USING {stage} s WHERE {key_equal} AND {filter}

-- name: defer_foreign_keys
-- Replica mode: foreign keys (and triggers) wait for the batch's end, as in
-- a replica applying its primary's changes.
SET LOCAL session_replication_role = replica

-- name: sequences
-- The sequences that fill the table's columns (serial and identity).
SELECT a.attname::text, pg_get_serial_sequence({table}, a.attname)
FROM pg_attribute a
WHERE a.attrelid = {table}::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND pg_get_serial_sequence({table}, a.attname) IS NOT NULL

-- name: sequence_past
-- Moves a sequence past the largest value loaded, never back.
SELECT setval({sequence}, m) FROM (SELECT MAX({column}) AS m FROM {target}) x
WHERE m IS NOT NULL AND m > (SELECT last_value FROM {sequence_table})

-- name: ddl_lock
-- One session at a time creates tables and columns (an advisory lock on a
-- constant key: "cdcflow").
SELECT pg_advisory_lock(99104100102108)

-- name: ddl_unlock
SELECT pg_advisory_unlock(99104100102108)
