//! Column types as information_schema gives them, and binlog values in
//! PostgreSQL's text form.

use mysql_async::Value as MyValue;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;

use super::MySource;
use super::connect::my;
use crate::capture::mapping::{SourceColumn, SourceTable};
use crate::capture::sink::Sink;
use crate::capture::writer::timestamp_text;
use crate::config::SqlType;
use crate::error::Result;

/// The value a column default gives the rows stored before the column was
/// added, from `information_schema.columns.column_default`: MariaDB writes
/// literals quoted (`'std'`) and `NULL` for none, MySQL writes them bare.
/// An expression (`current_timestamp()`) has no value known here: `None`.
fn default_value(default: &str) -> Option<String> {
    if let Some(quoted) = default
        .strip_prefix('\'')
        .and_then(|d| d.strip_suffix('\''))
    {
        return Some(quoted.replace("''", "'").replace("\\\\", "\\"));
    }
    let bare = default.trim();
    let expression = bare.eq_ignore_ascii_case("NULL")
        || bare.contains('(')
        || bare.to_ascii_lowercase().starts_with("current_");
    (!expression).then(|| bare.to_string())
}

/// A column as information_schema describes it.
#[derive(Debug, Clone)]
pub(super) struct MyColumn {
    pub(super) sql_type: SqlType,
    /// ENUM and SET labels, in order.
    labels: Vec<String>,
    /// `set` (a bitmask over `labels`) rather than `enum` (an index).
    set: bool,
    /// An unsigned integer type.
    pub(super) unsigned: bool,
}

#[cfg(test)]
impl MyColumn {
    /// A column of `sql_type`, not an ENUM or SET.
    pub(super) fn of(sql_type: SqlType, unsigned: bool) -> MyColumn {
        MyColumn {
            sql_type,
            labels: vec![],
            set: false,
            unsigned,
        }
    }
}

/// A table as capture knows it.
pub(super) struct Table {
    /// Its columns as the sink takes them.
    pub(super) source: SourceTable,
    /// Its columns as the binlog gives them.
    pub(super) columns: Vec<MyColumn>,
    /// `schema.table`, or `None` when the mapping excludes it.
    pub(super) id: Option<String>,
}

/// The SQL type a MySQL column is written as.
fn sql_type(
    data_type: &str,
    column_type: &str,
    precision: Option<u64>,
    scale: Option<u64>,
) -> SqlType {
    let unsigned = column_type.contains("unsigned");
    match data_type {
        "tinyint" | "year" => SqlType::SmallInt,
        "smallint" if !unsigned => SqlType::SmallInt,
        "smallint" | "mediumint" => SqlType::Integer,
        "int" | "integer" if !unsigned => SqlType::Integer,
        "int" | "integer" => SqlType::BigInt,
        "bigint" if !unsigned => SqlType::BigInt,
        "bigint" => SqlType::Decimal {
            precision: 20,
            scale: 0,
        },
        "decimal" | "numeric" => match (precision, scale) {
            (Some(p), Some(s)) if (1..=38).contains(&p) && s <= p => SqlType::Decimal {
                precision: p as u8,
                scale: s as i8,
            },
            _ => SqlType::Text,
        },
        "float" => SqlType::Real,
        "double" | "real" => SqlType::Double,
        "date" => SqlType::Date,
        "datetime" => SqlType::Timestamp,
        "timestamp" => SqlType::TimestampTz,
        "json" => SqlType::Json,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "bit" => {
            SqlType::Bytes
        }
        _ => SqlType::Text,
    }
}

/// `enum('a','b')` → ["a", "b"].
fn labels(column_type: &str) -> Vec<String> {
    let Some(inner) = column_type
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
    else {
        return vec![];
    };
    inner
        .split("','")
        .map(|l| l.trim_matches('\'').replace("''", "'"))
        .collect()
}

/// The text form of a binlog value for `column`, as PostgreSQL would print it
/// (so one set of parsers serves both sources); a TIME with the
/// `fraction_digits` of its column (the table map's metadata).
pub(super) fn binlog_text(
    value: &BinlogValue<'_>,
    column: &MyColumn,
    fraction_digits: u8,
) -> Result<String, String> {
    let v = match value {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(j) => {
            let json = serde_json::Value::try_from(j.clone()).map_err(|e| e.to_string())?;
            return Ok(json.to_string());
        }
        BinlogValue::JsonDiff(_) => {
            return Err("a partial JSON update (set binlog_row_value_options = '')".into());
        }
    };
    Ok(match (v, column.sql_type) {
        (MyValue::Int(i), SqlType::Text) if !column.labels.is_empty() => label(column, *i as u64),
        (MyValue::Bytes(b), SqlType::TimestampTz) => {
            // TIMESTAMP: seconds since the epoch, with optional microseconds.
            let text = String::from_utf8_lossy(b);
            let (secs, micros) = text.split_once('.').unwrap_or((&text, "0"));
            let secs: i64 = secs
                .parse()
                .map_err(|_| format!("a timestamp, found {text}"))?;
            let micros: u32 = format!("{micros:0<6}")[..6].parse().unwrap_or(0);
            let at = chrono::DateTime::from_timestamp(secs, micros * 1000)
                .ok_or_else(|| format!("a timestamp, found {text}"))?;
            format!("{}+00", timestamp_text(at))
        }
        (MyValue::Int(secs), SqlType::TimestampTz) => {
            let at = chrono::DateTime::from_timestamp(*secs, 0)
                .ok_or_else(|| format!("a timestamp, found {secs}"))?;
            format!("{}+00", timestamp_text(at))
        }
        (MyValue::Bytes(b), SqlType::Text) if column.set => {
            let mut mask = 0u64;
            for (i, byte) in b.iter().enumerate() {
                mask |= u64::from(*byte) << (8 * i);
            }
            let names: Vec<&str> = column
                .labels
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, l)| l.as_str())
                .collect();
            names.join(",")
        }
        (MyValue::Bytes(b), SqlType::Bytes) => format!("\\x{}", hex::encode(b)),
        (MyValue::Bytes(b), _) => String::from_utf8_lossy(b).into_owned(),
        (MyValue::Int(i), _) => i.to_string(),
        (MyValue::UInt(u), _) => u.to_string(),
        (MyValue::Float(f), _) => f.to_string(),
        (MyValue::Double(f), _) => f.to_string(),
        (MyValue::Date(y, mo, d, h, mi, s, us), SqlType::Date)
            if (*h, *mi, *s, *us) == (0, 0, 0, 0) =>
        {
            format!("{y:04}-{mo:02}-{d:02}")
        }
        (MyValue::Date(y, mo, d, h, mi, s, us), _) => {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
        }
        (MyValue::Time(neg, days, h, mi, s, us), _) => {
            // With the column's fraction digits, as the server prints it.
            let digits = usize::from(fraction_digits.min(6));
            let fraction = format!(".{us:06}");
            format!(
                "{}{:02}:{mi:02}:{s:02}{}",
                if *neg { "-" } else { "" },
                *days * 24 + u32::from(*h),
                if digits > 0 { &fraction[..=digits] } else { "" }
            )
        }
        (MyValue::NULL, _) => return Err("NULL (handled before)".into()),
    })
}

fn label(column: &MyColumn, index: u64) -> String {
    // ENUM index 0 is the empty string MySQL stores for an invalid value.
    match index {
        0 => String::new(),
        i => column
            .labels
            .get(i as usize - 1)
            .cloned()
            .unwrap_or_else(|| i.to_string()),
    }
}

impl MySource {
    /// Reads a table's columns from information_schema. With `names` (the
    /// binlog's table map, under binlog_row_metadata = FULL) the columns are
    /// those of the binlog row, in its order: a column added since is not
    /// there yet, and one dropped since is written as text.
    pub(super) async fn describe(
        &mut self,
        schema: &str,
        name: &str,
        names: Option<&[String]>,
        sink: &Sink,
    ) -> Result<Table> {
        type Row = (
            String,
            String,
            String,
            Option<u64>,
            Option<u64>,
            String,
            Option<String>,
            String,
        );
        let rows: Vec<Row> = self
            .conn
            .exec(
                "SELECT column_name, data_type, column_type, numeric_precision, numeric_scale, column_key, \
                 column_default, is_nullable \
                 FROM information_schema.columns WHERE table_schema = ? AND table_name = ? \
                 ORDER BY ordinal_position",
                (schema, name),
            )
            .await
            .map_err(my(format!("reading the columns of {schema}.{name}")))?;
        let mut source = SourceTable {
            schema: schema.to_string(),
            name: name.to_string(),
            columns: vec![],
        };
        let mut columns = vec![];
        let rows: Vec<Row> = match names {
            None => rows,
            Some(names) => names
                .iter()
                .map(|n| {
                    rows.iter()
                        .find(|r| r.0.eq_ignore_ascii_case(n))
                        .cloned()
                        .unwrap_or_else(|| {
                            (
                                n.clone(),
                                "text".into(),
                                "text".into(),
                                None,
                                None,
                                String::new(),
                                None,
                                "YES".into(),
                            )
                        })
                })
                .collect(),
        };
        for (col, data_type, column_type, p, s, key, default, nullable) in rows {
            let data_type = data_type.to_ascii_lowercase();
            let sql_type = sql_type(&data_type, &column_type, p, s);
            source.columns.push(SourceColumn {
                name: col,
                sql_type,
                key: key == "PRI",
                existing: default.as_deref().and_then(default_value),
                not_null: nullable == "NO",
            });
            columns.push(MyColumn {
                sql_type,
                labels: if matches!(data_type.as_str(), "enum" | "set") {
                    labels(&column_type)
                } else {
                    vec![]
                },
                set: data_type == "set",
                unsigned: column_type.contains("unsigned"),
            });
        }
        // The binlog holds every database of the server: only the URL's is captured.
        let id = (schema == self.database && sink.mapping().selects(schema, name))
            .then(|| format!("{schema}.{name}"));
        Ok(Table {
            source,
            columns,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_labels() {
        assert_eq!(
            sql_type("int", "int(10) unsigned", None, None),
            SqlType::BigInt
        );
        assert_eq!(sql_type("int", "int(11)", None, None), SqlType::Integer);
        assert_eq!(
            sql_type("decimal", "decimal(12,2)", Some(12), Some(2)),
            SqlType::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(
            sql_type("timestamp", "timestamp(6)", None, None),
            SqlType::TimestampTz
        );
        assert_eq!(
            labels("enum('new','it''s','x,y')"),
            vec!["new", "it's", "x,y"]
        );
    }

    #[test]
    fn binlog_values_as_text() {
        let col = |sql_type| MyColumn {
            sql_type,
            labels: vec![],
            set: false,
            unsigned: false,
        };
        let text = |v: MyValue, t| binlog_text(&BinlogValue::Value(v), &col(t), 6).unwrap();
        assert_eq!(
            text(
                MyValue::Bytes(b"1700000000.5".to_vec()),
                SqlType::TimestampTz
            ),
            "2023-11-14 22:13:20.500000+00"
        );
        assert_eq!(
            text(MyValue::Date(2024, 5, 1, 0, 0, 0, 0), SqlType::Date),
            "2024-05-01"
        );
        assert_eq!(
            text(MyValue::Date(2024, 5, 1, 10, 2, 3, 40), SqlType::Timestamp),
            "2024-05-01 10:02:03.000040"
        );
        assert_eq!(
            text(MyValue::Bytes(vec![0, 255]), SqlType::Bytes),
            "\\x00ff"
        );
        let enumerated = MyColumn {
            sql_type: SqlType::Text,
            labels: vec!["a".into(), "b".into()],
            set: false,
            unsigned: false,
        };
        assert_eq!(
            binlog_text(&BinlogValue::Value(MyValue::Int(2)), &enumerated, 0).unwrap(),
            "b"
        );
        let set = MyColumn {
            sql_type: SqlType::Text,
            labels: vec!["a".into(), "b".into(), "c".into()],
            set: true,
            unsigned: false,
        };
        assert_eq!(
            binlog_text(&BinlogValue::Value(MyValue::Bytes(vec![5])), &set, 0).unwrap(),
            "a,c"
        );
    }
}
