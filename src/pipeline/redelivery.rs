//! Changes delivered twice. With a sequence column, a change is its key and
//! its `change_seq`: DMS after a task restart, or capture after a crash,
//! may write a change again into a later object, with the same sequence.
//! History keeps the first copy; a later one, in the same batch or
//! repeating a change loaded before, is left out and counted.
//!
//! Every row of a batch leaves a 128-bit digest of its identity (16 bytes a
//! row, about 24 with the set's overhead). Rows above the loaded maximum
//! cannot repeat a loaded change and stream on; rows at or below it are held
//! until the batch's other rows are through, then compared with the history
//! rows of their `change_seq` range (one query), leaving out the rows of the
//! batch's own objects: a batch loaded again (a replay after a crash, a
//! backfill) is the warehouse's to recognize, not a redelivery.
//!
//! Rows of two keys that share a sequence value are two changes and both stay.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::config::Table;
use crate::error::{Error, Result};
use crate::merge::{Merger, sql};
use crate::warehouse::{Queries, Warehouse};

/// The batch's row identities so far, and its rows held for the history check.
pub(super) struct Sieve {
    schema: SchemaRef,
    key: Vec<(String, DataType)>,
    change_seq: String,
    source_file: String,
    loaded_max: String,
    objects: HashSet<String>,
    seen: HashSet<u128>,
    held: Vec<RecordBatch>,
    dropped: u64,
}

impl Sieve {
    /// A sieve for a batch of `objects` with `merger`'s rows, loaded after
    /// `loaded_max`; `None` when nothing needs one (no sequence column: a
    /// change's identity is its object and row, which no other object has).
    pub(super) fn new(
        merger: &Merger,
        objects: impl Iterator<Item = String>,
        loaded_max: Option<String>,
    ) -> Option<Sieve> {
        merger.sequence_column.as_ref()?;
        let schema = merger.history_schema();
        let key = merger
            .key
            .iter()
            .map(|k| {
                let field = schema.field_with_name(k).expect("keys are history columns");
                (k.clone(), field.data_type().clone())
            })
            .collect();
        Some(Sieve {
            schema,
            key,
            change_seq: merger.meta.change_seq.clone(),
            source_file: merger.meta.source_file.clone(),
            // Nothing loaded: "" sorts below every change_seq, so nothing is held.
            loaded_max: loaded_max.unwrap_or_default(),
            objects: objects.collect(),
            seen: HashSet::new(),
            held: Vec::new(),
            dropped: 0,
        })
    }

    /// The digest of each row's key and `change_seq` (`seq`, the rows'
    /// `change_seq` as text), from rows whose key columns have the history's types.
    fn identities(&self, rows: &RecordBatch, seq: &ArrayRef) -> Result<Vec<u128>> {
        let keys = self
            .key
            .iter()
            .map(|(k, _)| text_column(rows, k))
            .collect::<Result<Vec<_>>>()?;
        let (seq, keys) = (
            seq.as_string::<i32>(),
            keys.iter()
                .map(|k| k.as_string::<i32>())
                .collect::<Vec<_>>(),
        );
        Ok((0..rows.num_rows())
            .map(|row| {
                let mut digest = Sha256::new();
                let seq = seq.value(row).as_bytes();
                digest.update((seq.len() as u64).to_le_bytes());
                digest.update(seq);
                for key in &keys {
                    if key.is_null(row) {
                        digest.update([0]);
                    } else {
                        let value = key.value(row).as_bytes();
                        digest.update([1]);
                        digest.update((value.len() as u64).to_le_bytes());
                        digest.update(value);
                    }
                }
                let bytes: [u8; 16] = digest.finalize()[..16].try_into().expect("16 bytes");
                u128::from_le_bytes(bytes)
            })
            .collect())
    }

    /// The rows of `rows` to write now: a row seen before in the batch is
    /// dropped, a row at or below the loaded maximum is held.
    pub(super) fn sift(&mut self, rows: RecordBatch) -> Result<RecordBatch> {
        let seq_text = text_column(&rows, &self.change_seq)?;
        let ids = self.identities(&rows, &seq_text)?;
        let seq = seq_text.as_string::<i32>();
        let (mut pass, mut hold) = (Vec::with_capacity(ids.len()), Vec::new());
        for (row, id) in ids.into_iter().enumerate() {
            let first = self.seen.insert(id);
            self.dropped += u64::from(!first);
            let loaded_before = seq.value(row) <= self.loaded_max.as_str();
            pass.push(first && !loaded_before);
            hold.push(first && loaded_before);
        }
        if hold.contains(&true) {
            self.held.push(filter(&rows, hold)?);
        }
        filter(&rows, pass)
    }

    /// The `change_seq` range of the held rows, if any are held.
    pub(super) fn held_range(&self) -> Result<Option<(String, String)>> {
        let mut range: Option<(String, String)> = None;
        for rows in &self.held {
            let seq = text_column(rows, &self.change_seq)?;
            for value in seq.as_string::<i32>().iter().flatten() {
                range = Some(match range {
                    None => (value.to_string(), value.to_string()),
                    Some((lo, hi)) => (lo.min(value.to_string()), hi.max(value.to_string())),
                });
            }
        }
        Ok(range)
    }

    /// The held rows that `loaded` (history rows of their range, with the
    /// key columns, `change_seq` and `source_file`) does not hold, outside
    /// the batch's own objects.
    pub(super) fn release(&mut self, loaded: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let mut in_history = HashSet::new();
        for rows in loaded {
            let rows = self.as_history_types(rows)?;
            let files = text_column(&rows, &self.source_file)?;
            let files = files.as_string::<i32>();
            let seq = text_column(&rows, &self.change_seq)?;
            for (row, id) in self.identities(&rows, &seq)?.into_iter().enumerate() {
                if !self.objects.contains(files.value(row)) {
                    in_history.insert(id);
                }
            }
        }
        let mut out = Vec::new();
        for rows in std::mem::take(&mut self.held) {
            let seq = text_column(&rows, &self.change_seq)?;
            let keep: Vec<bool> = self
                .identities(&rows, &seq)?
                .iter()
                .map(|id| !in_history.contains(id))
                .collect();
            self.dropped += keep.iter().filter(|k| !**k).count() as u64;
            out.push(filter(&rows, keep)?);
        }
        Ok(out)
    }

    /// `rows` (read from a warehouse) with the key columns cast to the
    /// history's types, so a key reads as the same text as a decoded one.
    fn as_history_types(&self, rows: &RecordBatch) -> Result<RecordBatch> {
        let mut columns = rows.columns().to_vec();
        let mut fields: Vec<_> = rows.schema().fields().iter().cloned().collect();
        for (name, data_type) in &self.key {
            let Some((i, _)) = rows.schema().column_with_name(name) else {
                continue;
            };
            columns[i] = arrow::compute::cast(&columns[i], data_type)
                .map_err(|e| Error::query(format!("reading key {name:?}"), e.into()))?;
            fields[i] = Arc::new(fields[i].as_ref().clone().with_data_type(data_type.clone()));
        }
        RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
            .map_err(|e| Error::query("reading history rows", e.into()))
    }

    /// Changes left out as copies of earlier ones.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Column `name` of `rows` as text.
fn text_column(rows: &RecordBatch, name: &str) -> Result<ArrayRef> {
    let column = rows
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("history rows without the column {name:?}")))?;
    arrow::compute::cast(column, &DataType::Utf8)
        .map_err(|e| Error::query(format!("reading {name:?} as text"), e.into()))
}

fn filter(rows: &RecordBatch, keep: Vec<bool>) -> Result<RecordBatch> {
    arrow::compute::filter_record_batch(rows, &BooleanArray::from(keep))
        .map_err(|e| Error::query("filtering history rows", e.into()))
}

/// The history rows (key columns, `change_seq`, `source_file`) of `table`
/// whose `change_seq` lies in `lo..=hi`, in the warehouse's own engine when
/// it has one, else in DataFusion.
pub(super) async fn history_between(
    warehouse: &dyn Warehouse,
    table: &Table,
    merger: &Merger,
    lo: &str,
    hi: &str,
) -> Result<Vec<RecordBatch>> {
    let queries = warehouse.queries();
    let d = queries.dialect();
    let m = &merger.meta;
    let mut columns = merger.key.clone();
    columns.extend([m.change_seq.clone(), m.source_file.clone()]);
    let query = sql::render(
        sql::HISTORY_BETWEEN,
        &[
            ("columns", &d.list(&columns)),
            ("history", &d.ident(&table.history_name())),
            ("change_seq", &d.ident(&m.change_seq)),
            ("lo", &d.literal(lo)),
            ("hi", &d.literal(hi)),
        ],
    );
    let tables = match queries {
        Queries::Engine(engine) => return engine.query(&query).await,
        Queries::DataFusion(tables) => tables,
    };
    let ctx = SessionContext::new();
    if !tables.register(&ctx, table, merger).await? {
        return Ok(Vec::new());
    }
    crate::merge::collect(&ctx, &query, "history_between.sql").await
}

/// `rows` through `sieve`: copies left out, held rows released at the end
/// after `lookup(lo, hi)` gave the history rows of their range. An error of
/// `rows` ends the stream as it is (nothing is released after it).
pub(super) fn sifted<F, Fut>(
    rows: SendableRecordBatchStream,
    sieve: Sieve,
    table: String,
    batch: i64,
    lookup: F,
) -> SendableRecordBatchStream
where
    F: FnOnce(String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<RecordBatch>>> + Send + 'static,
{
    struct State<F> {
        rows: Option<SendableRecordBatchStream>,
        sieve: Sieve,
        lookup: Option<F>,
        out: VecDeque<RecordBatch>,
    }
    let schema = sieve.schema.clone();
    let fail = |e: Error| DataFusionError::External(Box::new(e));
    let start = State {
        rows: Some(rows),
        sieve,
        lookup: Some(lookup),
        out: VecDeque::new(),
    };
    let stream = futures::stream::unfold(start, move |mut s| {
        let table = table.clone();
        async move {
            loop {
                if let Some(rows) = s.out.pop_front() {
                    return Some((Ok(rows), s));
                }
                let next = s.rows.as_mut()?.next().await;
                match next {
                    Some(Ok(rows)) => match s.sieve.sift(rows) {
                        Ok(rows) if rows.num_rows() == 0 => continue,
                        Ok(rows) => return Some((Ok(rows), s)),
                        Err(e) => {
                            s.rows = None;
                            return Some((Err(fail(e)), s));
                        }
                    },
                    Some(Err(e)) => {
                        s.rows = None;
                        return Some((Err(e), s));
                    }
                    None => {
                        s.rows = None;
                        let lookup = s.lookup.take()?;
                        let released = match s.sieve.held_range() {
                            Ok(Some((lo, hi))) => match lookup(lo, hi).await {
                                Ok(loaded) => s.sieve.release(&loaded),
                                Err(e) => Err(e),
                            },
                            Ok(None) => Ok(Vec::new()),
                            Err(e) => Err(e),
                        };
                        match released {
                            Ok(rows) => s.out.extend(rows.into_iter().filter(|r| r.num_rows() > 0)),
                            Err(e) => return Some((Err(fail(e)), s)),
                        }
                        if s.sieve.dropped() > 0 {
                            tracing::warn!(table = %table, batch, changes = s.sieve.dropped(), "changes delivered again (the key and sequence of an earlier change) were left out of history");
                        }
                    }
                }
            }
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Column, MetadataColumns, SqlType};

    fn merger() -> Merger {
        Merger {
            key: vec!["a".into(), "b".into()],
            columns: ["a", "b"]
                .map(|n| Column {
                    name: n.into(),
                    sql_type: SqlType::Text,
                    existing: None,
                })
                .into(),
            extra_columns: vec!["seq".into()],
            sequence_column: Some("seq".into()),
            meta: MetadataColumns::default(),
            soft_delete: false,
        }
    }

    /// History-shaped rows of (a, b, change_seq); other columns empty.
    fn rows(merger: &Merger, cells: &[(Option<&str>, &str, &str)]) -> RecordBatch {
        let schema = merger.history_schema();
        let columns = schema
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                let text = |i: usize| -> Vec<Option<&str>> {
                    cells
                        .iter()
                        .map(|c| [c.0, Some(c.1), Some(c.2)][i])
                        .collect()
                };
                match f.name().as_str() {
                    "a" => Arc::new(arrow::array::StringArray::from(text(0))),
                    "b" => Arc::new(arrow::array::StringArray::from(text(1))),
                    "change_seq" => Arc::new(arrow::array::StringArray::from(text(2))),
                    _ => arrow::array::new_null_array(f.data_type(), cells.len()),
                }
            })
            .collect();
        RecordBatch::try_new_with_options(
            Arc::new(arrow::datatypes::Schema::new(
                schema
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone().with_nullable(true))
                    .collect::<Vec<_>>(),
            )),
            columns,
            &Default::default(),
        )
        .unwrap()
    }

    #[test]
    fn keys_that_join_to_the_same_text_or_differ_by_null_are_different_changes() {
        let m = merger();
        let mut sieve = Sieve::new(&m, std::iter::empty(), None).unwrap();
        let first = rows(
            &m,
            &[
                (Some("ab"), "c", "1"),
                (Some("a"), "bc", "1"),
                (Some("a\u{1}b"), "c", "1"),
                (Some("a"), "b\u{1}c", "1"),
                (None, "c", "1"),
                (Some(""), "c", "1"),
            ],
        );
        assert_eq!(sieve.sift(first).unwrap().num_rows(), 6);
        let again = rows(
            &m,
            &[
                (Some("a"), "bc", "1"),
                (None, "c", "1"),
                (Some("a"), "bc", "2"),
            ],
        );
        assert_eq!(sieve.sift(again).unwrap().num_rows(), 1);
        assert_eq!(sieve.dropped(), 2);
    }
}
