//! One session with the target database: statements, rows as text, and bulk
//! loading (PostgreSQL `COPY … FROM STDIN`, MySQL multi-row `INSERT`), with
//! Arrow values written in each server's text form.

use std::fmt::Write as _;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, TimeUnit, TimestampMicrosecondType,
};
use futures::SinkExt;
use mysql_async::prelude::Queryable;

use crate::database::{Engine, Failure};
use crate::error::{Error, Result};
use crate::model::SqlType;

/// Bytes of values sent per COPY message or INSERT statement.
const CHUNK_BYTES: usize = 1 << 20;

/// A session with the target database.
pub(super) enum Session {
    /// PostgreSQL.
    Pg(tokio_postgres::Client),
    /// MySQL / MariaDB.
    My(mysql_async::Conn),
}

/// Rows as the server writes them in text (`None`: NULL), with the column names.
pub(super) struct TextRows {
    pub names: Vec<String>,
    /// Each column's type as the server describes it (`Text` for any other).
    pub types: Vec<SqlType>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Session {
    /// Opens a session; MySQL's is set to `mysql.sql`'s `session` mode.
    pub(super) async fn open(
        endpoint: &crate::database::Endpoint,
        session_sql: &str,
    ) -> Result<Session> {
        let fail = |f: Failure| database_error(format!("connecting to {}", endpoint.redacted()), f);
        match endpoint.engine {
            Engine::Postgres => Ok(Session::Pg(
                crate::database::postgres(&endpoint.url, &endpoint.tls)
                    .await
                    .map_err(fail)?,
            )),
            Engine::MySql => {
                let (conn, _) = crate::database::mysql(&endpoint.url, &endpoint.tls)
                    .await
                    .map_err(fail)?;
                let mut session = Session::My(conn);
                session
                    .execute(session_sql, "setting up the session")
                    .await?;
                Ok(session)
            }
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub(super) async fn execute(&mut self, sql: &str, context: &str) -> Result<u64> {
        tracing::debug!(%sql, "database statement");
        let result = match self {
            Session::Pg(client) => client.execute(sql, &[]).await.map_err(Failure::from),
            Session::My(conn) => match conn.query_drop(sql).await {
                Ok(()) => Ok(conn.affected_rows()),
                Err(e) => Err(Failure::from(e)),
            },
        };
        result.map_err(|f| statement_error(context, sql, f))
    }

    /// Runs a query and returns its rows in text.
    pub(super) async fn rows(&mut self, sql: &str, context: &str) -> Result<TextRows> {
        tracing::debug!(%sql, "database query");
        let fail = |f: Failure| statement_error(context, sql, f);
        match self {
            Session::Pg(client) => {
                let mut out = TextRows {
                    names: Vec::new(),
                    types: Vec::new(),
                    rows: Vec::new(),
                };
                for message in client.simple_query(sql).await.map_err(|e| fail(e.into()))? {
                    match message {
                        tokio_postgres::SimpleQueryMessage::RowDescription(columns) => {
                            out.names = columns.iter().map(|c| c.name().to_string()).collect();
                        }
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            out.rows.push(
                                (0..row.len())
                                    .map(|i| row.get(i).map(str::to_string))
                                    .collect(),
                            );
                        }
                        _ => {}
                    }
                }
                if !out.names.is_empty() {
                    let statement = client.prepare(sql).await.map_err(|e| fail(e.into()))?;
                    out.types = statement
                        .columns()
                        .iter()
                        .enumerate()
                        .map(|(i, c)| postgres_type(c.type_(), &out.rows, i))
                        .collect();
                }
                Ok(out)
            }
            Session::My(conn) => {
                let mut result = conn.query_iter(sql).await.map_err(|e| fail(e.into()))?;
                let names = result
                    .columns_ref()
                    .iter()
                    .map(|c| c.name_str().into_owned())
                    .collect();
                let types = result.columns_ref().iter().map(mysql_type).collect();
                let rows: Vec<mysql_async::Row> =
                    result.collect().await.map_err(|e| fail(e.into()))?;
                let rows = rows
                    .into_iter()
                    .map(|row| {
                        row.unwrap()
                            .into_iter()
                            .map(|v| match v {
                                mysql_async::Value::NULL => None,
                                mysql_async::Value::Bytes(b) => {
                                    Some(String::from_utf8_lossy(&b).into_owned())
                                }
                                other => Some(other.as_sql(true).trim_matches('\'').to_string()),
                            })
                            .collect()
                    })
                    .collect();
                Ok(TextRows { names, types, rows })
            }
        }
    }

    /// Appends `batch`'s rows to `table` (a quoted, qualified name) whose
    /// `columns` (quoted) take the batch's columns in order.
    pub(super) async fn insert(
        &mut self,
        table: &str,
        columns: &str,
        batch: &RecordBatch,
        context: &str,
    ) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match self {
            Session::Pg(client) => {
                let sql = format!("COPY {table} ({columns}) FROM STDIN");
                let fail = |e: tokio_postgres::Error| statement_error(context, &sql, e.into());
                let sink = client
                    .copy_in::<_, bytes::Bytes>(&sql)
                    .await
                    .map_err(fail)?;
                futures::pin_mut!(sink);
                let mut text = String::with_capacity(CHUNK_BYTES + 4096);
                for row in 0..batch.num_rows() {
                    for (i, column) in batch.columns().iter().enumerate() {
                        if i > 0 {
                            text.push('\t');
                        }
                        copy_value(column, row, &mut text)?;
                    }
                    text.push('\n');
                    if text.len() >= CHUNK_BYTES {
                        sink.send(bytes::Bytes::from(std::mem::take(&mut text)))
                            .await
                            .map_err(fail)?;
                    }
                }
                if !text.is_empty() {
                    sink.send(bytes::Bytes::from(text)).await.map_err(fail)?;
                }
                sink.finish().await.map_err(fail)?;
                Ok(())
            }
            Session::My(_) => {
                let head = format!("INSERT INTO {table} ({columns}) VALUES ");
                let mut sql = head.clone();
                for row in 0..batch.num_rows() {
                    if sql.len() > head.len() {
                        sql.push(',');
                    }
                    sql.push('(');
                    for (i, column) in batch.columns().iter().enumerate() {
                        if i > 0 {
                            sql.push(',');
                        }
                        mysql_value(column, row, &mut sql)?;
                    }
                    sql.push(')');
                    if sql.len() >= CHUNK_BYTES {
                        self.execute(&std::mem::replace(&mut sql, head.clone()), context)
                            .await?;
                    }
                }
                if sql.len() > head.len() {
                    self.execute(&sql, context).await?;
                }
                Ok(())
            }
        }
    }
}

/// The type of a PostgreSQL result column; a numeric's scale is the most
/// fraction digits among `rows`' values of column `i`.
fn postgres_type(
    ty: &tokio_postgres::types::Type,
    rows: &[Vec<Option<String>>],
    i: usize,
) -> SqlType {
    use tokio_postgres::types::Type;
    match *ty {
        Type::INT2 => SqlType::SmallInt,
        Type::INT4 => SqlType::Integer,
        Type::INT8 => SqlType::BigInt,
        Type::NUMERIC => {
            let scale = rows
                .iter()
                .filter_map(|r| r[i].as_deref())
                .map(|v| v.split_once('.').map_or(0, |(_, f)| f.len()))
                .max()
                .unwrap_or(0);
            SqlType::Decimal {
                precision: 38,
                scale: scale.min(38) as i8,
            }
        }
        Type::FLOAT4 => SqlType::Real,
        Type::FLOAT8 => SqlType::Double,
        Type::BOOL => SqlType::Boolean,
        Type::DATE => SqlType::Date,
        Type::TIMESTAMP => SqlType::Timestamp,
        Type::TIMESTAMPTZ => SqlType::TimestampTz,
        Type::BYTEA => SqlType::Bytes,
        _ => SqlType::Text,
    }
}

/// The type of a MySQL result column.
fn mysql_type(column: &mysql_async::Column) -> SqlType {
    use mysql_async::consts::{ColumnFlags, ColumnType as T};
    let unsigned = column.flags().contains(ColumnFlags::UNSIGNED_FLAG);
    let binary = column.character_set() == 63;
    match column.column_type() {
        T::MYSQL_TYPE_TINY => SqlType::SmallInt,
        T::MYSQL_TYPE_SHORT if !unsigned => SqlType::SmallInt,
        T::MYSQL_TYPE_SHORT | T::MYSQL_TYPE_INT24 => SqlType::Integer,
        T::MYSQL_TYPE_LONG if !unsigned => SqlType::Integer,
        T::MYSQL_TYPE_LONG => SqlType::BigInt,
        T::MYSQL_TYPE_LONGLONG if !unsigned => SqlType::BigInt,
        T::MYSQL_TYPE_LONGLONG => SqlType::Decimal {
            precision: 20,
            scale: 0,
        },
        T::MYSQL_TYPE_NEWDECIMAL | T::MYSQL_TYPE_DECIMAL => SqlType::Decimal {
            precision: 38,
            scale: column.decimals().min(38) as i8,
        },
        T::MYSQL_TYPE_FLOAT => SqlType::Real,
        T::MYSQL_TYPE_DOUBLE => SqlType::Double,
        T::MYSQL_TYPE_DATE => SqlType::Date,
        T::MYSQL_TYPE_DATETIME | T::MYSQL_TYPE_TIMESTAMP => SqlType::Timestamp,
        T::MYSQL_TYPE_BLOB
        | T::MYSQL_TYPE_TINY_BLOB
        | T::MYSQL_TYPE_MEDIUM_BLOB
        | T::MYSQL_TYPE_LONG_BLOB
        | T::MYSQL_TYPE_VAR_STRING
        | T::MYSQL_TYPE_STRING
            if binary =>
        {
            SqlType::Bytes
        }
        _ => SqlType::Text,
    }
}

/// A failed statement: its first words name it, the server's message says why.
fn statement_error(context: &str, sql: &str, f: Failure) -> Error {
    let mut statement: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if statement.len() > 160 {
        let cut = (0..=160)
            .rev()
            .find(|&i| statement.is_char_boundary(i))
            .unwrap_or(0);
        statement.truncate(cut);
        statement.push('…');
    }
    database_error(format!("{context} ({statement})"), f)
}

/// `f` as the database warehouse's error, retryable when a retry may succeed.
fn database_error(context: String, f: Failure) -> Error {
    let retry = f.lost
        || [
            "40001",
            "40P01",
            "Deadlock found",
            "Lock wait timeout",
            "could not serialize",
        ]
        .iter()
        .any(|m| f.message.contains(m));
    Error::Database {
        context,
        message: f.message,
        retry,
    }
}

/// One value in a server's text form.
enum Text<'a> {
    Null,
    Str(std::borrow::Cow<'a, str>),
    Bytes(&'a [u8]),
}

fn unsupported(data_type: &DataType) -> Error {
    Error::Internal(format!(
        "the database warehouse cannot write a column of Arrow type {data_type}"
    ))
}

/// `column[row]` as text: numbers as Rust prints them (exact; floats
/// shortest round-trip), timestamps in UTC with µs, booleans as `t`/`f`.
fn text(column: &ArrayRef, row: usize, mysql: bool) -> Result<Text<'_>> {
    if column.is_null(row) {
        return Ok(Text::Null);
    }
    let owned = |s: String| Ok(Text::Str(s.into()));
    match column.data_type() {
        DataType::Int16 => owned(column.as_primitive::<Int16Type>().value(row).to_string()),
        DataType::Int32 => owned(column.as_primitive::<Int32Type>().value(row).to_string()),
        DataType::Int64 => owned(column.as_primitive::<Int64Type>().value(row).to_string()),
        DataType::Float32 => owned(float(
            f64::from(column.as_primitive::<Float32Type>().value(row)),
            column.as_primitive::<Float32Type>().value(row).to_string(),
        )),
        DataType::Float64 => {
            let v = column.as_primitive::<Float64Type>().value(row);
            owned(float(v, v.to_string()))
        }
        DataType::Decimal128(..) => {
            owned(column.as_primitive::<Decimal128Type>().value_as_string(row))
        }
        DataType::Boolean => {
            let v = column.as_boolean().value(row);
            owned(match (v, mysql) {
                (true, true) => "1".into(),
                (false, true) => "0".into(),
                (true, false) => "t".into(),
                (false, false) => "f".into(),
            })
        }
        DataType::Utf8 => Ok(Text::Str(column.as_string::<i32>().value(row).into())),
        DataType::Date32 => {
            match Date32Type::to_naive_date_opt(column.as_primitive::<Date32Type>().value(row)) {
                Some(d) => owned(d.format("%Y-%m-%d").to_string()),
                None => Err(unsupported(column.data_type())),
            }
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let micros = column.as_primitive::<TimestampMicrosecondType>().value(row);
            let at = chrono::DateTime::from_timestamp_micros(micros)
                .ok_or_else(|| unsupported(column.data_type()))?;
            let mut s = at.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
            if tz.is_some() && !mysql {
                s.push_str("+00");
            }
            owned(s)
        }
        DataType::Binary => Ok(Text::Bytes(column.as_binary::<i32>().value(row))),
        other => Err(unsupported(other)),
    }
}

/// A float as both servers read it back exactly (`NaN`, `Infinity` spelled
/// as PostgreSQL does; MySQL refuses them with a clear error).
fn float(v: f64, shortest: String) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        shortest
    }
}

/// A COPY text-format field.
fn copy_value(column: &ArrayRef, row: usize, out: &mut String) -> Result<()> {
    match text(column, row, false)? {
        Text::Null => out.push_str("\\N"),
        Text::Str(s) => {
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
        }
        Text::Bytes(b) => {
            out.push_str("\\\\x");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
        }
    }
    Ok(())
}

/// A MySQL literal (the session has `NO_BACKSLASH_ESCAPES`: `''` is the only escape).
fn mysql_value(column: &ArrayRef, row: usize, out: &mut String) -> Result<()> {
    match text(column, row, true)? {
        Text::Null => out.push_str("NULL"),
        Text::Str(s) => {
            out.push('\'');
            out.push_str(&s.replace('\'', "''"));
            out.push('\'');
        }
        Text::Bytes(b) => {
            out.push_str("X'");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
            out.push('\'');
        }
    }
    Ok(())
}

/// The column type a table gets for `sql_type` (`key`: part of an index,
/// which MySQL needs bounded).
pub(super) fn column_type(engine: Engine, sql_type: SqlType, key: bool) -> String {
    match (engine, sql_type) {
        (_, SqlType::SmallInt) => "SMALLINT".into(),
        (Engine::Postgres, SqlType::Integer) => "INTEGER".into(),
        (Engine::MySql, SqlType::Integer) => "INT".into(),
        (_, SqlType::BigInt) => "BIGINT".into(),
        (Engine::Postgres, SqlType::Decimal { precision, scale }) => {
            format!("NUMERIC({precision},{scale})")
        }
        (Engine::MySql, SqlType::Decimal { precision, scale }) => {
            format!("DECIMAL({precision},{scale})")
        }
        (Engine::Postgres, SqlType::Real) => "REAL".into(),
        (Engine::MySql, SqlType::Real) => "FLOAT".into(),
        (Engine::Postgres, SqlType::Double) => "DOUBLE PRECISION".into(),
        (Engine::MySql, SqlType::Double) => "DOUBLE".into(),
        (_, SqlType::Boolean) => "BOOLEAN".into(),
        (Engine::Postgres, SqlType::Text) => "TEXT".into(),
        (Engine::MySql, SqlType::Text) if key => "VARCHAR(255)".into(),
        (Engine::MySql, SqlType::Text) => "LONGTEXT".into(),
        (_, SqlType::Date) => "DATE".into(),
        (Engine::Postgres, SqlType::Timestamp) => "TIMESTAMP(6)".into(),
        (Engine::Postgres, SqlType::TimestampTz) => "TIMESTAMPTZ".into(),
        (Engine::MySql, SqlType::Timestamp | SqlType::TimestampTz) => "DATETIME(6)".into(),
        (Engine::Postgres, SqlType::Bytes) => "BYTEA".into(),
        (Engine::MySql, SqlType::Bytes) if key => "VARBINARY(255)".into(),
        (Engine::MySql, SqlType::Bytes) => "LONGBLOB".into(),
        (Engine::Postgres, SqlType::Uuid) => "UUID".into(),
        (Engine::MySql, SqlType::Uuid) => "CHAR(36)".into(),
        (Engine::Postgres, SqlType::Json) => "JSONB".into(),
        (Engine::MySql, SqlType::Json) => "JSON".into(),
    }
}

/// The type of a `change_seq` column: compared byte by byte.
pub(super) fn sequence_type(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => "TEXT COLLATE \"C\"",
        Engine::MySql => "VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BinaryArray, Decimal128Array, StringArray, TimestampMicrosecondArray};

    use super::*;

    fn copy(column: ArrayRef) -> Vec<String> {
        (0..column.len())
            .map(|i| {
                let mut out = String::new();
                copy_value(&column, i, &mut out).unwrap();
                out
            })
            .collect()
    }

    fn literal(column: ArrayRef) -> Vec<String> {
        (0..column.len())
            .map(|i| {
                let mut out = String::new();
                mysql_value(&column, i, &mut out).unwrap();
                out
            })
            .collect()
    }

    #[test]
    fn values_are_written_in_each_servers_text_form() {
        let text: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a\tb\\c\nd'e"),
            None,
            Some(""),
        ]));
        assert_eq!(copy(text.clone()), ["a\\tb\\\\c\\nd'e", "\\N", ""]);
        assert_eq!(literal(text), ["'a\tb\\c\nd''e'", "NULL", "''"]);
        let bytes: ArrayRef = Arc::new(BinaryArray::from(vec![&b"\x00\xff"[..], b""]));
        assert_eq!(copy(bytes.clone()), ["\\\\x00ff", "\\\\x"]);
        assert_eq!(literal(bytes), ["X'00ff'", "X''"]);
        let decimal: ArrayRef = Arc::new(
            Decimal128Array::from(vec![-1205, 7])
                .with_precision_and_scale(12, 2)
                .unwrap(),
        );
        assert_eq!(copy(decimal), ["-12.05", "0.07"]);
        let ts: ArrayRef = Arc::new(
            TimestampMicrosecondArray::from(vec![1_714_557_600_123_456]).with_timezone("UTC"),
        );
        assert_eq!(copy(ts.clone()), ["2024-05-01 10:00:00.123456+00"]);
        assert_eq!(literal(ts), ["'2024-05-01 10:00:00.123456'"]);
        let floats: ArrayRef = Arc::new(arrow::array::Float64Array::from(vec![
            0.1,
            f64::NAN,
            f64::NEG_INFINITY,
            1e300,
        ]));
        let written = copy(floats);
        assert_eq!(written[..3], ["0.1", "NaN", "-Infinity"]);
        assert_eq!(written[3].parse::<f64>().unwrap(), 1e300);
    }
}
