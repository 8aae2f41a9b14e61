-- Applying a batch's latest change per key to the current-state table.
-- Equivalent statement:
--   MERGE INTO current t USING latest s ON <key equal>
--   WHEN MATCHED AND s.op = 'D' AND s.change_seq > t.change_seq THEN DELETE      (hard delete)
--   WHEN MATCHED AND s.change_seq > t.change_seq THEN UPDATE SET *, deleted = (s.op = 'D')
--   WHEN NOT MATCHED AND s.op <> 'D' THEN INSERT *                               (soft delete: always)
-- The change_seq guards make the MERGE order-safe and idempotent: a change
-- never overwrites a newer one, and applying a batch twice changes nothing.
-- Each section below is one clause, handed to the Delta MERGE builder.

-- name: on
{key_equal}

-- name: delete_when
s.{op} = 'D' AND s.{change_seq} > t.{change_seq}

-- name: update_when
s.{change_seq} > t.{change_seq}

-- name: insert_when
s.{op} <> 'D'

-- name: deleted_value
s.{op} = 'D'
