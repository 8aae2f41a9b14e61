//! Decoding DMS objects (CSV or Parquet) into Arrow record batches.
//!
//! The contract of a decoded object: one [`RecordBatch`] with the schema of
//! [`DecodeSpec::output_schema`] — `op` (`I`/`U`/`D`, never NULL), the
//! commit timestamp (UTC, µs; NULL when the files carry none), the extra
//! columns as text, then the table's columns in declared types — and one row
//! per change, in the object's row order. Row `i` of the batch is data row
//! `i + 1` of the object: that position is part of the change order. Any
//! value that does not fit is an error naming the object, line/row, column
//! and what was expected; nothing is dropped or coerced to NULL.

pub(crate) mod columns;
mod csv;
mod parquet;
mod text;

use std::io::Read;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;

use crate::config::{Column, CsvOptions, Format, UTC};
use crate::error::{Error, Location, Result};
use crate::source::{Compression, ObjectOrder, SourceObject};

/// The Parquet field metadata key of a column's value in rows stored
/// before the column was added (a column added with a default; capture
/// writes it): those rows hold it in the source though no change said so.
pub const EXISTING_METADATA: &str = "cdcflow.existing";

/// A change operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `I`.
    Insert,
    /// `U`.
    Update,
    /// `D`.
    Delete,
    /// `T`: every row of the table was removed (PostgreSQL TRUNCATE, written by
    /// `cdcflow capture`); its columns are NULL.
    Truncate,
}

impl Op {
    /// Parses DMS's `I`, `U`, `D`, and capture's `T`.
    pub fn parse(s: &str) -> Result<Op, &'static str> {
        match s {
            "I" => Ok(Op::Insert),
            "U" => Ok(Op::Update),
            "D" => Ok(Op::Delete),
            "T" => Ok(Op::Truncate),
            _ => Err("an Op of I, U, D or T"),
        }
    }

    /// The DMS letter.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
            Op::Truncate => "T",
        }
    }
}

/// How to decode the objects of one table.
#[derive(Debug, Clone)]
pub struct DecodeSpec {
    /// The table's columns, in file order.
    pub columns: Vec<Column>,
    /// Output name of the op column.
    pub op_name: String,
    /// Output name of the commit-timestamp column.
    pub commit_ts_name: String,
    /// DMS timestamp column in the files, if any.
    pub timestamp_column: Option<String>,
    /// Extra DMS columns after the timestamp, kept as text.
    pub extra_columns: Vec<String>,
    /// Full-load files carry `Op`.
    pub include_op_for_full_load: bool,
    /// CSV dialect.
    pub csv: CsvOptions,
    /// The columns were found, not declared (Parquet): a column an object
    /// lacks is NULL (an object older than the column), and a column it has
    /// beyond `columns` is reported as [`crate::error::Error::NewColumns`].
    pub evolving: bool,
}

impl DecodeSpec {
    /// Schema of every decoded batch (see the module contract).
    pub fn output_schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new(&self.op_name, DataType::Utf8, false),
            Field::new(
                &self.commit_ts_name,
                DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
                true,
            ),
        ];
        fields.extend(
            self.extra_columns
                .iter()
                .map(|c| Field::new(c, DataType::Utf8, true)),
        );
        fields.extend(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.sql_type.arrow_type(), true)),
        );
        Arc::new(Schema::new(fields))
    }
}

fn uncompress(object: &SourceObject, bytes: Bytes) -> Result<Bytes> {
    match object.name.compression {
        Compression::None => Ok(bytes),
        Compression::Gzip => {
            let mut out = Vec::with_capacity(bytes.len() * 4);
            gzip_reader(object, Box::new(std::io::Cursor::new(bytes)))
                .read_to_end(&mut out)
                .map_err(|err| gzip_error(object, err))?;
            Ok(Bytes::from(out))
        }
    }
}

fn gzip_reader<'a>(
    _object: &SourceObject,
    reader: Box<dyn Read + Send + 'a>,
) -> Box<dyn Read + Send + 'a> {
    Box::new(flate2::read::MultiGzDecoder::new(reader))
}

fn gzip_error(object: &SourceObject, err: std::io::Error) -> Error {
    Error::decode(
        &object.key,
        Location::default(),
        format!("not valid gzip (truncated or corrupt?): {err}"),
    )
}

/// Decodes one object read from `reader`, handing its rows to `emit` in
/// order, one chunk at a time (see the module contract). CSV (also gzipped)
/// streams in chunks of [`csv::CHUNK_BYTES`]; Parquet is spooled to a
/// temporary file (its footer is at the end) and read 64k rows at a time.
pub fn decode_stream(
    object: &SourceObject,
    reader: Box<dyn Read + Send + '_>,
    spec: &DecodeSpec,
    emit: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    guard(&object.key, || {
        decode_stream_chunked(object, reader, spec, csv::CHUNK_BYTES, emit)
    })
}

/// Runs a decoder over object `key`, turning a panic into a decode error of
/// the object. arrow and parquet panic on some malformed files (a corrupt
/// type in a Parquet footer, seen in fuzzing); that is a bad object, which
/// must stop its table, never end the batch's rows early.
fn guard<T>(key: &str, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode))
        .unwrap_or_else(|payload| Err(panicked(key, payload.as_ref())))
}

/// The decode error of object `key` whose decoder panicked with `payload`.
pub fn panicked(key: &str, payload: &(dyn std::any::Any + Send)) -> Error {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    Error::decode(
        key,
        Location::default(),
        format!("the decoder panicked ({message}): the object is malformed; replace it or skip it"),
    )
}

fn decode_stream_chunked(
    object: &SourceObject,
    reader: Box<dyn Read + Send + '_>,
    spec: &DecodeSpec,
    chunk_bytes: usize,
    emit: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let cdc = matches!(object.name.order, ObjectOrder::Cdc(_));
    let mut reader = uncompressed(object, reader);
    match object.name.format {
        Format::Parquet => {
            // The footer is at the end: the stream is spooled to a temporary
            // file, then read a row group at a time, so memory stays flat.
            let file = spool(object, &mut reader)?.into_file();
            parquet::decode_batches(&object.key, file, cdc, spec, emit)
        }
        _ => csv::decode_reader(
            &object.key,
            &mut reader,
            cdc,
            spec,
            chunk_bytes,
            &mut |batch| emit(batch),
        )
        .map_err(|err| csv_error(object, err)),
    }
}

/// `reader` of `object`, decompressed as its name says.
fn uncompressed<'a>(
    object: &SourceObject,
    reader: Box<dyn Read + Send + 'a>,
) -> Box<dyn Read + Send + 'a> {
    match object.name.compression {
        Compression::None => reader,
        Compression::Gzip => gzip_reader(object, reader),
    }
}

/// `reader` of `object` copied into a temporary file (removed when dropped).
fn spool(object: &SourceObject, reader: &mut dyn Read) -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::NamedTempFile::new()
        .map_err(|e| Error::io("creating a spool file", std::env::temp_dir().display(), e))?;
    std::io::copy(reader, &mut file)
        .map_err(|e| Error::io("reading the object", &object.key, e))?;
    Ok(file)
}

/// A CSV read error: under gzip, a read error that is not the transport's is
/// the decompressor's.
fn csv_error(object: &SourceObject, err: Error) -> Error {
    match err {
        Error::Io { source, .. }
            if object.name.compression == Compression::Gzip
                && !source
                    .get_ref()
                    .is_some_and(|e| e.is::<crate::source::TransportError>()) =>
        {
            gzip_error(object, source)
        }
        other => other,
    }
}

/// Bytes of rows (uncompressed) in one piece of a Parquet object.
const PIECE_BYTES: usize = 8 << 20;

/// A piece of a large object, cut by [`split_stream`]: rows decoded
/// already, or rows to decode on any thread.
pub(crate) enum Piece {
    /// Decoded rows, the first of them the object's row `first_row` (0-based).
    Rows { batch: RecordBatch, first_row: u64 },
    /// Whole records of a CSV object.
    Records(csv::Records),
    /// Rows of a row group of a Parquet object.
    RowRange(parquet::RowRange),
}

impl Piece {
    /// The object's row (0-based) this piece starts at.
    pub(crate) fn first_row(&self) -> u64 {
        match self {
            Piece::Rows { first_row, .. } => *first_row,
            Piece::Records(records) => records.row,
            Piece::RowRange(range) => range.first_row,
        }
    }

    /// The piece's rows, in order: those [`decode_stream`] gives for them,
    /// with errors that name the object's line or row.
    pub(crate) fn decode(self) -> Result<Vec<RecordBatch>> {
        match self {
            Piece::Rows { batch, .. } => Ok(vec![batch]),
            Piece::Records(records) => Ok(vec![records.decode()?]),
            Piece::RowRange(range) => range.decode(),
        }
    }
}

/// Cuts an object read from `reader` into pieces to decode on several
/// threads, handed to `emit` in order: a CSV object (also gzipped) at record
/// ends ([`csv::split_reader`]), a Parquet object (spooled to a temporary
/// file, since its footer is at the end) into ranges of its row groups.
pub(crate) fn split_stream(
    object: &SourceObject,
    reader: Box<dyn Read + Send + '_>,
    spec: &Arc<DecodeSpec>,
    emit: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let cdc = matches!(object.name.order, ObjectOrder::Cdc(_));
    let mut reader = uncompressed(object, reader);
    guard(&object.key, || match object.name.format {
        Format::Parquet => {
            let file = Arc::new(spool(object, &mut reader)?.into_temp_path());
            parquet::split_file(&object.key, file, cdc, spec, PIECE_BYTES, emit)
        }
        _ => csv::split_reader(&object.key, &mut reader, cdc, spec, csv::CHUNK_BYTES, emit)
            .map_err(|err| csv_error(object, err)),
    })
}

/// Decodes one object's bytes into one batch (see the module contract).
pub fn decode(object: &SourceObject, bytes: Bytes, spec: &DecodeSpec) -> Result<RecordBatch> {
    guard(&object.key, || {
        decode_chunked(object, bytes, spec, csv::CHUNK_BYTES)
    })
}

fn decode_chunked(
    object: &SourceObject,
    bytes: Bytes,
    spec: &DecodeSpec,
    chunk_bytes: usize,
) -> Result<RecordBatch> {
    let mut batches = Vec::new();
    let mut keep = |b| {
        batches.push(b);
        Ok(())
    };
    if object.name.format == Format::Parquet {
        // In memory already: read from the bytes, not through a spool file.
        let cdc = matches!(object.name.order, ObjectOrder::Cdc(_));
        let bytes = uncompress(object, bytes)?;
        parquet::decode_batches(&object.key, bytes, cdc, spec, &mut keep)?;
    } else {
        decode_stream_chunked(
            object,
            Box::new(std::io::Cursor::new(bytes)),
            spec,
            chunk_bytes,
            &mut keep,
        )?;
    }
    arrow::compute::concat_batches(&spec.output_schema(), &batches)
        .map_err(|e| Error::decode(&object.key, Location::default(), e.to_string()))
}

/// The data columns of a Parquet object, for tables that do not declare them.
pub fn parquet_columns(
    object: &SourceObject,
    bytes: Bytes,
    spec: &DecodeSpec,
) -> Result<Vec<Column>> {
    guard(&object.key, || {
        let bytes = uncompress(object, bytes)?;
        parquet::columns(&object.key, bytes, spec)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Column, SqlType};

    fn spec() -> DecodeSpec {
        DecodeSpec {
            columns: vec![
                Column {
                    name: "id".into(),
                    sql_type: SqlType::BigInt,
                    existing: None,
                },
                Column {
                    name: "v".into(),
                    sql_type: SqlType::Text,
                    existing: None,
                },
            ],
            op_name: "op".into(),
            commit_ts_name: "ts".into(),
            timestamp_column: None,
            extra_columns: vec![],
            include_op_for_full_load: false,
            csv: CsvOptions {
                header: true,
                ..CsvOptions::default()
            },
            evolving: false,
        }
    }

    fn object(key: &str) -> SourceObject {
        SourceObject {
            key: key.into(),
            etag: String::new(),
            size: 0,
            last_modified: Default::default(),
            name: crate::source::ObjectName::parse(key).unwrap(),
        }
    }

    /// A reader that counts the bytes read.
    struct Counting(
        std::io::Cursor<Vec<u8>>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    );

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            Ok(n)
        }
    }

    /// The pieces of `text` cut `chunk` bytes at a time, decoded last piece
    /// first, then put back in order, as the pipeline does: the first error
    /// in the object's order wins (a split error comes after every piece cut
    /// before it). Each piece's first row must be where it starts.
    fn split_and_decode(text: &str, chunk: usize) -> Result<Vec<RecordBatch>> {
        let o = object("s/t/20240501-000000000.csv");
        let mut pieces = Vec::new();
        let split = csv::split_reader(
            &o.key,
            &mut std::io::Cursor::new(text.as_bytes()),
            true,
            &Arc::new(spec()),
            chunk,
            &mut |piece| {
                pieces.push(piece);
                Ok(())
            },
        );
        let mut decoded = Vec::new();
        for piece in pieces.into_iter().rev() {
            let first_row = piece.first_row();
            decoded.push(piece.decode().map(|mut b| (first_row, b.remove(0))));
        }
        decoded.reverse();
        let mut decoded = decoded.into_iter().collect::<Result<Vec<_>>>()?;
        split?;
        decoded.retain(|(_, batch)| batch.num_rows() > 0);
        let mut expected_first = 0;
        for (first_row, batch) in &decoded {
            assert_eq!(*first_row, expected_first, "chunk size {chunk}");
            expected_first += batch.num_rows() as u64;
        }
        Ok(decoded.into_iter().map(|(_, batch)| batch).collect())
    }

    #[test]
    fn pieces_decoded_on_any_thread_give_the_rows_of_one_pass() {
        let text = "Op,id,v\r\nI,1,\"a,\"\"b\"\"\nc\"\r\nU,2,ünï\nD,3,\r\nI,44,\"\"\nU,5,x\nU,6,\"y\ny\"\n";
        let o = object("s/t/20240501-000000000.csv");
        let whole = decode_chunked(&o, Bytes::from(text), &spec(), 1 << 20).unwrap();
        assert_eq!(whole.num_rows(), 6);
        for chunk in 1..text.len() {
            let pieces = split_and_decode(text, chunk).unwrap();
            let joined = arrow::compute::concat_batches(&spec().output_schema(), &pieces).unwrap();
            assert_eq!(joined, whole, "chunk size {chunk}");
        }
        // errors name the object's line and row, in whichever piece they are
        let bad = "Op,id,v\nI,1,\"x\ny\"\nI,2,z\nI,zz,w\nI,3,\"open\n";
        for chunk in 1..bad.len() {
            let err = split_and_decode(bad, chunk).unwrap_err().to_string();
            assert!(
                err.contains("line 5, row 3, column \"id\""),
                "chunk {chunk}: {err}"
            );
        }
        // a quote inside an unquoted field: no piece holds a part of its record
        let stray = "Op,id,v\nI,1,a\nI,2,b\"c\nI,3,d\n";
        for chunk in 1..stray.len() {
            let err = split_and_decode(stray, chunk).unwrap_err().to_string();
            assert!(err.contains("line 3, row 2"), "chunk {chunk}: {err}");
        }
        let unclosed = "Op,id,v\nI,1,a\nI,2,b\nI,3,\"open\n";
        for chunk in 1..unclosed.len() {
            let err = split_and_decode(unclosed, chunk).unwrap_err().to_string();
            assert!(err.contains("line 4"), "chunk {chunk}: {err}");
            assert!(err.contains("never closed"), "chunk {chunk}: {err}");
        }
    }

    /// A Parquet object of `rows` rows in row groups of 1,500, its `bad`th
    /// row's `Op` invalid, spooled to a temporary file.
    fn spooled_parquet(rows: usize, bad: Option<usize>) -> Arc<tempfile::TempPath> {
        use arrow::array::{ArrayRef, Int64Array, StringArray};
        let column = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values((0..rows).map(f)))
        };
        let batch = RecordBatch::try_from_iter([
            (
                "Op",
                column(&|i| if bad == Some(i + 1) { "X" } else { "U" }.to_string()),
            ),
            (
                "id",
                Arc::new(Int64Array::from_iter_values(0..rows as i64)) as ArrayRef,
            ),
            ("v", column(&|i| format!("value {i}"))),
        ])
        .unwrap();
        let props = ::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(1500))
            .build();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut writer =
            ::parquet::arrow::ArrowWriter::try_new(&mut file, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        Arc::new(file.into_temp_path())
    }

    /// The batches [`parquet::decode_batches`] gives for the object in `file`.
    fn parquet_batches(key: &str, file: &tempfile::TempPath) -> Vec<RecordBatch> {
        let mut batches = Vec::new();
        let reader = std::fs::File::open(file).unwrap();
        parquet::decode_batches(key, reader, true, &spec(), &mut |b| {
            batches.push(b);
            Ok(())
        })
        .unwrap();
        batches
    }

    /// The pieces [`parquet::split_file`] cuts `file` into, `piece_bytes` each.
    fn parquet_ranges(key: &str, file: &Arc<tempfile::TempPath>, piece_bytes: usize) -> Vec<Piece> {
        let mut pieces = Vec::new();
        parquet::split_file(
            key,
            file.clone(),
            true,
            &Arc::new(spec()),
            piece_bytes,
            &mut |p| {
                pieces.push(p);
                Ok(())
            },
        )
        .unwrap();
        pieces
    }

    #[test]
    fn parquet_ranges_decoded_on_any_thread_give_the_rows_of_one_pass() {
        let key = "s/t/20240501-000000000.parquet";
        let file = spooled_parquet(5000, None);
        let whole = parquet_batches(key, &file);
        let whole = arrow::compute::concat_batches(&spec().output_schema(), &whole).unwrap();
        // 1 byte a piece: the fewest rows a range holds (1,024), so groups split.
        let ranges = |file: &Arc<tempfile::TempPath>| parquet_ranges(key, file, 1);
        let pieces = ranges(&file);
        assert!(pieces.len() > 4, "{} ranges", pieces.len());
        let mut decoded: Vec<_> = pieces
            .into_iter()
            .rev()
            .map(|p| (p.first_row(), p.decode().unwrap()))
            .collect();
        decoded.reverse();
        let mut next = 0;
        for (first_row, batches) in &decoded {
            assert_eq!(*first_row, next);
            next += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
        }
        let batches: Vec<_> = decoded.into_iter().flat_map(|(_, b)| b).collect();
        let joined = arrow::compute::concat_batches(&spec().output_schema(), &batches).unwrap();
        assert_eq!(joined, whole);
        // an error names the object's row, in whichever range it is
        let bad = spooled_parquet(5000, Some(4321));
        let errors: Vec<_> = ranges(&bad)
            .into_iter()
            .filter_map(|p| p.decode().err())
            .collect();
        assert_eq!(errors.len(), 1);
        let err = errors[0].to_string();
        assert!(err.contains("row 4321, column \"Op\""), "{err}");
    }

    /// The bytes of `batch`'s buffers (their capacity, as allocated).
    fn capacity(batch: &RecordBatch) -> usize {
        batch
            .columns()
            .iter()
            .map(|c| c.get_buffer_memory_size())
            .sum()
    }

    #[test]
    fn a_small_parquet_object_decodes_into_arrays_of_its_size() {
        // The merge keeps decoded arrays (a key's latest row) until the batch
        // ends: a row group's range was read in 64k-row batches, and held
        // its 1,500 rows in arrays twice their size (the whole-file reader
        // caps the batch at the file's rows).
        let key = "s/t/20240501-000000000.parquet";
        for (file, rows) in [
            (spooled_parquet(100, None), 100),
            (spooled_parquet(5000, None), 5000),
        ] {
            let decoded = parquet_batches(key, &file);
            assert_eq!(decoded.iter().map(|b| b.num_rows()).sum::<usize>(), rows);
            // Independently: the same rows concatenated (arrays of exact size).
            let exact = arrow::compute::concat_batches(&spec().output_schema(), &decoded).unwrap();
            let held: usize = decoded.iter().map(capacity).sum();
            assert!(
                held <= 2 * capacity(&exact) + 4096,
                "{rows} rows: decoded arrays hold {held} bytes, the rows take {}",
                capacity(&exact)
            );
            let held: usize = parquet_ranges(key, &file, 1 << 20)
                .into_iter()
                .flat_map(|p| p.decode().unwrap())
                .map(|b| capacity(&b))
                .sum();
            assert!(
                held <= 2 * capacity(&exact) + 4096,
                "{rows} rows in ranges: decoded arrays hold {held} bytes, the rows take {}",
                capacity(&exact)
            );
        }
    }

    #[test]
    fn csv_rows_are_handed_on_before_the_object_is_read_whole() {
        let mut text = String::from("Op,id,v\n");
        for i in 0..20_000 {
            text.push_str(&format!("I,{i},\"row, {i}\"\n"));
        }
        let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reader = Counting(
            std::io::Cursor::new(text.clone().into_bytes()),
            read.clone(),
        );
        let (mut chunks, mut rows, mut read_at_first) = (0, 0, None);
        decode_stream_chunked(
            &object("s/t/20240501-000000000.csv"),
            Box::new(reader),
            &spec(),
            16 * 1024,
            &mut |b| {
                chunks += 1;
                rows += b.num_rows();
                read_at_first.get_or_insert(read.load(std::sync::atomic::Ordering::SeqCst));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(rows, 20_000);
        assert!(chunks > 10, "{chunks} chunks");
        let first = read_at_first.unwrap();
        assert!(
            first <= 2 * 16 * 1024,
            "the first rows came after {first} of {} bytes",
            text.len()
        );
    }

    #[test]
    fn every_chunk_boundary_gives_the_same_rows() {
        let text = "Op,id,v\r\nI,1,\"a,\"\"b\"\"\nc\"\r\nU,2,ünï\nD,3,\r\nI,44,\"\"\n";
        let o = object("s/t/20240501-000000000.csv");
        let whole = decode_chunked(&o, Bytes::from(text), &spec(), 1 << 20).unwrap();
        assert_eq!(whole.num_rows(), 4);
        for chunk in 1..text.len() {
            let chunked = decode_chunked(&o, Bytes::from(text), &spec(), chunk).unwrap();
            assert_eq!(chunked, whole, "chunk size {chunk}");
        }
        // errors keep their line and row across chunks
        let bad = "Op,id,v\nI,1,\"x\ny\"\nI,zz,w\n";
        for chunk in 1..bad.len() {
            let err = decode_chunked(&o, Bytes::from(bad), &spec(), chunk)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("line 4, row 2, column \"id\""),
                "chunk {chunk}: {err}"
            );
        }
    }
}
