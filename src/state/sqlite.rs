//! [`StateStore`] in an embedded SQLite file (WAL mode).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Batch, BatchMode, BatchStats, CommittedBatch, LeaseOutcome, ObjectRecord, ObjectRef,
    ObjectStatus, Restored, RunRecord, StateStore, TaskAttempt, TaskState, Trigger,
};
use crate::error::{Error, Result};

const SCHEMA: &str = include_str!("../../sql/state.sql");

/// The version of `sql/state.sql` this build writes (`PRAGMA user_version`).
/// A store of a later version is refused: an older build must not write it.
/// A change to the schema raises it and migrates older stores on open.
const SCHEMA_VERSION: i64 = 1;

/// SQLite state of one pipeline.
pub struct SqliteStore {
    pipeline: String,
    path: PathBuf,
    id: String,
    conn: Mutex<Connection>,
}

fn now() -> String {
    stamp(Utc::now())
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

impl SqliteStore {
    /// Opens (creating if needed) the state file of `pipeline`.
    pub fn open(path: &Path, pipeline: &str) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("cannot create the state directory", dir.display(), e))?;
        }
        let mut store = SqliteStore {
            pipeline: pipeline.to_string(),
            path: path.to_path_buf(),
            id: String::new(),
            conn: Mutex::new(Connection::open(path).map_err(|e| Error::State {
                path: path.display().to_string(),
                context: "opening".into(),
                source: e,
            })?),
        };
        store.with(
            |c| {
                c.busy_timeout(std::time::Duration::from_secs(30))?;
                c.execute_batch(SCHEMA)
            },
            "creating the schema",
        )?;
        store.check_schema()?;
        store.id = store.with(
            |c| {
                c.execute(
                    "INSERT OR IGNORE INTO store (pipeline, store_id, created_at) VALUES (?1, ?2, ?3)",
                    params![pipeline, uuid::Uuid::new_v4().simple().to_string(), now()],
                )?;
                c.query_row(
                    "SELECT store_id FROM store WHERE pipeline = ?1",
                    params![pipeline],
                    |r| r.get(0),
                )
            },
            "reading the store id",
        )?;
        Ok(store)
    }

    /// Refuses a store of a newer schema, or one lacking columns this build
    /// uses (made by a build from before the versions were numbered), and
    /// records the version otherwise.
    fn check_schema(&self) -> Result<()> {
        let (version, missing) = self.with(
            |c| {
                let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
                let fresh = Connection::open_in_memory()?;
                fresh.execute_batch(SCHEMA)?;
                let mut missing = Vec::new();
                for table in table_names(&fresh)? {
                    let have = column_names(c, &table)?;
                    missing.extend(
                        column_names(&fresh, &table)?
                            .into_iter()
                            .filter(|column| !have.contains(column))
                            .map(|column| format!("{table}.{column}")),
                    );
                }
                Ok((version, missing))
            },
            "checking the schema",
        )?;
        let path = self.path.display();
        if version > SCHEMA_VERSION {
            return Err(Error::Usage(format!(
                "state store {path} has schema version {version}, written by a newer cdcflow \
                 (this one knows {SCHEMA_VERSION}): run that version or a later one"
            )));
        }
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "state store {path} was made by an early cdcflow build and lacks {}; no migration \
                 exists from it: keep that build, or start the pipeline afresh with a new state \
                 store and a new warehouse",
                missing.join(", ")
            )));
        }
        if version < SCHEMA_VERSION {
            self.with(
                |c| c.pragma_update(None, "user_version", SCHEMA_VERSION),
                "recording the schema version",
            )?;
        }
        Ok(())
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
        context: &str,
    ) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut conn).map_err(|source| Error::State {
            path: self.path.display().to_string(),
            context: context.to_string(),
            source,
        })
    }
}

fn parse_objects(json: &str) -> rusqlite::Result<Vec<ObjectRef>> {
    serde_json::from_str(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl StateStore for SqliteStore {
    fn store_id(&self) -> &str {
        &self.id
    }

    fn restore(&self, table: &str, restored: &Restored) -> Result<()> {
        let json = serde_json::to_string(&restored.objects).expect("objects serialize");
        self.with(
            |c| {
                let tx = c.transaction()?;
                let at = now();
                tx.execute(
                    "DELETE FROM batches WHERE pipeline = ?1 AND tbl = ?2",
                    params![self.pipeline, table],
                )?;
                tx.execute(
                    "DELETE FROM objects WHERE pipeline = ?1 AND tbl = ?2 AND status = 'processed'",
                    params![self.pipeline, table],
                )?;
                if restored.number > 0 {
                    let s = &restored.stats;
                    tx.execute(
                        "INSERT INTO batches (pipeline, tbl, batch_no, batch_id, objects, status, mode, rows,
                           inserts, updates, deletes, max_seq, max_commit_ts, planned_at, committed_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'committed', 'append', ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
                        params![
                            self.pipeline, table, restored.number, restored.id, json, s.rows as i64,
                            s.inserts as i64, s.updates as i64, s.deletes as i64, s.max_seq,
                            s.max_commit_ts.map(stamp), at
                        ],
                    )?;
                }
                for object in &restored.objects {
                    tx.execute(
                        "INSERT INTO objects (pipeline, tbl, key, etag, size, status, batch_no, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'processed', ?6, ?7)
                         ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
                           etag = excluded.etag, size = excluded.size, status = 'processed',
                           batch_no = excluded.batch_no, error = NULL, reason = NULL,
                           updated_at = excluded.updated_at",
                        params![self.pipeline, table, object.key, object.etag, object.size as i64, restored.number, at],
                    )?;
                }
                if let Some(p) = &restored.pending {
                    for object in &p.objects {
                        tx.execute(
                            "DELETE FROM objects WHERE pipeline = ?1 AND tbl = ?2 AND key = ?3",
                            params![self.pipeline, table, object.key],
                        )?;
                    }
                    tx.execute(
                        "INSERT INTO batches (pipeline, tbl, batch_no, batch_id, objects, status, mode, planned_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'planned', ?6, ?7)",
                        params![
                            self.pipeline, table, p.number, p.id,
                            serde_json::to_string(&p.objects).expect("objects serialize"),
                            p.mode.as_str(), at
                        ],
                    )?;
                }
                tx.commit()
            },
            "restoring a table's state from the warehouse",
        )
    }

    fn objects(&self, table: &str) -> Result<HashMap<String, ObjectRecord>> {
        self.with(
            |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT key, etag, size, status, batch_no, error, reason, updated_at
                     FROM objects WHERE pipeline = ?1 AND tbl = ?2",
                )?;
                let rows = stmt.query_map(params![self.pipeline, table], |r| {
                    let status: String = r.get(3)?;
                    let status = match status.as_str() {
                        "processed" => ObjectStatus::Processed {
                            batch_no: r.get(4)?,
                        },
                        "quarantined" => ObjectStatus::Quarantined {
                            error: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                        },
                        _ => ObjectStatus::Skipped {
                            reason: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        },
                    };
                    Ok(ObjectRecord {
                        object: ObjectRef {
                            key: r.get(0)?,
                            etag: r.get(1)?,
                            size: r.get::<_, i64>(2)? as u64,
                            last_modified: DateTime::default(),
                        },
                        status,
                        updated_at: r.get(7)?,
                    })
                })?;
                rows.map(|r| r.map(|rec| (rec.object.key.clone(), rec)))
                    .collect()
            },
            "reading objects",
        )
    }

    fn pending_batch(&self, table: &str) -> Result<Option<Batch>> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT batch_no, batch_id, objects, mode FROM batches
                     WHERE pipeline = ?1 AND tbl = ?2 AND status = 'planned'",
                    params![self.pipeline, table],
                    |r| {
                        Ok(Batch {
                            number: r.get(0)?,
                            id: r.get(1)?,
                            objects: parse_objects(&r.get::<_, String>(2)?)?,
                            mode: BatchMode::parse(&r.get::<_, String>(3)?),
                        })
                    },
                )
                .optional()
            },
            "reading the pending batch",
        )
    }

    fn plan_batch(&self, table: &str, objects: &[ObjectRef], mode: BatchMode) -> Result<Batch> {
        let id = Batch::id_of(&self.pipeline, table, objects);
        let json = serde_json::to_string(objects).expect("objects serialize");
        self.with(
            |c| {
                let tx = c.transaction()?;
                let number: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(batch_no), 0) + 1 FROM batches WHERE pipeline = ?1 AND tbl = ?2",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO batches (pipeline, tbl, batch_no, batch_id, objects, status, mode, planned_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'planned', ?6, ?7)",
                    params![self.pipeline, table, number, id, json, mode.as_str(), now()],
                )?;
                tx.commit()?;
                Ok(Batch { number, id: id.clone(), objects: objects.to_vec(), mode })
            },
            "planning a batch",
        )
    }

    fn replan_batch(
        &self,
        table: &str,
        number: i64,
        objects: &[ObjectRef],
    ) -> Result<Option<Batch>> {
        self.with(
            |c| {
                if objects.is_empty() {
                    c.execute(
                        "DELETE FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3 AND status = 'planned'",
                        params![self.pipeline, table, number],
                    )?;
                    return Ok(None);
                }
                let id = Batch::id_of(&self.pipeline, table, objects);
                let mode: String = c.query_row(
                    "UPDATE batches SET batch_id = ?4, objects = ?5
                     WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3 AND status = 'planned'
                     RETURNING mode",
                    params![self.pipeline, table, number, id, serde_json::to_string(objects).expect("objects serialize")],
                    |r| r.get(0),
                )?;
                Ok(Some(Batch { number, id, objects: objects.to_vec(), mode: BatchMode::parse(&mode) }))
            },
            "re-planning a batch",
        )
    }

    fn commit_batch(&self, table: &str, number: i64, stats: &BatchStats) -> Result<()> {
        self.with(
            |c| {
                let tx = c.transaction()?;
                let json: String = tx.query_row(
                    "SELECT objects FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3 AND status = 'planned'",
                    params![self.pipeline, table, number],
                    |r| r.get(0),
                )?;
                let at = now();
                for object in parse_objects(&json)? {
                    tx.execute(
                        "INSERT INTO objects (pipeline, tbl, key, etag, size, status, batch_no, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'processed', ?6, ?7)
                         ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
                           etag = excluded.etag, size = excluded.size, status = 'processed',
                           batch_no = excluded.batch_no, error = NULL, updated_at = excluded.updated_at",
                        params![self.pipeline, table, object.key, object.etag, object.size as i64, number, at],
                    )?;
                }
                tx.execute(
                    "UPDATE batches SET status = 'committed', rows = ?4, inserts = ?5, updates = ?6,
                       deletes = ?7, max_seq = ?8, committed_at = ?9, max_commit_ts = ?10
                     WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3",
                    params![
                        self.pipeline, table, number, stats.rows as i64, stats.inserts as i64,
                        stats.updates as i64, stats.deletes as i64, stats.max_seq, at,
                        stats.max_commit_ts.map(stamp)
                    ],
                )?;
                tx.commit()
            },
            "committing a batch",
        )
    }

    fn last_batch(&self, table: &str) -> Result<Option<CommittedBatch>> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT batch_no, objects, rows, inserts, updates, deletes, max_seq, committed_at, batch_id FROM batches
                     WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed' ORDER BY batch_no DESC LIMIT 1",
                    params![self.pipeline, table],
                    |r| {
                        let committed_at: String = r.get(7)?;
                        Ok(CommittedBatch {
                            number: r.get(0)?,
                            id: r.get(8)?,
                            objects: parse_objects(&r.get::<_, String>(1)?)?.len(),
                            stats: BatchStats {
                                rows: r.get::<_, i64>(2)? as u64,
                                inserts: r.get::<_, i64>(3)? as u64,
                                updates: r.get::<_, i64>(4)? as u64,
                                deletes: r.get::<_, i64>(5)? as u64,
                                max_seq: r.get(6)?,
                                max_commit_ts: None,
                            },
                            committed_at: DateTime::parse_from_rfc3339(&committed_at)
                                .map(|t| t.with_timezone(&Utc))
                                .unwrap_or_default(),
                        })
                    },
                )
                .optional()
            },
            "reading the last batch",
        )
    }

    fn max_seq(&self, table: &str) -> Result<Option<String>> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT MAX(max_seq) FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )
            },
            "reading the watermark",
        )
    }

    fn quarantine(&self, table: &str, object: &ObjectRef, error: &str) -> Result<()> {
        self.set_status(table, object, "quarantined", Some(error), None)
    }

    fn release(&self, table: &str, key: &str) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "DELETE FROM objects WHERE pipeline = ?1 AND tbl = ?2 AND key = ?3 AND status = 'quarantined'",
                    params![self.pipeline, table, key],
                )
                .map(|_| ())
            },
            "releasing a quarantined object",
        )
    }

    fn skip(&self, table: &str, object: &ObjectRef, reason: &str) -> Result<()> {
        self.set_status(table, object, "skipped", None, Some(reason))
    }

    fn max_commit_ts(&self, table: &str) -> Result<Option<DateTime<Utc>>> {
        let max: Option<String> = self.with(
            |c| {
                c.query_row(
                    "SELECT MAX(max_commit_ts) FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )
            },
            "reading the newest commit time",
        )?;
        Ok(max.as_deref().and_then(parse_stamp))
    }

    fn last_full_listing(&self, table: &str) -> Result<Option<DateTime<Utc>>> {
        let at: Option<String> = self.with(
            |c| {
                c.query_row(
                    "SELECT full_at FROM listings WHERE pipeline = ?1 AND tbl = ?2",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )
                .optional()
            },
            "reading the last full listing",
        )?;
        Ok(at.as_deref().and_then(parse_stamp))
    }

    fn set_last_full_listing(&self, table: &str, at: DateTime<Utc>) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO listings (pipeline, tbl, full_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (pipeline, tbl) DO UPDATE SET full_at = excluded.full_at",
                    params![self.pipeline, table, stamp(at)],
                )
                .map(|_| ())
            },
            "recording a full listing",
        )
    }

    fn begin_run(
        &self,
        trigger: Trigger,
        interval: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<i64> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO runs (pipeline, trigger, interval_start, interval_end, started_at, status)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
                    params![
                        self.pipeline,
                        trigger.as_str(),
                        interval.map(|i| stamp(i.0)),
                        interval.map(|i| stamp(i.1)),
                        now()
                    ],
                )?;
                Ok(c.last_insert_rowid())
            },
            "recording a run",
        )
    }

    fn finish_run(&self, run_id: i64, success: bool, summary: &str) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "UPDATE runs SET finished_at = ?2, status = ?3, summary = ?4 WHERE run_id = ?1",
                    params![
                        run_id,
                        now(),
                        if success { "success" } else { "failed" },
                        summary
                    ],
                )
                .map(|_| ())
            },
            "finishing a run",
        )
    }

    fn record_attempt(&self, run_id: i64, a: &TaskAttempt) -> Result<()> {
        self.with(
            |c| {
                let at = now();
                let finished = matches!(a.state, TaskState::Success | TaskState::Failed | TaskState::UpForRetry | TaskState::Skipped)
                    .then(|| at.clone());
                c.execute(
                    "INSERT INTO task_attempts (run_id, tbl, try_number, state, started_at, finished_at, rows, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (run_id, tbl, try_number) DO UPDATE SET
                       state = excluded.state, finished_at = excluded.finished_at,
                       rows = excluded.rows, error = excluded.error",
                    params![run_id, a.table, a.try_number, a.state.as_str(), at, finished, a.rows as i64, a.error],
                )
                .map(|_| ())
            },
            "recording a task attempt",
        )
    }

    fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        self.with(
            |c| {
                let mut runs = c
                    .prepare_cached(
                        "SELECT run_id, trigger, interval_start, interval_end, started_at, status FROM runs
                         WHERE pipeline = ?1 ORDER BY run_id DESC LIMIT ?2",
                    )?
                    .query_map(params![self.pipeline, limit as i64], |r| {
                        let start: Option<String> = r.get(2)?;
                        let end: Option<String> = r.get(3)?;
                        Ok(RunRecord {
                            id: r.get(0)?,
                            trigger: r.get(1)?,
                            interval: start.zip(end),
                            started_at: r.get(4)?,
                            status: r.get(5)?,
                            attempts: Vec::new(),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut stmt = c.prepare_cached(
                    "SELECT tbl, try_number, state, rows, error FROM task_attempts WHERE run_id = ?1 ORDER BY tbl, try_number",
                )?;
                for run in &mut runs {
                    run.attempts = stmt
                        .query_map(params![run.id], |r| {
                            Ok(TaskAttempt {
                                table: r.get(0)?,
                                try_number: r.get(1)?,
                                state: TaskState::parse(&r.get::<_, String>(2)?),
                                rows: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                                error: r.get(4)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                }
                Ok(runs)
            },
            "reading runs",
        )
    }

    fn last_tick(&self) -> Result<Option<DateTime<Utc>>> {
        let tick: Option<String> = self.with(
            |c| {
                c.query_row(
                    "SELECT last_tick FROM schedule WHERE pipeline = ?1",
                    params![self.pipeline],
                    |r| r.get(0),
                )
                .optional()
            },
            "reading the schedule",
        )?;
        Ok(tick.as_deref().and_then(parse_stamp))
    }

    fn set_last_tick(&self, tick: DateTime<Utc>) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO schedule (pipeline, last_tick) VALUES (?1, ?2)
                     ON CONFLICT (pipeline) DO UPDATE SET last_tick = MAX(last_tick, excluded.last_tick)",
                    params![self.pipeline, stamp(tick)],
                )
                .map(|_| ())
            },
            "advancing the schedule",
        )
    }

    fn acquire_lease(
        &self,
        owner: &str,
        ttl: std::time::Duration,
        dead_holder: Option<&str>,
    ) -> Result<LeaseOutcome> {
        self.with(
            |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let current: Option<(String, String)> = tx
                    .query_row(
                        "SELECT owner, expires_at FROM leases WHERE pipeline = ?1",
                        params![self.pipeline],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let now_t = Utc::now();
                if let Some((holder, expires)) = &current
                    && holder != owner
                    && Some(holder.as_str()) != dead_holder
                    && parse_stamp(expires).is_some_and(|e| e > now_t)
                {
                    return Ok(LeaseOutcome::Held { owner: holder.clone(), expires_at: expires.clone() });
                }
                tx.execute(
                    "INSERT INTO leases (pipeline, owner, acquired_at, expires_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (pipeline) DO UPDATE SET owner = excluded.owner,
                       acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                    params![self.pipeline, owner, stamp(now_t), stamp(now_t + ttl)],
                )?;
                tx.commit()?;
                Ok(LeaseOutcome::Acquired)
            },
            "taking the lease",
        )
    }

    fn renew_lease(&self, owner: &str, ttl: std::time::Duration) -> Result<bool> {
        self.with(
            |c| {
                let changed = c.execute(
                    "UPDATE leases SET expires_at = ?3 WHERE pipeline = ?1 AND owner = ?2",
                    params![self.pipeline, owner, stamp(Utc::now() + ttl)],
                )?;
                Ok(changed == 1)
            },
            "renewing the lease",
        )
    }

    fn release_lease(&self, owner: &str) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "DELETE FROM leases WHERE pipeline = ?1 AND owner = ?2",
                    params![self.pipeline, owner],
                )
                .map(|_| ())
            },
            "releasing the lease",
        )
    }
}

impl SqliteStore {
    fn set_status(
        &self,
        table: &str,
        object: &ObjectRef,
        status: &str,
        error: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO objects (pipeline, tbl, key, etag, size, status, error, reason, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
                       etag = excluded.etag, size = excluded.size, status = excluded.status,
                       error = excluded.error, reason = excluded.reason, updated_at = excluded.updated_at
                     WHERE objects.status <> 'processed'",
                    params![self.pipeline, table, object.key, object.etag, object.size as i64, status, error, reason, now()],
                )
                .map(|_| ())
            },
            "recording an object",
        )
    }
}

/// The tables of a store's schema.
fn table_names(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = c.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )?;
    statement
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()
}

/// The columns of `table` (none when it does not exist).
fn column_names(c: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut statement = c.prepare("SELECT name FROM pragma_table_info(?1)")?;
    statement
        .query_map([table], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_of_another_schema_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(SqliteStore::open(&path, "p").unwrap());
        let version = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(version(&path), SCHEMA_VERSION);
        // Opened again: the same store, accepted.
        drop(SqliteStore::open(&path, "p").unwrap());

        let newer = dir.path().join("newer.db");
        drop(SqliteStore::open(&newer, "p").unwrap());
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let error = SqliteStore::open(&newer, "p").err().unwrap().to_string();
        assert!(error.contains("newer cdcflow"), "{error}");

        // A store from before the numbering, whose runs table lacked `trigger`.
        let early = dir.path().join("early.db");
        Connection::open(&early)
            .unwrap()
            .execute_batch(
                "CREATE TABLE runs (run_id INTEGER PRIMARY KEY, pipeline TEXT NOT NULL, \
                 started_at TEXT NOT NULL, finished_at TEXT, status TEXT NOT NULL, summary TEXT)",
            )
            .unwrap();
        let error = SqliteStore::open(&early, "p").err().unwrap().to_string();
        assert!(error.contains("lacks runs.trigger"), "{error}");
        assert_eq!(version(&early), 0, "a refused store gets no version");
    }

    fn obj(key: &str) -> ObjectRef {
        ObjectRef {
            key: key.into(),
            etag: "e".into(),
            size: 1,
            last_modified: DateTime::default(),
        }
    }

    #[test]
    fn batches_are_planned_then_committed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db"), "p").unwrap();
        let b1 = store
            .plan_batch("s.t", &[obj("a"), obj("b")], BatchMode::Append)
            .unwrap();
        assert_eq!(b1.number, 1);
        assert!(
            store
                .plan_batch("s.t", &[obj("c")], BatchMode::Append)
                .is_err(),
            "one planned batch per table"
        );
        assert_eq!(store.pending_batch("s.t").unwrap(), Some(b1.clone()));
        let stats = BatchStats {
            rows: 3,
            max_seq: Some("9".into()),
            ..Default::default()
        };
        store.commit_batch("s.t", 1, &stats).unwrap();
        assert_eq!(store.pending_batch("s.t").unwrap(), None);
        assert_eq!(store.objects("s.t").unwrap().len(), 2);
        assert_eq!(store.max_seq("s.t").unwrap().as_deref(), Some("9"));
        assert_eq!(
            store
                .plan_batch("s.t", &[obj("c")], BatchMode::Append)
                .unwrap()
                .number,
            2
        );
        // a processed object cannot be quarantined or skipped afterwards
        store.skip("s.t", &obj("a"), "no").unwrap();
        assert_eq!(
            store.objects("s.t").unwrap()["a"].status,
            ObjectStatus::Processed { batch_no: 1 }
        );
    }

    #[test]
    fn one_lease_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteStore::open(&dir.path().join("s.db"), "p").unwrap();
        let b = SqliteStore::open(&dir.path().join("s.db"), "p").unwrap();
        let ttl = std::time::Duration::from_secs(60);
        assert_eq!(
            a.acquire_lease("a", ttl, None).unwrap(),
            LeaseOutcome::Acquired
        );
        assert!(
            matches!(b.acquire_lease("b", ttl, None).unwrap(), LeaseOutcome::Held { owner, .. } if owner == "a")
        );
        assert!(a.renew_lease("a", ttl).unwrap());
        assert!(!b.renew_lease("b", ttl).unwrap());
        a.release_lease("a").unwrap();
        assert_eq!(
            b.acquire_lease("b", ttl, None).unwrap(),
            LeaseOutcome::Acquired
        );
        // a holder known to be dead is taken over at once
        assert_eq!(
            a.acquire_lease("a", ttl, Some("b")).unwrap(),
            LeaseOutcome::Acquired
        );
        assert_eq!(
            b.acquire_lease("b", ttl, None).unwrap(),
            LeaseOutcome::Held {
                owner: "a".into(),
                expires_at: b_expiry(&b)
            }
        );
        a.release_lease("a").unwrap();
        b.acquire_lease("b", ttl, None).unwrap();
        // an expired lease can be taken over
        b.acquire_lease("b", std::time::Duration::ZERO, None)
            .unwrap();
        assert_eq!(
            a.acquire_lease("a", ttl, None).unwrap(),
            LeaseOutcome::Acquired
        );
        assert!(!b.renew_lease("b", ttl).unwrap(), "b lost its lease");
    }

    fn b_expiry(store: &SqliteStore) -> String {
        store
            .with(
                |c| c.query_row("SELECT expires_at FROM leases", [], |r| r.get(0)),
                "test",
            )
            .unwrap()
    }

    #[test]
    fn the_schedule_never_moves_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db"), "p").unwrap();
        let t1 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t2 = DateTime::from_timestamp(2_000, 0).unwrap();
        store.set_last_tick(t2).unwrap();
        store.set_last_tick(t1).unwrap();
        assert_eq!(store.last_tick().unwrap(), Some(t2));
    }

    #[test]
    fn batch_id_depends_on_etags() {
        let a = Batch::id_of("p", "t", &[obj("a")]);
        let mut changed = obj("a");
        changed.etag = "f".into();
        assert_ne!(a, Batch::id_of("p", "t", &[changed]));
        assert_eq!(a, Batch::id_of("p", "t", &[obj("a")]));
    }
}
