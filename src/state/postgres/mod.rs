//! [`super::StateStore`] in a PostgreSQL database that many pipelines and
//! processes share (`[state] url = "postgres://…"`): the store, its
//! connection and its schema here; one file per concern (`manifest.rs`,
//! `runs.rs`, `lease.rs`), as in `state/sqlite/`.
//!
//! The tables are `sql/state_postgres.sql`'s, in the schema `cdcflow`,
//! keyed by pipeline. Every method is one statement or one transaction, so
//! the contract of each trait holds across processes as it does in SQLite;
//! leases are taken in one statement and timed by the server's clock.
//!
//! The traits are blocking (as SQLite is) and callers are often async: each
//! call runs the blocking client on a scoped thread of its own, never on a
//! runtime's worker, and the client (which owns a small runtime) is also
//! dropped there. A lost connection is an error the caller retries
//! (`Error::StateServer`, `RetryPolicy::Retry`); the next call connects
//! again.

use std::sync::Mutex;

use postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

mod lease;
mod manifest;
mod runs;

use super::Fences;
use crate::error::{Error, Result, postgres_connection_lost};
use crate::tls::{Tls, redact_url};

const SCHEMA: &str = include_str!("../../../sql/state_postgres.sql");

/// The version of `sql/state_postgres.sql` this build writes. A database of
/// a later version is refused: an older build must not write it. 2: leases
/// per table (`table_leases`) instead of per pipeline. 3: the bytes a
/// batch's warehouse jobs processed and billed (`batches.bytes_*`).
const SCHEMA_VERSION: i32 = 3;

/// The state sessions' settings unless the URL's `options` give others.
const SESSION_OPTIONS: &str = "-c lock_timeout=30s -c idle_in_transaction_session_timeout=300s";

/// Every process opening a store runs the schema under this advisory lock,
/// so that two creating it at once do not collide.
const SCHEMA_LOCK: i64 = 0x0cdc_f10e;

/// PostgreSQL state of one pipeline.
pub struct PostgresStore {
    pipeline: String,
    /// The URL without its password, for messages.
    url: String,
    id: String,
    config: postgres::Config,
    tls: MakeRustlsConnect,
    /// The session; `None` until the first call and after a lost connection.
    conn: Mutex<Option<Client>>,
    /// The fencing tokens of the tables' leases this store took.
    fences: Fences,
}

impl PostgresStore {
    /// Connects to `url` (its TLS parameters already taken out into `tls`;
    /// the password from the environment variable `password_env` when the
    /// URL has none), creates the schema when missing, refuses a newer one,
    /// and reads or makes the store id of `pipeline`.
    pub fn open(url: &str, tls: &Tls, password_env: &str, pipeline: &str) -> Result<Self> {
        let shown = redact_url(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| Error::Config {
            path: "[state]".into(),
            problems: vec![format!("`state.url` {shown}: {e}")],
        })?;
        if config.get_password().is_none()
            && let Ok(password) = std::env::var(password_env)
        {
            config.password(password);
        }
        if config.get_options().is_none() {
            // No state call waits long on a lock another session holds (it
            // fails, and the run retries it), and a session that stops in
            // a transaction (a paused or partitioned worker) does not hold
            // its locks for ever. A URL's own `options` replace these.
            config.options(SESSION_OPTIONS);
        }
        config
            .application_name("cdcflow")
            .connect_timeout(std::time::Duration::from_secs(10))
            .keepalives_idle(std::time::Duration::from_secs(30));
        let tls = tls.postgres(&mut config)?;
        let mut store = PostgresStore {
            pipeline: pipeline.to_string(),
            url: shown,
            id: String::new(),
            config: config.into(),
            tls,
            conn: Mutex::new(None),
            fences: Fences::default(),
        };
        let version = store.with("creating the schema", |c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
            tx.batch_execute(SCHEMA)?;
            let version: i32 = tx
                .query_one(
                    "INSERT INTO cdcflow.schema_version (version) VALUES ($1)
                 ON CONFLICT (one) DO UPDATE
                   SET version = GREATEST(cdcflow.schema_version.version, excluded.version)
                 RETURNING version",
                    &[&SCHEMA_VERSION],
                )?
                .get(0);
            tx.commit()?;
            Ok(version)
        })?;
        if version > SCHEMA_VERSION {
            return Err(Error::Usage(format!(
                "state store {} has schema version {version}, written by a newer cdcflow (this \
                 one knows {SCHEMA_VERSION}): run that version or a later one",
                store.url
            )));
        }
        store.id = store.with("reading the store id", |c| {
            let p = &store.pipeline;
            c.execute(
                "INSERT INTO cdcflow.store (pipeline, store_id) VALUES ($1, $2)
                 ON CONFLICT (pipeline) DO NOTHING",
                &[p, &uuid::Uuid::new_v4().simple().to_string()],
            )?;
            Ok(c.query_one(
                "SELECT store_id FROM cdcflow.store WHERE pipeline = $1",
                &[p],
            )?
            .get(0))
        })?;
        tracing::info!(url = %store.url, pipeline, "opened the PostgreSQL state store");
        Ok(store)
    }

    /// Runs the write `f` to `table` in one transaction, if this store holds
    /// no lease on `table` or its fencing token is still the table's (see
    /// [`crate::state::Leases`]); refuses it with [`Error::LeaseLost`]
    /// otherwise. The lease's row is locked `FOR SHARE` until the commit: a
    /// take-over waits for the write.
    fn write<T: Send>(
        &self,
        table: &str,
        context: &str,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> std::result::Result<T, postgres::Error> + Send,
    ) -> Result<T> {
        let fence = self.fences.of(table);
        self.with(context, |c| {
            let mut tx = c.transaction()?;
            if let Some(fence) = fence {
                let holder: Option<i64> = tx
                    .query_opt(
                        "SELECT token FROM cdcflow.table_leases
                         WHERE pipeline = $1 AND tbl = $2 FOR SHARE",
                        &[&self.pipeline, &table],
                    )?
                    .map(|r| r.get(0));
                if holder != Some(fence) {
                    return Ok(None);
                }
            }
            let value = f(&mut tx)?;
            tx.commit()?;
            Ok(Some(value))
        })?
        .ok_or_else(|| Error::LeaseLost {
            pipeline: self.pipeline.clone(),
        })
    }

    /// Runs `f` on the session (connecting first when there is none) on a
    /// thread of its own; `context` names what was being done in an error.
    fn with<T: Send>(
        &self,
        context: &str,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error> + Send,
    ) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let slot: &mut Option<Client> = &mut guard;
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if slot.as_ref().is_none_or(Client::is_closed) {
                        *slot = None;
                        *slot = Some(self.config.connect(self.tls.clone())?);
                    }
                    let result = f(slot.as_mut().expect("connected above"));
                    if let Err(e) = &result
                        && postgres_connection_lost(e)
                    {
                        // Dropped here, off any async runtime: the next call reconnects.
                        *slot = None;
                    }
                    result
                })
                .join()
        });
        outcome
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .map_err(|source| Error::StateServer {
                url: self.url.clone(),
                context: context.to_string(),
                source,
            })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The client owns a runtime, which may not be dropped inside another
        // (a store is often dropped by async code).
        let client = self.conn.get_mut().map(Option::take).ok().flatten();
        if client.is_some() {
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}
