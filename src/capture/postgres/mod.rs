//! Capture from PostgreSQL: a full load under a snapshot, then the changes of
//! a logical replication slot (pgoutput), read by SQL polling.
//!
//! **Why SQL polling.** `pg_logical_slot_peek_binary_changes` decodes the
//! slot in the server and returns whole transactions; after their objects are
//! written, `pg_replication_slot_advance` confirms them. The slot therefore
//! keeps every change that is not yet in an object, with no replication
//! connection (the crates.io PostgreSQL clients have no replication mode).
//! Keepalives and standby status updates belong to the streaming protocol and
//! are not needed: the slot's position is what the server keeps.
//!
//! **Full load without gap or duplicate.** The slot is created first. The
//! full load then reads every table under one exported snapshot taken after
//! it; a transaction the slot streams is skipped when that snapshot already
//! saw it (its xid is below the snapshot's xmin, or below xmax and not in
//! progress). So each change is either in a LOAD object or in a CDC object.
//!
//! **Rows.** An UPDATE of the primary key is written as a delete of the old
//! key then an insert of the new one. TRUNCATE is written as an `Op` `T` row
//! (all columns NULL). An unchanged TOAST value (not sent by the server) is
//! taken from the old row under REPLICA IDENTITY FULL; under DEFAULT it is
//! not known, and capture stops rather than write a NULL over real data.
//!
//! Files (see `capture::source` for the roles): `connect.rs`, `snapshot.rs`,
//! `stream.rs`, `types.rs`, and `pgoutput.rs` (the protocol decoder).

mod connect;
mod copy;
pub mod pgoutput;
mod snapshot;
mod stream;
mod types;

use tokio_postgres::Client;

use super::sink::Sink;
use super::source::{ChangeSource, Chunk, FullLoad, Lag};
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
pub use snapshot::Snapshot;
use stream::Relations;

/// Settings of a PostgreSQL source.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// Connection URL (`postgres://user@host:port/db`), without its TLS parameters.
    pub url: String,
    /// TLS (from the URL's `sslmode` and `sslrootcert`).
    pub tls: crate::tls::Tls,
    /// Publication (created for the selected tables when missing).
    pub publication: String,
    /// Replication slot (created when missing).
    pub slot: String,
    /// Changes per poll at most (whole transactions are kept together).
    pub max_changes: i32,
    /// Tables loaded at once during the full load.
    pub parallel_load: usize,
}

/// A connected PostgreSQL source.
pub struct PgSource {
    settings: PgSettings,
    client: Client,
    /// A second session for catalog lookups while `client` streams the slot.
    catalog: Client,
    /// The full load's snapshot, whose transactions the stream skips.
    seen: Option<Snapshot>,
    /// The stream has passed the snapshot (see [`Snapshot::passed`]).
    passed: bool,
    /// With `--once`: the WAL position to stop at.
    end: Option<u64>,
    /// The relations of the stream so far.
    relations: Relations,
}

impl PgSource {
    /// Connects, checks the server, creates the publication and slot when
    /// missing, and waits until no other session holds the slot.
    pub async fn open(settings: PgSettings, sink: &Sink) -> Result<PgSource> {
        let source = PgSource::connect(settings).await?;
        source.prepare(sink).await?;
        source.wait_for_slot().await?;
        Ok(source)
    }
}

#[async_trait::async_trait]
impl ChangeSource for PgSource {
    async fn full_load(&mut self, sink: &mut Sink) -> Result<FullLoad> {
        let (snapshot, rows) = self.load(sink).await?;
        Ok(FullLoad {
            state: serde_json::to_value(&snapshot).expect("a snapshot serializes"),
            position: None,
            rows,
        })
    }

    async fn start(&mut self, sink: &mut Sink, once: bool) -> Result<()> {
        self.seen = sink
            .checkpoint
            .full_load
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        self.passed = self.seen.as_ref().is_some_and(|s| s.passed);
        self.end = match once {
            true => Some(self.current_end().await?),
            false => None,
        };
        Ok(())
    }

    async fn next_chunk(&mut self, sink: &mut Sink, _stop: &Shutdown) -> Result<Chunk> {
        Ok(match self.poll(sink).await? {
            Some(lsn) => Chunk::Ready(pgoutput::format_lsn(lsn)),
            None if self.end.is_some() => Chunk::End,
            None => Chunk::Idle,
        })
    }

    async fn confirm(&mut self, sink: &mut Sink, position: &str) -> Result<()> {
        let lsn = pgoutput::parse_lsn(position)
            .ok_or_else(|| Error::capture("confirming a position", position.to_string()))?;
        self.advance_slot(lsn).await?;
        if let Some(snapshot) = self.seen.as_mut().filter(|s| self.passed && !s.passed) {
            // Saved with the position: a transaction after the snapshot is
            // confirmed, so the snapshot filters nothing any more.
            snapshot.passed = true;
            sink.checkpoint.full_load =
                Some(serde_json::to_value(&*snapshot).expect("a snapshot serializes"));
        }
        Ok(())
    }

    async fn lag(&mut self, _sink: &Sink) -> Result<Lag> {
        let lag = self.slot_lag().await?;
        Ok(Lag {
            bytes: lag.as_ref().map(|(_, _, bytes)| (*bytes).max(0) as u64),
            text: stream::describe_lag(lag, &self.settings.slot),
        })
    }
}
