//! Writing captured rows as DMS-format objects (ARCHITECTURE §1): per table a
//! buffer of rows, flushed to one CSV or Parquet object, durably.
//!
//! Columns of every object: `Op` (CDC objects only), the timestamp column
//! (commit time), the sequence column (fixed-width text, totally ordered),
//! then the table's columns after mapping. Beside the data, one schema file
//! per table version (`cdcflow-schema-v0001.json`) names the columns and
//! types, so headerless CSV is self-describing.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::mapping::{OutputColumn, OutputTable};
use super::source::Value;
use crate::config::UTC;
use crate::decode::columns::ColumnBuilder;
use crate::decode::{EXISTING_METADATA, Op};
use crate::error::{Error, Result};
use crate::source::push_padded;

/// Object format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Headerless CSV, DMS defaults.
    Csv,
    /// Parquet, uncompressed, as DMS writes it by default.
    #[default]
    Parquet,
}

impl OutputFormat {
    fn extension(self) -> &'static str {
        match self {
            OutputFormat::Csv => "csv",
            OutputFormat::Parquet => "parquet",
        }
    }
}

/// Where objects go: a local directory (written with fsync) or an object store.
#[derive(Clone)]
pub enum Target {
    /// A local directory.
    Local(PathBuf),
    /// An object store and the prefix inside it.
    Store(Arc<dyn ObjectStore>, StorePath),
}

/// `key` under the store's prefix.
fn under(root: &StorePath, key: &str) -> StorePath {
    StorePath::from_iter(root.parts().chain(StorePath::from(key).parts()))
}

impl Target {
    /// Writes `bytes` at `key` durably and atomically: a reader sees the whole
    /// object or nothing, and it survives a crash once this returns.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        match self {
            Target::Local(dir) => {
                let path = dir.join(key);
                let parent = path.parent().expect("key has a folder").to_path_buf();
                tokio::task::spawn_blocking(move || write_synced(&parent, &path, &bytes))
                    .await
                    .expect("write task")
            }
            Target::Store(store, root) => {
                let path = under(root, key);
                store
                    .put(&path, PutPayload::from_bytes(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::object_store(format!("writing {path}"), e))
            }
        }
    }

    /// Reads `key`; `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self {
            Target::Local(dir) => match std::fs::read(dir.join(key)) {
                Ok(b) => Ok(Some(b.into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("reading", dir.join(key).display(), e)),
            },
            Target::Store(store, root) => {
                let path = under(root, key);
                match store.get(&path).await {
                    Ok(r) => {
                        Ok(Some(r.bytes().await.map_err(|e| {
                            Error::object_store(format!("reading {path}"), e)
                        })?))
                    }
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(Error::object_store(format!("reading {path}"), e)),
                }
            }
        }
    }

    /// Whether `key` exists (without reading it).
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self {
            Target::Local(dir) => Ok(dir.join(key).is_file()),
            Target::Store(store, root) => {
                let path = under(root, key);
                match store.head(&path).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(Error::object_store(format!("looking up {path}"), e)),
                }
            }
        }
    }

    /// The keys of the objects in folder `dir` (not in folders under it).
    pub async fn list(&self, dir: &str) -> Result<Vec<String>> {
        match self {
            Target::Local(root) => {
                let path = root.join(dir);
                let entries = match std::fs::read_dir(&path) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                    Err(e) => return Err(Error::io("listing", path.display(), e)),
                };
                let mut keys = vec![];
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io("listing", path.display(), e))?;
                    if entry.path().is_file() {
                        keys.push(format!("{dir}/{}", entry.file_name().to_string_lossy()));
                    }
                }
                Ok(keys)
            }
            Target::Store(store, root) => {
                let path = under(root, dir);
                let listed = store
                    .list_with_delimiter(Some(&path))
                    .await
                    .map_err(|e| Error::object_store(format!("listing {path}"), e))?;
                Ok(listed
                    .objects
                    .iter()
                    .filter_map(|o| o.location.filename().map(|name| format!("{dir}/{name}")))
                    .collect())
            }
        }
    }

    /// Deletes `key` if it exists.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Target::Local(dir) => match std::fs::remove_file(dir.join(key)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("deleting", dir.join(key).display(), e))
                }
                _ => Ok(()),
            },
            Target::Store(store, root) => {
                let path = under(root, key);
                match store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(Error::object_store(format!("deleting {path}"), e)),
                }
            }
        }
    }
}

fn write_synced(parent: &std::path::Path, path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |what: &str, e| Error::io(what, path.display(), e);
    std::fs::create_dir_all(parent).map_err(|e| io("creating the folder of", e))?;
    let tmp = path.with_extension("cdcflow-tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
    file.write_all(bytes).map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into", e))?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the folder of", e))
}

/// How objects are laid out and named.
#[derive(Debug, Clone)]
pub struct Layout {
    /// CSV or Parquet.
    pub format: OutputFormat,
    /// Name of the commit-time column.
    pub timestamp_column: String,
    /// Name of the change-sequence column.
    pub sequence_column: String,
    /// CDC objects under `yyyy/MM/dd/` folders (DMS DatePartitionEnabled).
    pub date_folders: bool,
    /// Rows per object at most.
    pub max_rows: usize,
    /// Bytes of buffered values per object at most (approximate).
    pub max_bytes: usize,
    /// Bytes of values the sink holds at most before it writes them, even in
    /// the middle of a transaction (see `Sink::spill_if_full`).
    pub max_held_bytes: usize,
}

/// Which kind of object a buffer becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A full-load file (no `Op` column).
    Load,
    /// A CDC file.
    Cdc,
}

/// A problem with one value, before it is written.
#[derive(Debug)]
pub struct BadValue {
    /// Column name (after mapping).
    pub column: String,
    /// The text value.
    pub value: String,
    /// What the column's type expects.
    pub expected: String,
}

impl BadValue {
    /// `value` of `column` is not what its type `expected`.
    fn new(column: &OutputColumn, value: Value<'_>, expected: String) -> BadValue {
        let mut text = String::new();
        value.write_text(&mut text);
        BadValue {
            column: column.name.clone(),
            value: text.chars().take(100).collect(),
            expected,
        }
    }

    /// The error, for the change or row described by `at`.
    pub fn at(self, at: impl std::fmt::Display) -> Error {
        Error::capture(
            format!("{at}, column {:?}", self.column),
            format!("value {:?} is not {}", self.value, self.expected),
        )
    }
}

enum Rows {
    Parquet(Box<ParquetRows>),
    Csv(Vec<u8>),
}

/// Rows per Parquet row group: the builders hold one row group's rows, and
/// each full one goes to the buffer's [`Encoder`].
const ROW_GROUP_ROWS: usize = 10_000;

/// A Parquet buffer: the current row group's builders, and the encoder of
/// the full ones before it.
struct ParquetRows {
    /// CDC objects only.
    op: Option<StringBuilder>,
    ts: TimestampMicrosecondBuilder,
    seq: StringBuilder,
    columns: Vec<ColumnBuilder>,
    /// Rows in the builders.
    pending: usize,
    schema: SchemaRef,
    props: WriterProperties,
    /// Started at the first full row group; small buffers never start one.
    encoder: Option<Encoder>,
}

impl ParquetRows {
    /// The builders' rows as one batch (the builders are left empty).
    fn batch(&mut self) -> RecordBatch {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        if let Some(op) = &mut self.op {
            arrays.push(Arc::new(op.finish()));
        }
        arrays.push(Arc::new(self.ts.finish()));
        arrays.push(Arc::new(self.seq.finish()));
        arrays.extend(self.columns.iter_mut().map(ColumnBuilder::finish));
        self.pending = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).expect("builders match the schema")
    }

    /// Hands a full row group to the encoder (started at the first).
    fn row_group_done(&mut self) {
        let batch = self.batch();
        let encoder = self
            .encoder
            .get_or_insert_with(|| Encoder::start(self.schema.clone(), self.props.clone()));
        encoder.send(batch);
    }

    /// The object's bytes: the last rows, then the encoder's output.
    fn finish(mut self) -> Result<Bytes> {
        let last = self.batch();
        match self.encoder.take() {
            Some(encoder) => {
                encoder.send(last);
                encoder.finish()
            }
            None => encode_batches(self.schema, self.props, [last]),
        }
        .map(Bytes::from)
    }
}

/// Encodes a buffer's row groups on a thread of its own while the source
/// goes on appending rows: an object is mostly encoded by the time it is
/// written. The channel is unbounded, but every row in it left the
/// builders, so a buffer never holds more than its rows.
struct Encoder {
    batches: std::sync::mpsc::Sender<RecordBatch>,
    done: std::thread::JoinHandle<Result<Vec<u8>>>,
}

impl Encoder {
    fn start(schema: SchemaRef, props: WriterProperties) -> Encoder {
        let (batches, received) = std::sync::mpsc::channel();
        let done = std::thread::Builder::new()
            .name("capture-encode".into())
            .spawn(move || encode_batches(schema, props, received))
            .expect("a thread starts");
        Encoder { batches, done }
    }

    fn send(&self, batch: RecordBatch) {
        // A failed encoder has hung up; its error comes from `finish`.
        let _ = self.batches.send(batch);
    }

    fn finish(self) -> Result<Vec<u8>> {
        drop(self.batches);
        self.done
            .join()
            .map_err(|_| Error::Internal("the Parquet encoder thread panicked".into()))?
    }
}

/// A Parquet file of `batches`.
fn encode_batches(
    schema: SchemaRef,
    props: WriterProperties,
    batches: impl IntoIterator<Item = RecordBatch>,
) -> Result<Vec<u8>> {
    let failed =
        |e: parquet::errors::ParquetError| Error::Internal(format!("writing Parquet: {e}"));
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props)).map_err(failed)?;
    for batch in batches {
        writer.write(&batch).map_err(failed)?;
    }
    writer.close().map_err(failed)?;
    Ok(out)
}

/// The rows of one table waiting to be written as one object.
pub struct Buffer {
    table: Arc<OutputTable>,
    kind: Kind,
    rows: Rows,
    count: usize,
    bytes: usize,
    /// Sequence of the last row.
    pub last_seq: String,
    /// A value's text form, while it is appended.
    text: String,
}

impl Buffer {
    /// An empty buffer.
    pub fn new(table: Arc<OutputTable>, kind: Kind, layout: &Layout) -> Buffer {
        let cap = layout.max_rows.min(ROW_GROUP_ROWS);
        let rows = match layout.format {
            OutputFormat::Parquet => Rows::Parquet(Box::new(ParquetRows {
                op: (kind == Kind::Cdc).then(|| StringBuilder::with_capacity(cap, cap)),
                ts: TimestampMicrosecondBuilder::with_capacity(cap).with_timezone(UTC),
                seq: StringBuilder::with_capacity(cap, cap * 35),
                columns: table
                    .columns
                    .iter()
                    .map(|c| ColumnBuilder::new(c.sql_type, cap))
                    .collect(),
                pending: 0,
                schema: parquet_schema(&table, kind, layout),
                props: parquet_props(layout),
                encoder: None,
            })),
            OutputFormat::Csv => Rows::Csv(Vec::with_capacity(1 << 16)),
        };
        Buffer {
            table,
            kind,
            rows,
            count: 0,
            bytes: 0,
            last_seq: String::new(),
            text: String::new(),
        }
    }

    /// The table written.
    pub fn table(&self) -> &Arc<OutputTable> {
        &self.table
    }

    /// Bytes of values buffered (approximate).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Rows buffered.
    pub fn len(&self) -> usize {
        self.count
    }

    /// No rows buffered.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the buffer has reached a rotation limit.
    pub fn full(&self, layout: &Layout) -> bool {
        self.count >= layout.max_rows || self.bytes >= layout.max_bytes
    }

    /// Appends one row: `row` holds the source columns (before mapping).
    pub fn append(
        &mut self,
        op: Op,
        commit_micros: i64,
        seq: &str,
        row: &[Value<'_>],
    ) -> Result<(), BadValue> {
        let Buffer {
            table, rows, text, ..
        } = self;
        match rows {
            Rows::Parquet(rows) => {
                let ParquetRows {
                    op: ops,
                    ts,
                    seq: seqs,
                    columns,
                    ..
                } = rows.as_mut();
                for (builder, col) in columns.iter_mut().zip(&table.columns) {
                    let value = row[col.source_index];
                    let appended = match (value, &col.mask) {
                        (Value::Null | Value::Unchanged, _) => {
                            builder.append_null();
                            continue;
                        }
                        (value, Some(mask)) => {
                            text.clear();
                            value.write_text(text);
                            builder.append_text(&mask.apply(text))
                        }
                        (value, None) => append_value(builder, value, text),
                    };
                    appended.map_err(|expected| BadValue::new(col, value, expected))?;
                    self.bytes += match value {
                        Value::Text(v) => v.len(),
                        Value::Bytes(v) => v.len(),
                        _ => 8,
                    };
                }
                if let Some(ops) = ops {
                    ops.append_value(op.as_str());
                }
                ts.append_value(commit_micros);
                seqs.append_value(seq);
                rows.pending += 1;
                if rows.pending == ROW_GROUP_ROWS {
                    rows.row_group_done();
                }
            }
            Rows::Csv(out) => {
                let start = out.len();
                if self.kind == Kind::Cdc {
                    out.extend_from_slice(op.as_str().as_bytes());
                    out.push(b',');
                }
                let at = DateTime::<Utc>::from_timestamp_micros(commit_micros).unwrap_or_default();
                out.extend_from_slice(timestamp_text(at).as_bytes());
                out.push(b',');
                out.extend_from_slice(seq.as_bytes());
                for col in &table.columns {
                    out.push(b',');
                    match (row[col.source_index], &col.mask) {
                        (Value::Null | Value::Unchanged, _) => {}
                        (Value::Text(v), None) => csv_field(out, v),
                        (value, mask) => {
                            text.clear();
                            value.write_text(text);
                            match mask {
                                Some(mask) => csv_field(out, &mask.apply(text)),
                                None => csv_field(out, text),
                            }
                        }
                    }
                }
                out.push(b'\n');
                self.bytes += out.len() - start;
            }
        }
        self.count += 1;
        self.last_seq.clear();
        self.last_seq.push_str(seq);
        Ok(())
    }

    /// The object's bytes.
    pub fn encode(self) -> Result<Bytes> {
        match self.rows {
            Rows::Csv(out) => Ok(out.into()),
            Rows::Parquet(rows) => rows.finish(),
        }
    }
}

/// The columns of a Parquet object of `table`.
fn parquet_schema(table: &OutputTable, kind: Kind, layout: &Layout) -> SchemaRef {
    let mut fields = Vec::with_capacity(table.columns.len() + 3);
    if kind == Kind::Cdc {
        fields.push(Field::new("Op", DataType::Utf8, false));
    }
    fields.push(Field::new(
        &layout.timestamp_column,
        DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        false,
    ));
    fields.push(Field::new(&layout.sequence_column, DataType::Utf8, false));
    for col in &table.columns {
        let field = Field::new(&col.name, col.sql_type.arrow_type(), true);
        fields.push(match &col.existing {
            Some(value) => {
                field.with_metadata([(EXISTING_METADATA.to_string(), value.clone())].into())
            }
            None => field,
        });
    }
    Arc::new(Schema::new(fields))
}

/// Row groups of [`ROW_GROUP_ROWS`]. The sequence has neither a dictionary
/// (it is unique per row) nor min/max statistics (two string comparisons a
/// row, and nothing reads them: an object's rows are in sequence order).
fn parquet_props(layout: &Layout) -> WriterProperties {
    let seq = parquet::schema::types::ColumnPath::from(layout.sequence_column.as_str());
    WriterProperties::builder()
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_column_dictionary_enabled(seq.clone(), false)
        .set_column_statistics_enabled(seq, parquet::file::properties::EnabledStatistics::None)
        .build()
}

/// Writes one table's full load: `LOAD00000001`, `LOAD00000002`… of at most
/// the layout's rows and bytes each, every row an insert at the snapshot's time.
///
/// Several writers may copy parts of one table at once ([`LoadWriter::part`]):
/// they share the table's object numbers, and the last one to finish writes
/// an empty object if the table had no rows. Each writer encodes a full
/// object while it goes on taking rows (one object in flight).
pub struct LoadWriter {
    target: Target,
    layout: Layout,
    output: Arc<OutputTable>,
    /// What is being copied, for errors.
    context: String,
    snapshot_micros: i64,
    buffer: Buffer,
    rows: u64,
    /// The number of this writer's first row (rows of parts are numbered apart).
    first_row: u64,
    objects: Arc<LoadObjects>,
    in_flight: Option<tokio::task::JoinHandle<Result<()>>>,
    seq: String,
}

/// What the writers of one table's full load share.
#[derive(Debug)]
struct LoadObjects {
    /// The next object's number.
    next: std::sync::atomic::AtomicU32,
    /// Writers not finished.
    open: std::sync::atomic::AtomicUsize,
}

impl LoadWriter {
    /// Starts the full load of `output`; the objects of an earlier,
    /// interrupted full load of it are deleted first (all of them: parts
    /// copied at once may have left any numbers).
    pub async fn start(
        target: Target,
        layout: Layout,
        output: Arc<OutputTable>,
        context: String,
        snapshot_micros: i64,
    ) -> Result<LoadWriter> {
        for key in target.list(&table_dir(&output)).await? {
            if key
                .rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with("LOAD"))
            {
                target.delete(&key).await?;
            }
        }
        let buffer = Buffer::new(output.clone(), Kind::Load, &layout);
        Ok(LoadWriter {
            target,
            layout,
            output,
            context,
            snapshot_micros,
            buffer,
            rows: 0,
            first_row: 0,
            objects: Arc::new(LoadObjects {
                next: 1.into(),
                open: 1.into(),
            }),
            in_flight: None,
            seq: String::new(),
        })
    }

    /// Another writer of the same table's objects, for a part of its rows
    /// (`context` names it), numbered from `first_row`.
    pub fn part(&self, context: String, first_row: u64) -> LoadWriter {
        self.objects
            .open
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        LoadWriter {
            target: self.target.clone(),
            layout: self.layout.clone(),
            output: self.output.clone(),
            context,
            snapshot_micros: self.snapshot_micros,
            buffer: Buffer::new(self.output.clone(), Kind::Load, &self.layout),
            rows: 0,
            first_row,
            objects: self.objects.clone(),
            in_flight: None,
            seq: String::new(),
        }
    }

    /// Appends one row of source columns; writes an object when one is full.
    pub async fn row(&mut self, values: &[Value<'_>]) -> Result<()> {
        self.rows += 1;
        self.seq.clear();
        push_padded(&mut self.seq, 0, 20);
        push_padded(&mut self.seq, self.first_row + self.rows, 15);
        self.buffer
            .append(Op::Insert, self.snapshot_micros, &self.seq, values)
            .map_err(|bad| bad.at(format!("{}, row {}", self.context, self.rows)))?;
        if self.buffer.full(&self.layout) {
            let next = Buffer::new(self.output.clone(), Kind::Load, &self.layout);
            let full = std::mem::replace(&mut self.buffer, next);
            self.write(full).await?;
        }
        Ok(())
    }

    /// Rows appended so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the last object and returns the rows. The last writer of a
    /// table to finish writes an empty object when no other was written.
    pub async fn finish(mut self) -> Result<u64> {
        let last = std::mem::replace(
            &mut self.buffer,
            Buffer::new(self.output.clone(), Kind::Load, &self.layout),
        );
        if !last.is_empty() {
            self.write(last).await?;
        }
        self.wait().await?;
        use std::sync::atomic::Ordering::SeqCst;
        if self.objects.open.fetch_sub(1, SeqCst) == 1 && self.objects.next.load(SeqCst) == 1 {
            let empty = Buffer::new(self.output.clone(), Kind::Load, &self.layout);
            self.write(empty).await?;
            self.wait().await?;
        }
        Ok(self.rows)
    }

    /// Starts writing `buffer` as the table's next object, once the object
    /// in flight is written.
    async fn write(&mut self, buffer: Buffer) -> Result<()> {
        self.wait().await?;
        let number = self
            .objects
            .next
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let key = load_key(&self.output, number, &self.layout);
        let target = self.target.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let bytes = tokio::task::spawn_blocking(move || buffer.encode())
                .await
                .expect("encoding task")?;
            target.put(&key, bytes).await
        }));
        Ok(())
    }

    /// Waits for the object in flight.
    async fn wait(&mut self) -> Result<()> {
        match self.in_flight.take() {
            Some(task) => task.await.expect("write task"),
            None => Ok(()),
        }
    }
}

/// `yyyy-MM-dd HH:mm:ss.ffffff` (UTC), formatted by hand: chrono's strftime
/// showed up in perf on a per-row path.
pub(crate) fn timestamp_text(at: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        at.year(),
        at.month(),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.timestamp_subsec_micros()
    )
}

/// Appends `value` to `builder`: as it is where the column's type holds it
/// (an integer into an integer column that fits it, a decimal of the
/// column's scale and precision, …), else through its text form (made in
/// `text`), so that a value that does not fit fails as its text would.
fn append_value(
    builder: &mut ColumnBuilder,
    value: Value<'_>,
    text: &mut String,
) -> Result<(), String> {
    use ColumnBuilder as B;
    match (builder, value) {
        (B::BigInt(b), Value::Int(i)) => b.append_value(i),
        (B::Integer(b), Value::Int(i)) if i32::try_from(i).is_ok() => b.append_value(i as i32),
        (B::SmallInt(b), Value::Int(i)) if i16::try_from(i).is_ok() => b.append_value(i as i16),
        (B::Double(b), Value::Double(f)) => b.append_value(f),
        (B::Decimal(b, precision, scale), Value::Decimal(digits, s))
            if i8::try_from(s) == Ok(*scale)
                && digits.unsigned_abs() < 10u128.pow(u32::from(*precision)) =>
        {
            b.append_value(digits)
        }
        (B::Timestamp(b, zoned), Value::Timestamp(micros, utc)) if *zoned == utc => {
            b.append_value(micros)
        }
        (B::Date(b), Value::Date(days)) => b.append_value(days),
        (B::Bytes(b), Value::Bytes(bytes)) => b.append_value(bytes),
        (builder, Value::Text(v)) => return builder.append_text(v),
        (builder, value) => {
            text.clear();
            value.write_text(text);
            return builder.append_text(text);
        }
    }
    Ok(())
}

/// RFC 4180 field; an empty string is quoted so that it is not read as NULL.
fn csv_field(out: &mut Vec<u8>, v: &str) {
    let needs = v.is_empty()
        || v.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'))
        || v.starts_with(' ')
        || v.ends_with(' ');
    if !needs {
        out.extend_from_slice(v.as_bytes());
        return;
    }
    out.push(b'"');
    for b in v.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Key of a table's folder: `schema/table`.
pub fn table_dir(table: &OutputTable) -> String {
    format!("{}/{}", table.schema, table.name)
}

/// Key of a full-load object: `schema/table/LOAD00000001.parquet`.
pub fn load_key(table: &OutputTable, number: u32, layout: &Layout) -> String {
    format!(
        "{}/LOAD{number:08}.{}",
        table_dir(table),
        layout.format.extension()
    )
}

/// Key of a CDC object named by `at` (`yyyyMMdd-HHmmssSSS`), under date
/// folders when configured.
pub fn cdc_key(table: &OutputTable, at: DateTime<Utc>, layout: &Layout) -> String {
    let folders = if layout.date_folders {
        at.format("%Y/%m/%d/").to_string()
    } else {
        String::new()
    };
    format!(
        "{}/{folders}{}.{}",
        table_dir(table),
        at.format("%Y%m%d-%H%M%S%3f"),
        layout.format.extension()
    )
}

/// The schema file of one table version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchemaFile {
    /// Schema folder.
    pub schema: String,
    /// Table folder.
    pub table: String,
    /// Version, from 1.
    pub version: u32,
    /// The first object written with this version.
    pub first_object: String,
    /// Columns in file order, after the DMS columns.
    pub columns: Vec<SchemaColumn>,
    /// Primary-key columns.
    pub primary_key: Vec<String>,
}

/// A column of a [`SchemaFile`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchemaColumn {
    /// Name.
    pub name: String,
    /// Type as a pipeline file spells it.
    #[serde(rename = "type")]
    pub sql_type: String,
    /// The value of rows stored before the column was added (see
    /// [`crate::decode::EXISTING_METADATA`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<String>,
    /// Declared NOT NULL.
    #[serde(default)]
    pub not_null: bool,
}

impl SchemaFile {
    /// The schema file of `table` at `version`.
    pub fn new(table: &OutputTable, version: u32, first_object: String) -> SchemaFile {
        SchemaFile {
            schema: table.schema.clone(),
            table: table.name.clone(),
            version,
            first_object,
            columns: table
                .columns
                .iter()
                .map(|c| SchemaColumn {
                    name: c.name.clone(),
                    sql_type: c.sql_type.to_string(),
                    existing: c.existing.clone(),
                    not_null: c.not_null,
                })
                .collect(),
            primary_key: table
                .columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone())
                .collect(),
        }
    }

    /// Its key beside the data.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/cdcflow-schema-v{:04}.json",
            self.schema, self.table, self.version
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SqlType;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn layout(max_rows: usize) -> Layout {
        Layout {
            format: OutputFormat::Parquet,
            timestamp_column: "ts".into(),
            sequence_column: "seq".into(),
            date_folders: false,
            max_rows,
            max_bytes: usize::MAX,
            max_held_bytes: usize::MAX,
        }
    }

    fn column(source_index: usize, name: &str, sql_type: SqlType) -> OutputColumn {
        OutputColumn {
            source_index,
            name: name.into(),
            sql_type,
            key: source_index == 0,
            mask: None,
            existing: None,
            not_null: false,
        }
    }

    /// Rows appended to a Parquet buffer come out of its object in order,
    /// whole, in row groups of `ROW_GROUP_ROWS`, for sizes below, at and
    /// past a row group (the encoder thread is started at the first full one).
    #[test]
    fn a_parquet_object_holds_every_row_appended_in_order() {
        let table = Arc::new(OutputTable {
            schema: "public".into(),
            name: "t".into(),
            columns: vec![
                column(0, "id", SqlType::BigInt),
                column(1, "name", SqlType::Text),
            ],
        });
        for (rows, kind) in [
            (0, Kind::Cdc),
            (7, Kind::Cdc),
            (ROW_GROUP_ROWS, Kind::Load),
            (2 * ROW_GROUP_ROWS + 3, Kind::Cdc),
        ] {
            let layout = layout(1_000_000);
            let mut buffer = Buffer::new(table.clone(), kind, &layout);
            for i in 0..rows {
                let name = format!("row {i}");
                let values = [
                    Value::Int(i as i64 * 3),
                    if i % 5 == 0 {
                        Value::Null
                    } else {
                        Value::Text(&name)
                    },
                ];
                let op = if i % 2 == 0 { Op::Insert } else { Op::Update };
                buffer
                    .append(op, 1_000 + i as i64, &format!("{i:035}"), &values)
                    .unwrap();
            }
            let bytes = buffer.encode().unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
            let groups: Vec<i64> = (0..reader.metadata().num_row_groups())
                .map(|g| reader.metadata().row_group(g).num_rows())
                .collect();
            let expected_groups: Vec<i64> = (0..rows.div_ceil(ROW_GROUP_ROWS))
                .map(|g| (rows - g * ROW_GROUP_ROWS).min(ROW_GROUP_ROWS) as i64)
                .collect();
            assert_eq!(groups, expected_groups, "{rows} rows: row groups");
            let mut i = 0;
            for batch in reader.build().unwrap() {
                let batch = batch.unwrap();
                let ops = batch.column_by_name("Op");
                assert_eq!(ops.is_some(), kind == Kind::Cdc, "{rows} rows: Op column");
                let seqs = batch.column_by_name("seq").unwrap().as_string::<i32>();
                let ids = batch
                    .column_by_name("id")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                let names = batch.column_by_name("name").unwrap().as_string::<i32>();
                for r in 0..batch.num_rows() {
                    assert_eq!(seqs.value(r), format!("{i:035}"));
                    assert_eq!(ids.value(r), i as i64 * 3);
                    assert_eq!(names.is_null(r), i % 5 == 0, "row {i}");
                    if i % 5 != 0 {
                        assert_eq!(names.value(r), format!("row {i}"));
                    }
                    if let Some(ops) = ops {
                        let op = if i % 2 == 0 { "I" } else { "U" };
                        assert_eq!(ops.as_string::<i32>().value(r), op, "row {i}");
                    }
                    i += 1;
                }
            }
            assert_eq!(i, rows, "rows read back");
        }
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut out = Vec::new();
        for v in ["plain", "", "a,b", "say \"hi\"", "two\nlines", " pad"] {
            csv_field(&mut out, v);
            out.push(b'|');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain|\"\"|\"a,b\"|\"say \"\"hi\"\"\"|\"two\nlines\"|\" pad\"|"
        );
    }
}
