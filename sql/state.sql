-- cdcflow state store (SQLite). One file per pipeline by default.
-- Applied at every open; every statement is idempotent.

PRAGMA journal_mode = WAL;

-- Who this store is: a random id made when the store was created. Every
-- warehouse commit names it, so a warehouse can tell this store's batches
-- from those of a lost, replaced or second store.
CREATE TABLE IF NOT EXISTS store (
    pipeline     TEXT PRIMARY KEY,
    store_id     TEXT NOT NULL,
    created_at   TEXT NOT NULL
);

-- Every object cdcflow has decided about. An object absent here is new.
CREATE TABLE IF NOT EXISTS objects (
    pipeline     TEXT    NOT NULL,
    tbl          TEXT    NOT NULL,   -- schema.table
    key          TEXT    NOT NULL,   -- object key under the source URL
    etag         TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('processed', 'quarantined', 'skipped')),
    batch_no     INTEGER,            -- batch that loaded it (processed)
    error        TEXT,               -- why it is quarantined
    reason       TEXT,               -- why an operator skipped it
    updated_at   TEXT    NOT NULL,
    PRIMARY KEY (pipeline, tbl, key)
);

-- Batches, recorded (planned) before anything is loaded.
CREATE TABLE IF NOT EXISTS batches (
    pipeline     TEXT    NOT NULL,
    tbl          TEXT    NOT NULL,
    batch_no     INTEGER NOT NULL,   -- 1, 2, 3… per table: the warehouse transaction version
    batch_id     TEXT    NOT NULL,   -- hash of (pipeline, table, object keys and ETags)
    objects      TEXT    NOT NULL,   -- JSON array of {key, etag, size}
    status       TEXT    NOT NULL CHECK (status IN ('planned', 'committed')),
    mode         TEXT    NOT NULL DEFAULT 'append' CHECK (mode IN ('append', 'replace')),
    rows         INTEGER,
    inserts      INTEGER,
    updates      INTEGER,
    deletes      INTEGER,
    max_seq      TEXT,               -- largest change_seq loaded by this batch
    max_commit_ts TEXT,              -- newest commit_ts loaded by this batch (for lag)
    bytes_processed INTEGER,         -- bytes the warehouse's jobs processed (BigQuery; schema 3)
    bytes_billed INTEGER,            -- and billed
    planned_at   TEXT    NOT NULL,
    committed_at TEXT,
    PRIMARY KEY (pipeline, tbl, batch_no)
);

-- At most one planned batch per table.
CREATE UNIQUE INDEX IF NOT EXISTS one_planned_batch
    ON batches (pipeline, tbl) WHERE status = 'planned';

-- One row per run: scheduled, manual or backfill.
CREATE TABLE IF NOT EXISTS runs (
    run_id         INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline       TEXT    NOT NULL,
    trigger        TEXT    NOT NULL CHECK (trigger IN ('schedule', 'manual', 'backfill')),
    interval_start TEXT,             -- data interval [start, end)
    interval_end   TEXT,
    started_at     TEXT    NOT NULL,
    finished_at    TEXT,
    status         TEXT    NOT NULL CHECK (status IN ('running', 'success', 'failed')),
    summary        TEXT              -- JSON: per table objects, rows, errors
);

-- One row per try of a table task in a run.
CREATE TABLE IF NOT EXISTS task_attempts (
    run_id       INTEGER NOT NULL,
    tbl          TEXT    NOT NULL,
    try_number   INTEGER NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'success', 'failed', 'up_for_retry', 'skipped')),
    started_at   TEXT,
    finished_at  TEXT,
    rows         INTEGER,
    error        TEXT,
    PRIMARY KEY (run_id, tbl, try_number)
);

-- What each try logged (INFO and above), for the web UI's runs grid; kept
-- for the newest 500 runs of a pipeline. Added without a version change:
-- older builds ignore the table.
CREATE TABLE IF NOT EXISTS attempt_logs (
    run_id       INTEGER NOT NULL,
    tbl          TEXT    NOT NULL,
    try_number   INTEGER NOT NULL,
    log          TEXT    NOT NULL,
    PRIMARY KEY (run_id, tbl, try_number)
);

-- Where the schedule stands: the end of the last scheduled data interval.
CREATE TABLE IF NOT EXISTS schedule (
    pipeline     TEXT PRIMARY KEY,
    last_tick    TEXT NOT NULL
);

-- When each table was last listed in full (incremental listings start after a watermark).
CREATE TABLE IF NOT EXISTS listings (
    pipeline     TEXT NOT NULL,
    tbl          TEXT NOT NULL,
    full_at      TEXT NOT NULL,
    PRIMARY KEY (pipeline, tbl)
);

-- One process at a time per table: an expiring lease renewed by a
-- heartbeat, with the fencing token of its take (schema version 2; version
-- 1 had one lease per pipeline, in a table `leases` dropped here so that an
-- older build still running fails instead of running beside this one).
DROP TABLE IF EXISTS leases;
CREATE TABLE IF NOT EXISTS table_leases (
    pipeline     TEXT NOT NULL,
    tbl          TEXT NOT NULL,
    owner        TEXT NOT NULL,
    acquired_at  TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    token        INTEGER NOT NULL,
    PRIMARY KEY (pipeline, tbl)
);

-- The newest fencing token of each pipeline: raised by every take of any of
-- its tables' leases, so tokens only grow (ARCHITECTURE §3).
CREATE TABLE IF NOT EXISTS lease_tokens (
    pipeline     TEXT PRIMARY KEY,
    token        INTEGER NOT NULL
);

-- Alert incidents open now: told to the webhook as firing, not yet as
-- resolved (ARCHITECTURE §3). Added without a version change: older builds
-- ignore the table.
CREATE TABLE IF NOT EXISTS incidents (
    pipeline     TEXT NOT NULL,
    incident     TEXT NOT NULL,      -- kind:schema.table
    detail       TEXT NOT NULL,      -- what the firing alert said
    opened_at    TEXT NOT NULL,
    PRIMARY KEY (pipeline, incident)
);
