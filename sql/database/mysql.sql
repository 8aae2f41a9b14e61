-- The database warehouse's MySQL / MariaDB statements (see common.sql).

-- name: session
-- "quoted" identifiers, '' the only escape in literals, no value made up for
-- an explicit 0 in an AUTO_INCREMENT column, errors instead of truncation.
SET SESSION sql_mode = 'ANSI_QUOTES,NO_BACKSLASH_ESCAPES,NO_AUTO_VALUE_ON_ZERO,STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'

-- name: ledger_create
CREATE TABLE IF NOT EXISTS {ledger} (
  pipeline VARCHAR(255) NOT NULL,
  table_name VARCHAR(255) NOT NULL,
  number BIGINT NOT NULL,
  batch_id VARCHAR(255) NOT NULL,
  store VARCHAR(255) NOT NULL,
  lease_token BIGINT,
  stats LONGTEXT NOT NULL,
  columns LONGTEXT NOT NULL,
  objects LONGTEXT NOT NULL,
  loaded_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  PRIMARY KEY (pipeline, table_name, number)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin

-- name: upsert
-- The batch's newest change of each key (an in-order batch: newer than
-- every row).
INSERT INTO {target} ({target_columns})
SELECT * FROM (SELECT {select_columns} FROM {stage} s WHERE {filter}) AS cdcflow_new
ON DUPLICATE KEY UPDATE {assignments}

-- name: delete_join
-- Rows of {target} whose key is in the stage and {filter} holds.
DELETE t FROM {target} t JOIN {stage} s ON {key_equal} WHERE {filter}

-- name: defer_foreign_keys
-- Replica mode: foreign keys are not checked while the batch applies.
SET SESSION FOREIGN_KEY_CHECKS = 0

-- name: unique_keys
-- The columns of each unique index of the table, to check one matches the key.
SELECT INDEX_NAME, GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX SEPARATOR ',')
FROM information_schema.STATISTICS
WHERE TABLE_SCHEMA = {schema} AND TABLE_NAME = {table} AND NON_UNIQUE = 0
GROUP BY INDEX_NAME
