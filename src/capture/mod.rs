//! `cdcflow capture`: writes the DMS-format objects of ARCHITECTURE §1 from a
//! PostgreSQL logical replication slot or a MySQL / MariaDB row binlog, as
//! AWS DMS does.
//!
//! Stages: a [`source::ChangeSource`] ([`postgres`], [`mysql`]) reads the
//! database (full load, then the change stream) and [`source::drive`] runs
//! it; [`mapping`] applies the DMS table-mapping rules and masks, [`sink`]
//! buffers rows and checkpoints, [`writer`] encodes and writes the objects.

pub mod mapping;
pub mod mysql;
pub mod postgres;
pub mod sink;
pub mod source;
pub mod writer;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::{self, Secret, SourceFile};
use crate::error::{Error, Result, RetryPolicy};
use crate::shutdown::Shutdown;
use mapping::{Mapping, MaskFile};
use mysql::{MySettings, MySource};
use postgres::{PgSettings, PgSource};
use sink::Sink;
use source::ChangeSource;
use writer::{Layout, OutputFormat, Target};

/// What to capture (DMS migration types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Mode {
    /// Only the tables' current rows.
    #[serde(rename = "full-load")]
    FullLoad,
    /// Only changes from the slot's creation on.
    #[serde(rename = "cdc")]
    Cdc,
    /// The current rows, then every change after them.
    #[default]
    #[serde(rename = "full-load-and-cdc")]
    FullLoadAndCdc,
}

/// A capture file (TOML); see the README's "Capture" section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    /// Names the checkpoint (`_cdcflow/capture-<name>.json` in the target).
    pub name: String,
    /// The database.
    pub source: CaptureSource,
    /// Where the objects go.
    pub target: CaptureTarget,
    /// Column masks.
    #[serde(default)]
    pub masking: Vec<MaskFile>,
}

/// `[source]` of a capture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSource {
    /// `postgres://user@host:port/database` or `mysql://user@host:port/database`
    /// (no password: see `password_env`). TLS as the database's clients set it:
    /// `?sslmode=verify-full&sslrootcert=ca.pem`, `?ssl-mode=VERIFY_IDENTITY&ssl-ca=ca.pem`
    /// (see the `tls` module).
    pub url: String,
    /// Environment variable holding the password (default `PGPASSWORD`, or
    /// `MYSQL_PWD` for MySQL).
    #[serde(default)]
    pub password_env: Option<String>,
    /// MySQL: the server id capture registers with as a replica (unique among them).
    #[serde(default = "CaptureSource::default_server_id")]
    pub server_id: u32,
    /// Publication; created for the selected tables when missing.
    #[serde(default = "CaptureSource::default_name")]
    pub publication: String,
    /// Logical replication slot; created when missing.
    #[serde(default = "CaptureSource::default_name")]
    pub slot: String,
    /// `full-load`, `cdc` or `full-load-and-cdc` (DMS migration types).
    #[serde(default)]
    pub mode: Mode,
    /// DMS table-mapping rules (a JSON file, as DMS takes it). All tables when omitted.
    #[serde(default)]
    pub rules: Option<String>,
    /// Changes read per poll at most (whole transactions stay together).
    #[serde(default = "CaptureSource::default_max_changes")]
    pub max_changes: i32,
    /// Sessions copying at once during the full load: tables, and key ranges
    /// of a table of over a million rows with a one-column integer key. All
    /// read one snapshot (MariaDB: sessions whose snapshots match the same
    /// binlog position; MySQL: opened under a brief global read lock).
    #[serde(default = "CaptureSource::default_parallel_load")]
    pub parallel_load: usize,
    /// How long capture keeps reconnecting after it lost the database (a
    /// restart, a failover, a network reset) before it gives up, e.g. `"15m"`.
    #[serde(default = "CaptureSource::default_reconnect_for")]
    pub reconnect_for: String,
}

impl CaptureSource {
    fn default_name() -> String {
        "cdcflow".into()
    }
    fn default_max_changes() -> i32 {
        100_000
    }
    fn default_parallel_load() -> usize {
        4
    }
    fn default_server_id() -> u32 {
        4_271
    }
    fn default_reconnect_for() -> String {
        "15m".into()
    }
}

/// `[target]` of a capture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureTarget {
    /// `file://dir` or `s3://bucket/prefix` (as a pipeline's `source.url`).
    pub url: String,
    /// `parquet` (default) or `csv`.
    #[serde(default)]
    pub format: OutputFormat,
    /// Commit-time column (DMS TimestampColumnName).
    #[serde(default = "CaptureTarget::default_timestamp")]
    pub timestamp_column: String,
    /// Change-sequence column: 35 digits, commit LSN then position in the transaction.
    #[serde(default = "CaptureTarget::default_sequence")]
    pub sequence_column: String,
    /// CDC objects under `yyyy/MM/dd/` folders.
    #[serde(default)]
    pub date_folders: bool,
    /// Rows per object at most.
    #[serde(default = "CaptureTarget::default_max_rows")]
    pub max_rows: usize,
    /// MiB of values per object at most.
    #[serde(default = "CaptureTarget::default_max_mib")]
    pub max_mib: usize,
    /// MiB of change values capture holds in memory at most. A transaction
    /// larger than this is written in parts before its end (objects its
    /// checkpoint keeps pending until the transaction's end is confirmed).
    #[serde(default = "CaptureTarget::default_max_memory_mib")]
    pub max_memory_mib: usize,
    /// While streaming, the time between polls once caught up, e.g. "10s".
    #[serde(default = "CaptureTarget::default_interval")]
    pub interval: String,
    /// S3 region.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Allow plain HTTP to the endpoint.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Named AWS profile.
    #[serde(default)]
    pub profile: Option<String>,
    /// Further object_store options (secrets, never printed).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, Secret>,
}

impl CaptureTarget {
    fn default_timestamp() -> String {
        "dms_timestamp".into()
    }
    fn default_sequence() -> String {
        "cdc_seq".into()
    }
    fn default_max_rows() -> usize {
        1_000_000
    }
    fn default_max_mib() -> usize {
        64
    }
    fn default_max_memory_mib() -> usize {
        256
    }
    fn default_interval() -> String {
        "10s".into()
    }
}

/// The database capture reads.
enum Database {
    Postgres(PgSettings),
    Mysql(MySettings),
}

/// A checked capture file, ready to run.
pub struct Capture {
    file: CaptureFile,
    database: Database,
    mode: Mode,
    interval: Duration,
    reconnect_for: Duration,
}

impl Capture {
    /// Reads and checks a capture file.
    pub fn load(path: &Path) -> Result<Capture> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("reading", path.display(), e))?;
        let file: CaptureFile = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.display().to_string(),
            problems: vec![e.to_string()],
        })?;
        let interval =
            config::parse_duration(&file.target.interval).map_err(|e| Error::Config {
                path: path.display().to_string(),
                problems: vec![format!("`target.interval`: {e}")],
            })?;
        let reconnect_for =
            config::parse_duration(&file.source.reconnect_for).map_err(|e| Error::Config {
                path: path.display().to_string(),
                problems: vec![format!("`source.reconnect_for`: {e}")],
            })?;
        let endpoint =
            crate::database::Endpoint::parse(&file.source.url, file.source.password_env.as_deref())
                .map_err(|e| Error::Config {
                    path: path.display().to_string(),
                    problems: vec![format!("`source.url`: {e}")],
                })?;
        let (url, tls) = (endpoint.url, endpoint.tls);
        let mysql = endpoint.engine == crate::database::Engine::MySql;
        let database = if mysql {
            Database::Mysql(MySettings {
                url,
                tls,
                server_id: file.source.server_id,
                max_changes: file.source.max_changes.max(1) as usize,
                parallel_load: file.source.parallel_load,
            })
        } else {
            Database::Postgres(PgSettings {
                url,
                tls,
                publication: file.source.publication.clone(),
                slot: file.source.slot.clone(),
                max_changes: file.source.max_changes.max(1),
                parallel_load: file.source.parallel_load,
            })
        };
        Ok(Capture {
            mode: file.source.mode,
            file,
            database,
            interval,
            reconnect_for,
        })
    }

    async fn sink(&self) -> Result<Sink> {
        let t = &self.file.target;
        let source_file = SourceFile {
            url: t.url.clone(),
            region: t.region.clone(),
            endpoint: t.endpoint.clone(),
            allow_http: t.allow_http,
            profile: t.profile.clone(),
            options: t.options.clone(),
            ..SourceFile::for_url("")
        };
        let store = config::store_of(&source_file, "target")?;
        let target = if store.url.scheme() == "file" {
            let dir = store.url.to_file_path().expect("file URL");
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", dir.display(), e))?;
            Target::Local(dir)
        } else {
            let (store, root) = crate::source::open_store(&store)?;
            Target::Store(store, root)
        };
        self.sink_at(target).await
    }

    /// A sink writing to `target` with the capture's mapping and layout.
    async fn sink_at(&self, target: Target) -> Result<Sink> {
        let t = &self.file.target;
        let rules =
            match &self.file.source.rules {
                None => None,
                Some(path) => {
                    let path = Path::new(path);
                    Some(std::fs::read_to_string(path).map_err(|e| {
                        Error::io("reading the table-mapping rules", path.display(), e)
                    })?)
                }
            };
        let mapping = Mapping::new(rules.as_deref(), &self.file.masking)?;
        let layout = Layout {
            format: t.format,
            timestamp_column: t.timestamp_column.clone(),
            sequence_column: t.sequence_column.clone(),
            date_folders: t.date_folders,
            max_rows: t.max_rows.max(1),
            max_bytes: t.max_mib.max(1) << 20,
            max_held_bytes: t.max_memory_mib.max(1) << 20,
        };
        Sink::open(target, layout, mapping, &self.file.name).await
    }

    /// Runs capture: the full load when due, then changes until `stop` (or,
    /// with `once`, until the server's position at start). Returns the rows
    /// written (full load and changes; after a restart, rows read again
    /// count again).
    ///
    /// A lost connection (or another transient error: the target's storage
    /// answering 5xx) does not end it: capture starts again from its
    /// checkpoint, as a restarted process would, after a backoff of 1 s
    /// doubling to 60 s, until `reconnect_for` has passed without a
    /// connection that lasted a minute. Every change still lands once: the
    /// checkpoint protocol (see `sink`) makes a restart at any moment safe.
    pub async fn run(&self, once: bool, stop: &Shutdown) -> Result<u64> {
        const SETTLED: Duration = Duration::from_secs(60);
        const LONGEST: Duration = Duration::from_secs(60);
        let mut rows = 0;
        let mut delay = Duration::from_secs(1);
        let mut failing_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let (result, read) = match self.sink().await {
                Ok(mut sink) => {
                    let result = self.capture(&mut sink, once, stop).await;
                    (result, sink.rows())
                }
                Err(e) => (Err(e), 0),
            };
            let error = match result {
                Ok(written) => return Ok(rows + written),
                Err(e) if e.retry_policy() == RetryPolicy::Retry && !stop.requested() => e,
                Err(e) => return Err(e),
            };
            // The rows of this connection (some are read again after the restart).
            rows += read;
            if started.elapsed() >= SETTLED {
                (delay, failing_since) = (Duration::from_secs(1), None);
            }
            let since = *failing_since.get_or_insert(started);
            if since.elapsed() >= self.reconnect_for {
                tracing::error!(error = %error, reconnect_for = ?self.reconnect_for, "giving up: the database stayed unreachable");
                return Err(error);
            }
            tracing::warn!(error = %error, retry_in = ?delay, "capture stopped on a transient error; starting again from the checkpoint");
            stop.sleep(delay).await;
            delay = (delay * 2).min(LONGEST);
        }
    }

    /// One connection's run: the source opened, then [`source::drive`].
    async fn capture(&self, sink: &mut Sink, once: bool, stop: &Shutdown) -> Result<u64> {
        let mut source = self.source(sink, true).await?;
        source::drive(source.as_mut(), sink, self.mode, once, stop, self.interval).await
    }

    /// The database as a [`ChangeSource`]; with `prepare`, ready to capture
    /// (PostgreSQL: publication and slot created, the slot free).
    async fn source(&self, sink: &Sink, prepare: bool) -> Result<Box<dyn ChangeSource>> {
        Ok(match &self.database {
            Database::Postgres(pg) if prepare => Box::new(PgSource::open(pg.clone(), sink).await?),
            Database::Postgres(pg) => Box::new(PgSource::connect(pg.clone()).await?),
            Database::Mysql(my) => Box::new(MySource::connect(my.clone()).await?),
        })
    }

    /// Copies every selected table under one snapshot, as the full load
    /// does (mapping and masks applied), into LOAD objects under `dir`; for
    /// `verify`. Touches neither the capture's checkpoint nor a slot.
    pub async fn snapshot_into(&self, dir: &Path) -> Result<u64> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir.display(), e))?;
        let mut sink = self.sink_at(Target::Local(dir.to_path_buf())).await?;
        let mut source = self.source(&sink, false).await?;
        let load = source.full_load(&mut sink).await?;
        sink.write_schema_files().await?;
        Ok(load.rows)
    }

    /// The capture's name.
    pub fn name(&self) -> &str {
        &self.file.name
    }

    /// Where the capture stands: its checkpoint, and how far it is behind
    /// the server (connects to the database).
    pub async fn report(&self) -> Result<CaptureReport> {
        let sink = self.sink().await?;
        let lag = self.source(&sink, false).await?.lag(&sink).await?;
        let cp = &sink.checkpoint;
        Ok(CaptureReport {
            lag,
            full_load_done: cp.full_load.is_some(),
            position: cp.position.clone(),
            checkpoint_at: cp.updated_at,
            tables: cp.tables.clone(),
        })
    }

    /// `status`: the checkpoint and how far capture is behind the server.
    pub async fn status(&self) -> Result<String> {
        let r = self.report().await?;
        let mut out = format!("capture {}: {}\n", self.file.name, r.lag.text);
        out.push_str(&format!(
            "full load: {}\nlast checkpoint: {} at {}\n",
            if r.full_load_done { "done" } else { "not done" },
            r.position.as_deref().unwrap_or("none"),
            r.checkpoint_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into())
        ));
        for (table, t) in &r.tables {
            out.push_str(&format!(
                "  {table}: schema v{}, {} changes in {} objects, last object {}\n",
                t.version,
                t.changes,
                t.objects,
                t.last_object.as_deref().unwrap_or("-")
            ));
        }
        Ok(out)
    }
}

/// Where a capture stands ([`Capture::report`]).
#[derive(Debug, Clone)]
pub struct CaptureReport {
    /// How far behind the server.
    pub lag: source::Lag,
    /// Whether the full load is done.
    pub full_load_done: bool,
    /// The confirmed position, as the source writes it.
    pub position: Option<String>,
    /// When the checkpoint was last written.
    pub checkpoint_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Per source table (`schema.table`): its schema version, changes and
    /// objects written, last object.
    pub tables: std::collections::BTreeMap<String, sink::TableCheckpoint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_capture_file_and_rules_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/capture");
        let capture = Capture::load(&dir.join("postgres.toml")).unwrap();
        assert!(
            matches!(&capture.database, Database::Postgres(_))
                && capture.mode == Mode::FullLoadAndCdc
        );
        assert_eq!(capture.interval, Duration::from_secs(10));
        let rules = std::fs::read_to_string(dir.join("mapping.json")).unwrap();
        let mapping = Mapping::new(Some(&rules), &[]).unwrap();
        assert!(mapping.selects("public", "customers") && !mapping.selects("public", "audit_log"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "name = \"x\"\n[source]\nurl = \"postgres://h/db\"\nslots = \"typo\"\n[target]\nurl = \"file:///tmp/x\"\n",
        )
        .unwrap();
        let err = Capture::load(&path).err().expect("refused").to_string();
        assert!(err.contains("slots"), "{err}");
    }
}
