//! The change stream: the slot read by SQL polling (whole transactions, up
//! to `max_changes` changes a poll), the slot advanced once the objects are
//! durable.

use std::collections::HashMap;

use futures::{StreamExt, pin_mut};

use super::PgSource;
use super::connect::pg;
use super::pgoutput::{self, Message, PG_EPOCH_MICROS, Relation, format_lsn, parse_lsn};
use super::snapshot::seen_by_full_load;
use super::types::{check_width, same_shape, source_table, update_rows};
use crate::capture::sink::Sink;
use crate::capture::source::Value;
use crate::decode::Op;
use crate::error::{Error, Result};
use crate::source::push_padded;

impl PgSource {
    /// The server's current WAL insert position: `--once` captures up to it.
    /// Logical decoding reads only flushed WAL, so this waits until the
    /// server has flushed up to there (with `synchronous_commit = off` a
    /// commit may sit in the WAL buffers for a moment).
    pub(super) async fn current_end(&self) -> Result<u64> {
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
    /// (up to `end` when set). Returns the position after them, or `None`
    /// when there was nothing new.
    pub(super) async fn poll(&mut self, sink: &mut Sink) -> Result<Option<u64>> {
        let mut relations = std::mem::take(&mut self.relations);
        let mut passed = self.passed;
        let polled = self.read_slot(sink, &mut relations, &mut passed).await;
        (self.relations, self.passed) = (relations, passed);
        polled
    }

    async fn read_slot(
        &self,
        sink: &mut Sink,
        relations: &mut Relations,
        passed: &mut bool,
    ) -> Result<Option<u64>> {
        let s = &self.settings;
        let end_text = self.end.map(format_lsn);
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
            let row = row.map_err(|e| pg(format!("reading slot {}", s.slot))(e))?;
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
                push_padded(&mut seq, lsn, 20);
                push_padded(&mut seq, index, 15);
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
                    skip = seen_by_full_load(self.seen.as_ref(), passed, xid);
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
    pub(super) async fn advance_slot(&self, lsn: u64) -> Result<()> {
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
    pub(super) async fn slot_lag(&self) -> Result<Option<(String, String, i64)>> {
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

/// The slot lag as text, for `status`.
pub(super) fn describe_lag(lag: Option<(String, String, i64)>, slot: &str) -> String {
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
pub(super) type Relations = HashMap<u32, Option<(String, Relation)>>;
