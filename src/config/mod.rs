//! The pipeline file (`pipelines/*.toml`): what to read, how to decode it,
//! where to load it.
//!
//! Loading is two steps, as in vector: [`PipelineFile::parse`] reads TOML
//! into these structs (unknown keys are errors), then
//! [`PipelineFile::validate`] checks everything without touching the network
//! or the disk and returns a [`Pipeline`] or *every* problem at once, each
//! with its field path.

mod validate;
mod validated;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::model::{Column, SqlType, TYPE_NAMES, UTC};
pub use validate::store_of;
pub use validated::{
    AlertFormat, Alerts, BigQueryConfig, CsvOptions, DatabaseConfig, DeltaLocation, Pipeline,
    RetryPolicy, Source, StateConfig, Table, WarehouseConfig, Webhook,
};

use crate::error::{Error, Result};

/// A pipeline file as written by the user, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline name: lowercase letters, digits, `_` and `-`. Names the state and batch ids.
    pub name: String,
    /// Cron schedule (5 fields, or 6 with seconds). Each tick is a run whose data
    /// interval ends at the tick.
    #[serde(default)]
    pub schedule: Option<String>,
    /// IANA time zone the schedule is read in (default `UTC`); DST is handled.
    #[serde(default)]
    pub timezone: Option<String>,
    /// `true`: every missed tick runs, in order; `false`: missed ticks coalesce into one run.
    #[serde(default)]
    pub catchup: bool,
    /// How many tables are processed at once.
    #[serde(default = "PipelineFile::default_max_parallel_tables")]
    pub max_parallel_tables: usize,
    /// Retries of a table task on transient errors (network, 5xx, busy, lease lost).
    #[serde(default)]
    pub retries: RetriesFile,
    /// How long a run's lease on the pipeline lasts without a heartbeat, e.g. "60s".
    #[serde(default = "PipelineFile::default_lease_ttl")]
    pub lease_ttl: String,
    /// Where the CDC objects are and how they are written.
    pub source: SourceFile,
    /// Where cdcflow keeps its manifest of objects, batches and runs.
    #[serde(default)]
    pub state: StateFile,
    /// Where the tables are loaded.
    pub warehouse: WarehouseFile,
    /// How much one batch may hold.
    #[serde(default)]
    pub batch: BatchFile,
    /// Names of the columns cdcflow adds; change them when a source column collides.
    #[serde(default)]
    pub metadata_columns: MetadataColumns,
    /// The source tables to load.
    #[serde(default)]
    pub tables: Vec<TableFile>,
    /// Where alerts go (none when absent).
    #[serde(default)]
    pub alerts: Option<AlertsFile>,
}

/// `[alerts]`: a webhook told when a table's task fails after its retries,
/// an object is quarantined, or the lag passes a bound; once when each
/// incident opens and once when it resolves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    /// The webhook URL (a Slack incoming webhook, or any endpoint taking JSON).
    #[serde(default)]
    pub webhook: Option<String>,
    /// Or the environment variable holding it (webhook URLs are secrets).
    #[serde(default)]
    pub webhook_env: Option<String>,
    /// `slack` (`{"text": …}`, the default) or `json` (one object with every field).
    #[serde(default = "AlertsFile::default_format")]
    pub format: String,
    /// Alert when a table's lag is above this, e.g. "1h"; unset: no lag alerts.
    #[serde(default)]
    pub lag: Option<String>,
}

impl AlertsFile {
    fn default_format() -> String {
        "slack".into()
    }
}

impl PipelineFile {
    /// Default of `max_parallel_tables`.
    pub const DEFAULT_MAX_PARALLEL_TABLES: usize = 4;

    fn default_max_parallel_tables() -> usize {
        Self::DEFAULT_MAX_PARALLEL_TABLES
    }
    fn default_lease_ttl() -> String {
        "60s".into()
    }
}

/// `[retries]`: exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    /// Retries after the first try (0 disables retries).
    #[serde(default = "RetriesFile::default_count")]
    pub count: u32,
    /// Delay before the first retry, e.g. "10s"; doubled each retry.
    #[serde(default = "RetriesFile::default_delay")]
    pub delay: String,
    /// Longest delay between two tries, e.g. "5m".
    #[serde(default = "RetriesFile::default_max_delay")]
    pub max_delay: String,
}

impl RetriesFile {
    fn default_count() -> u32 {
        3
    }
    fn default_delay() -> String {
        "10s".into()
    }
    fn default_max_delay() -> String {
        "5m".into()
    }
}

impl Default for RetriesFile {
    fn default() -> Self {
        RetriesFile {
            count: Self::default_count(),
            delay: Self::default_delay(),
            max_delay: Self::default_max_delay(),
        }
    }
}

/// Parses "250ms", "10s", "5m", "2h".
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration; write e.g. \"500ms\", \"10s\", \"5m\" or \"1h\"")
    })?;
    let millis = match unit.trim() {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => {
            return Err(format!(
                "{text:?} has no unit; write e.g. \"500ms\", \"10s\", \"5m\" or \"1h\""
            ));
        }
    };
    Ok(std::time::Duration::from_millis(millis))
}

/// `[source]`: the DMS-format objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// Object-store URL of the DMS bucket folder: `file://relative/or/absolute/dir` or `s3://bucket/prefix`.
    pub url: String,
    /// `auto` (by file extension), `csv` or `parquet`.
    #[serde(default)]
    pub format: Format,
    /// DMS `TimestampColumnName`: the column after `Op` holding the commit time. Omit when absent.
    #[serde(default)]
    pub timestamp_column: Option<String>,
    /// Columns a DMS add-column rule placed after the timestamp column (e.g. a change sequence).
    /// Kept in history as text.
    #[serde(default)]
    pub extra_columns: Vec<String>,
    /// One of `extra_columns` that totally orders changes (e.g. from `$AR_H_CHANGE_SEQ`).
    /// When set, it orders CDC changes instead of file and row order, and
    /// with the key names a change: a later row with both is a copy, kept once.
    #[serde(default)]
    pub sequence_column: Option<String>,
    /// DMS `includeOpForFullLoad`: full-load files carry an `Op` column too.
    #[serde(default)]
    pub include_op_for_full_load: bool,
    /// CSV settings (DMS defaults when omitted).
    #[serde(default)]
    pub csv: CsvFile,
    /// S3 region (else `AWS_REGION`, the profile's region, or us-east-1).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store, e.g. "http://127.0.0.1:19000" (else `AWS_ENDPOINT`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allow plain HTTP to the endpoint (else `AWS_ALLOW_HTTP`).
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Named profile of `~/.aws/credentials` with static keys (else `AWS_PROFILE`).
    #[serde(default)]
    pub profile: Option<String>,
    /// Further object_store options for the URL's scheme (e.g. `aws_session_token`,
    /// `google_service_account`, `azure_storage_account_key`). Values are secrets: never printed.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, Secret>,
    /// How late an object may arrive with an older name than ones already loaded and still be
    /// found by incremental listing, e.g. "1h".
    #[serde(default = "SourceFile::default_lateness")]
    pub lateness: String,
    /// How often a full listing of each table runs anyway (catching objects later than
    /// `lateness`, replaced or changed objects), e.g. "24h".
    #[serde(default = "SourceFile::default_full_listing_every")]
    pub full_listing_every: String,
}

impl SourceFile {
    /// Settings for `url` with every other field at its default.
    pub fn for_url(url: &str) -> SourceFile {
        let mut table = toml::Table::new();
        table.insert("url".into(), url.into());
        SourceFile::deserialize(toml::Value::Table(table)).expect("every other field has a default")
    }

    fn default_lateness() -> String {
        "1h".into()
    }
    fn default_full_listing_every() -> String {
        "24h".into()
    }
}

/// A secret string: shown as `***` in every debug or error output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for handing to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// File format of the objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// By extension: `.csv`, `.csv.gz`, `.parquet`.
    #[default]
    Auto,
    /// Only CSV objects.
    Csv,
    /// Only Parquet objects.
    Parquet,
}

/// `[source.csv]`: DMS CSV settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvFile {
    /// DMS `csvDelimiter`: one ASCII character.
    #[serde(default = "CsvFile::default_delimiter")]
    pub delimiter: String,
    /// DMS `AddColumnName`: the first line of each file names the columns.
    #[serde(default)]
    pub header: bool,
    /// DMS `CsvNullValue`: the unquoted text that means NULL (default: empty field).
    #[serde(default)]
    pub null_value: String,
}

impl CsvFile {
    fn default_delimiter() -> String {
        ",".to_string()
    }
}

impl Default for CsvFile {
    fn default() -> Self {
        CsvFile {
            delimiter: Self::default_delimiter(),
            header: false,
            null_value: String::new(),
        }
    }
}

/// `[state]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// `sqlite://path/to/file.db` (relative to the working directory), or
    /// `postgres://user@host:port/database` for a state store many processes
    /// and machines share (tables in the schema `cdcflow`; TLS as libpq sets
    /// it: `?sslmode=verify-full&sslrootcert=ca.pem`).
    /// Default: `sqlite://.cdcflow/<pipeline name>.db`.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL: the environment variable holding the password, when the
    /// URL has none (default `PGPASSWORD`).
    #[serde(default)]
    pub password_env: Option<String>,
}

/// `[warehouse]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WarehouseFile {
    /// Delta Lake tables in a directory or under an object-store prefix
    /// (`kind = "local"` is the same).
    #[serde(alias = "local")]
    Delta {
        /// Where the tables are, one Delta table per warehouse table: a
        /// directory (relative to the working directory), or
        /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
        /// or `abfss://container@account.dfs.core.windows.net/prefix`.
        path: String,
        /// Apply in-order batches to current-state tables by Delta deletion
        /// vectors (default), which readers must support; `false` rewrites
        /// the touched files instead (set it before the first load).
        #[serde(default = "default_true")]
        deletion_vectors: bool,
        /// Object storage: as `source.region`.
        #[serde(default)]
        region: Option<String>,
        /// Object storage: as `source.endpoint`.
        #[serde(default)]
        endpoint: Option<String>,
        /// Object storage: as `source.allow_http`.
        #[serde(default)]
        allow_http: Option<bool>,
        /// Object storage: as `source.profile`.
        #[serde(default)]
        profile: Option<String>,
        /// Object storage: as `source.options`.
        #[serde(default)]
        options: std::collections::BTreeMap<String, Secret>,
    },
    /// Google BigQuery: tables in one dataset, loaded by load and MERGE jobs.
    Bigquery {
        /// GCP project that runs the jobs and holds the dataset.
        project: String,
        /// Dataset holding the tables (it must exist).
        dataset: String,
        /// Location of the dataset. Default: the dataset's own (read from
        /// BigQuery); when given, it must be the dataset's.
        #[serde(default)]
        location: Option<String>,
        /// Service-account key file. Default: application default credentials
        /// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud, or the metadata server,
        /// which is how GKE workload identity is reached).
        #[serde(default)]
        credentials: Option<String>,
        /// API endpoint for an emulator, e.g. `http://127.0.0.1:19050`
        /// (no credentials are sent to it).
        #[serde(default)]
        endpoint: Option<String>,
        /// How current state is kept: `"log"` (default) appends each batch's
        /// changes to `<t>__log` and compacts them into `<t>__base` now and
        /// then, `<t>` being a view over both, so a batch costs in proportion
        /// to the batch; `"merge"` MERGEs each batch into a `<t>` table,
        /// which BigQuery bills for the whole table every batch.
        #[serde(default)]
        current: CurrentMode,
        /// `current = "log"`: compact when the log holds more rows than this
        /// share of the base (default 0.1: a batch then costs about 11 times
        /// its own size, amortized, and a read of `<t>` 1.1 times the table).
        #[serde(default = "default_compact_ratio")]
        compact_ratio: f64,
        /// A job that would bill more bytes than this fails instead (BigQuery's
        /// `maximumBytesBilled`); the table stops at its batch and waits.
        #[serde(default)]
        maximum_bytes_billed: Option<u64>,
        /// Bytes sent per request when a batch's staged file is uploaded, in
        /// KiB: a multiple of 256 (BigQuery's unit). Memory holds one chunk;
        /// a dropped connection resends at most one.
        #[serde(default = "default_upload_chunk_kib")]
        upload_chunk_kib: u64,
        /// A JSON number BigQuery cannot hold exactly (beyond 64-bit
        /// integers, or with more digits than a FLOAT64): `"exact"` (default)
        /// fails the batch's job and the table waits; `"round"` stores it
        /// rounded to the nearest FLOAT64 (`wide_number_mode => 'round'`).
        #[serde(default)]
        json_wide_numbers: JsonWideNumbers,
    },
    /// A PostgreSQL (`kind = "postgres"`) or MySQL / MariaDB (`kind =
    /// "mysql"`) database: each batch applied in one transaction with its
    /// `cdcflow_batches` row.
    #[serde(alias = "postgres", alias = "mysql", alias = "mariadb")]
    Database {
        /// `postgres://user@host:port/database` or
        /// `mysql://user@host:port/database`, TLS as capture's `source.url`
        /// (`?sslmode=verify-full&sslrootcert=ca.pem`,
        /// `?ssl-mode=VERIFY_IDENTITY&ssl-ca=ca.pem`).
        url: String,
        /// The environment variable holding the password when the URL has
        /// none (default `PGPASSWORD`, or `MYSQL_PWD` for MySQL).
        #[serde(default)]
        password_env: Option<String>,
        /// PostgreSQL: the schema of the tables (default `public`; created
        /// when missing). MySQL's tables are in the URL's database.
        #[serde(default)]
        schema: Option<String>,
        /// `"history"` (default): `<t>_history`, `<t>` and `<t>_versions` as
        /// in every warehouse. `"replica"`: only the current rows, in a table
        /// named and shaped as the source's (no added columns), for a
        /// migration or a reverse sync.
        #[serde(default)]
        mode: TargetMode,
    },
}

/// What a database warehouse keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetMode {
    /// History, current state and versions, with the added columns.
    #[default]
    History,
    /// Only current rows, as the source has them.
    Replica,
}

/// What BigQuery's `PARSE_JSON` does with a number it cannot hold exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonWideNumbers {
    /// Fail: nothing is changed without the operator.
    #[default]
    Exact,
    /// Round to the nearest FLOAT64.
    Round,
}

/// How the BigQuery warehouse keeps a table's current state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CurrentMode {
    /// A base table and a log of changes, compacted now and then, read through a view.
    #[default]
    Log,
    /// One table, MERGEd every batch.
    Merge,
}

fn default_compact_ratio() -> f64 {
    0.1
}

fn default_upload_chunk_kib() -> u64 {
    16 * 1024
}

/// `[batch]`: bounds of one batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    /// At most this many objects per batch.
    #[serde(default = "BatchFile::default_max_objects")]
    pub max_objects: usize,
    /// At most this many bytes (object sizes) per batch; a larger single object still forms a batch.
    #[serde(default = "BatchFile::default_max_bytes")]
    pub max_bytes: u64,
    /// Memory a batch's DataFusion queries (the MERGE, scans) may use before
    /// sorts spill to disk, in MiB. Each key's latest row is held besides.
    #[serde(default = "BatchFile::default_memory_limit_mib")]
    pub memory_limit_mib: usize,
    /// Memory a batch's latest change per key may take, in MiB, before the
    /// rows are spilled to a file in the temporary directory (`TMPDIR`);
    /// their keys stay in memory. Each table loading at once holds its own.
    /// Delta warehouses; a database warehouse holds them in memory.
    #[serde(default = "BatchFile::default_latest_memory_mib")]
    pub latest_memory_mib: usize,
}

impl BatchFile {
    /// Default of `batch.max_objects`.
    pub const DEFAULT_MAX_OBJECTS: usize = 1000;
    /// Default of `batch.max_bytes` (256 MiB).
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

    fn default_max_objects() -> usize {
        Self::DEFAULT_MAX_OBJECTS
    }

    /// How many of the objects with these sizes (in order) the next batch takes:
    /// at most `max_objects`, and within `max_bytes` unless a single object is larger.
    pub fn take(&self, sizes: impl Iterator<Item = u64>) -> usize {
        let mut bytes = 0u64;
        sizes
            .take(self.max_objects)
            .take_while(|size| {
                bytes += size;
                bytes == *size || bytes <= self.max_bytes
            })
            .count()
    }
    fn default_max_bytes() -> u64 {
        Self::DEFAULT_MAX_BYTES
    }
    fn default_memory_limit_mib() -> usize {
        2048
    }
    fn default_latest_memory_mib() -> usize {
        256
    }
}

impl Default for BatchFile {
    fn default() -> Self {
        BatchFile {
            max_objects: Self::DEFAULT_MAX_OBJECTS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            memory_limit_mib: Self::default_memory_limit_mib(),
            latest_memory_mib: Self::default_latest_memory_mib(),
        }
    }
}

/// `[metadata_columns]`: names of the columns cdcflow adds to the warehouse tables.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataColumns {
    /// `I`, `U` or `D`.
    pub op: String,
    /// Commit time, UTC, microseconds.
    pub commit_ts: String,
    /// Sortable, deterministic total order of changes.
    pub change_seq: String,
    /// Object key the change came from.
    pub source_file: String,
    /// When cdcflow loaded the change.
    pub ingested_at: String,
    /// Soft-delete flag of the current-state table.
    pub deleted: String,
}

impl Default for MetadataColumns {
    fn default() -> Self {
        MetadataColumns {
            op: "op".into(),
            commit_ts: "commit_ts".into(),
            change_seq: "change_seq".into(),
            source_file: "source_file".into(),
            ingested_at: "ingested_at".into(),
            deleted: "deleted".into(),
        }
    }
}

impl MetadataColumns {
    /// All names with their keys, for collision checks.
    pub fn named(&self) -> [(&'static str, &str); 6] {
        [
            ("op", &self.op),
            ("commit_ts", &self.commit_ts),
            ("change_seq", &self.change_seq),
            ("source_file", &self.source_file),
            ("ingested_at", &self.ingested_at),
            ("deleted", &self.deleted),
        ]
    }
}

/// `[[tables]]`: one source table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    /// Source schema: the first folder under the source URL.
    pub schema: String,
    /// Source table: the folder under the schema.
    pub name: String,
    /// Warehouse table name (default: `name`); history is `<target>_history`.
    #[serde(default)]
    pub target: Option<String>,
    /// Primary-key columns, in key order.
    pub primary_key: Vec<String>,
    /// Columns in file order. Required for headerless CSV; taken from the file for Parquet when omitted.
    #[serde(default)]
    pub columns: Option<Vec<ColumnFile>>,
    /// Keep deleted keys in the current table with `deleted = true` instead of removing them.
    #[serde(default)]
    pub soft_delete: bool,
}

/// One declared column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnFile {
    /// Column name as in the source.
    pub name: String,
    /// SQL type name (see [`TYPE_NAMES`]).
    #[serde(rename = "type")]
    pub sql_type: String,
}

impl PipelineFile {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|err| Error::Config {
            path: origin.to_string(),
            problems: vec![err.to_string().trim_end().replace('\n', "\n    ")],
        })
    }

    /// Reads and parses a pipeline file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| Error::io("cannot read pipeline file", path.display(), err))?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Reads, parses and validates a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline> {
    PipelineFile::read(path)?.validate(&path.display().to_string())
}

/// Reads every pipeline file (`*.toml`) of a folder, in name order.
pub fn load_folder(dir: &Path) -> Result<Vec<Pipeline>> {
    toml_files(dir, "the pipelines folder")?
        .iter()
        .map(|p| load(p))
        .collect()
}

/// The `*.toml` files of folder `dir` (`what`, for errors), in name order.
pub fn toml_files(dir: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot read {what}"), dir.display(), e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Resolves a possibly relative local path against the working directory.
pub fn absolute(path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

fn default_true() -> bool {
    true
}
