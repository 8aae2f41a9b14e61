//! DMS Parquet: columns found by name, converted to the declared types with
//! errors that name the row and value that did not fit.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Schema, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::file::reader::ChunkReader;

use super::columns::ColumnBuilder;
use super::{DecodeSpec, Op, Piece};
use crate::config::{Column, SqlType, UTC};
use crate::error::{Error, Location, Result};

fn corrupt(key: &str, err: impl std::fmt::Display) -> Error {
    Error::decode(
        key,
        Location::default(),
        format!(
            "not a readable Parquet file (truncated or corrupt?): {err}; replace the object, or skip it with `cdcflow skip`"
        ),
    )
}

/// Rows per decoded batch: a Parquet object is read this many rows at a time
/// (a row group is decoded as it is reached), so memory does not grow with it.
const BATCH_ROWS: usize = 64 * 1024;

/// Decodes a Parquet object from `file` (bytes in memory, or a spooled
/// file), `BATCH_ROWS` rows at a time. `cdc` is true for CDC files.
pub(crate) fn decode_batches<R: ChunkReader + 'static>(
    key: &str,
    file: R,
    cdc: bool,
    spec: &DecodeSpec,
    emit: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| corrupt(key, e))?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| corrupt(key, e))?;
    let mut first_row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(key, e))?;
        emit(decode_at(key, &batch, cdc, spec, first_row)?)?;
        first_row += batch.num_rows() as u64;
    }
    Ok(())
}

/// [`decode`] of rows that start at the object's row `first_row` (0-based):
/// errors number rows within the object, not within the batch.
fn decode_at(
    key: &str,
    batch: &RecordBatch,
    cdc: bool,
    spec: &DecodeSpec,
    first_row: u64,
) -> Result<RecordBatch> {
    decode(key, batch, cdc, spec).map_err(|err| match err {
        Error::Decode {
            object,
            mut location,
            message,
        } => {
            location.row = location.row.map(|r| r + first_row);
            Error::Decode {
                object,
                location,
                message,
            }
        }
        other => other,
    })
}

/// Rows of one row group of a spooled Parquet object, to decode on any thread.
pub(crate) struct RowRange {
    key: String,
    file: Arc<tempfile::TempPath>,
    spec: Arc<DecodeSpec>,
    cdc: bool,
    group: usize,
    /// Rows of the group before the range, and in it.
    skip: usize,
    take: usize,
    /// The object's row (0-based) the range starts at.
    pub(crate) first_row: u64,
}

impl RowRange {
    /// The range's rows, [`BATCH_ROWS`] at a time: those [`decode_batches`]
    /// gives for them, with errors that name the object's row.
    pub(crate) fn decode(self) -> Result<Vec<RecordBatch>> {
        let key = self.key.as_str();
        let file = std::fs::File::open(&*self.file)
            .map_err(|e| Error::io("reading the spooled object", key, e))?;
        let selection = RowSelection::from(vec![
            RowSelector::skip(self.skip),
            RowSelector::select(self.take),
        ]);
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| corrupt(key, e))?
            .with_row_groups(vec![self.group])
            .with_row_selection(selection)
            // The reader sizes each column's buffers for a whole batch (it
            // caps that at the file's rows, not the range's), and the merge
            // may keep a decoded array to the end: batches the range's size.
            .with_batch_size(self.take.clamp(1, BATCH_ROWS))
            .build()
            .map_err(|e| corrupt(key, e))?;
        let mut first_row = self.first_row;
        let mut decoded = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| corrupt(key, e))?;
            decoded.push(decode_at(key, &batch, self.cdc, &self.spec, first_row)?);
            first_row += batch.num_rows() as u64;
        }
        Ok(decoded)
    }
}

/// Cuts the Parquet object spooled to `file` into ranges of rows of about
/// `piece_bytes` of uncompressed data each (by its row groups' sizes), in
/// order, for decoding on several threads.
pub(crate) fn split_file(
    key: &str,
    file: Arc<tempfile::TempPath>,
    cdc: bool,
    spec: &Arc<DecodeSpec>,
    piece_bytes: usize,
    emit: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let handle =
        std::fs::File::open(&*file).map_err(|e| Error::io("reading the spooled object", key, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| corrupt(key, e))?;
    let mut first_row = 0u64;
    for (group, meta) in builder.metadata().row_groups().iter().enumerate() {
        let rows = usize::try_from(meta.num_rows()).map_err(|e| corrupt(key, e))?;
        let bytes = u128::try_from(meta.total_byte_size().max(1)).map_err(|e| corrupt(key, e))?;
        let per_piece =
            (piece_bytes as u128 * rows as u128 / bytes).clamp(1024, BATCH_ROWS as u128);
        let mut skip = 0;
        while skip < rows {
            let take = (per_piece as usize).min(rows - skip);
            emit(Piece::RowRange(RowRange {
                key: key.to_string(),
                file: file.clone(),
                spec: spec.clone(),
                cdc,
                group,
                skip,
                take,
                first_row,
            }))?;
            skip += take;
            first_row += take as u64;
        }
    }
    Ok(())
}

fn find(schema: &Schema, name: &str) -> Option<usize> {
    schema
        .fields()
        .iter()
        .position(|f| f.name().eq_ignore_ascii_case(name))
}

/// The data columns of a Parquet object (all but `Op`, the timestamp and
/// the extra columns), for tables whose columns are not declared.
pub(crate) fn columns(key: &str, bytes: Bytes, spec: &DecodeSpec) -> Result<Vec<Column>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| corrupt(key, e))?;
    builder
        .schema()
        .fields()
        .iter()
        .filter(|f| !is_dms_column(f.name(), spec))
        .map(|f| {
            SqlType::from_arrow(f.data_type())
                .map(|sql_type| Column {
                    name: f.name().clone(),
                    sql_type,
                    existing: None,
                })
                .ok_or_else(|| {
                    Error::decode(
                        key,
                        Location {
                            column: Some(f.name().clone()),
                            ..Location::default()
                        },
                        format!(
                            "Parquet type {} has no warehouse type; declare the table's columns",
                            f.data_type()
                        ),
                    )
                })
        })
        .collect()
}

fn is_dms_column(name: &str, spec: &DecodeSpec) -> bool {
    name.eq_ignore_ascii_case("op")
        || spec
            .timestamp_column
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(name))
        || spec
            .extra_columns
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
}

/// Decodes one batch of a Parquet object's rows.
fn decode(key: &str, batch: &RecordBatch, cdc: bool, spec: &DecodeSpec) -> Result<RecordBatch> {
    let schema = batch.schema();
    let rows = batch.num_rows();
    let at = |column: &str| Location {
        column: Some(column.to_string()),
        ..Location::default()
    };
    let missing = |column: &str| {
        Error::decode(
            key,
            at(column),
            format!(
                "the object has no column {column:?}; found {:?}",
                names(&schema)
            ),
        )
    };

    let mut new_columns = Vec::new();
    for field in schema.fields() {
        let known = is_dms_column(field.name(), spec)
            || spec
                .columns
                .iter()
                .any(|c| c.name.eq_ignore_ascii_case(field.name()));
        if known {
            continue;
        }
        match SqlType::from_arrow(field.data_type()) {
            Some(sql_type) if spec.evolving => {
                let existing = match field.metadata().get(super::EXISTING_METADATA) {
                    Some(value) => Some(canonical(value, field.data_type()).ok_or_else(|| {
                        Error::decode(
                            key,
                            at(field.name()),
                            format!(
                                "the value of the rows stored before the column was added \
                                 ({:?}, field metadata {}) is not a {sql_type}",
                                value,
                                super::EXISTING_METADATA
                            ),
                        )
                    })?),
                    None => None,
                };
                new_columns.push(Column {
                    name: field.name().clone(),
                    sql_type,
                    existing,
                })
            }
            Some(_) => {
                return Err(Error::decode(
                    key,
                    at(field.name()),
                    format!(
                        "column {:?} is not declared for this table; add it to the table's `columns`",
                        field.name()
                    ),
                ));
            }
            None => {
                return Err(Error::decode(
                    key,
                    at(field.name()),
                    format!(
                        "column {:?} has type {}, which cdcflow cannot load (nested types are not supported)",
                        field.name(),
                        field.data_type()
                    ),
                ));
            }
        }
    }
    if !new_columns.is_empty() {
        return Err(Error::NewColumns {
            object: key.to_string(),
            columns: new_columns,
        });
    }

    let op: ArrayRef = match find(&schema, "op") {
        Some(i) => convert_op(key, batch.column(i))?,
        None if cdc => {
            return Err(Error::decode(
                key,
                at("Op"),
                "a CDC object needs an Op column (I, U or D)",
            ));
        }
        None => Arc::new(StringArray::from(vec![Op::Insert.as_str(); rows])),
    };
    let ts: ArrayRef = match &spec.timestamp_column {
        Some(name) => {
            let i = find(&schema, name).ok_or_else(|| missing(name))?;
            convert(key, name, batch.column(i), SqlType::TimestampTz)?
        }
        None => arrow::array::new_null_array(
            &DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            rows,
        ),
    };
    let mut arrays = vec![op, ts];
    for name in &spec.extra_columns {
        let i = find(&schema, name).ok_or_else(|| missing(name))?;
        arrays.push(convert(key, name, batch.column(i), SqlType::Text)?);
    }
    for column in &spec.columns {
        match find(&schema, &column.name) {
            Some(i) => arrays.push(convert(
                key,
                &column.name,
                batch.column(i),
                column.sql_type,
            )?),
            // An object written before the column existed.
            None if spec.evolving => arrays.push(arrow::array::new_null_array(
                &column.sql_type.arrow_type(),
                rows,
            )),
            None => return Err(missing(&column.name)),
        }
    }
    RecordBatch::try_new(spec.output_schema(), arrays).map_err(|e| corrupt(key, e))
}

fn names(schema: &Schema) -> Vec<&str> {
    schema.fields().iter().map(|f| f.name().as_str()).collect()
}

fn convert_op(key: &str, array: &ArrayRef) -> Result<ArrayRef> {
    let text = convert(key, "Op", array, SqlType::Text)?;
    let strings = text.as_string::<i32>();
    for (row, value) in strings.iter().enumerate() {
        let parsed = value.map(Op::parse);
        if !matches!(parsed, Some(Ok(_))) {
            return Err(Error::decode(
                key,
                Location {
                    line: None,
                    row: Some(row as u64 + 1),
                    column: Some("Op".into()),
                },
                format!("expected I, U, D or T, found {value:?}"),
            ));
        }
    }
    Ok(text)
}

/// Converts a Parquet column to `sql_type`, naming the first row that does not fit.
fn convert(key: &str, name: &str, array: &ArrayRef, sql_type: SqlType) -> Result<ArrayRef> {
    let target = sql_type.arrow_type();
    let is_text = matches!(
        array.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    let fail = |row: usize, found: String, expected: String| {
        Error::decode(
            key,
            Location {
                line: None,
                row: Some(row as u64 + 1),
                column: Some(name.to_string()),
            },
            format!("expected {expected}, found {found}"),
        )
    };
    if is_text && !matches!(sql_type, SqlType::Text | SqlType::Json) {
        let strings = cast_with_options(array, &DataType::Utf8, &CastOptions::default())
            .map_err(|e| fail(0, array.data_type().to_string(), e.to_string()))?;
        let strings = strings.as_string::<i32>();
        let mut builder = ColumnBuilder::new(sql_type, strings.len());
        for (row, value) in strings.iter().enumerate() {
            match value {
                None => builder.append_null(),
                Some(v) => builder
                    .append_text(v)
                    .map_err(|exp| fail(row, format!("{v:?}"), exp))?,
            }
        }
        return Ok(builder.finish());
    }
    let options = CastOptions {
        safe: true,
        ..CastOptions::default()
    };
    let out = cast_with_options(array, &target, &options).map_err(|_| {
        fail(
            0,
            format!("a column of type {}", array.data_type()),
            format!("{sql_type} (declare the column's type to match the file)"),
        )
    })?;
    let lossy_row = (0..array.len())
        .find(|&i| array.is_valid(i) && out.is_null(i))
        .or_else(|| {
            // Narrowing a decimal's scale rounds: refuse instead.
            match (array.data_type(), &target) {
                (DataType::Decimal128(_, s_from), DataType::Decimal128(_, s_to))
                    if s_to < s_from =>
                {
                    let back = cast_with_options(&out, array.data_type(), &options).ok()?;
                    let (a, b) = (
                        array.as_primitive::<arrow::datatypes::Decimal128Type>(),
                        back.as_primitive::<arrow::datatypes::Decimal128Type>(),
                    );
                    (0..a.len()).find(|&i| a.is_valid(i) && a.value(i) != b.value(i))
                }
                _ => None,
            }
        });
    if let Some(row) = lossy_row {
        let formatter = ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default())
            .map_err(|e| fail(row, String::new(), e.to_string()))?;
        return Err(fail(
            row,
            format!("{:?}", formatter.value(row).to_string()),
            sql_type.to_string(),
        ));
    }
    Ok(out)
}

/// `value` as `data_type` would write it (`t` as `true`, `12.5` as `12.50`
/// in a decimal(12,2)), or `None` when it is not one.
fn canonical(value: &str, data_type: &DataType) -> Option<String> {
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let typed = cast_with_options(&StringArray::from(vec![value]), data_type, &strict).ok()?;
    let text = cast_with_options(&typed, &DataType::Utf8, &strict).ok()?;
    Some(text.as_string::<i32>().value(0).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_of_existing_rows_is_read_as_its_column_type_writes_it() {
        assert_eq!(canonical("t", &DataType::Boolean).as_deref(), Some("true"));
        assert_eq!(
            canonical("12.5", &DataType::Decimal128(12, 2)).as_deref(),
            Some("12.50")
        );
        assert_eq!(
            canonical("it's std", &DataType::Utf8).as_deref(),
            Some("it's std")
        );
        assert_eq!(canonical("std", &DataType::Int64), None);
    }
}
