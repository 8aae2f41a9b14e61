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

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt, pin_mut};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::mapping::{SourceColumn, SourceTable};
use super::pgoutput::{self, Message, PG_EPOCH_MICROS, Relation, Value, format_lsn, parse_lsn};
use super::sink::Sink;
use super::writer::LoadWriter;
use crate::config::SqlType;
use crate::decode::Op;
use crate::error::{Error, Result};

/// What to capture (DMS migration types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Mode {
    /// Only the tables' current rows.
    #[serde(rename = "full-load")]
    FullLoad,
    /// Only changes from the slot's creation on.
    #[serde(rename = "cdc")]
    Cdc,
    /// The current rows, then every change after them.
    #[default]
    #[serde(rename = "full-load-and-cdc")]
    FullLoadAndCdc,
}

/// Settings of a PostgreSQL source.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// Connection URL (`postgres://user@host:port/db`), without its TLS parameters.
    pub url: String,
    /// TLS (from the URL's `sslmode` and `sslrootcert`).
    pub tls: super::tls::Tls,
    /// Publication (created for the selected tables when missing).
    pub publication: String,
    /// Replication slot (created when missing).
    pub slot: String,
    /// Full load, CDC or both.
    pub mode: Mode,
    /// Changes per poll at most (whole transactions are kept together).
    pub max_changes: i32,
    /// Tables loaded at once during the full load.
    pub parallel_load: usize,
}

fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let context = context.into();
    move |e| {
        let lost = connection_lost(&e);
        let message = match e.as_db_error() {
            Some(db) => format!(
                "{}{}",
                db.message(),
                db.hint()
                    .map(|h| format!(" (hint: {h})"))
                    .unwrap_or_default()
            ),
            // The cause (a TLS handshake's, an I/O error) is not in the text.
            None => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    let cause_text = cause.to_string();
                    if !text.contains(&cause_text) {
                        text = format!("{text}: {cause_text}");
                    }
                    source = cause.source();
                }
                text
            }
        };
        if lost {
            Error::SourceLost { context, message }
        } else {
            Error::capture(context, message)
        }
    }
}

/// Whether `e` is the connection failing (refused, reset, closed; the
/// server shutting down or not accepting connections yet) rather than the
/// server refusing what was asked.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 57P01-03: admin or crash shutdown, cannot
        // connect now (starting up, recovering); 53300: too many connections.
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    let text = e.to_string();
    e.is_closed()
        || text.starts_with("error connecting to server")
        || text.starts_with("error communicating with the server")
}

/// The SQL type a column of `oid` (with its type modifier) is written as.
/// Types without an exact Arrow counterpart (numeric without precision,
/// arrays, intervals, ranges, enums…) are written as their text form.
pub(crate) fn sql_type(oid: u32, typmod: i32) -> SqlType {
    match oid {
        16 => SqlType::Boolean,
        17 => SqlType::Bytes,
        20 => SqlType::BigInt,
        21 => SqlType::SmallInt,
        23 => SqlType::Integer,
        26 => SqlType::BigInt,
        700 => SqlType::Real,
        701 => SqlType::Double,
        114 | 3802 => SqlType::Json,
        1082 => SqlType::Date,
        1114 => SqlType::Timestamp,
        1184 => SqlType::TimestampTz,
        2950 => SqlType::Uuid,
        1700 if typmod >= 4 => {
            let precision = ((typmod - 4) >> 16) & 0xffff;
            let scale = (typmod - 4) & 0xffff;
            if (1..=38).contains(&precision) && scale <= precision {
                SqlType::Decimal {
                    precision: precision as u8,
                    scale: scale as i8,
                }
            } else {
                SqlType::Text
            }
        }
        _ => SqlType::Text,
    }
}

/// The same table with the same columns and types (key flags aside: they
/// come from the catalog).
fn same_shape(a: &Relation, b: &Relation) -> bool {
    (&a.schema, &a.name, a.replica_identity) == (&b.schema, &b.name, b.replica_identity)
        && a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            (&x.name, x.type_oid, x.type_modifier) == (&y.name, y.type_oid, y.type_modifier)
        })
}

/// The table of `rel`, with what the catalog says of its columns beside
/// the Relation message: `facts` (see [`PgSource::column_facts`]).
fn source_table(rel: &Relation, facts: &HashMap<String, (Option<String>, bool)>) -> SourceTable {
    SourceTable {
        schema: rel.schema.clone(),
        name: rel.name.clone(),
        columns: rel
            .columns
            .iter()
            .map(|c| {
                let (existing, not_null) = facts.get(&c.name).cloned().unwrap_or_default();
                SourceColumn {
                    name: c.name.clone(),
                    sql_type: sql_type(c.type_oid, c.type_modifier),
                    key: c.key,
                    existing,
                    not_null,
                }
            })
            .collect(),
    }
}

/// The visibility of the full load's snapshot (`pg_current_snapshot()`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Oldest transaction still running.
    pub xmin: u64,
    /// First transaction not yet started.
    pub xmax: u64,
    /// Transactions running at the snapshot.
    pub running: Vec<u64>,
    /// The stream has passed the snapshot: a transaction it did not see
    /// was captured and confirmed, so no later one can have been seen.
    #[serde(default)]
    pub passed: bool,
}

impl Snapshot {
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => vec![],
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            running,
            passed: false,
        })
    }

    /// Whether the full load saw the effects of transaction `xid` (32 bits,
    /// widened to the 64-bit xid nearest `xmax`, so a transaction just after
    /// the 32-bit wrap is after the snapshot, not 2^32 before it).
    ///
    /// Only meaningful for the first transactions the slot decodes: the
    /// snapshot saw those that committed before it, and they come first in
    /// commit order. Once one it did not see is captured, the stream has
    /// passed it ([`Snapshot::passed`]) and nothing is filtered any more; a
    /// 32-bit xid cannot be placed after 2^31 further transactions anyway.
    pub fn saw(&self, xid: u32) -> bool {
        const HALF: u64 = 1 << 31;
        let epoch = self.xmax & !0xFFFF_FFFF;
        let mut full = epoch | u64::from(xid);
        if full > self.xmax + HALF {
            full = full.saturating_sub(1 << 32);
        } else if full + HALF < self.xmax {
            full += 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.running.contains(&full))
    }
}

/// Whether transaction `xid` (in commit order) was seen by the full load's
/// snapshot `seen`, so that its changes are already loaded. The seen ones
/// come first; the first one not seen sets `passed`, and after it nothing
/// is (see [`Snapshot::saw`]).
fn seen_by_full_load(seen: Option<&Snapshot>, passed: &mut bool, xid: u32) -> bool {
    let skip = !*passed && seen.is_some_and(|snap| snap.saw(xid));
    *passed |= !skip;
    skip
}

/// An error unless `values` has one value per column of `relation` (the
/// server sends them so; anything else is a malformed message, which must
/// not be indexed past its end).
fn check_width(relation: &Relation, values: &[Value<'_>], at: &str) -> Result<()> {
    if values.len() == relation.columns.len() {
        return Ok(());
    }
    Err(Error::capture(
        at,
        format!(
            "a row of {} values for a table of {} columns ({}): the Relation message and the \
             change disagree; recreate the slot with a full load if this repeats",
            values.len(),
            relation.columns.len(),
            relation
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// The rows an UPDATE becomes: one update, or a delete of the old key and
/// an insert of the new one when the key changed; unchanged TOAST values
/// are taken from the old row (REPLICA IDENTITY FULL), never written as NULL.
fn update_rows<'a>(
    relation: &Relation,
    at: &str,
    old: Option<Vec<Value<'a>>>,
    mut new: Vec<Value<'a>>,
) -> Result<Vec<(Op, Vec<Value<'a>>)>> {
    check_width(relation, &new, at)?;
    if let Some(old) = &old {
        check_width(relation, old, at)?;
    }
    let key_changed = match (&old, relation.replica_identity) {
        (None, _) => false,
        (Some(_), b'd' | b'i') => true,
        (Some(old), _) => relation
            .columns
            .iter()
            .enumerate()
            .any(|(i, c)| c.key && old[i] != new[i]),
    };
    for (i, v) in new.iter_mut().enumerate() {
        if *v == Value::Unchanged {
            match old.as_ref().map(|o| o[i]) {
                Some(Value::Text(t)) => *v = Value::Text(t),
                Some(Value::Null) => *v = Value::Null,
                _ => {
                    let id = format!("{}.{}", relation.schema, relation.name);
                    return Err(Error::capture(
                        at,
                        format!(
                            "the server did not send the unchanged TOAST value of column {:?} \
                             (REPLICA IDENTITY DEFAULT) and cdcflow never writes it as NULL; \
                             run `ALTER TABLE {id} REPLICA IDENTITY FULL` so later changes \
                             carry it, and recreate the slot with a full load",
                            relation.columns[i].name
                        ),
                    ));
                }
            }
        }
    }
    Ok(match old {
        Some(old) if key_changed => vec![(Op::Delete, old), (Op::Insert, new)],
        _ => vec![(Op::Update, new)],
    })
}

/// A connected PostgreSQL source.
pub struct PgSource {
    settings: PgSettings,
    client: Client,
    /// A second session for catalog lookups while `client` streams the slot.
    catalog: Client,
}

impl PgSource {
    /// Connects and sets the session so values come out in one text form
    /// (UTC timestamps, ISO dates, hex bytea, exact floats).
    pub async fn connect(settings: PgSettings) -> Result<PgSource> {
        let client = connect(&settings).await?;
        let catalog = connect(&settings).await?;
        Ok(PgSource {
            settings,
            client,
            catalog,
        })
    }

    /// Checks `wal_level` and creates the publication and slot when missing.
    /// Returns whether the slot was created now.
    pub async fn prepare(&self, sink: &Sink) -> Result<bool> {
        let c = &self.client;
        let level: String = c
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(pg("reading wal_level"))?
            .get(0);
        if level != "logical" {
            return Err(Error::capture(
                "checking the server",
                format!(
                    "wal_level is {level}; logical replication needs wal_level = logical \
                     (postgresql.conf, then restart; on RDS set rds.logical_replication = 1)"
                ),
            ));
        }
        let s = &self.settings;
        let has_pub = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&s.publication],
            )
            .await
            .map_err(pg("looking up the publication"))?
            .is_some();
        if !has_pub {
            let tables = c
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_tables \
                     WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
                    &[],
                )
                .await
                .map_err(pg("listing tables"))?;
            let selected: Vec<String> = tables
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .filter(|(sch, t)| sink.mapping().selects(sch, t))
                .map(|(sch, t)| format!("{}.{}", quote(&sch), quote(&t)))
                .collect();
            if selected.is_empty() {
                return Err(Error::capture(
                    "creating the publication",
                    "no table matches the selection rules",
                ));
            }
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote(&s.publication),
                selected.join(", ")
            );
            c.batch_execute(&sql)
                .await
                .map_err(pg(format!("creating publication {}", s.publication)))?;
            tracing::info!(publication = %s.publication, tables = selected.len(), "created the publication");
        }
        let has_slot = c
            .query_opt(
                "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot],
            )
            .await
            .map_err(pg("looking up the slot"))?;
        match has_slot {
            Some(row) => {
                let plugin: Option<String> = row.get(0);
                if plugin.as_deref() != Some("pgoutput") {
                    return Err(Error::capture(
                        format!("slot {}", s.slot),
                        format!(
                            "it uses plugin {plugin:?}; cdcflow needs a pgoutput slot: choose another `slot` name"
                        ),
                    ));
                }
                Ok(false)
            }
            None => {
                c.query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&s.slot],
                )
                .await
                .map_err(pg(format!("creating slot {}", s.slot)))?;
                tracing::info!(slot = %s.slot, "created the replication slot");
                Ok(true)
            }
        }
    }

    /// Waits until no other session uses the slot: after a crash the old
    /// session can hold it for a moment; a live one is another capture.
    pub async fn wait_for_slot(&self) -> Result<()> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        let started = std::time::Instant::now();
        loop {
            let pid: Option<i32> = self
                .catalog
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&self.settings.slot],
                )
                .await
                .map_err(pg("reading the slot"))?
                .map(|r| r.get(0));
            let Some(pid) = pid else { return Ok(()) };
            if started.elapsed() > WAIT {
                return Err(Error::capture(
                    format!("slot {}", self.settings.slot),
                    format!(
                        "in use by server process {pid} for {} s: another capture runs on this slot \
                         (one process per slot), or stop that session with pg_terminate_backend({pid})",
                        WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// The selected tables of the publication with their columns and keys.
    async fn tables(&self, sink: &Sink) -> Result<Vec<(u32, SourceTable)>> {
        let rows = self
            .client
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text, a.attname::text, a.atttypid, a.atttypmod, \
                        coalesce(a.attnum = ANY(i.indkey), false), \
                        CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END, a.attnotnull \
                 FROM pg_publication_tables p \
                 JOIN pg_namespace n ON n.nspname = p.schemaname \
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
                 WHERE p.pubname = $1 ORDER BY 2, 3, a.attnum",
                &[&self.settings.publication],
            )
            .await
            .map_err(pg("reading the publication's tables"))?;
        let mut tables: Vec<(u32, SourceTable)> = Vec::new();
        for r in rows {
            let oid: u32 = r.get(0);
            let (schema, name): (String, String) = (r.get(1), r.get(2));
            if !sink.mapping().selects(&schema, &name) {
                continue;
            }
            if tables.last().is_none_or(|(o, _)| *o != oid) {
                tables.push((
                    oid,
                    SourceTable {
                        schema,
                        name,
                        columns: vec![],
                    },
                ));
            }
            let typ: u32 = r.get(4);
            tables
                .last_mut()
                .expect("pushed")
                .1
                .columns
                .push(SourceColumn {
                    name: r.get(3),
                    sql_type: sql_type(typ, r.get(5)),
                    key: r.get(6),
                    existing: r.get(7),
                    not_null: r.get(8),
                });
        }
        Ok(tables)
    }

    /// Copies every selected table under one snapshot into LOAD objects and
    /// returns the snapshot's visibility for the change stream, and the rows copied.
    pub async fn full_load(&self, sink: &mut Sink) -> Result<(Snapshot, u64)> {
        let coordinator = connect(&self.settings).await?;
        coordinator
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(pg("starting the snapshot"))?;
        let row = coordinator
            .query_one(
                "SELECT pg_export_snapshot(), pg_current_snapshot()::text, \
                 (extract(epoch from now()) * 1000000)::int8",
                &[],
            )
            .await
            .map_err(pg("exporting the snapshot"))?;
        let (id, visibility, now_micros): (String, String, i64) =
            (row.get(0), row.get(1), row.get(2));
        let snapshot = Snapshot::parse(&visibility).ok_or_else(|| {
            Error::capture(
                "reading the snapshot",
                format!("unexpected form {visibility:?}"),
            )
        })?;
        let tables = self.tables(sink).await?;
        let progress = indicatif::MultiProgress::new();
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let outputs: Vec<_> = tables
            .iter()
            .map(|(_, table)| (table.clone(), sink.load_table(table)))
            .collect();
        let results = futures::stream::iter(outputs.into_iter().map(|(table, output)| {
            let settings = &self.settings;
            let id = id.clone();
            let target = sink.target().clone();
            let layout = sink.layout().clone();
            let bar = progress.add(indicatif::ProgressBar::new_spinner());
            async move {
                bar.set_message(format!("{}.{}", table.schema, table.name));
                let client = connect(settings).await?;
                client
                    .batch_execute(&format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{id}'"
                    ))
                    .await
                    .map_err(pg("joining the snapshot"))?;
                let cols: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
                let sql = format!(
                    "COPY (SELECT {} FROM {}.{}) TO STDOUT",
                    cols.join(", "),
                    quote(&table.schema),
                    quote(&table.name)
                );
                let context = format!("copying {}.{}", table.schema, table.name);
                let stream = client.copy_out(&sql).await.map_err(pg(context.clone()))?;
                pin_mut!(stream);
                let mut load = LoadWriter::start(target, layout, output, context.clone(), now_micros).await?;
                let mut pending = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(pg(context.clone()))?;
                    pending.extend_from_slice(&chunk);
                    let end = pending.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                    for line in pending[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                        let fields = copy_fields(line);
                        let values: Vec<Value<'_>> = fields
                            .iter()
                            .map(|f| f.as_deref().map_or(Value::Null, Value::Text))
                            .collect();
                        load.row(&values).await?;
                    }
                    pending.drain(..end);
                    bar.set_position(load.rows());
                }
                let rows = load.finish().await?;
                client.batch_execute("COMMIT").await.map_err(pg(context))?;
                bar.finish_with_message(format!("{}.{}: {rows} rows", table.schema, table.name));
                Ok::<_, Error>(rows)
            }
        }))
        .buffer_unordered(self.settings.parallel_load.max(1))
        .try_collect::<Vec<u64>>()
        .await?;
        coordinator
            .batch_execute("COMMIT")
            .await
            .map_err(pg("ending the snapshot"))?;
        let rows = results.iter().sum::<u64>();
        tracing::info!(tables = results.len(), rows, "full load written");
        Ok((snapshot, rows))
    }

    /// The server's current WAL insert position: `--once` captures up to it.
    /// Logical decoding reads only flushed WAL, so this waits until the
    /// server has flushed up to there (with `synchronous_commit = off` a
    /// commit may sit in the WAL buffers for a moment).
    pub async fn current_end(&self) -> Result<u64> {
        let read = |sql: &'static str| async move {
            let lsn: String = self
                .client
                .query_one(sql, &[])
                .await
                .map_err(pg("reading the WAL position"))?
                .get(0);
            parse_lsn(&lsn).ok_or_else(|| Error::capture("reading the WAL position", lsn))
        };
        let end = read("SELECT pg_current_wal_insert_lsn()::text").await?;
        for _ in 0..600 {
            if read("SELECT pg_current_wal_flush_lsn()::text").await? >= end {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(end)
    }

    /// Reads one chunk of whole transactions from the slot into `sink`
    /// (up to `end` when given). Returns the position after them, or `None`
    /// when there was nothing new.
    pub async fn poll(
        &self,
        sink: &mut Sink,
        end: Option<u64>,
        seen: Option<&Snapshot>,
        relations: &mut Relations,
        passed: &mut bool,
    ) -> Result<Option<u64>> {
        let s = &self.settings;
        let end_text = end.map(format_lsn);
        let rows = self
            .client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                 'proto_version', '1', 'publication_names', $4)",
                [
                    &s.slot as &(dyn tokio_postgres::types::ToSql + Sync),
                    &end_text,
                    &s.max_changes,
                    &s.publication,
                ],
            )
            .await
            .map_err(pg(format!("reading slot {}", s.slot)))?;
        pin_mut!(rows);
        let mut last_end = None;
        let (mut commit_micros, mut lsn, mut index, mut skip) = (0i64, 0u64, 0u64, false);
        let mut seq = String::with_capacity(40);
        while let Some(row) = rows.next().await {
            let row = row.map_err(pg(format!("reading slot {}", s.slot)))?;
            let data: &[u8] = row.get(0);
            let message = pgoutput::decode(data)
                .map_err(|e| Error::capture(format!("slot {}", s.slot), e))?;
            let mut emit = |sink: &mut Sink,
                            rel: u32,
                            op: Op,
                            values: &[Value<'_>],
                            relations: &Relations|
             -> Result<()> {
                let Some(entry) = relations.get(&rel) else {
                    return Err(Error::capture(
                        format!("slot {}", s.slot),
                        format!("a change of relation {rel} came before its Relation message"),
                    ));
                };
                let Some((id, relation)) = entry else {
                    return Ok(());
                };
                check_width(
                    relation,
                    values,
                    &format!("{id}, change at LSN {}", format_lsn(lsn)),
                )?;
                index += 1;
                seq.clear();
                use std::fmt::Write;
                write!(seq, "{lsn:020}{index:015}").expect("string");
                sink.row(id, op, commit_micros, &seq, values)
            };
            match message {
                Message::Begin {
                    final_lsn,
                    commit_time,
                    xid,
                } => {
                    lsn = final_lsn;
                    index = 0;
                    commit_micros = commit_time + PG_EPOCH_MICROS;
                    skip = seen_by_full_load(seen, passed, xid);
                }
                Message::Commit { end_lsn } => last_end = Some(end_lsn),
                Message::Relation(mut rel) => {
                    // Every poll is a new decoding session that sends each
                    // Relation again: only a changed one is looked up and declared.
                    let known =
                        matches!(relations.get(&rel.id), Some(Some((_, r))) if same_shape(r, &rel));
                    if !known {
                        let id = rel.id;
                        let entry = if sink.mapping().selects(&rel.schema, &rel.name) {
                            self.mark_primary_key(&mut rel).await?;
                            let facts = self.column_facts(&rel).await?;
                            sink.table(&source_table(&rel, &facts));
                            Some((format!("{}.{}", rel.schema, rel.name), rel))
                        } else {
                            None
                        };
                        relations.insert(id, entry);
                    }
                }
                _ if skip => {}
                Message::Insert { rel, new } => emit(sink, rel, Op::Insert, &new, relations)?,
                Message::Update { rel, old, new } => {
                    let Some(Some((id, relation))) = relations.get(&rel) else {
                        emit(sink, rel, Op::Update, &new, relations)?;
                        continue;
                    };
                    let at = format!("{id}, change at LSN {}", format_lsn(lsn));
                    for (op, values) in update_rows(relation, &at, old, new)? {
                        emit(sink, rel, op, &values, relations)?;
                    }
                }
                Message::Delete { rel, old } => emit(sink, rel, Op::Delete, &old, relations)?,
                Message::Truncate { rels } => {
                    for rel in rels {
                        let width = match relations.get(&rel) {
                            Some(Some((_, r))) => r.columns.len(),
                            _ => 0,
                        };
                        emit(
                            sink,
                            rel,
                            Op::Truncate,
                            &vec![Value::Null; width],
                            relations,
                        )?;
                    }
                }
                Message::Other => {}
            }
            sink.spill_if_full().await?;
        }
        Ok(last_end)
    }

    /// Marks the columns of the table's primary key as the key. Under REPLICA
    /// IDENTITY FULL the Relation message flags every column; a table
    /// without a primary key keeps the flags (its replica identity index).
    async fn mark_primary_key(&self, rel: &mut Relation) -> Result<()> {
        let rows = self
            .catalog
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary",
                &[&rel.id],
            )
            .await
            .map_err(pg(format!(
                "reading the primary key of {}.{}",
                rel.schema, rel.name
            )))?;
        if rows.is_empty() {
            return Ok(());
        }
        let key: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        for c in &mut rel.columns {
            c.key = key.contains(&c.name);
        }
        Ok(())
    }

    /// Per column of `rel`: the value rows stored before it was added hold
    /// (PostgreSQL 11+ keeps it as `attmissingval` rather than rewriting
    /// the rows, and no change event says so), and NOT NULL.
    async fn column_facts(
        &self,
        rel: &Relation,
    ) -> Result<HashMap<String, (Option<String>, bool)>> {
        let rows = self
            .catalog
            .query(
                "SELECT attname::text, CASE WHEN atthasmissing THEN (attmissingval::text::text[])[1] END, \
                        attnotnull \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&rel.id],
            )
            .await
            .map_err(pg(format!("reading the columns of {}.{}", rel.schema, rel.name)))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// Confirms that everything before `lsn` is written: the server may
    /// recycle that WAL and the next poll starts after it.
    pub async fn confirm(&self, lsn: u64) -> Result<()> {
        self.client
            .query_one(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
                &[&self.settings.slot, &format_lsn(lsn)],
            )
            .await
            .map_err(pg(format!("advancing slot {}", self.settings.slot)))?;
        Ok(())
    }

    /// The slot's confirmed position, the server's position and the lag in bytes.
    pub async fn lag(&self) -> Result<Option<(String, String, i64)>> {
        let row = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.settings.slot],
            )
            .await
            .map_err(pg("reading the slot"))?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }
}

async fn connect(settings: &PgSettings) -> Result<Client> {
    use super::tls::TlsMode;
    use tokio_postgres::config::SslMode;
    let url = super::redact_url(&settings.url);
    let mut config: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(pg(format!("reading the URL {url}")))?;
    config.ssl_mode(match settings.tls.mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(settings.tls.client_config()?);
    let (client, connection) =
        config
            .connect(tls)
            .await
            .map_err(|e| match pg(format!("connecting to {url}"))(e) {
                Error::Capture { context, message } => {
                    Error::capture(context, settings.tls.explain(&message))
                }
                other => other,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection closed: {e}");
        }
    });
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET bytea_output = 'hex'; \
             SET extra_float_digits = 3; SET IntervalStyle = 'iso_8601'",
        )
        .await
        .map_err(pg("setting up the session"))?;
    Ok(client)
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The fields of one line of COPY text format: `\N` is NULL, backslash escapes decoded.
fn copy_fields(line: &[u8]) -> Vec<Option<String>> {
    line.split(|&b| b == b'\t')
        .map(|f| {
            if f == b"\\N" {
                return None;
            }
            if !f.contains(&b'\\') {
                return Some(String::from_utf8_lossy(f).into_owned());
            }
            let mut out = Vec::with_capacity(f.len());
            let mut i = 0;
            while i < f.len() {
                if f[i] == b'\\' && i + 1 < f.len() {
                    i += 1;
                    out.push(match f[i] {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'b' => 8,
                        b'f' => 12,
                        b'v' => 11,
                        other => other,
                    });
                } else {
                    out.push(f[i]);
                }
                i += 1;
            }
            Some(String::from_utf8_lossy(&out).into_owned())
        })
        .collect()
}

/// Shared by the CLI: the slot lag as text.
pub(crate) fn describe_lag(lag: Option<(String, String, i64)>, slot: &str) -> String {
    match lag {
        None => format!("slot {slot}: missing (capture has not run yet)"),
        Some((confirmed, current, bytes)) => format!(
            "slot {slot}: confirmed {confirmed}, server at {current}, behind by {bytes} bytes of WAL"
        ),
    }
}

/// The relations seen so far, kept across polls: the table id
/// (`schema.table`) and its Relation message (keys from the catalog), or
/// `None` when the mapping excludes it.
pub(crate) type Relations = HashMap<u32, Option<(String, Relation)>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types() {
        assert_eq!(
            sql_type(1700, ((12 << 16) | 2) + 4),
            SqlType::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(sql_type(1700, -1), SqlType::Text);
        assert_eq!(sql_type(1184, -1), SqlType::TimestampTz);
        assert_eq!(sql_type(1007, -1), SqlType::Text); // int4[]
    }

    #[test]
    fn snapshot_visibility() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert!(s.saw(99));
        assert!(s.saw(100) && s.saw(102) && s.saw(104));
        assert!(!s.saw(101) && !s.saw(103));
        assert!(!s.saw(105) && !s.saw(200));
        // Widened with the epoch: xid 5 after wraparound is newer than xmax.
        let wrapped = Snapshot::parse("4294967290:4294967300:").unwrap();
        assert!(wrapped.saw(4294967295));
        assert!(!wrapped.saw(5));
        // A snapshot just before the wrap (xmax in epoch 0): xids after the
        // wrap are newer, not 2^32 older (../shared/repro/pg-xid-wraparound).
        let before_wrap = Snapshot::parse("4294966800:4294966810:").unwrap();
        assert!(before_wrap.saw(4294966799));
        assert!(!before_wrap.saw(4294966810) && !before_wrap.saw(4294967295));
        assert!(!before_wrap.saw(3) && !before_wrap.saw(493));
    }

    #[test]
    fn after_one_transaction_the_snapshot_did_not_see_none_is_skipped() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        let mut passed = false;
        let skipped: Vec<bool> = [99, 102, 101, 104, 50, 3]
            .into_iter()
            .map(|xid| seen_by_full_load(Some(&s), &mut passed, xid))
            .collect();
        // 99 and 102 committed before the snapshot; 101 was running. After
        // it, 104 and xids that look old (2^31 later, or after a wrap) are new.
        assert_eq!(skipped, [true, true, false, false, false, false]);
        assert!(passed);
        let mut passed = true;
        assert!(
            !seen_by_full_load(Some(&s), &mut passed, 99),
            "passed is kept"
        );
    }

    fn relation(columns: &[(&str, bool)], identity: u8) -> Relation {
        Relation {
            id: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: identity,
            columns: columns
                .iter()
                .map(|(name, key)| pgoutput::RelationColumn {
                    key: *key,
                    name: name.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn rows_of_the_wrong_width_are_errors_not_panics() {
        let rel = relation(&[("id", true), ("a", false), ("b", false)], b'f');
        let (one, two) = (Value::Text("1"), Value::Text("2"));
        // Fewer values than columns, in the new row, the old row, or both.
        for (old, new) in [
            (None, vec![one]),
            (Some(vec![one]), vec![one, two, two]),
            (Some(vec![one, two, two]), vec![one, Value::Unchanged]),
            (Some(vec![one, two]), vec![two, two]),
        ] {
            let err = update_rows(&rel, "public.t, change at LSN 0/1", old, new).unwrap_err();
            assert!(err.to_string().contains("a row of"), "{err}");
        }
        let ok = update_rows(
            &rel,
            "x",
            Some(vec![one, two, two]),
            vec![two, two, Value::Unchanged],
        );
        assert_eq!(
            ok.unwrap(),
            vec![
                (Op::Delete, vec![one, two, two]),
                (Op::Insert, vec![two, two, two])
            ]
        );
        assert!(check_width(&rel, &[one, two], "x").is_err());
        assert!(check_width(&rel, &[one, two, Value::Null], "x").is_ok());
    }

    #[test]
    fn copy_text_format() {
        assert_eq!(
            copy_fields(b"1\t\\N\ta\\tb\\nc\t\\\\x"),
            vec![
                Some("1".into()),
                None,
                Some("a\tb\nc".into()),
                Some("\\x".into())
            ]
        );
    }
}
