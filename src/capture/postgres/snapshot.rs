//! The full load: every selected table copied under one exported snapshot
//! (tables in parallel, each its own session joined to the snapshot), and
//! the snapshot's visibility, which tells the stream the transactions the
//! load already holds.

use futures::{StreamExt, TryStreamExt, pin_mut};
use serde::{Deserialize, Serialize};

use super::connect::{connect, pg, quote};
use super::types::sql_type;
use super::{PgSource, copy};
use crate::capture::mapping::{SourceColumn, SourceTable};
use crate::capture::sink::Sink;
use crate::capture::source::{PART_ROWS, RANGE_ROWS, Value, emptied, range_filters};
use crate::capture::writer::LoadWriter;
use crate::error::{Error, Result};

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
    pub(super) fn parse(text: &str) -> Option<Snapshot> {
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
pub(super) fn seen_by_full_load(seen: Option<&Snapshot>, passed: &mut bool, xid: u32) -> bool {
    let skip = !*passed && seen.is_some_and(|snap| snap.saw(xid));
    *passed |= !skip;
    skip
}

impl PgSource {
    /// The selected tables of the publication with their columns and keys.
    async fn tables(&self, sink: &Sink) -> Result<Vec<LoadTable>> {
        let rows = self
            .client
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text, a.attname::text, a.atttypid, a.atttypmod, \
                        coalesce(a.attnum = ANY(i.indkey), false), \
                        CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END, a.attnotnull, \
                        c.reltuples::float8 \
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
        let mut tables: Vec<LoadTable> = Vec::new();
        for r in rows {
            let oid: u32 = r.get(0);
            let (schema, name): (String, String) = (r.get(1), r.get(2));
            if !sink.mapping().selects(&schema, &name) {
                continue;
            }
            if tables.last().is_none_or(|t| t.oid != oid) {
                tables.push(LoadTable {
                    oid,
                    table: SourceTable {
                        schema,
                        name,
                        columns: vec![],
                    },
                    types: vec![],
                    estimated_rows: r.get(9),
                });
            }
            let typ: u32 = r.get(4);
            let last = tables.last_mut().expect("pushed");
            last.types.push(typ);
            last.table.columns.push(SourceColumn {
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
    pub(super) async fn load(&self, sink: &mut Sink) -> Result<(Snapshot, u64)> {
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
        let sessions = self.settings.parallel_load.max(1);
        // Per table: its first writer deletes what an interrupted load left;
        // the writers of its other key ranges write beside it.
        let mut jobs = vec![];
        for t in &tables {
            let filters = key_ranges(&coordinator, t, sessions).await?;
            let name = format!("{}.{}", t.table.schema, t.table.name);
            let context = |n: usize| format!("copying {name}{}", filters[n]);
            let output = sink.load_table(&t.table);
            let first = LoadWriter::start(
                sink.target().clone(),
                sink.layout().clone(),
                output,
                context(0),
                now_micros,
            )
            .await?;
            let others: Vec<LoadWriter> = (1..filters.len())
                .map(|n| first.part(context(n), n as u64 * PART_ROWS))
                .collect();
            for (n, writer) in std::iter::once(first).chain(others).enumerate() {
                let (sql, kinds) = copy::statement(&t.table, &t.types, &filters[n]);
                jobs.push((sql, kinds, context(n), writer));
            }
        }
        let progress = indicatif::MultiProgress::new();
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let results = futures::stream::iter(jobs.into_iter().map(|(sql, kinds, context, mut load)| {
            let settings = &self.settings;
            let id = id.clone();
            let bar = progress.add(indicatif::ProgressBar::new_spinner());
            async move {
                bar.set_message(context.clone());
                let client = connect(settings).await?;
                client
                    .batch_execute(&format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{id}'"
                    ))
                    .await
                    .map_err(pg("joining the snapshot"))?;
                let stream = client.copy_out(&sql).await.map_err(pg(context.clone()))?;
                pin_mut!(stream);
                let mut parser = copy::Parser::new(kinds);
                let mut pending: Vec<u8> = Vec::new();
                let mut spare: Vec<Value<'static>> = Vec::new();
                let mut shown = 0;
                let bad = |e: String| Error::capture(context.clone(), e);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| pg(context.as_str())(e))?;
                    pending.extend_from_slice(&chunk);
                    let mut at = 0;
                    loop {
                        let mut values = emptied(spare);
                        let used = parser.next(&pending[at..], &mut values).map_err(bad)?;
                        if !values.is_empty() {
                            load.row(&values).await?;
                        }
                        spare = emptied(values);
                        match used {
                            Some(used) => at += used,
                            None => break,
                        }
                    }
                    pending.drain(..at);
                    // Each row comes as its own message: the bar moves every 64k rows.
                    if load.rows() - shown >= 1 << 16 {
                        shown = load.rows();
                        bar.set_position(shown);
                    }
                }
                parser.finish(pending.len()).map_err(bad)?;
                let rows = load.finish().await?;
                client.batch_execute("COMMIT").await.map_err(pg(context.clone()))?;
                bar.finish_with_message(format!("{context}: {rows} rows"));
                Ok::<_, Error>(rows)
            }
        }))
        .buffer_unordered(sessions)
        .try_collect::<Vec<u64>>()
        .await?;
        coordinator
            .batch_execute("COMMIT")
            .await
            .map_err(pg("ending the snapshot"))?;
        let rows = results.iter().sum::<u64>();
        tracing::info!(
            tables = tables.len(),
            parts = results.len(),
            rows,
            "full load written"
        );
        Ok((snapshot, rows))
    }
}

/// A table of the full load.
struct LoadTable {
    oid: u32,
    table: SourceTable,
    /// Its columns' type oids.
    types: Vec<u32>,
    /// The catalog's estimate of its rows (`reltuples`: -1 before the first
    /// `ANALYZE` or `VACUUM`).
    estimated_rows: f64,
}

/// The parts `table` is copied in, as `WHERE` clauses: one (no clause) for
/// a table of fewer than [`RANGE_ROWS`] rows or without a one-column integer
/// key, else up to `sessions` ranges of equal width between its smallest
/// and largest key, read in the snapshot.
async fn key_ranges(
    snapshot: &tokio_postgres::Client,
    t: &LoadTable,
    sessions: usize,
) -> Result<Vec<String>> {
    let keys: Vec<usize> = (0..t.table.columns.len())
        .filter(|i| t.table.columns[*i].key)
        .collect();
    let whole = vec![String::new()];
    let [key] = keys[..] else { return Ok(whole) };
    let parts = (t.estimated_rows / RANGE_ROWS).ceil().min(sessions as f64);
    if parts < 2.0 || !matches!(t.types[key], 20 | 21 | 23) {
        return Ok(whole);
    }
    let column = quote(&t.table.columns[key].name);
    let row = snapshot
        .query_one(
            &format!(
                "SELECT min({column})::int8, max({column})::int8 FROM {}.{}",
                quote(&t.table.schema),
                quote(&t.table.name)
            ),
            &[],
        )
        .await
        .map_err(pg(format!(
            "reading the key range of {}.{}",
            t.table.schema, t.table.name
        )))?;
    let (Some(low), Some(high)): (Option<i64>, Option<i64>) = (row.get(0), row.get(1)) else {
        return Ok(whole);
    };
    Ok(range_filters(&column, low, high, parts as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
