//! Capture from MySQL / MariaDB: a full load under a consistent snapshot,
//! then the row binlog from the snapshot's position.
//!
//! **Snapshot.** MariaDB: `START TRANSACTION WITH CONSISTENT SNAPSHOT` and the
//! binlog position of that snapshot (`binlog_snapshot_file/position`), no
//! lock. MySQL: a brief `FLUSH TABLES WITH READ LOCK` while the snapshot
//! starts and `SHOW MASTER STATUS` is read. The tables are read in that one
//! transaction, and the binlog is read from that position.
//!
//! **Position.** The checkpoint keeps the binlog file and position after the
//! last transaction whose rows are in objects, and on MariaDB its GTID
//! (`domain-server-seq`). A restart resumes by GTID where there is one (it
//! survives binlog rotation and purges of older files), else by file and
//! position. The checkpoint is written only after the objects (see
//! [`super::sink`]), so a kill -9 loses and doubles nothing.
//!
//! **Rows.** v1 (MariaDB) and v2 (MySQL 8) row events with before and after
//! images. An UPDATE of the primary key is a delete then an insert, as for
//! PostgreSQL. DDL (a Query event with ALTER/CREATE/DROP/RENAME/TRUNCATE)
//! refreshes the table's columns: a new schema version. TRUNCATE is a `T` row.

use std::collections::HashMap;

use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts, Value as MyValue};
use serde::{Deserialize, Serialize};

use super::mapping::{SourceColumn, SourceTable};
use super::pgoutput::Value;
use super::sink::Sink;
use super::writer::{LoadWriter, timestamp_text};
use crate::config::SqlType;
use crate::decode::Op;
use crate::error::{Error, Result};
use crate::pipeline::Shutdown;

/// Settings of a MySQL / MariaDB source.
#[derive(Debug, Clone)]
pub struct MySettings {
    /// `mysql://user:password@host:port/database` (the database is the schema
    /// captured), without its TLS parameters.
    pub url: String,
    /// TLS (from the URL's `ssl-mode` and `ssl-ca`).
    pub tls: super::tls::Tls,
    /// Server id this reader registers with (unique among the server's replicas).
    pub server_id: u32,
    /// Whether to write a full load first.
    pub full_load: bool,
    /// Whether to read the binlog.
    pub cdc: bool,
    /// Changes per chunk (whole transactions stay together).
    pub max_changes: usize,
}

/// Where the binlog is read from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Binlog file.
    pub file: String,
    /// Position in it (the end of the last event read).
    pub pos: u64,
    /// MariaDB GTID position: the last transaction read in each replication
    /// domain (`domain-server-seq`, comma separated, as `@@gtid_binlog_pos`).
    #[serde(default)]
    pub gtid: Option<String>,
}

impl Position {
    /// Moves past the event ending at `log_pos`; a transaction's end takes
    /// the GTID its start announced, in its domain.
    fn advance(&mut self, log_pos: u64, gtid: &mut Option<String>) {
        self.pos = log_pos;
        if let Some(gtid) = gtid.take() {
            self.gtid = Some(with_gtid(self.gtid.as_deref(), &gtid));
        }
    }
}

/// The GTID position `set` with `gtid` as its domain's last transaction.
/// A server with several domains (multi-source replication, a former
/// primary) interleaves them; resuming from one domain's GTID alone would
/// send the other domains again from the start.
fn with_gtid(set: Option<&str>, gtid: &str) -> String {
    let domain = |g: &str| {
        g.split('-')
            .next()
            .and_then(|d| d.trim().parse::<u32>().ok())
    };
    let mut entries: Vec<&str> = set
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty() && domain(g) != domain(gtid))
        .collect();
    entries.push(gtid);
    entries.sort_by_key(|g| domain(g));
    entries.join(",")
}

fn my(context: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> Error {
    let context = context.into();
    move |e| {
        if connection_lost(&e) {
            Error::SourceLost {
                context,
                message: e.to_string(),
            }
        } else {
            Error::capture(context, e)
        }
    }
}

/// Whether `e` is the connection failing (refused, reset, closed; the
/// server shutting down or gone) rather than the server refusing what was
/// asked. A certificate that fails its check is an I/O error too, and is not.
fn connection_lost(e: &mysql_async::Error) -> bool {
    use mysql_async::{DriverError, Error as E};
    match e {
        E::Io(io) => !io.to_string().contains("certificate"),
        E::Driver(DriverError::ConnectionClosed | DriverError::PoolDisconnected) => true,
        // Too many connections, server shutdown, connection killed, server
        // gone away, lost connection.
        E::Server(server) => matches!(server.code, 1040 | 1053 | 1927 | 2006 | 2013),
        _ => false,
    }
}

/// The first connection, with TLS as `settings.tls` says, and the options
/// that made it (used for every later connection). `prefer` falls back to
/// a plain connection when the server offers no TLS.
async fn connect_with_tls(opts: Opts, settings: &MySettings) -> Result<(Conn, Opts)> {
    use super::tls::TlsMode;
    let tls = &settings.tls;
    let ssl = (tls.mode != TlsMode::Disable).then(|| {
        let ssl = mysql_async::SslOpts::default()
            .with_danger_accept_invalid_certs(matches!(
                tls.mode,
                TlsMode::Prefer | TlsMode::Require
            ))
            .with_danger_skip_domain_validation(tls.mode == TlsMode::VerifyCa);
        match &tls.root_cert {
            Some(ca) => ssl
                .with_root_certs(vec![ca.clone().into()])
                .with_disable_built_in_roots(true),
            None => ssl,
        }
    });
    let with = |ssl| -> Opts {
        mysql_async::OptsBuilder::from_opts(opts.clone())
            .ssl_opts(ssl)
            .into()
    };
    let fail = |e: mysql_async::Error| {
        let context = format!("connecting to {}", super::redact_url(&settings.url));
        match my(context)(e) {
            Error::Capture { context, message } => Error::capture(context, tls.explain(&message)),
            lost => lost,
        }
    };
    let opts = with(ssl);
    match Conn::new(opts.clone()).await {
        Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer))
            if tls.mode == TlsMode::Prefer =>
        {
            let plain = with(None);
            let conn = Conn::new(plain.clone()).await.map_err(fail)?;
            Ok((conn, plain))
        }
        connected => Ok((connected.map_err(fail)?, opts)),
    }
}

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
struct MyColumn {
    sql_type: SqlType,
    /// ENUM and SET labels, in order.
    labels: Vec<String>,
    /// `set` (a bitmask over `labels`) rather than `enum` (an index).
    set: bool,
}

struct Table {
    source: SourceTable,
    columns: Vec<MyColumn>,
    /// `schema.table`, or `None` when the mapping excludes it.
    id: Option<String>,
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
/// (so one set of parsers serves both sources).
fn binlog_text(value: &BinlogValue<'_>, column: &MyColumn) -> Result<String, String> {
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
        (MyValue::Time(neg, days, h, mi, s, us), _) => format!(
            "{}{:02}:{mi:02}:{s:02}.{us:06}",
            if *neg { "-" } else { "" },
            *days * 24 + u32::from(*h)
        ),
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

/// A connected MySQL / MariaDB source.
pub struct MySource {
    settings: MySettings,
    opts: Opts,
    conn: Conn,
    mariadb: bool,
    database: String,
    tables: HashMap<String, Table>,
}

impl MySource {
    /// Connects and checks what capture needs, with what to fix.
    pub async fn connect(settings: MySettings) -> Result<MySource> {
        let opts = Opts::from_url(&settings.url).map_err(|e| {
            Error::capture(
                "reading source.url",
                format!("{e}; e.g. mysql://cdc@127.0.0.1:3306/shop"),
            )
        })?;
        let database = opts.db_name().map(str::to_string).ok_or_else(|| {
            Error::capture(
                "reading source.url",
                "name the database: mysql://user@host:port/<database>",
            )
        })?;
        let (mut conn, opts) = connect_with_tls(opts, &settings).await?;
        conn.query_drop("SET time_zone = '+00:00'")
            .await
            .map_err(my("setting the session time zone"))?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .await
            .map_err(my("reading the version"))?
            .unwrap_or_default();
        let mariadb = version.to_ascii_lowercase().contains("mariadb");
        let mut source = MySource {
            settings,
            opts,
            conn,
            mariadb,
            database,
            tables: HashMap::new(),
        };
        source.check().await?;
        Ok(source)
    }

    async fn check(&mut self) -> Result<()> {
        let row: Option<(String, String, String)> = self
            .conn
            .query_first("SELECT CAST(@@log_bin AS CHAR), @@binlog_format, @@binlog_row_image")
            .await
            .map_err(my("reading the binlog settings"))?;
        let (log_bin, format, image) = row.unwrap_or_default();
        let mut problems = Vec::new();
        if log_bin != "1" && !log_bin.eq_ignore_ascii_case("on") {
            problems.push("log_bin is off: start the server with --log-bin".to_string());
        }
        if !format.eq_ignore_ascii_case("row") {
            problems.push(format!(
                "binlog_format is {format}: set binlog_format = ROW"
            ));
        }
        if !image.eq_ignore_ascii_case("full") {
            problems.push(format!(
                "binlog_row_image is {image}: set binlog_row_image = FULL"
            ));
        }
        let grants: Vec<String> = self
            .conn
            .query("SHOW GRANTS")
            .await
            .map_err(my("reading the grants"))?;
        let grants = grants.join(" ").to_ascii_uppercase();
        let all = grants.contains("ALL PRIVILEGES ON *.*");
        for needed in ["REPLICATION SLAVE", "REPLICATION CLIENT"] {
            let alias = needed.replace("REPLICATION SLAVE", "REPLICATION REPLICA");
            if !all
                && !grants.contains(needed)
                && !grants.contains(&alias)
                && !grants.contains("BINLOG MONITOR")
            {
                problems.push(format!("the user lacks {needed}: GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO …"));
            }
        }
        let expire: Option<u64> = self
            .conn
            .query_first(if self.mariadb {
                "SELECT CAST(@@expire_logs_days * 86400 AS UNSIGNED)"
            } else {
                "SELECT @@binlog_expire_logs_seconds"
            })
            .await
            .unwrap_or(None);
        if let Some(secs) = expire.filter(|&s| s > 0 && s < 86_400) {
            problems.push(format!(
                "binlogs are kept {secs} s: keep them at least a day so a stopped capture can resume"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::capture("checking the server", problems.join("; ")))
        }
    }

    /// Reads a table's columns from information_schema. With `names` (the
    /// binlog's table map, under binlog_row_metadata = FULL) the columns are
    /// those of the binlog row, in its order: a column added since is not
    /// there yet, and one dropped since is written as text.
    async fn describe(
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

    /// The selected base tables of the database.
    async fn table_names(&mut self, sink: &Sink) -> Result<Vec<String>> {
        let names: Vec<String> = self
            .conn
            .exec(
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = ? AND table_type = 'BASE TABLE' ORDER BY 1",
                (&self.database,),
            )
            .await
            .map_err(my("listing tables"))?;
        Ok(names
            .into_iter()
            .filter(|n| sink.mapping().selects(&self.database, n))
            .collect())
    }

    /// The server's current binlog position.
    pub async fn current_position(&mut self) -> Result<Position> {
        let row: Option<mysql_async::Row> = self
            .conn
            .query_first("SHOW MASTER STATUS")
            .await
            .map_err(my("reading the binlog position"))?;
        let row =
            row.ok_or_else(|| Error::capture("reading the binlog position", "the binlog is off"))?;
        let file: String = row.get(0).unwrap_or_default();
        let pos: u64 = row.get(1).unwrap_or_default();
        let gtid = if self.mariadb {
            self.conn
                .query_first::<String, _>("SELECT @@gtid_binlog_pos")
                .await
                .map_err(my("reading the GTID position"))?
                .filter(|g| !g.is_empty())
        } else {
            None
        };
        Ok(Position { file, pos, gtid })
    }

    /// Writes every selected table under one consistent snapshot and returns
    /// the binlog position of that snapshot, and the rows written.
    pub async fn full_load(&mut self, sink: &mut Sink) -> Result<(Position, u64)> {
        let mut snap = Conn::new(self.opts.clone())
            .await
            .map_err(my("connecting for the full load"))?;
        snap.query_drop("SET time_zone = '+00:00'")
            .await
            .map_err(my("setting the session time zone"))?;
        let position = if self.mariadb {
            snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                .await
                .map_err(my("starting the snapshot"))?;
            let rows: Vec<(String, String)> = snap
                .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
                .await
                .map_err(my("reading the snapshot's binlog position"))?;
            let get = |name: &str| {
                rows.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            crate::failpoint::pause("capture.snapshot_started").await;
            let (file, pos) = (
                get("binlog_snapshot_file"),
                get("binlog_snapshot_position").parse::<u64>().unwrap_or(4),
            );
            // The GTID position of the snapshot's own binlog position: a
            // commit after the snapshot (not in the full load) is after it,
            // so the stream sends it (@@gtid_binlog_pos, read now, would
            // already count it: in neither the load nor the stream).
            let gtid: Option<String> = snap
                .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&file, pos))
                .await
                .map_err(my("reading the snapshot's GTID position"))?;
            Position {
                file,
                pos,
                gtid: gtid.filter(|g| !g.is_empty()),
            }
        } else {
            snap.query_drop("FLUSH TABLES WITH READ LOCK")
                .await
                .map_err(my("locking for the snapshot (needs RELOAD)"))?;
            snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                .await
                .map_err(my("starting the snapshot"))?;
            let position = self.current_position().await;
            snap.query_drop("UNLOCK TABLES")
                .await
                .map_err(my("unlocking"))?;
            position?
        };
        let mut total = 0;
        let database = self.database.clone();
        for name in self.table_names(sink).await? {
            let table = self.describe(&database, &name, None, sink).await?;
            let output = sink.load_table(&table.source);
            let cols: Vec<String> = table
                .source
                .columns
                .iter()
                .map(|c| format!("`{}`", c.name.replace('`', "``")))
                .collect();
            let sql = format!(
                "SELECT {} FROM `{}`.`{}`",
                cols.join(", "),
                database.replace('`', "``"),
                name.replace('`', "``")
            );
            let context = format!("copying {database}.{name}");
            let now = chrono::Utc::now().timestamp_micros();
            let mut load = LoadWriter::start(
                sink.target().clone(),
                sink.layout().clone(),
                output,
                context.clone(),
                now,
            )
            .await?;
            let mut result = snap.query_iter(sql).await.map_err(my(context.clone()))?;
            let mut stream = result
                .stream::<mysql_async::Row>()
                .await
                .map_err(my(context.clone()))?
                .ok_or_else(|| Error::capture(context.clone(), "no result set"))?;
            while let Some(row) = stream.next().await {
                let row = row.map_err(my(context.clone()))?;
                let texts: Vec<Option<String>> = row
                    .unwrap()
                    .into_iter()
                    .zip(&table.columns)
                    .map(|(v, c)| match v {
                        MyValue::NULL => None,
                        MyValue::Bytes(b) if c.sql_type == SqlType::Bytes => {
                            Some(format!("\\x{}", hex::encode(b)))
                        }
                        MyValue::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
                    })
                    .collect();
                let values: Vec<Value<'_>> = texts
                    .iter()
                    .map(|t| t.as_deref().map_or(Value::Null, Value::Text))
                    .collect();
                load.row(&values).await?;
            }
            drop(stream);
            drop(result);
            let rows = load.finish().await?;
            tracing::info!(table = %format!("{database}.{name}"), rows, "full load written");
            total += rows;
        }
        snap.query_drop("COMMIT")
            .await
            .map_err(my("ending the snapshot"))?;
        Ok((position, total))
    }

    /// Reads the binlog from `from` into `sink`, committing a chunk of whole
    /// transactions every `max_changes` changes (and at the end). With `once`
    /// it stops at the end of the binlog as it was at start; else it waits
    /// for more until `stop`.
    pub async fn stream(
        mut self,
        sink: &mut Sink,
        from: Position,
        once: bool,
        stop: &Shutdown,
    ) -> Result<u64> {
        let end = if once {
            Some(self.current_position().await?)
        } else {
            None
        };
        let database = self.database.clone();
        let mut conn = Conn::new(self.opts.clone())
            .await
            .map_err(my("connecting for the binlog"))?;
        let mut request = BinlogStreamRequest::new(self.settings.server_id);
        if once {
            request = request.with_non_blocking();
        }
        let filename = from.file.clone().into_bytes();
        if self.mariadb {
            conn.query_drop("SET @mariadb_slave_capability = 4")
                .await
                .map_err(my("announcing MariaDB GTID support"))?;
        }
        match (&from.gtid, self.mariadb) {
            (Some(gtid), true) => {
                conn.query_drop(format!("SET @slave_connect_state = '{gtid}'"))
                    .await
                    .map_err(my("setting the GTID to resume from"))?;
                request = request.with_filename(b"").with_pos(4u64);
            }
            _ => request = request.with_filename(&filename).with_pos(from.pos),
        }
        let mut stream = conn.get_binlog_stream(request).await.map_err(my(format!(
            "reading the binlog from {}:{}",
            from.file, from.pos
        )))?;
        let mut at = from.clone();
        let mut txn_pos = 0u64;
        let mut index = 0u64;
        let mut commit_micros = 0i64;
        let mut pending_gtid: Option<String> = None;
        let mut in_chunk = 0usize;
        // Inside a transaction (its GTID or BEGIN read, its end not yet):
        // nothing is written or confirmed, and a stop waits for its end, so
        // an object never holds part of a transaction whose position is not
        // confirmed (a restart would write that part again).
        let mut in_txn = false;
        let mut texts: Vec<Option<String>> = Vec::new();
        let mut last_event = std::time::Instant::now();
        loop {
            if stop.requested() && !in_txn {
                break;
            }
            let next = if once {
                stream.next().await
            } else {
                match tokio::time::timeout(std::time::Duration::from_millis(500), stream.next())
                    .await
                {
                    Ok(next) => next,
                    Err(_) => {
                        // Idle: write what is buffered, at a transaction boundary.
                        if !in_txn && sink.has_rows() && last_event.elapsed().as_millis() >= 500 {
                            commit(sink, &at).await?;
                            in_chunk = 0;
                        }
                        continue;
                    }
                }
            };
            let Some(event) = next else { break };
            let event = event.map_err(my("reading the binlog"))?;
            last_event = std::time::Instant::now();
            let header = event.header();
            let log_pos = u64::from(header.log_pos());
            let raw_type = header.event_type_raw();
            if raw_type == 0xa2 {
                // MariaDB GTID event: the start of a transaction.
                let data = event.data();
                if data.len() >= 12 {
                    let seq = u64::from_le_bytes(data[0..8].try_into().expect("8"));
                    let domain = u32::from_le_bytes(data[8..12].try_into().expect("4"));
                    pending_gtid = Some(format!("{domain}-{}-{seq}", header.server_id()));
                }
                txn_pos = log_pos;
                index = 0;
                commit_micros = i64::from(header.timestamp()) * 1_000_000;
                in_txn = true;
                continue;
            }
            let Some(data) = event
                .read_data()
                .map_err(|e| Error::capture("decoding a binlog event", e))?
            else {
                continue;
            };
            match data {
                EventData::RotateEvent(r) => {
                    at.file = binlog_name(r.name_raw()).ok_or_else(|| {
                        Error::capture(
                            "reading the binlog",
                            format!(
                                "a rotate event names {:?}, not a binlog file (<base>.<6 or 7 digits>)",
                                r.name()
                            ),
                        )
                    })?;
                    at.pos = r.position();
                    continue;
                }
                EventData::QueryEvent(q) => {
                    let sql = q.query().to_string();
                    let upper = sql.trim_start().to_ascii_uppercase();
                    if upper.starts_with("BEGIN") {
                        in_txn = true;
                        txn_pos = log_pos;
                        index = 0;
                        commit_micros = i64::from(header.timestamp()) * 1_000_000;
                    } else if upper.starts_with("ALTER")
                        || upper.starts_with("CREATE")
                        || upper.starts_with("DROP")
                        || upper.starts_with("RENAME")
                    {
                        // Columns are read again at the table's next row event.
                        self.tables.clear();
                        at.advance(log_pos, &mut pending_gtid);
                        in_txn = false;
                    } else if upper.starts_with("TRUNCATE") {
                        let schema = q.schema().to_string();
                        let name = truncate_target(&sql);
                        if let Some(name) = name {
                            let (schema, name) = match name.split_once('.') {
                                Some((s, n)) => (s.to_string(), n.to_string()),
                                None => (
                                    if schema.is_empty() {
                                        database.clone()
                                    } else {
                                        schema
                                    },
                                    name,
                                ),
                            };
                            let key = self.table_for(&schema, &name, None, sink).await?;
                            let table = &self.tables[&key];
                            if let Some(id) = &table.id {
                                let seq =
                                    format!("{:06}{log_pos:014}{:015}", file_index(&at.file), 0);
                                let nulls = vec![Value::Null; table.columns.len()];
                                sink.row(
                                    id,
                                    Op::Truncate,
                                    i64::from(header.timestamp()) * 1_000_000,
                                    &seq,
                                    &nulls,
                                )?;
                            }
                        }
                        at.advance(log_pos, &mut pending_gtid);
                        in_txn = false;
                    } else if upper.starts_with("COMMIT") {
                        at.advance(log_pos, &mut pending_gtid);
                        in_txn = false;
                        in_chunk = self.maybe_commit(sink, &at, in_chunk).await?;
                    }
                }
                EventData::XidEvent(_) => {
                    at.advance(log_pos, &mut pending_gtid);
                    in_txn = false;
                    in_chunk = self.maybe_commit(sink, &at, in_chunk).await?;
                }
                EventData::RowsEvent(rows) => {
                    let Some(tme) = stream.get_tme(rows.table_id()) else {
                        return Err(Error::capture(
                            "reading the binlog",
                            "a row event without its table map",
                        ));
                    };
                    let (schema, name) = (tme.database_name(), tme.table_name());
                    let names = column_names(tme);
                    let key = self
                        .table_for(&schema, &name, names.as_deref(), sink)
                        .await?;
                    let table = &self.tables[&key];
                    let Some(id) = &table.id else { continue };
                    if tme.columns_count() as usize != table.columns.len() {
                        return Err(Error::capture(
                            format!("{key} at {}:{log_pos}", at.file),
                            format!(
                                "the binlog row has {} columns and the table now has {}: the table changed \
                                 again after this point; capture from a new full load",
                                tme.columns_count(),
                                table.columns.len()
                            ),
                        ));
                    }
                    let kind = match &rows {
                        RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                            'I'
                        }
                        RowsEventData::UpdateRowsEventV1(_)
                        | RowsEventData::UpdateRowsEvent(_)
                        | RowsEventData::PartialUpdateRowsEvent(_) => 'U',
                        _ => 'D',
                    };
                    let file = file_index(&at.file);
                    for row in rows.rows(tme) {
                        let (before, after) =
                            row.map_err(|e| Error::capture(format!("decoding a row of {key}"), e))?;
                        let mut emit = |sink: &mut Sink,
                                        op: Op,
                                        image: &mysql_async::binlog::row::BinlogRow|
                         -> Result<()> {
                            texts.clear();
                            for (i, column) in table.columns.iter().enumerate() {
                                texts.push(match image.as_ref(i) {
                                    None | Some(BinlogValue::Value(MyValue::NULL)) => None,
                                    Some(v) => {
                                        Some(binlog_text(v, column).map_err(|expected| {
                                            Error::capture(
                                                format!(
                                                    "{key}, column {:?}",
                                                    table.source.columns[i].name
                                                ),
                                                format!("expected {expected}"),
                                            )
                                        })?)
                                    }
                                });
                            }
                            let values: Vec<Value<'_>> = texts
                                .iter()
                                .map(|t| t.as_deref().map_or(Value::Null, Value::Text))
                                .collect();
                            index += 1;
                            let seq = format!("{file:06}{txn_pos:014}{index:015}");
                            sink.row(id, op, commit_micros, &seq, &values)
                        };
                        match (kind, before, after) {
                            ('I', _, Some(after)) => emit(sink, Op::Insert, &after)?,
                            ('D', Some(before), _) => emit(sink, Op::Delete, &before)?,
                            ('U', Some(before), Some(after)) => {
                                let key_changed = table
                                    .source
                                    .columns
                                    .iter()
                                    .enumerate()
                                    .any(|(i, c)| c.key && before.as_ref(i) != after.as_ref(i));
                                if key_changed {
                                    emit(sink, Op::Delete, &before)?;
                                    emit(sink, Op::Insert, &after)?;
                                } else {
                                    emit(sink, Op::Update, &after)?;
                                }
                            }
                            _ => {
                                return Err(Error::capture(
                                    format!("{key} at {}:{log_pos}", at.file),
                                    "a row event without the image it needs (set binlog_row_image = FULL)",
                                ));
                            }
                        }
                        in_chunk += 1;
                    }
                    sink.spill_if_full().await?;
                }
                _ => {}
            }
            if let Some(end) = &end
                && at.file == end.file
                && at.pos >= end.pos
                && !sink.has_rows()
            {
                break;
            }
        }
        if in_txn {
            // The stream ended inside a transaction: its rows so far are not
            // written; the next run reads it again from the confirmed position.
            return Err(Error::capture(
                "reading the binlog",
                format!(
                    "the stream ended inside the transaction at {}:{txn_pos}; nothing of it was \
                     written, the next run reads it again",
                    at.file
                ),
            ));
        }
        if sink.has_rows() {
            commit(sink, &at).await?;
        } else if Some(&at) != sink_position(sink).as_ref() {
            sink.confirm(serde_json::to_string(&at).expect("json"))
                .await?;
        }
        let _ = stream.close().await;
        Ok(sink.rows())
    }

    /// The key of a table whose rows follow, described (and declared to the
    /// sink, when selected) unless already known with these column `names`.
    async fn table_for(
        &mut self,
        schema: &str,
        name: &str,
        names: Option<&[String]>,
        sink: &mut Sink,
    ) -> Result<String> {
        let key = format!("{schema}.{name}");
        let known = self.tables.get(&key).is_some_and(|t| {
            names.is_none_or(|n| {
                n.len() == t.source.columns.len()
                    && n.iter().zip(&t.source.columns).all(|(a, c)| *a == c.name)
            })
        });
        if !known {
            let table = self.describe(schema, name, names, sink).await?;
            if table.id.is_some() {
                sink.table(&table.source);
            }
            self.tables.insert(key.clone(), table);
        }
        Ok(key)
    }

    async fn maybe_commit(&self, sink: &mut Sink, at: &Position, in_chunk: usize) -> Result<usize> {
        if in_chunk >= self.settings.max_changes {
            commit(sink, at).await?;
            return Ok(0);
        }
        Ok(in_chunk)
    }
}

async fn commit(sink: &mut Sink, at: &Position) -> Result<()> {
    let objects = sink.commit().await?;
    crate::failpoint::hit("capture.before_confirm");
    sink.confirm(serde_json::to_string(at).expect("json"))
        .await?;
    tracing::info!(file = %at.file, pos = at.pos, gtid = ?at.gtid, objects, "changes written");
    Ok(())
}

/// The confirmed position in the checkpoint.
pub fn sink_position(sink: &Sink) -> Option<Position> {
    sink.checkpoint
        .position
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
}

/// The column names of a table map (binlog_row_metadata = FULL), if it has them.
fn column_names(tme: &mysql_async::binlog::events::TableMapEvent<'_>) -> Option<Vec<String>> {
    let meta =
        mysql_async::binlog::events::OptionalMetaExtractor::new(tme.iter_optional_meta()).ok()?;
    let names: Vec<String> = meta
        .iter_column_name()
        .map(|n| n.map(|n| n.name().into_owned()))
        .collect::<Result<_, _>>()
        .ok()?;
    (!names.is_empty()).then_some(names)
}

/// The binlog file name in a rotate event's name bytes, `None` when they
/// hold none.
///
/// MariaDB's first (fake) rotate event comes before the format description,
/// so mysql_common leaves its four checksum bytes at the end of the name
/// (blackbeam/mysql_async#189). Those bytes are random: they may hold a `.`,
/// digits, or half of a UTF-8 character, so the name cannot be found by its
/// last `.` in the lossy text. A binlog name is `<base>.<6 or 7 digits>`
/// (the index is zero-padded to six digits): the name without the last four
/// bytes is taken when it is one (the checksum was there), else the whole
/// name. Both cannot be names: that would need an index of ten digits.
fn binlog_name(raw: &[u8]) -> Option<String> {
    fn name(bytes: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (base, index) = text.rsplit_once('.')?;
        (!base.is_empty()
            && (6..=7).contains(&index.len())
            && index.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.to_string())
    }
    raw.len()
        .checked_sub(4)
        .and_then(|n| name(&raw[..n]))
        .or_else(|| name(raw))
}

/// `binlog.000003` → 3.
fn file_index(file: &str) -> u64 {
    file.rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The table of `TRUNCATE [TABLE] name`.
fn truncate_target(sql: &str) -> Option<String> {
    let mut words = sql.split_whitespace().skip(1);
    let mut word = words.next()?;
    if word.eq_ignore_ascii_case("table") {
        word = words.next()?;
    }
    Some(word.trim_end_matches(';').replace('`', ""))
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
        assert_eq!(file_index("binlog.000012"), 12);
        assert_eq!(with_gtid(None, "0-1-5"), "0-1-5");
        assert_eq!(with_gtid(Some("0-1-5,7-1-2"), "0-1-6"), "0-1-6,7-1-2");
        assert_eq!(with_gtid(Some("0-1-5"), "7-2-1"), "0-1-5,7-2-1");
        assert_eq!(
            with_gtid(Some("7-1-2, 10-1-1"), "3-1-9"),
            "3-1-9,7-1-2,10-1-1"
        );
        // The name of MariaDB's fake rotate event, with checksum bytes that
        // hold a `.` (binlog.000124 for server-id 1), digits, or half of a
        // UTF-8 character: the lossy text's last `.` gave junk, or a panic.
        for crc in [
            [0xe3, 0x2e, 0x54, 0x2d],
            [0x2e, 0x31, 0x32, 0x33],
            [0x2e, 0xc3, 0xa9, 0x2e],
            [0x31, 0x32, 0x33, 0x34],
            [0xff, 0xfe, 0xe2, 0x82],
        ] {
            let raw = [b"binlog.000124".as_slice(), &crc].concat();
            assert_eq!(
                binlog_name(&raw).as_deref(),
                Some("binlog.000124"),
                "{crc:x?}"
            );
        }
        // A rotate event read after the format description: no checksum bytes.
        assert_eq!(
            binlog_name(b"binlog.000124").as_deref(),
            Some("binlog.000124")
        );
        assert_eq!(
            binlog_name(b"my.bin.log.1000000").as_deref(),
            Some("my.bin.log.1000000")
        );
        assert_eq!(binlog_name(b"binlog"), None);
        assert_eq!(binlog_name(b"\xff\x2e"), None);
        assert_eq!(
            truncate_target("TRUNCATE TABLE `shop`.`items`"),
            Some("shop.items".into())
        );
        assert_eq!(truncate_target("truncate items"), Some("items".into()));
    }

    #[test]
    fn binlog_values_as_text() {
        let col = |sql_type| MyColumn {
            sql_type,
            labels: vec![],
            set: false,
        };
        let text = |v: MyValue, t| binlog_text(&BinlogValue::Value(v), &col(t)).unwrap();
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
        };
        assert_eq!(
            binlog_text(&BinlogValue::Value(MyValue::Int(2)), &enumerated).unwrap(),
            "b"
        );
        let set = MyColumn {
            sql_type: SqlType::Text,
            labels: vec!["a".into(), "b".into(), "c".into()],
            set: true,
        };
        assert_eq!(
            binlog_text(&BinlogValue::Value(MyValue::Bytes(vec![5])), &set).unwrap(),
            "a,c"
        );
    }
}
