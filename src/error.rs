//! The one error type of cdcflow.
//!
//! Every variant names what it was working on (the object, the table, the
//! file) and keeps the underlying error as its `source`, so the chain printed
//! by the CLI reads from "what failed" down to "why". [`Error::is_transient`]
//! is the single retry policy: the scheduler retries transient errors and
//! stops on the others, which need an operator.

use std::fmt;

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
    #[error("{object}: {location}: {message}")]
    Decode {
        /// Object key (path under the source URL).
        object: String,
        /// Line, row and column of the problem, where known.
        location: Location,
        /// What was found and what was expected.
        message: String,
    },

    /// Reading or listing the object store failed.
    #[error("object store: {context}")]
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

    /// Another process holds the pipeline's lease: one run at a time.
    #[error(
        "pipeline {pipeline} is being run by {owner} (lease until {expires_at}); \
         this process does nothing. If that process died, its lease expires by itself"
    )]
    LeaseHeld {
        /// Pipeline name.
        pipeline: String,
        /// The holder (host:pid:nonce).
        owner: String,
        /// When the holder's lease runs out unless renewed.
        expires_at: String,
    },

    /// This process lost the pipeline's lease (its heartbeat failed); it stops
    /// before the next batch. A later run finishes the work.
    #[error("lost the lease on pipeline {pipeline}; stopping before the next batch")]
    LeaseLost {
        /// Pipeline name.
        pipeline: String,
    },

    /// An error injected by `CDCFLOW_FAULT` (fault-injection tests).
    #[error("injected {} fault at {step}", if *transient { "transient" } else { "permanent" })]
    Injected {
        /// Step name.
        step: String,
        /// Its class.
        transient: bool,
    },

    /// An object that was already loaded changed afterwards (same key, new ETag).
    #[error(
        "{object} changed after it was loaded in batch {batch} (ETag {old_etag} -> {new_etag}); \
         cdcflow does not re-apply changed objects: restore the original object, or backfill the range"
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

    /// Wraps an I/O error with what was being done and the path.
    pub fn io(context: impl Into<String>, path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            path: path.to_string(),
            source,
        }
    }

    /// True when retrying the same work later may succeed (network, 5xx,
    /// throttling, a busy database). Bad input, bad config and changed
    /// objects are permanent: they wait for an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::ObjectStore { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
            ),
            Error::State { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            Error::Warehouse { source, .. } => matches!(
                **source,
                deltalake::DeltaTableError::ObjectStore { .. }
                    | deltalake::DeltaTableError::VersionAlreadyExists(_)
            ),
            Error::Io { .. } | Error::LeaseLost { .. } => true,
            Error::Injected { transient, .. } => *transient,
            Error::Config { .. }
            | Error::Decode { .. }
            | Error::Query { .. }
            | Error::Usage(_)
            | Error::LeaseHeld { .. }
            | Error::ObjectChanged { .. } => false,
        }
    }
}
