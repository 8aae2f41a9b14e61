//! Column types between cdcflow (Arrow / [`SqlType`]) and BigQuery.
//!
//! A data column's declared type is kept in its BigQuery description
//! (`cdcflow:decimal(12,2)`), so reading a table back gives the exact type
//! even where BigQuery's is wider (NUMERIC holds any `decimal(p,s)` with
//! s ≤ 9 and p − s ≤ 29).

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use base64::Engine;
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_row::TableRow;
use gcp_bigquery_client::model::table_schema::TableSchema;

use crate::config::{Column, SqlType, UTC};
use crate::error::{Error, Result};

const TYPE_TAG: &str = "cdcflow:";

/// The BigQuery type of a declared column type.
pub(super) fn field_type(t: SqlType) -> FieldType {
    match t {
        SqlType::SmallInt | SqlType::Integer | SqlType::BigInt => FieldType::Int64,
        SqlType::Decimal { precision, scale } => {
            if scale <= 9 && i16::from(precision) - i16::from(scale) <= 29 {
                FieldType::Numeric
            } else {
                FieldType::Bignumeric
            }
        }
        SqlType::Real | SqlType::Double => FieldType::Float64,
        SqlType::Boolean => FieldType::Bool,
        SqlType::Text | SqlType::Uuid => FieldType::String,
        SqlType::Json => FieldType::Json,
        SqlType::Date => FieldType::Date,
        SqlType::Timestamp => FieldType::Datetime,
        SqlType::TimestampTz => FieldType::Timestamp,
        SqlType::Bytes => FieldType::Bytes,
    }
}

/// The BigQuery schema of an Arrow schema whose data columns are `columns`
/// (their declared types are kept in the descriptions); other fields are
/// metadata columns. With `staging`, JSON columns are STRING (a Parquet
/// string loads into STRING; the MERGE parses it).
pub(super) fn table_schema(schema: &Schema, columns: &[Column], staging: bool) -> TableSchema {
    let fields = schema
        .fields()
        .iter()
        .map(|f| {
            let declared = columns.iter().find(|c| &c.name == f.name());
            let t = match declared {
                Some(c) if staging && c.sql_type == SqlType::Json => FieldType::String,
                Some(c) => field_type(c.sql_type),
                None => match f.data_type() {
                    DataType::Boolean => FieldType::Bool,
                    DataType::Timestamp(_, Some(_)) => FieldType::Timestamp,
                    _ => FieldType::String,
                },
            };
            let mut field = TableFieldSchema::new(f.name(), t);
            field.mode = Some(
                if f.is_nullable() {
                    "NULLABLE"
                } else {
                    "REQUIRED"
                }
                .into(),
            );
            field.description = declared.map(|c| format!("{TYPE_TAG}{}", c.sql_type));
            field
        })
        .collect();
    TableSchema::new(fields)
}

/// The columns of `keys` that BigQuery can cluster a table on (INT64,
/// STRING, NUMERIC, BIGNUMERIC, BOOL, DATE, DATETIME, TIMESTAMP, GEOGRAPHY;
/// it refuses FLOAT64, BYTES, JSON, TIME and nested columns), at most
/// `max`, in key order; and the key columns left out for their type.
pub(super) fn cluster_fields(
    keys: &[String],
    fields: &[TableFieldSchema],
    max: usize,
) -> (Vec<String>, Vec<String>) {
    let (mut kept, mut left_out) = (Vec::new(), Vec::new());
    for key in keys {
        let clusterable = fields.iter().find(|f| &f.name == key).is_some_and(|f| {
            matches!(
                f.r#type,
                FieldType::Integer
                    | FieldType::Int64
                    | FieldType::String
                    | FieldType::Numeric
                    | FieldType::Bignumeric
                    | FieldType::Boolean
                    | FieldType::Bool
                    | FieldType::Date
                    | FieldType::Datetime
                    | FieldType::Timestamp
                    | FieldType::Geography
            )
        });
        if !clusterable {
            left_out.push(key.clone());
        } else if kept.len() < max {
            kept.push(key.clone());
        }
    }
    (kept, left_out)
}

/// The GoogleSQL name of a column type (for DDL).
pub(super) fn type_name(t: &FieldType) -> &'static str {
    match t {
        FieldType::Integer | FieldType::Int64 => "INT64",
        FieldType::Float | FieldType::Float64 => "FLOAT64",
        FieldType::Numeric => "NUMERIC",
        FieldType::Bignumeric => "BIGNUMERIC",
        FieldType::Boolean | FieldType::Bool => "BOOL",
        FieldType::Bytes => "BYTES",
        FieldType::Date => "DATE",
        FieldType::Datetime => "DATETIME",
        FieldType::Timestamp => "TIMESTAMP",
        FieldType::Json => "JSON",
        FieldType::Time => "TIME",
        _ => "STRING",
    }
}

/// The declared type of a BigQuery column: from its description when
/// cdcflow made it, else the closest type.
pub(super) fn declared_type(field: &TableFieldSchema) -> Option<SqlType> {
    if let Some(t) = field
        .description
        .as_deref()
        .and_then(|d| d.strip_prefix(TYPE_TAG))
        .and_then(|t| t.parse().ok())
    {
        return Some(t);
    }
    Some(match field.r#type {
        FieldType::Integer | FieldType::Int64 => SqlType::BigInt,
        FieldType::Float | FieldType::Float64 => SqlType::Double,
        FieldType::Numeric => SqlType::Decimal {
            precision: 38,
            scale: 9,
        },
        FieldType::Boolean | FieldType::Bool => SqlType::Boolean,
        FieldType::String => SqlType::Text,
        FieldType::Json => SqlType::Json,
        FieldType::Bytes => SqlType::Bytes,
        FieldType::Date => SqlType::Date,
        FieldType::Datetime => SqlType::Timestamp,
        FieldType::Timestamp => SqlType::TimestampTz,
        _ => return None,
    })
}

/// The Arrow type a query result column is returned as.
fn arrow_type(t: &FieldType) -> DataType {
    match t {
        FieldType::Integer | FieldType::Int64 => DataType::Int64,
        FieldType::Float | FieldType::Float64 => DataType::Float64,
        FieldType::Numeric => DataType::Decimal128(38, 9),
        FieldType::Boolean | FieldType::Bool => DataType::Boolean,
        FieldType::Bytes => DataType::Binary,
        FieldType::Date => DataType::Date32,
        FieldType::Datetime => DataType::Timestamp(TimeUnit::Microsecond, None),
        FieldType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
        // BIGNUMERIC, STRING, JSON, TIME, GEOGRAPHY, INTERVAL, RECORD: as text.
        _ => DataType::Utf8,
    }
}

/// Query rows (cells as JSON, TIMESTAMP as int64 µs) as one Arrow batch.
pub(super) fn to_arrow(schema: &TableSchema, rows: &[TableRow]) -> Result<RecordBatch> {
    let fields = schema.fields.clone().unwrap_or_default();
    let fail = |name: &str, e: arrow::error::ArrowError| Error::BigQuery {
        context: format!("reading result column {name}"),
        status: None,
        reason: None,
        message: e.to_string(),
    };
    let mut arrow_fields = Vec::with_capacity(fields.len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(fields.len());
    for (i, field) in fields.iter().enumerate() {
        let texts: Vec<Option<String>> = rows
            .iter()
            .map(|row| {
                let cell = row.columns.as_ref()?.get(i)?.value.as_ref()?;
                match cell {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                }
            })
            .collect();
        let target = arrow_type(&field.r#type);
        let strings: ArrayRef = Arc::new(StringArray::from(texts.clone()));
        let column = match &target {
            DataType::Binary => {
                let engine = base64::engine::general_purpose::STANDARD;
                let decoded: Vec<Option<Vec<u8>>> = texts
                    .iter()
                    .map(|t| t.as_ref().and_then(|t| engine.decode(t).ok()))
                    .collect();
                Arc::new(BinaryArray::from_iter(decoded)) as ArrayRef
            }
            DataType::Timestamp(_, Some(_)) => {
                let micros = arrow::compute::cast(&strings, &DataType::Int64)
                    .map_err(|e| fail(&field.name, e))?;
                arrow::compute::cast(&micros, &target).map_err(|e| fail(&field.name, e))?
            }
            _ => arrow::compute::cast(&strings, &target).map_err(|e| fail(&field.name, e))?,
        };
        arrow_fields.push(Field::new(&field.name, target, true));
        columns.push(column);
    }
    let schema = Arc::new(Schema::new(arrow_fields));
    RecordBatch::try_new_with_options(
        schema,
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.len())),
    )
    .map_err(|e| fail("(all)", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clustering_takes_the_key_columns_bigquery_accepts() {
        let field = |name: &str, t| TableFieldSchema::new(name, t);
        let fields = [
            field("amount", FieldType::Float64),
            field("id", FieldType::Int64),
            field("payload", FieldType::Bytes),
            field("doc", FieldType::Json),
            field("name", FieldType::String),
            field("day", FieldType::Date),
            field("at", FieldType::Time),
            field("ts", FieldType::Timestamp),
            field("n", FieldType::Numeric),
        ];
        let keys: Vec<String> = [
            "amount", "id", "payload", "doc", "name", "day", "at", "ts", "n",
        ]
        .map(String::from)
        .to_vec();
        let (kept, left_out) = cluster_fields(&keys, &fields, 4);
        assert_eq!(kept, ["id", "name", "day", "ts"]);
        assert_eq!(left_out, ["amount", "payload", "doc", "at"]);
        let (kept, left_out) = cluster_fields(&keys[..1], &fields, 4);
        assert!(kept.is_empty() && left_out == ["amount"]);
    }

    #[test]
    fn numeric_or_bignumeric_by_precision_and_scale() {
        let t = |p, s| {
            format!(
                "{:?}",
                field_type(SqlType::Decimal {
                    precision: p,
                    scale: s
                })
            )
        };
        assert_eq!(t(38, 9), "Numeric");
        assert_eq!(t(12, 2), "Numeric");
        assert_eq!(t(38, 0), "Bignumeric");
        assert_eq!(t(20, 10), "Bignumeric");
    }

    #[test]
    fn declared_type_round_trips_through_the_description() {
        let column = Column {
            name: "amount".into(),
            sql_type: SqlType::Decimal {
                precision: 12,
                scale: 2,
            },
            existing: None,
        };
        let schema = Schema::new(vec![Field::new(
            "amount",
            column.sql_type.arrow_type(),
            true,
        )]);
        let bq = table_schema(&schema, std::slice::from_ref(&column), false);
        let field = &bq.fields.unwrap()[0];
        assert_eq!(declared_type(field), Some(column.sql_type));
    }
}
