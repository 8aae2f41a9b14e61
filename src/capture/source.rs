//! The seam between a database and the objects: [`ChangeSource`], and the one
//! driver loop ([`drive`]) that writes and confirms its chunks. "Confirm only
//! after the objects are durable, and only at a transaction boundary" lives
//! here, once, for every source (ARCHITECTURE §4).
//!
//! A source lives in a folder of its own with fixed file roles: `connect.rs`
//! (sessions, TLS, what the server must be set to), `snapshot.rs` (the full
//! load), `stream.rs` (the change stream), `types.rs` (column types and the
//! text form of values).

use std::time::{Duration, Instant};

use super::Mode;
use super::sink::Sink;
use crate::error::Result;
use crate::shutdown::Shutdown;

/// One value of a change or a loaded row, as a source gives it to the sink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOAST value the server did not send (PostgreSQL).
    Unchanged,
    /// The value in PostgreSQL's text output form (MySQL values are turned
    /// into it), so one set of parsers serves every source.
    Text(&'a str),
}

/// What [`ChangeSource::next_chunk`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// Whole transactions were given to the sink (perhaps none of a selected
    /// table); the position just after the last of them, in the form the
    /// checkpoint keeps (and [`ChangeSource::confirm`] reads back).
    Ready(String),
    /// Nothing new yet: the driver waits `target.interval` and asks again.
    Idle,
    /// The end: `--once` reached the position the server was at when it
    /// started, or a stop was requested at a transaction boundary.
    End,
}

/// What a full load leaves for the checkpoint.
pub struct FullLoad {
    /// What the change stream needs to know of the snapshot (kept as the
    /// checkpoint's `full_load`; its presence means the load is done).
    pub state: serde_json::Value,
    /// The position streaming starts from, where the source keeps it in the
    /// checkpoint (MySQL); `None` where the server keeps it (a slot).
    pub position: Option<String>,
    /// Rows copied.
    pub rows: u64,
}

/// A database capture reads: PostgreSQL (`postgres/`) or MySQL / MariaDB
/// (`mysql/`).
///
/// Contract, as [`drive`] calls it:
/// 1. [`full_load`](ChangeSource::full_load) at most once per capture (until
///    its state is in the checkpoint): every selected table from one
///    consistent snapshot, as LOAD objects, and what the stream needs to
///    neither miss nor repeat a change across the snapshot.
/// 2. [`start`](ChangeSource::start): the stream begins at the checkpoint's
///    position (a first CDC-only run: at the server's position now, saved
///    before anything is read); with `once` it ends at the server's
///    position now.
/// 3. [`next_chunk`](ChangeSource::next_chunk): gives the sink whole
///    transactions in commit order, every change with a sequence above all
///    before it, each table declared (`Sink::table`) before its rows and
///    again when its columns change. It returns only at a transaction
///    boundary. Inside a transaction it may call `Sink::spill_if_full`,
///    never `Sink::commit` or `Sink::confirm`.
/// 4. [`confirm`](ChangeSource::confirm): called once the chunk's objects
///    are durable; the source tells the server (a slot advance), then the
///    driver saves the position in the checkpoint. A crash before that
///    makes the next run read the chunk again, with the same sequences,
///    and the sink drops what is already written.
///
/// A lost connection is `Error::SourceLost` (the run restarts from the
/// checkpoint); anything else the server refuses is `Error::Capture`.
#[async_trait::async_trait]
pub trait ChangeSource: Send {
    /// Copies every selected table (see the trait's contract, step 1).
    async fn full_load(&mut self, sink: &mut Sink) -> Result<FullLoad>;

    /// Where the stream starts and, with `once`, ends (step 2).
    async fn start(&mut self, sink: &mut Sink, once: bool) -> Result<()>;

    /// The next whole transactions (step 3). Returns at a boundary once
    /// `stop` is requested.
    async fn next_chunk(&mut self, sink: &mut Sink, stop: &Shutdown) -> Result<Chunk>;

    /// Everything up to `position` is in durable objects (step 4).
    async fn confirm(&mut self, sink: &mut Sink, position: &str) -> Result<()>;

    /// How far the checkpoint is behind the server (`status`, `/metrics`).
    async fn lag(&mut self, sink: &Sink) -> Result<Lag>;
}

/// How far a capture's checkpoint is behind its server.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// Bytes of WAL or binlog the server wrote past the checkpoint, where
    /// the server can tell (a slot that exists; a binlog position in the
    /// server's current file).
    pub bytes: Option<u64>,
    /// What an operator reads.
    pub text: String,
}

/// Runs capture over `source`: the full load when `mode` asks for it and the
/// checkpoint has none, then chunks until the end (`once`) or `stop`: each
/// written (`Sink::commit`), then confirmed to the source, then to the
/// checkpoint. Returns the rows written.
pub async fn drive(
    source: &mut dyn ChangeSource,
    sink: &mut Sink,
    mode: Mode,
    once: bool,
    stop: &Shutdown,
    interval: Duration,
) -> Result<u64> {
    let mut loaded = 0;
    if mode != Mode::Cdc && sink.checkpoint.full_load.is_none() {
        let load = source.full_load(sink).await?;
        loaded = load.rows;
        sink.write_schema_files().await?;
        sink.checkpoint.full_load = Some(load.state);
        match load.position {
            Some(position) => sink.confirm(position).await?,
            None => sink.save().await?,
        }
    }
    if mode == Mode::FullLoad {
        return Ok(loaded);
    }
    source.start(sink, once).await?;
    let started = Instant::now();
    while !stop.requested() {
        let before = sink.rows();
        match source.next_chunk(sink, stop).await? {
            Chunk::End => break,
            Chunk::Idle => stop.sleep(interval).await,
            Chunk::Ready(position) => {
                if sink.has_rows() {
                    let objects = sink.commit().await?;
                    tracing::info!(%position, rows = sink.rows() - before, objects, "changes written");
                }
                crate::failpoint::hit("capture.before_confirm");
                source.confirm(sink, &position).await?;
                sink.confirm(position).await?;
            }
        }
    }
    tracing::info!(
        rows = sink.rows(),
        seconds = started.elapsed().as_secs_f64(),
        "capture stopped"
    );
    Ok(loaded + sink.rows())
}
