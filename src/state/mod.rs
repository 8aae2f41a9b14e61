//! The state store: what cdcflow has decided about every object, and the
//! batches it planned and committed (ARCHITECTURE §3).
//!
//! Contract of every [`StateStore`]:
//! - a batch is recorded ([`StateStore::plan_batch`]) before anything of it
//!   is loaded, and a table has at most one planned batch;
//! - [`StateStore::commit_batch`] marks the batch and all its objects
//!   processed in one transaction; committed batches are never undone;
//! - batch numbers per table start at 1 and only grow, and the committed
//!   watermark (largest `change_seq`) never moves back;
//! - an object is in at most one state: processed, quarantined or skipped.

mod postgres;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::config::StateConfig;
use crate::error::Result;

/// Opens the state store `config` names, for `pipeline`.
pub fn open(config: &StateConfig, pipeline: &str) -> Result<Arc<dyn StateStore>> {
    Ok(match config {
        StateConfig::Sqlite(path) => Arc::new(SqliteStore::open(path, pipeline)?),
        StateConfig::Postgres {
            url,
            tls,
            password_env,
        } => Arc::new(PostgresStore::open(url, tls, password_env, pipeline)?),
    })
}

/// A time as the stores show it: RFC 3339, UTC, microseconds.
pub(crate) fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A time written by [`stamp`] (or any RFC 3339 time), in UTC.
pub fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// An object as a batch refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Key under the source URL.
    pub key: String,
    /// ETag when listed.
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
    /// Last-modified time when listed (the commit time of full-load rows
    /// whose files carry no timestamp column).
    pub last_modified: DateTime<Utc>,
}

/// What was decided about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectStatus {
    /// Loaded by this batch.
    Processed {
        /// Batch number.
        batch_no: i64,
    },
    /// Failed to decode; the table waits at this object.
    Quarantined {
        /// The decode error.
        error: String,
    },
    /// An operator skipped it on purpose.
    Skipped {
        /// The operator's reason.
        reason: String,
    },
}

impl ObjectStatus {
    /// The status a store keeps as `status` (processed, quarantined or
    /// skipped) with the columns `batch_no`, `error` and `reason`.
    fn from_columns(
        status: &str,
        batch_no: Option<i64>,
        error: Option<String>,
        reason: Option<String>,
    ) -> Self {
        match status {
            "processed" => ObjectStatus::Processed {
                batch_no: batch_no.unwrap_or_default(),
            },
            "quarantined" => ObjectStatus::Quarantined {
                error: error.unwrap_or_default(),
            },
            _ => ObjectStatus::Skipped {
                reason: reason.unwrap_or_default(),
            },
        }
    }
}

/// A recorded object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    /// The object as recorded.
    pub object: ObjectRef,
    /// Its status.
    pub status: ObjectStatus,
    /// When the status was set.
    pub updated_at: String,
}

/// How a batch is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// New objects: history rows are appended, current state merged.
    Append,
    /// Backfill: the objects' history rows replace the ones loaded before,
    /// and current state is rebuilt from history.
    Replace,
}

impl BatchMode {
    /// Name stored and written in warehouse commits.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchMode::Append => "append",
            BatchMode::Replace => "replace",
        }
    }

    /// The mode named `s` (append unless `replace`).
    pub fn parse(s: &str) -> Self {
        if s == "replace" {
            BatchMode::Replace
        } else {
            BatchMode::Append
        }
    }
}

/// A planned batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// 1, 2, 3… per table; the warehouse's transaction version.
    pub number: i64,
    /// Hash of (pipeline, table, object keys and ETags).
    pub id: String,
    /// Objects in change order.
    pub objects: Vec<ObjectRef>,
    /// How it is applied.
    pub mode: BatchMode,
}

impl Batch {
    /// The deterministic batch id of these objects.
    pub fn id_of(pipeline: &str, table: &str, objects: &[ObjectRef]) -> String {
        let mut hash = Sha256::new();
        for part in [pipeline, table] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        for object in objects {
            hash.update(object.key.as_bytes());
            hash.update([0]);
            hash.update(object.etag.as_bytes());
            hash.update([0]);
        }
        hex::encode(&hash.finalize()[..12])
    }
}

/// Figures of a loaded batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Changes loaded into history.
    pub rows: u64,
    /// `I` changes.
    pub inserts: u64,
    /// `U` changes.
    pub updates: u64,
    /// `D` changes.
    pub deletes: u64,
    /// Largest `change_seq` of the batch.
    pub max_seq: Option<String>,
    /// Newest `commit_ts` of the batch.
    pub max_commit_ts: Option<DateTime<Utc>>,
    /// Bytes the warehouse's jobs for the batch processed (BigQuery's
    /// `totalBytesProcessed`, summed); `None` where the warehouse bills none.
    #[serde(default)]
    pub bytes_processed: Option<u64>,
    /// Bytes they were billed for (`totalBytesBilled`, summed).
    #[serde(default)]
    pub bytes_billed: Option<u64>,
}

impl BatchStats {
    /// Adds another batch's figures to these.
    pub fn add(&mut self, other: &BatchStats) {
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        self.bytes_processed = sum(self.bytes_processed, other.bytes_processed);
        self.bytes_billed = sum(self.bytes_billed, other.bytes_billed);
        self.rows += other.rows;
        self.inserts += other.inserts;
        self.updates += other.updates;
        self.deletes += other.deletes;
        self.max_seq = self.max_seq.clone().max(other.max_seq.clone());
        self.max_commit_ts = self.max_commit_ts.max(other.max_commit_ts);
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// A cron tick (`run` when due, or the `schedule` daemon).
    Schedule,
    /// `run --now`.
    Manual,
    /// `backfill`.
    Backfill,
}

impl Trigger {
    /// Name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::Backfill => "backfill",
        }
    }
}

/// State of a task attempt (Airflow's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a slot.
    Queued,
    /// In progress.
    Running,
    /// Done.
    Success,
    /// Stopped; needs an operator or a later run.
    Failed,
    /// Failed transiently; will be retried.
    UpForRetry,
    /// Nothing to do (e.g. the run was stopped before it started).
    Skipped,
}

impl TaskState {
    /// Name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Failed => "failed",
            TaskState::UpForRetry => "up_for_retry",
            TaskState::Skipped => "skipped",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "success" => TaskState::Success,
            "up_for_retry" => TaskState::UpForRetry,
            "skipped" => TaskState::Skipped,
            _ => TaskState::Failed,
        }
    }
}

/// One try of one table's task in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskAttempt {
    /// `schema.table`.
    pub table: String,
    /// 1 for the first try.
    pub try_number: u32,
    /// Its state.
    pub state: TaskState,
    /// Rows loaded by this try.
    pub rows: u64,
    /// The error of a failed or retried try.
    pub error: Option<String>,
}

/// What a table loaded since its store began (the counters of `/metrics`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableTotals {
    /// Committed batches.
    pub batches: u64,
    /// Their changes: rows and `I`/`U`/`D`, summed.
    pub rows: u64,
    /// `I` changes.
    pub inserts: u64,
    /// `U` changes.
    pub updates: u64,
    /// `D` changes.
    pub deletes: u64,
    /// Objects processed.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes the warehouse billed for its batches (BigQuery), summed.
    pub bytes_billed: u64,
    /// Seconds from plan to commit of each committed batch.
    pub batch_seconds: Vec<f64>,
}

/// What a pipeline's runs did (the counters of `/metrics`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunTotals {
    /// Task attempts: table, state, how many.
    pub attempts: Vec<(String, TaskState, u64)>,
    /// Seconds from start to finish of each finished run.
    pub run_seconds: Vec<f64>,
}

/// A recorded run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// Run id.
    pub id: i64,
    /// What started it.
    pub trigger: String,
    /// Data interval, for scheduled runs.
    pub interval: Option<(String, String)>,
    /// Start time.
    pub started_at: String,
    /// `running`, `success` or `failed`.
    pub status: String,
    /// Task attempts, in order.
    pub attempts: Vec<TaskAttempt>,
    /// Bytes the warehouse billed for the run's batches, from its summary
    /// (`None`: still running, or a warehouse that bills nothing).
    pub bytes_billed: Option<u64>,
}

/// The bytes billed of a run, summed over the tables of its JSON summary.
fn billed_in_summary(summary: Option<&str>) -> Option<u64> {
    let summary: serde_json::Value = serde_json::from_str(summary?).ok()?;
    let billed: Vec<u64> = summary["tables"]
        .as_array()?
        .iter()
        .filter_map(|t| t["stats"]["bytes_billed"].as_u64())
        .collect();
    (!billed.is_empty()).then(|| billed.iter().sum())
}

/// Answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// This owner holds the lease now, under fencing token `token`.
    Acquired {
        /// Greater than every token given before for any table of this
        /// pipeline.
        token: i64,
    },
    /// Another owner holds it.
    Held {
        /// The holder.
        owner: String,
        /// When its lease runs out unless renewed.
        expires_at: String,
    },
}

/// A committed batch, for `status` and the web UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedBatch {
    /// Batch number.
    pub number: i64,
    /// Its id (see [`Batch::id`]).
    pub id: String,
    /// Objects in it.
    pub objects: usize,
    /// Its figures.
    pub stats: BatchStats,
    /// When it was planned (its work began).
    pub planned_at: DateTime<Utc>,
    /// Commit time.
    pub committed_at: DateTime<Utc>,
}

/// A table's state as a warehouse recorded it (`cdcflow repair --from-warehouse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The last batch the warehouse committed in full (0: none).
    pub number: i64,
    /// Its id.
    pub id: String,
    /// Every object loaded up to it.
    pub objects: Vec<ObjectRef>,
    /// Their figures (the watermark among them).
    pub stats: BatchStats,
    /// A batch the warehouse applied in part (history, not current state).
    pub pending: Option<Batch>,
}

/// Persistent state of one pipeline (ARCHITECTURE §6): three concerns, each
/// its own trait, that one store keeps together.
pub trait StateStore: Manifest + RunLog + Leases {}

impl<T: Manifest + RunLog + Leases + ?Sized> StateStore for T {}

/// What is loaded: the object manifest and the batches of each table.
///
/// Contract: a batch is recorded ([`Manifest::plan_batch`]) before anything
/// of it is loaded and committed ([`Manifest::commit_batch`], atomically with
/// its objects) after; at most one batch of a table is pending; a processed
/// object never changes state again.
pub trait Manifest: Send + Sync {
    /// This store's id: random, made when the store was created, never
    /// changed. Warehouse commits name it (see `warehouse::Recorded`).
    fn store_id(&self) -> &str;
    /// Replaces the batches and processed objects of `table` with what the
    /// warehouse recorded, in one transaction: one committed batch
    /// `restored.number` holding every loaded object, and the partly applied
    /// batch as pending. Skips and quarantines of other objects stay.
    fn restore(&self, table: &str, restored: &Restored) -> Result<()>;
    /// Every recorded object of `table`, by key.
    fn objects(&self, table: &str) -> Result<HashMap<String, ObjectRecord>>;
    /// The planned, not yet committed batch of `table`.
    fn pending_batch(&self, table: &str) -> Result<Option<Batch>>;
    /// Records a new batch of `objects` (in change order). Fails if one is pending.
    fn plan_batch(&self, table: &str, objects: &[ObjectRef], mode: BatchMode) -> Result<Batch>;
    /// Replaces the objects of the pending batch `number` (nothing of it may be
    /// loaded yet); an empty list removes the batch.
    fn replan_batch(
        &self,
        table: &str,
        number: i64,
        objects: &[ObjectRef],
    ) -> Result<Option<Batch>>;
    /// Marks batch `number` and its objects processed, atomically.
    fn commit_batch(&self, table: &str, number: i64, stats: &BatchStats) -> Result<()>;
    /// The table's last `limit` committed batches, newest first.
    fn recent_batches(&self, table: &str, limit: usize) -> Result<Vec<CommittedBatch>>;
    /// The table's last committed batch.
    fn last_batch(&self, table: &str) -> Result<Option<CommittedBatch>> {
        Ok(self.recent_batches(table, 1)?.into_iter().next())
    }
    /// The committed watermark: the largest `change_seq` loaded.
    fn max_seq(&self, table: &str) -> Result<Option<String>>;
    /// The newest `commit_ts` loaded.
    fn max_commit_ts(&self, table: &str) -> Result<Option<DateTime<Utc>>>;
    /// What the table's committed batches loaded, summed (restored batches
    /// count as one).
    fn totals(&self, table: &str) -> Result<TableTotals>;
    /// Quarantines an object that failed to decode.
    fn quarantine(&self, table: &str, object: &ObjectRef, error: &str) -> Result<()>;
    /// Forgets a quarantine so the object is tried again (it was replaced).
    fn release(&self, table: &str, key: &str) -> Result<()>;
    /// Records that an operator skipped an object that is not processed.
    fn skip(&self, table: &str, object: &ObjectRef, reason: &str) -> Result<()>;
    /// When `table` was last listed in full.
    fn last_full_listing(&self, table: &str) -> Result<Option<DateTime<Utc>>>;
    /// Records a full listing of `table` at `at`.
    fn set_last_full_listing(&self, table: &str, at: DateTime<Utc>) -> Result<()>;
}

/// Runs of a pipeline whose attempts' logs are kept.
pub const KEPT_LOGS: i64 = 500;

/// What ran: runs, their task attempts, and the schedule's last tick.
pub trait RunLog: Send + Sync {
    /// Starts a run record; returns its id.
    fn begin_run(
        &self,
        trigger: Trigger,
        interval: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<i64>;
    /// Finishes a run record with its outcome and JSON summary.
    fn finish_run(&self, run_id: i64, success: bool, summary: &str) -> Result<()>;
    /// Records (or updates) a task attempt of a run.
    fn record_attempt(&self, run_id: i64, attempt: &TaskAttempt) -> Result<()>;
    /// Keeps what try `try_number` of `table` logged in run `run_id`;
    /// forgets the logs of all but the newest [`KEPT_LOGS`] runs.
    fn record_attempt_log(
        &self,
        run_id: i64,
        table: &str,
        try_number: u32,
        log: &str,
    ) -> Result<()>;
    /// The tries of `table` in run `run_id` of this pipeline, in order, each
    /// with what it logged (if kept).
    fn attempts(&self, run_id: i64, table: &str) -> Result<Vec<(TaskAttempt, Option<String>)>>;
    /// The latest `limit` runs, newest first, with their attempts.
    fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>>;
    /// Task attempts by table and state, and the seconds of finished runs.
    fn run_totals(&self) -> Result<RunTotals>;
    /// The open alert incidents: key → what the firing alert said.
    fn open_incidents(&self) -> Result<BTreeMap<String, String>>;
    /// Records incident `key` open with `detail`, or resolved (`None`).
    fn set_incident(&self, key: &str, detail: Option<&str>) -> Result<()>;
    /// End of the last scheduled data interval.
    fn last_tick(&self) -> Result<Option<DateTime<Utc>>>;
    /// Moves the schedule forward to `tick` (never back).
    fn set_last_tick(&self, tick: DateTime<Utc>) -> Result<()>;
}

/// Who works on a table: one lease per table of a pipeline, so that one
/// process at a time loads it while the pipeline's other tables may be
/// loaded by other processes (a fleet). A pipeline-wide operation (backfill,
/// vacuum, repair) takes the leases of all its tables.
///
/// Fencing: each take gives a token greater than every earlier take of any
/// table of the pipeline, and the store object that took it fences its
/// writes to that table with it ([`Manifest::plan_batch`],
/// [`Manifest::replan_batch`], [`Manifest::commit_batch`],
/// [`Manifest::quarantine`], [`Manifest::skip`]): once another store took the
/// table's lease, or it was released, those writes fail with
/// [`crate::error::Error::LeaseLost`] and change nothing, in the same
/// transaction as the write. Writes to a table this store holds no lease on
/// are unfenced (an operator's skip).
pub trait Leases: Send + Sync {
    /// Takes the lease of `table` (`schema.table`) for `ttl` unless another
    /// owner holds an unexpired one; a holder equal to `dead_holder` is taken
    /// over at once. Taken, this store's writes to `table` are fenced by the
    /// new token.
    fn acquire_lease(
        &self,
        table: &str,
        owner: &str,
        ttl: std::time::Duration,
        dead_holder: Option<&str>,
    ) -> Result<LeaseOutcome>;
    /// Extends every lease `owner` holds; how many it still holds.
    fn renew_lease(&self, owner: &str, ttl: std::time::Duration) -> Result<usize>;
    /// Gives up every lease `owner` holds; this store's writes to those
    /// tables are no longer fenced.
    fn release_lease(&self, owner: &str) -> Result<()>;
    /// Who holds `table`'s lease and until when (expired or not); `None`
    /// when it is free (released).
    fn lease_holder(&self, table: &str) -> Result<Option<(String, String)>>;
}

/// The fencing tokens a store object took, per table, with their owners.
#[derive(Debug, Default)]
pub(crate) struct Fences(std::sync::Mutex<BTreeMap<String, (String, i64)>>);

impl Fences {
    /// The token this store took for `table`, if it holds its lease.
    pub(crate) fn of(&self, table: &str) -> Option<i64> {
        self.lock().get(table).map(|(_, token)| *token)
    }

    /// Records the take of `table` by `owner` under `token`.
    pub(crate) fn took(&self, table: &str, owner: &str, token: i64) {
        self.lock()
            .insert(table.to_string(), (owner.to_string(), token));
    }

    /// Forgets the takes of `owner`.
    pub(crate) fn released(&self, owner: &str) {
        self.lock().retain(|_, (holder, _)| holder != owner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, i64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
