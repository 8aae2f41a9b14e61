-- cdcflow state store (PostgreSQL): the tables of sql/state.sql, shared by
-- every pipeline and every process pointed at the database. Applied at every
-- open under an advisory lock; every statement is idempotent.

CREATE SCHEMA IF NOT EXISTS cdcflow;

-- The schema version this database holds (one row). A build refuses a newer one.
CREATE TABLE IF NOT EXISTS cdcflow.schema_version (
    one          BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    version      INTEGER NOT NULL
);

-- Who each pipeline's store is: a random id made when it was created. Every
-- warehouse commit names it.
CREATE TABLE IF NOT EXISTS cdcflow.store (
    pipeline     TEXT PRIMARY KEY,
    store_id     TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every object cdcflow has decided about. An object absent here is new.
CREATE TABLE IF NOT EXISTS cdcflow.objects (
    pipeline     TEXT    NOT NULL,
    tbl          TEXT    NOT NULL,   -- schema.table
    key          TEXT    NOT NULL,   -- object key under the source URL
    etag         TEXT    NOT NULL,
    size         BIGINT  NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('processed', 'quarantined', 'skipped')),
    batch_no     BIGINT,             -- batch that loaded it (processed)
    error        TEXT,               -- why it is quarantined
    reason       TEXT,               -- why an operator skipped it
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pipeline, tbl, key)
);

-- Batches, recorded (planned) before anything is loaded.
CREATE TABLE IF NOT EXISTS cdcflow.batches (
    pipeline     TEXT    NOT NULL,
    tbl          TEXT    NOT NULL,
    batch_no     BIGINT  NOT NULL,   -- 1, 2, 3… per table: the warehouse transaction version
    batch_id     TEXT    NOT NULL,   -- hash of (pipeline, table, object keys and ETags)
    objects      JSONB   NOT NULL,   -- array of {key, etag, size, last_modified}
    status       TEXT    NOT NULL CHECK (status IN ('planned', 'committed')),
    mode         TEXT    NOT NULL DEFAULT 'append' CHECK (mode IN ('append', 'replace')),
    rows         BIGINT,
    inserts      BIGINT,
    updates      BIGINT,
    deletes      BIGINT,
    max_seq      TEXT,               -- largest change_seq loaded by this batch
    max_commit_ts TIMESTAMPTZ,       -- newest commit_ts loaded by this batch (for lag)
    bytes_processed BIGINT,          -- bytes the warehouse's jobs processed (BigQuery; schema 3)
    bytes_billed BIGINT,             -- and billed
    planned_at   TIMESTAMPTZ NOT NULL,
    committed_at TIMESTAMPTZ,
    PRIMARY KEY (pipeline, tbl, batch_no)
);

-- Schema 3 added the bytes a batch's warehouse jobs processed and billed.
ALTER TABLE cdcflow.batches ADD COLUMN IF NOT EXISTS bytes_processed BIGINT;
ALTER TABLE cdcflow.batches ADD COLUMN IF NOT EXISTS bytes_billed BIGINT;

-- At most one planned batch per table.
CREATE UNIQUE INDEX IF NOT EXISTS one_planned_batch
    ON cdcflow.batches (pipeline, tbl) WHERE status = 'planned';

-- One row per run: scheduled, manual or backfill.
CREATE TABLE IF NOT EXISTS cdcflow.runs (
    run_id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline       TEXT    NOT NULL,
    trigger        TEXT    NOT NULL CHECK (trigger IN ('schedule', 'manual', 'backfill')),
    interval_start TIMESTAMPTZ,      -- data interval [start, end)
    interval_end   TIMESTAMPTZ,
    started_at     TIMESTAMPTZ NOT NULL,
    finished_at    TIMESTAMPTZ,
    status         TEXT    NOT NULL CHECK (status IN ('running', 'success', 'failed')),
    summary        TEXT              -- JSON: per table objects, rows, errors
);

CREATE INDEX IF NOT EXISTS runs_of_pipeline ON cdcflow.runs (pipeline, run_id DESC);

-- One row per try of a table task in a run.
CREATE TABLE IF NOT EXISTS cdcflow.task_attempts (
    run_id       BIGINT  NOT NULL REFERENCES cdcflow.runs (run_id),
    tbl          TEXT    NOT NULL,
    try_number   INTEGER NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'success', 'failed', 'up_for_retry', 'skipped')),
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    rows         BIGINT,
    error        TEXT,
    PRIMARY KEY (run_id, tbl, try_number)
);

-- What each try logged (INFO and above), for the web UI's runs grid; kept
-- for the newest 500 runs of a pipeline. Added without a version change:
-- older builds ignore the table.
CREATE TABLE IF NOT EXISTS cdcflow.attempt_logs (
    run_id       BIGINT  NOT NULL REFERENCES cdcflow.runs (run_id),
    tbl          TEXT    NOT NULL,
    try_number   INTEGER NOT NULL,
    log          TEXT    NOT NULL,
    PRIMARY KEY (run_id, tbl, try_number)
);

-- Where the schedule stands: the end of the last scheduled data interval.
CREATE TABLE IF NOT EXISTS cdcflow.schedule (
    pipeline     TEXT PRIMARY KEY,
    last_tick    TIMESTAMPTZ NOT NULL
);

-- When each table was last listed in full (incremental listings start after a watermark).
CREATE TABLE IF NOT EXISTS cdcflow.listings (
    pipeline     TEXT NOT NULL,
    tbl          TEXT NOT NULL,
    full_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pipeline, tbl)
);

-- One process at a time per table: an expiring lease renewed by a
-- heartbeat, its times the server's clock (one clock for every worker), with
-- the fencing token of its take (schema version 2; version 1 had one lease
-- per pipeline, in a table `leases` dropped here so that an older build still
-- running fails instead of running beside this one).
DROP TABLE IF EXISTS cdcflow.leases;
CREATE TABLE IF NOT EXISTS cdcflow.table_leases (
    pipeline     TEXT NOT NULL,
    tbl          TEXT NOT NULL,
    owner        TEXT NOT NULL,
    acquired_at  TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    token        BIGINT NOT NULL,
    PRIMARY KEY (pipeline, tbl)
);

-- The newest fencing token of each pipeline: raised by every take of any of
-- its tables' leases, so tokens only grow (ARCHITECTURE §3).
CREATE TABLE IF NOT EXISTS cdcflow.lease_tokens (
    pipeline     TEXT PRIMARY KEY,
    token        BIGINT NOT NULL
);

-- Alert incidents open now: told to the webhook as firing, not yet as
-- resolved. Added without a version change: older builds ignore the table.
CREATE TABLE IF NOT EXISTS cdcflow.incidents (
    pipeline     TEXT NOT NULL,
    incident     TEXT NOT NULL,      -- kind:schema.table
    detail       TEXT NOT NULL,      -- what the firing alert said
    opened_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pipeline, incident)
);
