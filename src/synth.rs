//! A deterministic generator of realistic DMS output, for `testdata/`, the
//! tests and the benchmark.
//!
//! Two tables, as DMS writes them under `<out>/public/`:
//! - `orders` (key `id`): headerless CSV with a timestamp column, RFC 4180
//!   edge cases in the text (commas, quotes, newlines, trailing spaces, `""`
//!   versus NULL), some CDC files gzipped;
//! - `order_items` (key `order_id, line_no`): Parquet with DMS defaults
//!   (uncompressed, 10k-row row groups), the timestamp as a string column.
//!
//! `Formats::Csv` or `Formats::Parquet` writes both tables in one format
//! instead (uncompressed, as DMS does by default), for the benchmark.
//!
//! Full-load files first (~30% of the changes), then CDC files in date
//! folders: about half updates (many to a few hot keys), a third inserts
//! (some re-inserting deleted keys), the rest deletes; changes of one
//! transaction share a timestamp and may straddle a file boundary. The
//! generator also returns every change in order, so tests can compute the
//! expected tables independently of the code under test.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Decimal128Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use chrono::DateTime;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::decode::Op;
use crate::error::{Error, Result};

/// Generator settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Changes per table.
    pub changes: usize,
    /// Random seed: the same seed writes the same bytes.
    pub seed: u64,
    /// The objects' formats.
    pub formats: Formats,
}

/// The formats of the generated objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Formats {
    /// `orders` as CSV (some CDC files gzipped), `order_items` as Parquet.
    #[default]
    Mixed,
    /// Both tables as plain CSV.
    Csv,
    /// Both tables as Parquet.
    Parquet,
}

/// The type of a generated column in the objects.
#[derive(Debug, Clone, Copy)]
enum ColumnType {
    Int64,
    Int32,
    Text,
    /// Decimal with this precision, scale 2.
    Decimal(u8),
    /// Timestamp in UTC.
    TimestampTz,
    /// Timestamp without time zone.
    Timestamp,
}

/// A generated table's name, columns and key length.
struct TableShape {
    name: &'static str,
    columns: &'static [(&'static str, ColumnType)],
    key_len: usize,
}

const ORDERS: TableShape = TableShape {
    name: "orders",
    columns: &[
        ("id", ColumnType::Int64),
        ("customer", ColumnType::Text),
        ("amount", ColumnType::Decimal(12)),
        ("status", ColumnType::Text),
        ("note", ColumnType::Text),
        ("created_at", ColumnType::TimestampTz),
    ],
    key_len: 1,
};

const ORDER_ITEMS: TableShape = TableShape {
    name: "order_items",
    columns: &[
        ("order_id", ColumnType::Int64),
        ("line_no", ColumnType::Int32),
        ("sku", ColumnType::Text),
        ("qty", ColumnType::Int32),
        ("price", ColumnType::Decimal(10)),
        ("updated_at", ColumnType::Timestamp),
    ],
    key_len: 2,
};

/// A typed value of a generated row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// NULL.
    Null,
    /// Any integer.
    Int(i64),
    /// Decimal, unscaled (scale is the column's).
    Decimal(i128),
    /// Text.
    Text(String),
    /// Timestamp, µs since the epoch.
    Micros(i64),
}

/// One generated change.
#[derive(Debug, Clone)]
pub struct Change {
    /// Operation.
    pub op: Op,
    /// Row values in column order (a delete carries the full old row).
    pub values: Vec<Value>,
    /// Commit time written in the timestamp column, µs.
    pub commit_micros: i64,
    /// Index of the object it was written to (objects in change order).
    pub file: usize,
}

impl Change {
    fn new(op: Op, values: Vec<Value>) -> Self {
        Change {
            op,
            values,
            commit_micros: 0,
            file: 0,
        }
    }

    fn placed(&self, commit_micros: i64, file: usize) -> Self {
        Change {
            commit_micros,
            file,
            ..self.clone()
        }
    }
}

/// One generated table.
#[derive(Debug, Clone)]
pub struct SynthTable {
    /// Folder name under `public/`.
    pub name: &'static str,
    /// Column names.
    pub columns: Vec<&'static str>,
    /// How many leading columns form the key.
    pub key_len: usize,
    /// Every change, in change order.
    pub changes: Vec<Change>,
    /// Objects written.
    pub files: usize,
}

/// Everything the generator wrote.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `orders` then `order_items`.
    pub tables: Vec<SynthTable>,
}

impl std::fmt::Display for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for t in &self.tables {
            writeln!(
                f,
                "public.{}: {} changes in {} objects",
                t.name,
                t.changes.len(),
                t.files
            )?;
        }
        Ok(())
    }
}

/// splitmix64: small, fast, and stable across versions (unlike a crate's default RNG).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const CUSTOMERS: &[Option<&str>] = &[
    Some("Atelier graphique"),
    Some("Australian Collectors, Co."),
    Some("O\"Brien \"Bob\" Ltd"),
    Some("Two\nLines"),
    Some("Carine "),
    Some(""),
    None,
    Some("Mini Gifts Distributors Ltd."),
    Some("Havel & Zbyszek Co"),
    Some("Ünïcödé Straße"),
];
const STATUSES: &[&str] = &["new", "paid", "shipped", "cancelled"];

/// 2024-05-01 00:00:00 UTC in µs.
const START_MICROS: i64 = 1_714_521_600_000_000;

/// Which rows the generator changes, shared by both tables.
struct KeySpace {
    live: Vec<i64>,
    deleted: Vec<i64>,
    next: i64,
}

impl KeySpace {
    /// Index into `live`: half of the picks go to the first ten (hot) keys.
    fn pick_live(&self, rng: &mut Rng) -> usize {
        let n = self.live.len() as u64;
        let i = if rng.chance(50) {
            rng.below(n.min(10))
        } else {
            rng.below(n)
        };
        i as usize
    }
}

/// Generates the changes of one table and the order of files they fall into.
struct Plan {
    /// (changes, commit time µs of each) per file; first `load_files` are LOAD files.
    files: Vec<Vec<(Change, i64)>>,
    load_files: usize,
}

fn plan(
    opts: &Options,
    rng: &mut Rng,
    row: &mut dyn FnMut(&mut Rng, i64, u64) -> Vec<Value>,
    key_of: &dyn Fn(&[Value]) -> i64,
) -> Plan {
    let load_rows = (opts.changes * 3 / 10).max(1);
    let mut keys = KeySpace {
        live: Vec::new(),
        deleted: Vec::new(),
        next: 1,
    };
    let mut files: Vec<Vec<(Change, i64)>> = Vec::new();
    let per_load_file = load_rows.div_ceil(2).max(1);
    let mut version = 0u64;
    for i in 0..load_rows {
        if i % per_load_file == 0 {
            files.push(Vec::new());
        }
        let key = keys.next;
        keys.next += 1;
        keys.live.push(key);
        version += 1;
        files.last_mut().expect("file").push((
            Change::new(Op::Insert, row(rng, key, version)),
            START_MICROS,
        ));
    }
    let load_files = files.len();
    let cdc_changes = opts.changes.saturating_sub(load_rows);
    let mut now = START_MICROS + 3_600_000_000;
    let mut current: Vec<(Change, i64)> = Vec::new();
    let mut latest: std::collections::HashMap<i64, Vec<Value>> = files
        .iter()
        .flatten()
        .map(|(c, _)| (key_of(&c.values), c.values.clone()))
        .collect();
    let mut in_tx = 0;
    let file_rows = (cdc_changes / 12).clamp(1, 5_000);
    for _ in 0..cdc_changes {
        if in_tx == 0 {
            // A new transaction of 1–4 changes sharing one commit time.
            now += 1 + rng.below(4 * 72 * 3_600_000_000 / (cdc_changes as u64 + 1)) as i64;
            in_tx = 1 + rng.below(4);
        }
        in_tx -= 1;
        let roll = rng.below(100);
        version += 1;
        let change = if roll < 33 || keys.live.len() < 3 {
            let key = if !keys.deleted.is_empty() && rng.chance(30) {
                keys.deleted
                    .swap_remove(rng.below(keys.deleted.len() as u64) as usize)
            } else {
                keys.next += 1;
                keys.next - 1
            };
            keys.live.push(key);
            Change::new(Op::Insert, row(rng, key, version))
        } else if roll < 83 {
            let key = keys.live[keys.pick_live(rng)];
            Change::new(Op::Update, row(rng, key, version))
        } else {
            let key = keys.live.swap_remove(keys.pick_live(rng));
            keys.deleted.push(key);
            Change::new(Op::Delete, latest[&key].clone())
        };
        latest.insert(key_of(&change.values), change.values.clone());
        current.push((change, now));
        if current.len() >= file_rows {
            files.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        files.push(current);
    }
    Plan { files, load_files }
}

fn order_row(rng: &mut Rng, key: i64, version: u64) -> Vec<Value> {
    let customer = CUSTOMERS[rng.below(CUSTOMERS.len() as u64) as usize];
    let note = match rng.below(4) {
        0 => Value::Null,
        1 => Value::Text(String::new()),
        _ => Value::Text(format!("v{version}, note")),
    };
    vec![
        Value::Int(key),
        customer.map_or(Value::Null, |c| Value::Text(c.to_string())),
        Value::Decimal(rng.below(10_000_000) as i128 - 1_000),
        Value::Text(STATUSES[rng.below(STATUSES.len() as u64) as usize].to_string()),
        note,
        Value::Micros(START_MICROS - rng.below(86_400_000_000 * 30) as i64),
    ]
}

fn item_row(rng: &mut Rng, key: i64, _version: u64) -> Vec<Value> {
    vec![
        Value::Int(key / 4 + 1),
        Value::Int(key % 4 + 1),
        Value::Text(format!("SKU-{:05}", rng.below(50_000))),
        Value::Int(1 + rng.below(9) as i64),
        Value::Decimal(rng.below(100_000) as i128),
        Value::Micros(START_MICROS + rng.below(86_400_000_000) as i64),
    ]
}

fn cdc_name(micros: i64, ms_offset: i64) -> (String, String) {
    let t = DateTime::from_timestamp_micros(micros).expect("valid time")
        + chrono::Duration::milliseconds(ms_offset);
    (
        t.format("%Y/%m/%d").to_string(),
        t.format("%Y%m%d-%H%M%S%3f").to_string(),
    )
}

fn dms_time(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros)
        .expect("valid time")
        .format("%Y-%m-%d %H:%M:%S%.6f")
        .to_string()
}

fn decimal_text(unscaled: i128, scale: u32) -> String {
    let sign = if unscaled < 0 { "-" } else { "" };
    let abs = unscaled.unsigned_abs();
    let div = 10u128.pow(scale);
    format!(
        "{sign}{}.{:0width$}",
        abs / div,
        abs % div,
        width = scale as usize
    )
}

/// DMS CSV quoting: quote when needed and for the empty string; NULL is an empty unquoted field.
fn csv_field(out: &mut String, value: Option<&str>) {
    match value {
        None => {}
        Some(v) if v.is_empty() || v.contains([',', '"', '\n', '\r']) => {
            out.push('"');
            out.push_str(&v.replace('"', "\"\""));
            out.push('"');
        }
        Some(v) => out.push_str(v),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir.display(), e))?;
    }
    std::fs::write(path, bytes).map_err(|e| Error::io("cannot write", path.display(), e))
}

/// Writes the dataset under `out` and returns what it wrote.
pub fn write_dataset(out: &Path, opts: &Options) -> Result<Dataset> {
    let mut rng = Rng(opts.seed);
    let orders = plan(opts, &mut rng, &mut order_row, &|v| match v[0] {
        Value::Int(k) => k,
        _ => 0,
    });
    let (orders_csv, items_csv) = match opts.formats {
        Formats::Mixed => (true, false),
        Formats::Csv => (true, true),
        Formats::Parquet => (false, false),
    };
    // Only the mixed layout gzips some CSV objects (DMS writes plain CSV by default).
    let gzip = opts.formats == Formats::Mixed;
    let orders_table = write_table(out, &ORDERS, &orders, orders_csv, gzip)?;
    let mut rng = Rng(opts.seed ^ 0x5EED);
    let items = plan(opts, &mut rng, &mut item_row, &|v| match (&v[0], &v[1]) {
        (Value::Int(o), Value::Int(l)) => (o - 1) * 4 + (l - 1),
        _ => 0,
    });
    let items_table = write_table(out, &ORDER_ITEMS, &items, items_csv, gzip)?;
    Ok(Dataset {
        tables: vec![orders_table, items_table],
    })
}

fn file_path(out: &Path, table: &str, plan: &Plan, i: usize, ext: &str) -> std::path::PathBuf {
    let dir = out.join("public").join(table);
    if i < plan.load_files {
        return dir.join(format!("LOAD{:08}.{ext}", i + 1));
    }
    let last = plan.files[i].last().expect("non-empty file").1;
    // DMS names a CDC file after the time it is written: after its last change.
    let (folder, name) = cdc_name(last, 1 + i as i64);
    dir.join(folder).join(format!("{name}.{ext}"))
}

fn write_table(
    out: &Path,
    shape: &TableShape,
    plan: &Plan,
    csv: bool,
    gzip: bool,
) -> Result<SynthTable> {
    let mut changes = Vec::new();
    for (i, file) in plan.files.iter().enumerate() {
        let is_load = i < plan.load_files;
        changes.extend(file.iter().map(|(change, ts)| change.placed(*ts, i)));
        if csv {
            let gzip = gzip && !is_load && i % 3 == 0;
            let path = file_path(
                out,
                shape.name,
                plan,
                i,
                if gzip { "csv.gz" } else { "csv" },
            );
            write_file(&path, &csv_object(file, is_load, gzip, &path)?)?;
        } else {
            let path = file_path(out, shape.name, plan, i, "parquet");
            write_file(&path, &parquet_object(shape, file, is_load))?;
        }
    }
    Ok(SynthTable {
        name: shape.name,
        columns: shape.columns.iter().map(|(name, _)| *name).collect(),
        key_len: shape.key_len,
        changes,
        files: plan.files.len(),
    })
}

/// One headerless DMS CSV object: `[Op,]timestamp,columns…` per change.
fn csv_object(file: &[(Change, i64)], is_load: bool, gzip: bool, path: &Path) -> Result<Vec<u8>> {
    let mut text = String::new();
    for (change, ts) in file {
        if !is_load {
            text.push_str(change.op.as_str());
            text.push(',');
        }
        text.push_str(&dms_time(*ts));
        for v in &change.values {
            text.push(',');
            match v {
                Value::Null => {}
                Value::Int(n) => write!(text, "{n}").expect("write"),
                Value::Decimal(d) => text.push_str(&decimal_text(*d, 2)),
                Value::Text(s) => csv_field(&mut text, Some(s)),
                Value::Micros(m) => text.push_str(&dms_time(*m)),
            }
        }
        text.push('\n');
    }
    if !gzip {
        return Ok(text.into_bytes());
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text.as_bytes())
        .map_err(|e| Error::io("gzip", path.display(), e))?;
    enc.finish()
        .map_err(|e| Error::io("gzip", path.display(), e))
}

/// One DMS Parquet object (uncompressed, 10k-row row groups): `[Op,]
/// dms_timestamp` as strings, then the columns.
fn parquet_object(shape: &TableShape, file: &[(Change, i64)], is_load: bool) -> Vec<u8> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    if !is_load {
        fields.push(Field::new("Op", DataType::Utf8, false));
        let ops = file.iter().map(|(c, _)| Some(c.op.as_str()));
        columns.push(Arc::new(arrow::array::StringArray::from_iter(ops)));
    }
    fields.push(Field::new("dms_timestamp", DataType::Utf8, false));
    let times = file.iter().map(|(_, t)| Some(dms_time(*t)));
    columns.push(Arc::new(arrow::array::StringArray::from_iter(times)));
    for (index, (name, column_type)) in shape.columns.iter().enumerate() {
        let values = file.iter().map(|(c, _)| &c.values[index]);
        let (data_type, array) = parquet_column(*column_type, values, file.len());
        fields.push(Field::new(*name, data_type, true));
        columns.push(array);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    let props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .set_max_row_group_row_count(Some(10_000))
        .set_created_by("cdcflow synth (DMS layout)".into())
        .build();
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, schema, Some(props)).expect("parquet writer");
    writer.write(&batch).expect("write parquet");
    writer.close().expect("close parquet");
    buf
}

/// The Arrow type and values of one column.
fn parquet_column<'a>(
    column_type: ColumnType,
    values: impl Iterator<Item = &'a Value>,
    n: usize,
) -> (DataType, ArrayRef) {
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let micros = |v: &Value| match v {
        Value::Micros(m) => Some(*m),
        _ => None,
    };
    match column_type {
        ColumnType::Int64 => {
            let mut b = Int64Builder::with_capacity(n);
            values.for_each(|v| b.append_option(int(v)));
            (DataType::Int64, Arc::new(b.finish()))
        }
        ColumnType::Int32 => {
            let mut b = Int32Builder::with_capacity(n);
            values.for_each(|v| b.append_option(int(v).map(|x| x as i32)));
            (DataType::Int32, Arc::new(b.finish()))
        }
        ColumnType::Text => {
            let mut b = StringBuilder::new();
            values.for_each(|v| match v {
                Value::Text(s) => b.append_value(s),
                _ => b.append_null(),
            });
            (DataType::Utf8, Arc::new(b.finish()))
        }
        ColumnType::Decimal(precision) => {
            let mut b = Decimal128Builder::with_capacity(n);
            values.for_each(|v| match v {
                Value::Decimal(d) => b.append_value(*d),
                _ => b.append_null(),
            });
            let array = b
                .finish()
                .with_precision_and_scale(precision, 2)
                .expect("valid decimal");
            (DataType::Decimal128(precision, 2), Arc::new(array))
        }
        ColumnType::TimestampTz | ColumnType::Timestamp => {
            let tz = matches!(column_type, ColumnType::TimestampTz).then(|| "UTC".into());
            let mut b = TimestampMicrosecondBuilder::with_capacity(n);
            values.for_each(|v| b.append_option(micros(v)));
            let array = b.finish().with_timezone_opt(tz.clone());
            (
                DataType::Timestamp(TimeUnit::Microsecond, tz),
                Arc::new(array),
            )
        }
    }
}
