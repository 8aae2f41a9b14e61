//! The one error type of cdcflow.
//!
//! Every variant names what it was working on (the object, the table, the
//! file) and keeps the underlying error as its `source`, so the chain printed
//! by the CLI reads from "what failed" down to "why". [`Error::retry_policy`]
//! is the one place that decides what an error asks for (ARCHITECTURE §7):
//! a retry, an operator, or a bug report.

use std::fmt;

/// What an error asks of the code that meets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Try the same work again after a backoff: the cause may pass (the
    /// network, a 5xx, throttling, a server restarting, a busy database).
    /// Table tasks retry `retries.count` times, capture reconnects for
    /// `source.reconnect_for`, the BigQuery client retries its request.
    Retry,
    /// Stop this work and wait for an operator: the input, the settings or
    /// the world changed in a way only a person can settle (a bad or
    /// changed object, a source gone backwards, another process's lease).
    /// Once settled, a rerun resumes where this one stopped.
    Manual,
    /// A defect in cdcflow (an invariant broke): retrying cannot help.
    Never,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where in a CDC object a decode problem was found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// 1-based physical line of a CSV object (quoted newlines count).
    pub line: Option<u64>,
    /// 1-based data row (CSV record after the header, or Parquet row).
    pub row: Option<u64>,
    /// Column name as declared in the pipeline or found in the file.
    pub column: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(line) = self.line {
            parts.push(format!("line {line}"));
        }
        if let Some(row) = self.row {
            parts.push(format!("row {row}"));
        }
        if let Some(column) = &self.column {
            parts.push(format!("column {column:?}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// Everything that can go wrong in cdcflow.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file is invalid; every problem is listed with its field path.
    #[error("pipeline {path} is invalid:\n{}", bullets(problems))]
    Config {
        /// Path of the pipeline file.
        path: String,
        /// One line per problem: "`field.path`: what is wrong; what to do".
        problems: Vec<String>,
    },

    /// A CDC object could not be decoded. The table stops at this object.
    #[error("{object}: {}{message}", located(location))]
    Decode {
        /// Object key (path under the source URL).
        object: String,
        /// Line, row and column of the problem, where known.
        location: Location,
        /// What was found and what was expected.
        message: String,
    },

    /// Reading or listing the object store failed.
    #[error("object store: {context}{}", hint(source))]
    ObjectStore {
        /// What was being done, with the key or prefix.
        context: String,
        /// The object_store error.
        #[source]
        source: object_store::Error,
    },

    /// The state store (SQLite) failed.
    #[error("state store {path}: {context}")]
    State {
        /// Database file.
        path: String,
        /// What was being done.
        context: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },

    /// The PostgreSQL state store refused or failed (`[state] url =
    /// "postgres://…"`): a lost connection is retried, anything else waits
    /// for an operator.
    #[error("state store {url}: {context}: {}", postgres_message(source))]
    StateServer {
        /// The store's URL, without its password.
        url: String,
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// TLS to a database could not be set up (a CA file, the settings).
    #[error("setting up TLS: {context}: {message}")]
    Tls {
        /// What was being read or built.
        context: String,
        /// What was wrong.
        message: String,
    },

    /// The warehouse refused or failed a load.
    #[error("warehouse table {table}: {context}")]
    Warehouse {
        /// Warehouse table (e.g. `orders_history`).
        table: String,
        /// What was being done.
        context: String,
        /// The Delta Lake error.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// A Parquet object of a table whose columns are found, not declared,
    /// has columns the table lacks: the table grows them and the batch runs again.
    #[error("{object} has new columns: {}", columns.iter().map(|c| format!("{} {}", c.name, c.sql_type)).collect::<Vec<_>>().join(", "))]
    NewColumns {
        /// Object key.
        object: String,
        /// The new columns, in the object's order.
        columns: Vec<crate::model::Column>,
    },

    /// A BigQuery request or job failed.
    #[error("BigQuery: {context}: {message}{}", bq_hint(*status, reason.as_deref()))]
    BigQuery {
        /// What was being done, with the table or job id.
        context: String,
        /// HTTP status of the answer; `None` for a job that failed or no answer at all.
        status: Option<u16>,
        /// BigQuery's error reason (`notFound`, `rateLimitExceeded`…), if any.
        reason: Option<String>,
        /// BigQuery's message.
        message: String,
    },

    /// A database warehouse (PostgreSQL, MySQL) refused or failed a
    /// statement; nothing of the batch is applied (its transaction rolled back).
    #[error("database warehouse: {context}: {message}")]
    Database {
        /// What was being done, with the statement's first words.
        context: String,
        /// The server's message.
        message: String,
        /// A lost connection, a deadlock or a serialization failure: a retry may succeed.
        retry: bool,
    },

    /// A DataFusion plan or execution failed (merge SQL or a user query).
    #[error("query failed: {context}")]
    Query {
        /// The SQL template or statement, shortened.
        context: String,
        /// The DataFusion error.
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },

    /// Local file-system I/O failed.
    #[error("{context}: {path}")]
    Io {
        /// What was being done.
        context: String,
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The command was used in a way that cannot work; the message says what to do.
    #[error("{0}")]
    Usage(String),

    /// An invariant of cdcflow broke: a defect, to report.
    #[error("internal error (a defect in cdcflow; please report it with this message): {0}")]
    Internal(String),

    /// Another process holds a table's lease: one process per table at a time.
    #[error(
        "table {table} of pipeline {pipeline} is being loaded by {owner} (lease until \
         {expires_at}); this process leaves it alone. If that process died, its lease expires \
         by itself"
    )]
    LeaseHeld {
        /// Pipeline name.
        pipeline: String,
        /// The table (`schema.table`).
        table: String,
        /// The holder (host:pid:nonce).
        owner: String,
        /// When the holder's lease runs out unless renewed.
        expires_at: String,
    },

    /// This process lost a table's lease (its heartbeat failed, or another
    /// process took it over); it stops before the next batch. A later run
    /// finishes the work.
    #[error("lost a table's lease on pipeline {pipeline}; stopping before the next batch")]
    LeaseLost {
        /// Pipeline name.
        pipeline: String,
    },

    /// The state store and the warehouse disagree on a table's batches (a
    /// lost, restored or second state store; a restored warehouse): nothing
    /// is loaded, since either would skip or double changes.
    #[error("table {table}: {message}")]
    Ledger {
        /// `schema.table`.
        table: String,
        /// What disagrees and what to do.
        message: String,
    },

    /// An error injected by `CDCFLOW_FAULT` (fault-injection tests).
    #[error("injected {} fault at {step}", if *transient { "transient" } else { "permanent" })]
    Injected {
        /// Step name.
        step: String,
        /// Its class.
        transient: bool,
    },

    /// The capture source (PostgreSQL) refused or failed; the message says what to fix.
    #[error("capture: {context}: {message}")]
    Capture {
        /// What was being done (the table, the query).
        context: String,
        /// The server's message or what was found.
        message: String,
    },

    /// The connection to the capture source was lost or refused (a server
    /// restart, a failover, a network reset): transient, capture reconnects
    /// and resumes from its checkpoint.
    #[error("capture: {context}: lost the connection to the database: {message}")]
    SourceLost {
        /// What was being done.
        context: String,
        /// The driver's message.
        message: String,
    },

    /// An object of a recorded batch changed before the batch was finished
    /// (same key, new ETag): the batch must load the version it recorded.
    #[error(
        "{object} changed after batch {batch} recorded it (ETag {old_etag} -> {new_etag}); \
         cdcflow loads a recorded batch only as recorded: restore the original object, then rerun"
    )]
    ObjectChanged {
        /// Object key.
        object: String,
        /// Batch that loaded it.
        batch: i64,
        /// ETag recorded when loaded.
        old_etag: String,
        /// ETag now.
        new_etag: String,
    },
}

/// The HTTP status behind an object-store error. object_store types 403/404
/// as errors on reads but returns `Generic` for list requests, with the
/// status only in its message ("…status code: 403 Forbidden…"), so the
/// source chain is searched for it.
fn http_status(err: &object_store::Error) -> Option<u16> {
    match err {
        object_store::Error::NotFound { .. } => return Some(404),
        object_store::Error::PermissionDenied { .. } => return Some(403),
        object_store::Error::Unauthenticated { .. } => return Some(401),
        _ => {}
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        let text = e.to_string();
        if let Some(at) = text.find("status code: ") {
            return text[at + 13..].get(..3).and_then(|code| code.parse().ok());
        }
        cause = e.source();
    }
    None
}

/// What to check for an object-store error that an operator must fix.
fn hint(err: &object_store::Error) -> &'static str {
    match http_status(err) {
        Some(401 | 403) => {
            " (access denied: check the credentials — AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, `source.profile` \
             or AWS_PROFILE, the web identity (IRSA) role — and that the bucket policy allows ListBucket and GetObject)"
        }
        Some(404) => " (not found: check the bucket and prefix in `source.url`)",
        Some(301 | 400) => " (bad request: check `source.region` and `source.endpoint`)",
        _ => "",
    }
}

/// BigQuery error reasons that a later try may get past.
const BQ_TRANSIENT_REASONS: &[&str] = &[
    "backendError",
    "internalError",
    "rateLimitExceeded",
    "jobRateLimitExceeded",
    "jobBackendError",
    "jobInternalError",
];

/// What to check for a BigQuery error that an operator must fix.
fn bq_hint(status: Option<u16>, reason: Option<&str>) -> &'static str {
    match (status, reason) {
        (Some(401), _) | (_, Some("authError")) => {
            " (not authenticated: check `warehouse.credentials` or GOOGLE_APPLICATION_CREDENTIALS)"
        }
        (Some(403), _) | (_, Some("accessDenied")) => {
            " (access denied: the account needs roles/bigquery.jobUser on the project and \
             roles/bigquery.dataEditor on the dataset)"
        }
        (_, Some("notFound")) | (Some(404), _) => {
            " (not found: check `warehouse.project` and `warehouse.dataset`; cdcflow creates tables, \
             not datasets: `bq mk --dataset <project>:<dataset>`)"
        }
        _ => "",
    }
}

/// An error and its causes on one line: "what failed: why: root cause".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

/// `line 3, column "x": `, or nothing where the place is not known.
fn located(location: &Location) -> String {
    let at = location.to_string();
    if at.is_empty() { at } else { format!("{at}: ") }
}

fn bullets(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    /// Builds a decode error for `object` at `location`.
    pub fn decode(object: &str, location: Location, message: impl Into<String>) -> Self {
        Error::Decode {
            object: object.to_string(),
            location,
            message: message.into(),
        }
    }

    /// Wraps an object-store error with what was being done.
    pub fn object_store(context: impl Into<String>, source: object_store::Error) -> Self {
        Error::ObjectStore {
            context: context.into(),
            source,
        }
    }

    /// Wraps a Delta Lake error for `table`.
    pub fn warehouse(
        table: &str,
        context: impl Into<String>,
        source: deltalake::DeltaTableError,
    ) -> Self {
        Error::Warehouse {
            table: table.to_string(),
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Wraps a DataFusion error with the statement it ran.
    pub fn query(context: impl Into<String>, source: datafusion::error::DataFusionError) -> Self {
        Error::Query {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// A capture error with what was being done.
    pub fn capture(context: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Capture {
            context: context.into(),
            message: message.to_string(),
        }
    }

    /// A TLS setup error.
    pub fn tls(context: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Tls {
            context: context.into(),
            message: message.to_string(),
        }
    }

    /// Wraps an I/O error with what was being done and the path.
    pub fn io(context: impl Into<String>, path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            path: path.to_string(),
            source,
        }
    }

    /// What this error asks for (see [`RetryPolicy`]).
    pub fn retry_policy(&self) -> RetryPolicy {
        match self {
            Error::Internal(_) => RetryPolicy::Never,
            _ if self.transient() => RetryPolicy::Retry,
            _ => RetryPolicy::Manual,
        }
    }

    /// Whether retrying the same work later may succeed (network, 5xx,
    /// throttling, a busy database).
    fn transient(&self) -> bool {
        match self {
            // object_store already retried 5xx, throttling and network errors
            // for a while; a later try may still succeed. 4xx will not.
            Error::ObjectStore { source, .. } => match http_status(source) {
                Some(408 | 429) => true,
                Some(status) => status >= 500,
                None => !matches!(
                    source,
                    object_store::Error::InvalidPath { .. }
                        | object_store::Error::NotSupported { .. }
                        | object_store::Error::NotImplemented { .. }
                        | object_store::Error::UnknownConfigurationKey { .. }
                ),
            },
            Error::State { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            Error::StateServer { source, .. } => {
                postgres_connection_lost(source)
                    // serialization failure, deadlock, a lock not granted within
                    // lock_timeout: the transaction may be run again
                    || source
                        .code()
                        .is_some_and(|c| matches!(c.code(), "40001" | "40P01" | "55P03"))
            }
            Error::Warehouse { source, .. } => matches!(
                **source,
                deltalake::DeltaTableError::ObjectStore { .. }
                    | deltalake::DeltaTableError::VersionAlreadyExists(_)
            ),
            Error::BigQuery { status, reason, .. } => match (status, reason.as_deref()) {
                (Some(408 | 429), _) => true,
                (Some(s), _) if *s >= 500 => true,
                (_, Some(r)) => BQ_TRANSIENT_REASONS.contains(&r),
                // No answer at all: a network failure.
                (None, None) => true,
                (Some(_), None) => false,
            },
            Error::Io { .. } | Error::LeaseLost { .. } | Error::SourceLost { .. } => true,
            Error::Database { retry, .. } => *retry,
            Error::Injected { transient, .. } => *transient,
            Error::Config { .. }
            | Error::Decode { .. }
            | Error::Query { .. }
            | Error::Usage(_)
            | Error::Internal(_)
            | Error::LeaseHeld { .. }
            | Error::ObjectChanged { .. }
            | Error::Ledger { .. }
            | Error::NewColumns { .. }
            | Error::Capture { .. }
            | Error::Tls { .. } => false,
        }
    }
}

/// Whether `e` is the connection to a PostgreSQL server failing (refused,
/// reset, closed; the server shutting down or not accepting connections
/// yet) rather than the server refusing what was asked.
pub fn postgres_connection_lost(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 57P01-03: admin or crash shutdown, cannot
        // connect now (starting up, recovering); 53300: too many connections.
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    let text = e.to_string();
    e.is_closed()
        || text.starts_with("error connecting to server")
        || text.starts_with("error communicating with the server")
}

/// A PostgreSQL error as a user should read it: the server's message and
/// hint, or the driver's text with its causes (a TLS handshake's, an I/O
/// error), which its own text leaves out.
pub fn postgres_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let hint = db
            .hint()
            .map(|h| format!(" (hint: {h})"))
            .unwrap_or_default();
        return format!("{}{hint}", db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_error_names_the_place_only_where_known() {
        let whole = Error::decode("a/b.parquet", Location::default(), "corrupt footer");
        assert_eq!(whole.to_string(), "a/b.parquet: corrupt footer");
        let at = Location {
            line: Some(3),
            column: Some("id".into()),
            ..Location::default()
        };
        let cell = Error::decode("a/b.csv", at, "not an integer");
        assert_eq!(
            cell.to_string(),
            "a/b.csv: line 3, column \"id\": not an integer"
        );
    }

    #[test]
    fn each_kind_has_its_retry_policy() {
        let bq = |status, reason: Option<&str>| Error::BigQuery {
            context: "job".into(),
            status,
            reason: reason.map(str::to_string),
            message: String::new(),
        };
        let cases = [
            (Error::Internal("x".into()), RetryPolicy::Never),
            (
                Error::SourceLost {
                    context: "slot".into(),
                    message: "reset".into(),
                },
                RetryPolicy::Retry,
            ),
            (
                Error::capture("slot", "went backwards"),
                RetryPolicy::Manual,
            ),
            (
                Error::decode("o.csv", Location::default(), "bad"),
                RetryPolicy::Manual,
            ),
            (
                Error::Usage("--from after --to".into()),
                RetryPolicy::Manual,
            ),
            (bq(Some(503), None), RetryPolicy::Retry),
            (bq(Some(429), None), RetryPolicy::Retry),
            (bq(None, None), RetryPolicy::Retry),
            (bq(Some(400), Some("invalid")), RetryPolicy::Manual),
            (
                Error::Injected {
                    step: "load".into(),
                    transient: true,
                },
                RetryPolicy::Retry,
            ),
        ];
        for (error, policy) in cases {
            assert_eq!(error.retry_policy(), policy, "{error}");
        }
    }
}
