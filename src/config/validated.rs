//! The validated pipeline: what [`PipelineFile::validate`](super::PipelineFile::validate)
//! returns and every stage reads. Plain data; the checks live in `validate.rs`.

use std::path::PathBuf;
use std::time::Duration;

use super::{BatchFile, CurrentMode, Format, JsonWideNumbers, MetadataColumns};
use crate::cron::Schedule;
use crate::model::Column;
use crate::tls::Tls;

/// A validated pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Pipeline name.
    pub name: String,
    /// The cron schedule, if any.
    pub schedule: Option<Schedule>,
    /// Run every missed tick (true) or coalesce them (false).
    pub catchup: bool,
    /// Tables processed at once.
    pub max_parallel_tables: usize,
    /// Retry policy of table tasks.
    pub retry: RetryPolicy,
    /// Lease time-to-live.
    pub lease_ttl: Duration,
    /// The CDC objects.
    pub source: Source,
    /// Where the state is kept.
    pub state: StateConfig,
    /// Where the tables are loaded.
    pub warehouse: WarehouseConfig,
    /// Batch bounds.
    pub batch: BatchFile,
    /// Names of the added columns.
    pub meta: MetadataColumns,
    /// Tables, in file order.
    pub tables: Vec<Table>,
    /// Where alerts go, if anywhere.
    pub alerts: Option<Alerts>,
}

/// A validated `[alerts]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Alerts {
    /// Where the webhook URL is.
    pub webhook: Webhook,
    /// The body sent.
    pub format: AlertFormat,
    /// Lag above which a table's lag incident opens.
    pub lag: Option<Duration>,
}

/// Where the webhook URL is: in the file, or in an environment variable
/// read when an alert is sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Webhook {
    /// The URL itself.
    Url(String),
    /// The variable holding it.
    Env(String),
}

/// The body of an alert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AlertFormat {
    /// `{"text": …}`: Slack incoming webhooks, Mattermost, Rocket.Chat.
    Slack,
    /// One object: pipeline, table, kind, status, summary, detail, at.
    Json,
}

/// A validated `[state]`.
#[derive(Debug, Clone)]
pub enum StateConfig {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres {
        /// The URL without its TLS parameters.
        url: String,
        /// TLS to the server.
        tls: Tls,
        /// The environment variable holding the password, when the URL has none.
        password_env: String,
    },
}

/// A validated `[warehouse]`.
#[derive(Debug, Clone)]
pub enum WarehouseConfig {
    /// Delta Lake tables in a directory or under an object-store prefix.
    Delta {
        /// Where the tables are.
        location: DeltaLocation,
        /// Whether current-state tables take deletion vectors.
        deletion_vectors: bool,
    },
    /// A BigQuery dataset.
    BigQuery(BigQueryConfig),
    /// A PostgreSQL or MySQL / MariaDB database.
    Database(DatabaseConfig),
}

/// Where and how to reach a database warehouse.
#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    /// The server and how to reach it.
    pub endpoint: crate::database::Endpoint,
    /// PostgreSQL: the schema of the tables; MySQL: the URL's database.
    pub schema: String,
    /// What the tables keep.
    pub mode: super::TargetMode,
}

/// Where a Delta warehouse keeps its tables.
#[derive(Debug, Clone)]
pub enum DeltaLocation {
    /// An absolute directory.
    Dir(PathBuf),
    /// A prefix in object storage: the `[warehouse]` store settings, checked
    /// as a source's are (only `url`, `store_options` and `profile` apply).
    Store(Box<Source>),
}

/// Where and how to reach BigQuery.
#[derive(Debug, Clone, PartialEq)]
pub struct BigQueryConfig {
    /// Project running the jobs.
    pub project: String,
    /// Dataset of the tables.
    pub dataset: String,
    /// Dataset location as the pipeline file states it; `None`: the
    /// dataset's own, read when the warehouse first connects.
    pub location: Option<String>,
    /// Service-account key file; `None`: application default credentials.
    pub credentials: Option<PathBuf>,
    /// Emulator endpoint (no auth); `None`: Google's API.
    pub endpoint: Option<String>,
    /// How current state is kept.
    pub current: CurrentMode,
    /// `current = "log"`: compact when the log exceeds this share of the base.
    pub compact_ratio: f64,
    /// Bytes a job may bill at most.
    pub maximum_bytes_billed: Option<u64>,
    /// KiB per request of an upload.
    pub upload_chunk_kib: u64,
    /// What a JSON number BigQuery cannot hold exactly does.
    pub json_wide_numbers: JsonWideNumbers,
}

/// Retries of a table task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub count: u32,
    /// First delay; doubled each retry.
    pub delay: Duration,
    /// Longest delay.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Delay before retry number `retry` (1-based): exponential, capped, with
    /// jitter drawn from `random` (any u64) in [50%, 100%] of the delay.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let exp = self.delay.saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let capped = exp.min(self.max_delay);
        let fraction = 0.5 + (random % 1000) as f64 / 2000.0;
        capped.mul_f64(fraction)
    }
}

/// Where and how the objects are written.
#[derive(Debug, Clone)]
pub struct Source {
    /// Object-store URL with an absolute path (`file:///…`, `s3://…`).
    pub url: url::Url,
    /// Format filter.
    pub format: Format,
    /// DMS timestamp column, if present in the files.
    pub timestamp_column: Option<String>,
    /// Extra DMS columns after the timestamp column.
    pub extra_columns: Vec<String>,
    /// The extra column that orders CDC changes, if any.
    pub sequence_column: Option<String>,
    /// Full-load files carry `Op`.
    pub include_op_for_full_load: bool,
    /// CSV dialect.
    pub csv: CsvOptions,
    /// Object-store options (region, endpoint, credentials…) as object_store config keys.
    pub store_options: Vec<(String, super::Secret)>,
    /// Named AWS profile to read static keys from.
    pub profile: Option<String>,
    /// Lateness window of incremental listing.
    pub lateness: Duration,
    /// Interval of full listings.
    pub full_listing_every: Duration,
}

/// The CSV dialect of DMS objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// Field delimiter.
    pub delimiter: u8,
    /// First line names the columns.
    pub header: bool,
    /// Unquoted text meaning NULL.
    pub null_value: String,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: b',',
            header: false,
            null_value: String::new(),
        }
    }
}

/// A validated table.
#[derive(Debug, Clone)]
pub struct Table {
    /// Source schema folder.
    pub schema: String,
    /// Source table folder.
    pub name: String,
    /// Warehouse table name.
    pub target: String,
    /// Primary-key columns.
    pub primary_key: Vec<String>,
    /// Declared columns, when declared.
    pub columns: Option<Vec<Column>>,
    /// Keep deleted keys flagged instead of removing them.
    pub soft_delete: bool,
}

impl Table {
    /// `schema.name`, as shown to users.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Warehouse name of the history table.
    pub fn history_name(&self) -> String {
        format!("{}_history", self.target)
    }

    /// Name of the SCD-2 view over history.
    pub fn versions_name(&self) -> String {
        format!("{}_versions", self.target)
    }
}
