//! [`super::StateStore`] in an embedded SQLite file (WAL mode): the store and
//! its schema here; one file per concern (`manifest.rs`, `runs.rs`,
//! `lease.rs`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

mod lease;
mod manifest;
mod runs;

use super::{ObjectRef, stamp};
use crate::error::{Error, Result};

const SCHEMA: &str = include_str!("../../../sql/state.sql");

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
    /// The fencing token of the lease this store took; 0: unfenced.
    fence: AtomicI64,
}

pub(super) fn now() -> String {
    stamp(Utc::now())
}

pub(super) fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Seconds from one stored time to another (0 when either is unreadable).
pub(super) fn seconds_between(from: &str, to: &str) -> f64 {
    match (parse_stamp(from), parse_stamp(to)) {
        (Some(from), Some(to)) => (to - from).as_seconds_f64().max(0.0),
        _ => 0.0,
    }
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
            fence: AtomicI64::new(0),
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

    /// Runs the write `f` in one transaction if this store's fencing token
    /// is still the pipeline's newest (see [`super::Leases`]); refuses it
    /// with [`Error::LeaseLost`] otherwise.
    fn write<T>(
        &self,
        context: &str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let fence = self.fence.load(Ordering::SeqCst);
        self.with(
            |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                if fence != 0 {
                    let newest: i64 = tx.query_row(
                        "SELECT COALESCE(MAX(token), 0) FROM lease_tokens WHERE pipeline = ?1",
                        params![self.pipeline],
                        |r| r.get(0),
                    )?;
                    if newest != fence {
                        return Ok(None);
                    }
                }
                let value = f(&tx)?;
                tx.commit()?;
                Ok(Some(value))
            },
            context,
        )?
        .ok_or_else(|| Error::LeaseLost {
            pipeline: self.pipeline.clone(),
        })
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

pub(super) fn parse_objects(json: &str) -> rusqlite::Result<Vec<ObjectRef>> {
    serde_json::from_str(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
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

    #[test]
    fn batch_id_depends_on_etags() {
        use crate::state::Batch;
        let obj = |key: &str| ObjectRef {
            key: key.into(),
            etag: "e".into(),
            size: 1,
            last_modified: DateTime::default(),
        };
        let a = Batch::id_of("p", "t", &[obj("a")]);
        let mut changed = obj("a");
        changed.etag = "f".into();
        assert_ne!(a, Batch::id_of("p", "t", &[changed]));
        assert_eq!(a, Batch::id_of("p", "t", &[obj("a")]));
    }
}
