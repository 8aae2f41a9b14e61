//! Merge: decoded objects → history rows in change order, and the latest
//! change per key for the current-state table (ARCHITECTURE §2, §3 step 2).
//!
//! `change_seq` is text that sorts in change order and depends only on the
//! objects' names and row positions (or the configured sequence column), so
//! re-running or backfilling the same objects yields the same values:
//! - full-load rows: `0`, the LOAD number (17 digits), the row (12 digits);
//! - CDC rows: `1`, the CDC file time in ms (17 digits), its µs within the
//!   ms (3 digits), the row (12 digits);
//! - CDC rows with a sequence column: `1` and the column's value.
//!
//! Before the µs digits, two objects of one millisecond tied. A value of
//! the new form still sorts after an old one of an earlier millisecond;
//! values of one millisecond compare only between objects of the same
//! millisecond, which the old form could not order either.

mod latest;
mod spill;
pub mod sql;

/// Digits of the row number in a `change_seq`.
const ROW_DIGITS: usize = 12;

pub use latest::{Batches, KeyLookup, Latest, LatestChanges, Loc, Spilled};

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit, UInt64Type};
use chrono::{DateTime, Utc};
use datafusion::prelude::{DataFrame, SessionContext};

use crate::config::{Column, MetadataColumns, Table, UTC};
use crate::error::{Error, Location, Result};
use crate::source::{ObjectOrder, SourceObject};
use crate::state::BatchStats;

/// The `change_seq` values of `rows` of one object: its `prefix` and each
/// row number in ROW_DIGITS digits. Values of one length: the builder is
/// sized exactly once.
fn row_seqs(prefix: &str, rows: impl ExactSizeIterator<Item = u64>) -> StringArray {
    let width = prefix.len() + ROW_DIGITS;
    let mut out = StringBuilder::with_capacity(rows.len(), rows.len() * width);
    let mut value = String::with_capacity(width);
    for row in rows {
        value.clear();
        value.push_str(prefix);
        crate::source::push_padded(&mut value, row, ROW_DIGITS);
        out.append_value(&value);
    }
    out.finish()
}

/// Runs `query` and collects its rows; errors name `context`.
pub(crate) async fn collect(
    ctx: &SessionContext,
    query: &str,
    context: &str,
) -> Result<Vec<RecordBatch>> {
    let fail = |e| Error::query(context, e);
    ctx.sql(query)
        .await
        .map_err(fail)?
        .collect()
        .await
        .map_err(fail)
}

/// Where a batch sits in the change order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOrder {
    /// Its smallest `change_seq` (older than what is loaded: a late batch).
    pub min_seq: Option<String>,
    /// The `change_seq` of its latest truncate (`Op` `T`): every row changed
    /// before it is gone.
    pub truncated: Option<String>,
}

/// Builds history rows and the current-state queries of one table.
#[derive(Debug, Clone)]
pub struct Merger {
    /// Primary-key columns.
    pub key: Vec<String>,
    /// The table's data columns.
    pub columns: Vec<Column>,
    /// Extra DMS columns kept as text.
    pub extra_columns: Vec<String>,
    /// Sequence column (one of the extras) ordering CDC rows, if any.
    pub sequence_column: Option<String>,
    /// Names of the added columns.
    pub meta: MetadataColumns,
    /// Keep deleted keys flagged in the current table.
    pub soft_delete: bool,
}

impl Merger {
    /// A merger for `table` whose data columns are `columns`.
    pub fn new(
        table: &Table,
        columns: Vec<Column>,
        source: &crate::config::Source,
        meta: &MetadataColumns,
    ) -> Self {
        Merger {
            key: table.primary_key.clone(),
            columns,
            extra_columns: source.extra_columns.clone(),
            sequence_column: source.sequence_column.clone(),
            meta: meta.clone(),
            soft_delete: table.soft_delete,
        }
    }

    fn data_fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.columns
            .iter()
            .map(|c| Field::new(&c.name, c.sql_type.arrow_type(), true))
    }

    fn ts_type() -> DataType {
        DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
    }

    /// `<t>_history`: data columns, extras, op, commit_ts, change_seq, source_file, ingested_at.
    /// A column with a value for the rows stored before it was added keeps
    /// it in its field metadata ([`crate::decode::EXISTING_METADATA`]): the
    /// warehouse records it with the column, for a load that finishes after
    /// a crash (see `Warehouse::columns`).
    pub fn history_schema(&self) -> SchemaRef {
        let m = &self.meta;
        let mut fields: Vec<Field> = self
            .data_fields()
            .zip(&self.columns)
            .map(|(field, column)| match &column.existing {
                Some(value) => field.with_metadata(
                    [(crate::decode::EXISTING_METADATA.to_string(), value.clone())].into(),
                ),
                None => field,
            })
            .collect();
        fields.extend(
            self.extra_columns
                .iter()
                .map(|c| Field::new(c, DataType::Utf8, true)),
        );
        fields.extend([
            Field::new(&m.op, DataType::Utf8, false),
            Field::new(&m.commit_ts, Self::ts_type(), false),
            Field::new(&m.change_seq, DataType::Utf8, false),
            Field::new(&m.source_file, DataType::Utf8, false),
            Field::new(&m.ingested_at, Self::ts_type(), false),
        ]);
        Arc::new(Schema::new(fields))
    }

    /// Whether a history column named `name` holds source data (not one of
    /// the added columns or the extra DMS columns).
    pub fn is_data_column(&self, name: &str) -> bool {
        let m = &self.meta;
        ![
            &m.op,
            &m.commit_ts,
            &m.change_seq,
            &m.source_file,
            &m.ingested_at,
        ]
        .iter()
        .any(|c| c.as_str() == name)
            && !self.extra_columns.iter().any(|c| c == name)
    }

    /// `<t>`: data columns, commit_ts, change_seq, and `deleted` under soft delete.
    pub fn current_schema(&self) -> SchemaRef {
        let m = &self.meta;
        let mut fields: Vec<Field> = self.data_fields().collect();
        fields.push(Field::new(&m.commit_ts, Self::ts_type(), false));
        fields.push(Field::new(&m.change_seq, DataType::Utf8, false));
        if self.soft_delete {
            fields.push(Field::new(&m.deleted, DataType::Boolean, false));
        }
        Arc::new(Schema::new(fields))
    }

    /// History rows of one decoded chunk of `object`; its first row is data
    /// row `first_row + 1` of the object (the position is part of `change_seq`).
    pub fn history_chunk(
        &self,
        object: &SourceObject,
        batch: &RecordBatch,
        first_row: usize,
        ingested_at: DateTime<Utc>,
    ) -> Result<RecordBatch> {
        let schema = self.history_schema();
        let rows = batch.num_rows();
        let op = batch
            .column_by_name(&self.meta.op)
            .expect("decoded op")
            .clone();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for field in schema
            .fields()
            .iter()
            .take(self.columns.len() + self.extra_columns.len())
        {
            columns.push(
                batch
                    .column_by_name(field.name())
                    .expect("decoded column")
                    .clone(),
            );
        }
        columns.push(op);
        columns.push(Arc::new(self.commit_ts(object, batch)));
        columns.push(Arc::new(self.change_seq(object, batch, first_row)?));
        columns.push(Arc::new(StringArray::from(vec![object.key.as_str(); rows])));
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(vec![ingested_at.timestamp_micros(); rows])
                .with_timezone(UTC),
        ));
        RecordBatch::try_new(schema, columns)
            .map_err(|e| Error::decode(&object.key, Location::default(), e.to_string()))
    }

    /// The figures of the batch whose history rows are registered as `rows`,
    /// and its order: smallest `change_seq` and latest truncate.
    pub async fn batch_stats(
        &self,
        ctx: &SessionContext,
        rows: &str,
    ) -> Result<(BatchStats, BatchOrder)> {
        let m = &self.meta;
        let query = sql::render(
            sql::BATCH_STATS,
            &[
                ("op", &sql::ident(&m.op)),
                ("change_seq", &sql::ident(&m.change_seq)),
                ("commit_ts", &sql::ident(&m.commit_ts)),
                ("rows", &sql::ident(rows)),
            ],
        );
        let fail = |e| Error::query("batch_stats.sql", e);
        let batches = collect(ctx, &query, "batch_stats.sql").await?;
        let mut stats = BatchStats::default();
        let mut order = BatchOrder::default();
        for b in &batches {
            let text = |i: usize| {
                arrow::compute::cast(b.column(i), &DataType::Utf8).map_err(|e| fail(e.into()))
            };
            let (ops, mins, maxs) = (text(0)?, text(2)?, text(3)?);
            let counts =
                arrow::compute::cast(b.column(1), &DataType::UInt64).map_err(|e| fail(e.into()))?;
            let newest =
                arrow::compute::cast(b.column(4), &DataType::Int64).map_err(|e| fail(e.into()))?;
            let (ops, mins, maxs) = (
                ops.as_string::<i32>(),
                mins.as_string::<i32>(),
                maxs.as_string::<i32>(),
            );
            let (counts, newest) = (
                counts.as_primitive::<UInt64Type>(),
                newest.as_primitive::<Int64Type>(),
            );
            for i in 0..b.num_rows() {
                let n = counts.value(i);
                match ops.value(i) {
                    "I" => stats.inserts += n,
                    "U" => stats.updates += n,
                    "T" => {
                        stats.deletes += n;
                        order.truncated = Some(maxs.value(i).to_string());
                    }
                    _ => stats.deletes += n,
                }
                stats.rows += n;
                stats.max_seq = stats.max_seq.clone().max(Some(maxs.value(i).to_string()));
                stats.max_commit_ts = stats
                    .max_commit_ts
                    .max(DateTime::from_timestamp_micros(newest.value(i)));
                let min = mins.value(i).to_string();
                order.min_seq = Some(order.min_seq.map_or(min.clone(), |m| m.min(min)));
            }
        }
        Ok((stats, order))
    }

    /// The decoded timestamp, or else the CDC file-name time, or else the object's last-modified time.
    fn commit_ts(&self, object: &SourceObject, batch: &RecordBatch) -> TimestampMicrosecondArray {
        let decoded = batch
            .column_by_name(&self.meta.commit_ts)
            .expect("decoded commit_ts")
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let fallback = object
            .name
            .order
            .cdc_time()
            .unwrap_or(object.last_modified)
            .timestamp_micros();
        if decoded.null_count() == 0 {
            return decoded.clone();
        }
        decoded
            .iter()
            .map(|v| Some(v.unwrap_or(fallback)))
            .collect::<TimestampMicrosecondArray>()
            .with_timezone(UTC)
    }

    fn change_seq(
        &self,
        object: &SourceObject,
        batch: &RecordBatch,
        first_row: usize,
    ) -> Result<StringArray> {
        let rows = batch.num_rows();
        let sequence = match (&self.sequence_column, object.name.order) {
            (Some(name), ObjectOrder::Cdc(_)) => {
                Some(batch.column_by_name(name).expect("decoded extra"))
            }
            _ => None,
        };
        match sequence {
            None => {
                let prefix = object.name.order.sort_key();
                Ok(row_seqs(
                    &prefix,
                    (first_row..first_row + rows).map(|r| r as u64),
                ))
            }
            Some(values) => {
                let values = values.as_string::<i32>();
                let offsets = values.value_offsets();
                let bytes = (offsets[rows] - offsets[0]) as usize;
                let mut out = StringBuilder::with_capacity(rows, bytes + rows);
                for row in 0..rows {
                    if values.is_null(row) {
                        return Err(Error::decode(
                            &object.key,
                            Location {
                                line: None,
                                row: Some((first_row + row) as u64 + 1),
                                column: self.sequence_column.clone(),
                            },
                            "the sequence column is NULL; every CDC row needs a value",
                        ));
                    }
                    out.append_value(format!("1{}", values.value(row)));
                }
                Ok(out.finish())
            }
        }
    }

    /// The current-state rows of the latest changes per key in the
    /// registered table `latest` (see [`LatestChanges`]): deletes dropped, or
    /// flagged under soft delete.
    pub async fn current_state(&self, ctx: &SessionContext, latest: &str) -> Result<DataFrame> {
        let m = &self.meta;
        let columns = self
            .columns
            .iter()
            .map(|c| sql::ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let is_delete = format!("{} = 'D'", sql::ident(&m.op));
        let (deleted, keep) = if self.soft_delete {
            (
                format!(", {is_delete} AS {}", sql::ident(&m.deleted)),
                "TRUE".to_string(),
            )
        } else {
            (String::new(), format!("NOT ({is_delete})"))
        };
        let query = sql::render(
            sql::CURRENT_REBUILD,
            &[
                ("columns", &columns),
                ("commit_ts", &sql::ident(&m.commit_ts)),
                ("change_seq", &sql::ident(&m.change_seq)),
                ("deleted", &deleted),
                ("latest", &sql::ident(latest)),
                ("keep", &keep),
            ],
        );
        ctx.sql(&query)
            .await
            .map_err(|e| Error::query("current_rebuild.sql", e))
    }

    /// The history (registered as `history`) of the keys present in `batch`.
    pub async fn late_changes(
        &self,
        ctx: &SessionContext,
        history: &str,
        batch: &str,
    ) -> Result<DataFrame> {
        let query = sql::render(
            sql::LATE_CHANGES,
            &[
                ("history", &sql::ident(history)),
                ("batch", &sql::ident(batch)),
                ("key", &sql::key_list(&self.key)),
                ("key_equal", &sql::key_equal("h", "b", &self.key)),
            ],
        );
        ctx.sql(&query)
            .await
            .map_err(|e| Error::query("late_changes.sql", e))
    }

    /// The query of the `<t>_versions` view over `history` (a quoted table reference).
    pub fn versions_sql(&self, history: &str, dialect: sql::Dialect) -> String {
        let q = |name: &str| dialect.ident(name);
        sql::render(
            sql::VERSIONS,
            &[
                ("history", history),
                ("commit_ts", &q(&self.meta.commit_ts)),
                ("change_seq", &q(&self.meta.change_seq)),
                ("op", &q(&self.meta.op)),
                ("key", &dialect.list(&self.key)),
            ],
        )
    }
}
