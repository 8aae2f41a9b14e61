//! Typed Arrow column builders fed with text (CSV fields, Parquet strings).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};

use super::text;
use crate::config::{SqlType, UTC};

/// Appends text values of one declared type.
pub(crate) enum ColumnBuilder {
    SmallInt(Int16Builder),
    Integer(Int32Builder),
    BigInt(Int64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Real(Float32Builder),
    Double(Float64Builder),
    Boolean(BooleanBuilder),
    Text(StringBuilder),
    Uuid(StringBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, bool),
    Bytes(BinaryBuilder),
}

impl ColumnBuilder {
    /// A builder for `sql_type` with room for `capacity` values.
    pub(crate) fn new(sql_type: SqlType, capacity: usize) -> Self {
        match sql_type {
            SqlType::SmallInt => Self::SmallInt(Int16Builder::with_capacity(capacity)),
            SqlType::Integer => Self::Integer(Int32Builder::with_capacity(capacity)),
            SqlType::BigInt => Self::BigInt(Int64Builder::with_capacity(capacity)),
            SqlType::Decimal { precision, scale } => {
                Self::Decimal(Decimal128Builder::with_capacity(capacity), precision, scale)
            }
            SqlType::Real => Self::Real(Float32Builder::with_capacity(capacity)),
            SqlType::Double => Self::Double(Float64Builder::with_capacity(capacity)),
            SqlType::Boolean => Self::Boolean(BooleanBuilder::with_capacity(capacity)),
            SqlType::Text | SqlType::Json => {
                Self::Text(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            SqlType::Uuid => Self::Uuid(StringBuilder::with_capacity(capacity, capacity * 36)),
            SqlType::Date => Self::Date(Date32Builder::with_capacity(capacity)),
            SqlType::Timestamp => {
                Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity), false)
            }
            SqlType::TimestampTz => {
                Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity), true)
            }
            SqlType::Bytes => Self::Bytes(BinaryBuilder::with_capacity(capacity, capacity * 16)),
        }
    }

    /// Appends NULL.
    pub(crate) fn append_null(&mut self) {
        match self {
            Self::SmallInt(b) => b.append_null(),
            Self::Integer(b) => b.append_null(),
            Self::BigInt(b) => b.append_null(),
            Self::Decimal(b, ..) => b.append_null(),
            Self::Real(b) => b.append_null(),
            Self::Double(b) => b.append_null(),
            Self::Boolean(b) => b.append_null(),
            Self::Text(b) | Self::Uuid(b) => b.append_null(),
            Self::Date(b) => b.append_null(),
            Self::Timestamp(b, _) => b.append_null(),
            Self::Bytes(b) => b.append_null(),
        }
    }

    /// Parses and appends `value`; on failure returns what was expected.
    pub(crate) fn append_text(&mut self, value: &str) -> Result<(), String> {
        fn int<T: std::str::FromStr>(v: &str, what: &str) -> Result<T, String> {
            v.parse::<T>().map_err(|_| what.to_string())
        }
        match self {
            Self::SmallInt(b) => b.append_value(int(value, "a smallint (-32768..32767)")?),
            Self::Integer(b) => b.append_value(int(value, "an integer (32-bit)")?),
            Self::BigInt(b) => b.append_value(int(value, "a bigint (64-bit integer)")?),
            Self::Decimal(b, p, s) => b.append_value(text::parse_decimal(value, *p, *s)?),
            Self::Real(b) => b.append_value(int(value, "a real number")?),
            Self::Double(b) => b.append_value(int(value, "a double")?),
            Self::Boolean(b) => b.append_value(text::parse_bool(value)?),
            Self::Text(b) => b.append_value(value),
            Self::Uuid(b) => b.append_value(text::parse_uuid(value)?),
            Self::Date(b) => b.append_value(text::parse_date(value)?),
            Self::Timestamp(b, tz) => b.append_value(text::parse_timestamp(value, *tz)?),
            Self::Bytes(b) => b.append_value(text::parse_hex(value)?),
        }
        Ok(())
    }

    /// Finishes the column (the builder is left empty, to be filled again).
    pub(crate) fn finish(&mut self) -> ArrayRef {
        match self {
            Self::SmallInt(b) => Arc::new(b.finish()),
            Self::Integer(b) => Arc::new(b.finish()),
            Self::BigInt(b) => Arc::new(b.finish()),
            Self::Decimal(b, p, s) => Arc::new(
                b.finish()
                    .with_precision_and_scale(*p, *s)
                    .expect("precision and scale validated in config"),
            ),
            Self::Real(b) => Arc::new(b.finish()),
            Self::Double(b) => Arc::new(b.finish()),
            Self::Boolean(b) => Arc::new(b.finish()),
            Self::Text(b) | Self::Uuid(b) => Arc::new(b.finish()),
            Self::Date(b) => Arc::new(b.finish()),
            Self::Timestamp(b, tz) => {
                let array = b.finish();
                Arc::new(if *tz { array.with_timezone(UTC) } else { array })
            }
            Self::Bytes(b) => Arc::new(b.finish()),
        }
    }
}
