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

mod columns;
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

/// A change operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `I`.
    Insert,
    /// `U`.
    Update,
    /// `D`.
    Delete,
}

impl Op {
    /// Parses DMS's `I`, `U`, `D`.
    pub fn parse(s: &str) -> Result<Op, &'static str> {
        match s {
            "I" => Ok(Op::Insert),
            "U" => Ok(Op::Update),
            "D" => Ok(Op::Delete),
            _ => Err("an Op of I, U or D"),
        }
    }

    /// The DMS letter.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
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
            flate2::read::MultiGzDecoder::new(bytes.as_ref())
                .read_to_end(&mut out)
                .map_err(|err| {
                    Error::decode(
                        &object.key,
                        Location::default(),
                        format!("not valid gzip (truncated or corrupt?): {err}"),
                    )
                })?;
            Ok(Bytes::from(out))
        }
    }
}

/// Decodes one object's bytes (see the module contract).
pub fn decode(object: &SourceObject, bytes: Bytes, spec: &DecodeSpec) -> Result<RecordBatch> {
    let bytes = uncompress(object, bytes)?;
    let cdc = matches!(object.name.order, ObjectOrder::Cdc(_));
    match object.name.format {
        Format::Parquet => parquet::decode(&object.key, bytes, cdc, spec),
        _ => csv::decode(&object.key, &bytes, cdc, spec),
    }
}

/// The data columns of a Parquet object, for tables that do not declare them.
pub fn parquet_columns(
    object: &SourceObject,
    bytes: Bytes,
    spec: &DecodeSpec,
) -> Result<Vec<Column>> {
    let bytes = uncompress(object, bytes)?;
    parquet::columns(&object.key, bytes, spec)
}
