//! Capture from MySQL / MariaDB: a full load under a consistent snapshot,
//! then the row binlog from the snapshot's position.
//!
//! **Snapshot.** MariaDB: `START TRANSACTION WITH CONSISTENT SNAPSHOT` and the
//! binlog position of that snapshot (`binlog_snapshot_file/position`), no
//! lock. MySQL: a brief `FLUSH TABLES WITH READ LOCK` while the snapshot
//! starts and `SHOW MASTER STATUS` is read. The tables are read in that one
//! transaction, and the binlog is read from that position.
//!
//! **Position.** The checkpoint keeps the binlog file and position after the
//! last transaction whose rows are in objects, and on MariaDB its GTID
//! (`domain-server-seq`). A restart resumes by GTID where there is one (it
//! survives binlog rotation and purges of older files), else by file and
//! position. The checkpoint is written only after the objects (see
//! [`super::sink`]), so a kill -9 loses and doubles nothing.
//!
//! **Rows.** v1 (MariaDB) and v2 (MySQL 8) row events with before and after
//! images. An UPDATE of the primary key is a delete then an insert, as for
//! PostgreSQL. DDL (a Query event with ALTER/CREATE/DROP/RENAME/TRUNCATE)
//! refreshes the table's columns: a new schema version. TRUNCATE is a `T` row.
//!
//! Files (see `capture::source` for the roles): `connect.rs`, `snapshot.rs`,
//! `stream.rs`, `types.rs`, and `rows.rs` (row images decoded into values).

mod connect;
mod rows;
mod snapshot;
mod stream;
mod types;

use std::collections::HashMap;

use mysql_async::{Conn, Opts};

use super::sink::Sink;
use super::source::{ChangeSource, Chunk, FullLoad, Lag};
use crate::error::Result;
use crate::shutdown::Shutdown;
pub use stream::Position;
use stream::Reader;
use types::Table;

/// Settings of a MySQL / MariaDB source.
#[derive(Debug, Clone)]
pub struct MySettings {
    /// `mysql://user:password@host:port/database` (the database is the schema
    /// captured), without its TLS parameters.
    pub url: String,
    /// TLS (from the URL's `ssl-mode` and `ssl-ca`).
    pub tls: crate::tls::Tls,
    /// Server id this reader registers with (unique among the server's replicas).
    pub server_id: u32,
    /// Changes per chunk (whole transactions stay together).
    pub max_changes: usize,
    /// Sessions copying tables (and key ranges of large ones) at once
    /// during the full load, all on one snapshot.
    pub parallel_load: usize,
}

/// A connected MySQL / MariaDB source.
pub struct MySource {
    settings: MySettings,
    opts: Opts,
    conn: Conn,
    mariadb: bool,
    database: String,
    tables: HashMap<String, Table>,
    /// The binlog, once streaming started.
    reader: Option<Reader>,
}

#[async_trait::async_trait]
impl ChangeSource for MySource {
    async fn full_load(&mut self, sink: &mut Sink) -> Result<FullLoad> {
        let (position, rows) = self.load(sink).await?;
        Ok(FullLoad {
            state: serde_json::to_value(&position).expect("a position serializes"),
            position: Some(serde_json::to_string(&position).expect("a position serializes")),
            rows,
        })
    }

    async fn start(&mut self, sink: &mut Sink, once: bool) -> Result<()> {
        let from = match sink_position(sink) {
            Some(from) => from,
            None => {
                // CDC only, first run: from now on; recorded before anything is read.
                let now = self.current_position().await?;
                sink.confirm(serde_json::to_string(&now).expect("a position serializes"))
                    .await?;
                now
            }
        };
        self.reader = Some(self.open_stream(from, once).await?);
        Ok(())
    }

    async fn next_chunk(&mut self, sink: &mut Sink, stop: &Shutdown) -> Result<Chunk> {
        let mut reader = self.reader.take().expect("start comes before next_chunk");
        let chunk = self.read_chunk(&mut reader, sink, stop).await;
        self.reader = Some(reader);
        chunk
    }

    async fn confirm(&mut self, _sink: &mut Sink, position: &str) -> Result<()> {
        let reader = self.reader.as_mut().expect("start comes before confirm");
        reader.confirmed = serde_json::from_str(position).ok();
        Ok(())
    }

    async fn lag(&mut self, sink: &Sink) -> Result<Lag> {
        let server = self.current_position().await?;
        Ok(match sink_position(sink) {
            None => Lag {
                bytes: None,
                text: "no position yet (capture has not run)".to_string(),
            },
            Some(at) if at.file == server.file => {
                let bytes = server.pos.saturating_sub(at.pos);
                Lag {
                    bytes: Some(bytes),
                    text: format!(
                        "binlog {}:{}, server at {}:{}, behind by {bytes} bytes",
                        at.file, at.pos, server.file, server.pos
                    ),
                }
            }
            Some(at) => Lag {
                bytes: None,
                text: format!(
                    "binlog {}:{}, server at {}:{}: behind by at least one binlog file",
                    at.file, at.pos, server.file, server.pos
                ),
            },
        })
    }
}

/// The confirmed position in the checkpoint.
fn sink_position(sink: &Sink) -> Option<Position> {
    sink.checkpoint
        .position
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
}
