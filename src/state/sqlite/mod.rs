//! [`super::StateStore`] in an embedded SQLite file (WAL mode): the store and
//! its schema here; one file per concern (`manifest.rs`, `runs.rs`,
//! `lease.rs`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, params};

mod lease;
mod manifest;
mod runs;

use super::{Fences, ObjectRef, stamp};
use crate::error::{Error, Result};

const SCHEMA: &str = include_str!("../../../sql/state.sql");

/// The version of `sql/state.sql` this build writes (`PRAGMA user_version`).
/// A store of a later version is refused: an older build must not write it.
/// A change to the schema raises it and migrates older stores on open.
/// 2: leases per table (`table_leases`) instead of per pipeline.
/// 3: the bytes a batch's warehouse jobs processed and billed.
const SCHEMA_VERSION: i64 = 3;

/// Columns added by a schema version, added to an older store when it is
/// opened: (table, column, declaration).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("batches", "bytes_processed", "INTEGER"),
    ("batches", "bytes_billed", "INTEGER"),
];

/// SQLite state of one pipeline.
pub struct SqliteStore {
    pipeline: String,
    path: PathBuf,
    id: String,
    conn: Mutex<Connection>,
    /// The fencing tokens of the tables' leases this store took.
    fences: Fences,
}

pub(super) fn now() -> String {
    stamp(Utc::now())
}

pub(super) use super::parse_stamp;

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
            fences: Fences::default(),
        };
        store.with(
            |c| {
                c.busy_timeout(std::time::Duration::from_secs(30))?;
                // Processes opening a new file at once: a statement that read
                // the schema and must then write it gets SQLITE_BUSY at once
                // when another wrote first (the busy handler is not called,
                // as waiting could deadlock), so the schema is tried again.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    match c.execute_batch(SCHEMA) {
                        Err(e)
                            if matches!(
                                e.sqlite_error_code(),
                                Some(
                                    rusqlite::ErrorCode::DatabaseBusy
                                        | rusqlite::ErrorCode::DatabaseLocked
                                )
                            ) && std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        done => return done,
                    }
                }
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
                if version < SCHEMA_VERSION {
                    for (table, column, declaration) in ADDED_COLUMNS {
                        if !column_names(c, table)?.iter().any(|have| have == column) {
                            c.execute_batch(&format!(
                                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
                            ))?;
                        }
                    }
                }
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

    /// Runs the write `f` to `table` in one transaction, if this store holds
    /// no lease on `table` or its fencing token is still the table's (see
    /// [`super::Leases`]); refuses it with [`Error::LeaseLost`] otherwise.
    fn write<T>(
        &self,
        table: &str,
        context: &str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let fence = self.fences.of(table);
        self.with(
            |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                if let Some(fence) = fence {
                    let holder: Option<i64> = tx
                        .query_row(
                            "SELECT token FROM table_leases WHERE pipeline = ?1 AND tbl = ?2",
                            params![self.pipeline, table],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if holder != Some(fence) {
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

    /// A store of version 1 (one lease per pipeline) moves to version 2 when
    /// opened, and its pipeline lease table is dropped: a version-1 process
    /// still running then fails rather than running beside this one.
    #[test]
    fn a_version_1_store_moves_to_version_3_without_the_pipeline_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        drop(SqliteStore::open(&path, "p").unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE leases (pipeline TEXT PRIMARY KEY, owner TEXT NOT NULL, \
                 acquired_at TEXT NOT NULL, expires_at TEXT NOT NULL);
                 INSERT INTO leases VALUES ('p', 'old:1:0', '2026-01-01', '2999-01-01');
                 ALTER TABLE batches DROP COLUMN bytes_processed;
                 ALTER TABLE batches DROP COLUMN bytes_billed;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        drop(SqliteStore::open(&path, "p").unwrap());
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3);
        let batches = column_names(&conn, "batches").unwrap();
        assert!(batches.contains(&"bytes_billed".to_string()), "{batches:?}");
        assert!(!table_names(&conn).unwrap().contains(&"leases".to_string()));
        assert!(
            table_names(&conn)
                .unwrap()
                .contains(&"table_leases".to_string())
        );
    }

    #[test]
    fn batch_id_depends_on_etags() {
        use crate::state::Batch;
        let obj = |key: &str| ObjectRef {
            key: key.into(),
            etag: "e".into(),
            size: 1,
            last_modified: chrono::DateTime::default(),
        };
        let a = Batch::id_of("p", "t", &[obj("a")]);
        let mut changed = obj("a");
        changed.etag = "f".into();
        assert_ne!(a, Batch::id_of("p", "t", &[changed]));
        assert_eq!(a, Batch::id_of("p", "t", &[obj("a")]));
    }
}
