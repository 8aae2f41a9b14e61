//! The column model every stage shares (a leaf module): column types as users
//! write them in a pipeline file (SQL names), their Arrow representation in
//! decoded batches and warehouse tables, and a declared [`Column`].

use std::fmt;
use std::str::FromStr;

use arrow::datatypes::{DataType, TimeUnit};

/// Time zone of every `timestamptz` column: values are normalized to UTC.
pub const UTC: &str = "UTC";

/// A declared column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    /// `smallint`, `int2`: 16-bit signed.
    SmallInt,
    /// `integer`, `int`, `int4`: 32-bit signed.
    Integer,
    /// `bigint`, `int8`: 64-bit signed.
    BigInt,
    /// `decimal(p,s)` / `numeric(p,s)`: exact, p ≤ 38.
    Decimal {
        /// Total digits.
        precision: u8,
        /// Digits after the point.
        scale: i8,
    },
    /// `real`, `float4`.
    Real,
    /// `double`, `double precision`, `float8`, `float`.
    Double,
    /// `boolean`, `bool`.
    Boolean,
    /// `text`, `varchar`, `varchar(n)`, `char(n)`, `string`.
    Text,
    /// `date`.
    Date,
    /// `timestamp` (without time zone), microseconds.
    Timestamp,
    /// `timestamptz` (with time zone), microseconds, normalized to UTC.
    TimestampTz,
    /// `bytea`, `binary`, `blob`.
    Bytes,
    /// `uuid`, kept as canonical lowercase text.
    Uuid,
    /// `json`, `jsonb`, kept as text.
    Json,
}

impl SqlType {
    /// The Arrow type of this column in decoded batches and warehouse tables.
    pub fn arrow_type(self) -> DataType {
        match self {
            SqlType::SmallInt => DataType::Int16,
            SqlType::Integer => DataType::Int32,
            SqlType::BigInt => DataType::Int64,
            SqlType::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            SqlType::Real => DataType::Float32,
            SqlType::Double => DataType::Float64,
            SqlType::Boolean => DataType::Boolean,
            SqlType::Text | SqlType::Uuid | SqlType::Json => DataType::Utf8,
            SqlType::Date => DataType::Date32,
            SqlType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            SqlType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            SqlType::Bytes => DataType::Binary,
        }
    }
}

impl SqlType {
    /// The type a column of an Arrow type is loaded as when columns are not
    /// declared (Parquet sources); `None` for nested types.
    pub fn from_arrow(data_type: &DataType) -> Option<SqlType> {
        Some(match data_type {
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => SqlType::SmallInt,
            DataType::Int32 | DataType::UInt16 => SqlType::Integer,
            DataType::Int64 | DataType::UInt32 => SqlType::BigInt,
            DataType::UInt64 => SqlType::Decimal {
                precision: 20,
                scale: 0,
            },
            DataType::Decimal32(p, s) | DataType::Decimal64(p, s) | DataType::Decimal128(p, s) => {
                SqlType::Decimal {
                    precision: *p,
                    scale: *s,
                }
            }
            DataType::Float16 | DataType::Float32 => SqlType::Real,
            DataType::Float64 => SqlType::Double,
            DataType::Boolean => SqlType::Boolean,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => SqlType::Text,
            DataType::Date32 | DataType::Date64 => SqlType::Date,
            DataType::Timestamp(_, None) => SqlType::Timestamp,
            DataType::Timestamp(_, Some(_)) => SqlType::TimestampTz,
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => SqlType::Bytes,
            _ => return None,
        })
    }
}

impl fmt::Display for SqlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SqlType::SmallInt => f.write_str("smallint"),
            SqlType::Integer => f.write_str("integer"),
            SqlType::BigInt => f.write_str("bigint"),
            SqlType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            SqlType::Real => f.write_str("real"),
            SqlType::Double => f.write_str("double"),
            SqlType::Boolean => f.write_str("boolean"),
            SqlType::Text => f.write_str("text"),
            SqlType::Date => f.write_str("date"),
            SqlType::Timestamp => f.write_str("timestamp"),
            SqlType::TimestampTz => f.write_str("timestamptz"),
            SqlType::Bytes => f.write_str("bytea"),
            SqlType::Uuid => f.write_str("uuid"),
            SqlType::Json => f.write_str("json"),
        }
    }
}

/// Every accepted spelling, for error messages.
pub const TYPE_NAMES: &str = "bigint, integer, smallint, decimal(p,s), numeric(p,s), real, double, \
     boolean, text, varchar[(n)], char(n), date, timestamp, timestamptz, bytea, uuid, json, jsonb";

impl FromStr for SqlType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let (base, args) = match lower.split_once('(') {
            Some((base, rest)) => {
                let args = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("unclosed parenthesis in type {s:?}"))?;
                (base.trim(), Some(args))
            }
            None => (lower.as_str(), None),
        };
        let plain = |t: SqlType| match args {
            None => Ok(t),
            Some(_) => Err(format!("type {base} takes no arguments (got {s:?})")),
        };
        match base {
            "smallint" | "int2" => plain(SqlType::SmallInt),
            "integer" | "int" | "int4" => plain(SqlType::Integer),
            "bigint" | "int8" => plain(SqlType::BigInt),
            "real" | "float4" => plain(SqlType::Real),
            "double" | "double precision" | "float8" | "float" => plain(SqlType::Double),
            "boolean" | "bool" => plain(SqlType::Boolean),
            "text" | "string" => plain(SqlType::Text),
            // Lengths of character types are not enforced: the source already did.
            "varchar" | "character varying" | "char" | "character" => Ok(SqlType::Text),
            "date" => plain(SqlType::Date),
            "timestamp" | "timestamp without time zone" | "datetime" => plain(SqlType::Timestamp),
            "timestamptz" | "timestamp with time zone" => plain(SqlType::TimestampTz),
            "bytea" | "binary" | "varbinary" | "blob" => plain(SqlType::Bytes),
            "uuid" => plain(SqlType::Uuid),
            "json" | "jsonb" => plain(SqlType::Json),
            "decimal" | "numeric" => parse_decimal_args(s, args),
            _ => Err(format!("unknown type {s:?}; use one of: {TYPE_NAMES}")),
        }
    }
}

fn parse_decimal_args(s: &str, args: Option<&str>) -> Result<SqlType, String> {
    let args = args.ok_or_else(|| {
        format!("{s:?} needs a precision and scale, e.g. decimal(12,2): unbounded numeric cannot be stored exactly")
    })?;
    let mut parts = args.split(',').map(str::trim);
    let precision: u8 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("bad precision in {s:?}"))?;
    let scale: i8 = match parts.next() {
        Some(p) => p.parse().map_err(|_| format!("bad scale in {s:?}"))?,
        None => 0,
    };
    if parts.next().is_some() {
        return Err(format!("too many arguments in {s:?}"));
    }
    if !(1..=38).contains(&precision) {
        return Err(format!("precision of {s:?} must be between 1 and 38"));
    }
    if scale < 0 || scale as u8 > precision {
        return Err(format!(
            "scale of {s:?} must be between 0 and the precision"
        ));
    }
    Ok(SqlType::Decimal { precision, scale })
}

/// A declared column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Name.
    pub name: String,
    /// Type.
    pub sql_type: SqlType,
    /// The value of rows stored before the column was added, as text (see
    /// [`crate::decode::EXISTING_METADATA`]); `None`: NULL, or not known.
    pub existing: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spellings() {
        assert_eq!("BIGINT".parse::<SqlType>(), Ok(SqlType::BigInt));
        assert_eq!("varchar(20)".parse::<SqlType>(), Ok(SqlType::Text));
        assert_eq!(
            "numeric(12, 2)".parse::<SqlType>(),
            Ok(SqlType::Decimal {
                precision: 12,
                scale: 2
            })
        );
        assert_eq!("double precision".parse::<SqlType>(), Ok(SqlType::Double));
    }

    #[test]
    fn rejects_bad_types_with_a_hint() {
        assert!(
            "numeric"
                .parse::<SqlType>()
                .unwrap_err()
                .contains("decimal(12,2)")
        );
        assert!(
            "decimal(40,2)"
                .parse::<SqlType>()
                .unwrap_err()
                .contains("between 1 and 38")
        );
        assert!("decimal(4,5)".parse::<SqlType>().is_err());
        assert!("money".parse::<SqlType>().unwrap_err().contains("bigint"));
        assert!("int(3)".parse::<SqlType>().is_err());
    }
}
