//! Pure validation of a parsed pipeline file: no I/O, every problem at once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use super::validated::{
    AlertFormat, Alerts, BigQueryConfig, CsvOptions, DatabaseConfig, DeltaLocation, Pipeline,
    RetryPolicy, Source, StateConfig, Table, WarehouseConfig, Webhook,
};
use super::{
    AlertsFile, CsvFile, Format, MetadataColumns, PipelineFile, SqlType, TableFile, WarehouseFile,
    absolute, parse_duration,
};
use crate::cron::Schedule;
use crate::error::{Error, Result};
use crate::tls::Tls;

struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: impl AsRef<str>, message: impl AsRef<str>) {
        self.0
            .push(format!("`{}`: {}", field.as_ref(), message.as_ref()));
    }
}

fn is_simple_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl PipelineFile {
    /// Checks the whole file and returns the validated pipeline, or every problem found.
    /// Pure: reads no files and opens no connections.
    pub fn validate(self, origin: &str) -> Result<Pipeline> {
        let mut problems = Problems(Vec::new());
        if !is_simple_name(&self.name) {
            problems.add(
                "name",
                format!(
                    "{:?} must be non-empty lowercase letters, digits, `_` or `-`",
                    self.name
                ),
            );
        }
        let timezone = self.timezone.as_deref().unwrap_or("UTC");
        let tz = timezone.parse::<chrono_tz::Tz>().map_err(|_| {
            problems.add(
                "timezone",
                format!("{timezone:?} is not an IANA time zone; e.g. \"UTC\" or \"Europe/London\""),
            )
        });
        let schedule = match (&self.schedule, tz) {
            (Some(expr), Ok(tz)) => Schedule::parse(expr, tz)
                .map_err(|err| problems.add("schedule", err))
                .ok(),
            _ => None,
        };
        if self.max_parallel_tables == 0 {
            problems.add("max_parallel_tables", "must be greater than 0");
        }
        let mut duration = |field: &str, text: &str| {
            parse_duration(text)
                .map_err(|err| problems.add(field, err))
                .unwrap_or_default()
        };
        let retry = RetryPolicy {
            count: self.retries.count,
            delay: duration("retries.delay", &self.retries.delay),
            max_delay: duration("retries.max_delay", &self.retries.max_delay),
        };
        let lease_ttl = duration("lease_ttl", &self.lease_ttl);
        if parse_duration(&self.lease_ttl).is_ok() && lease_ttl < Duration::from_secs(1) {
            problems.add("lease_ttl", "must be at least 1s");
        }
        let alerts = self
            .alerts
            .as_ref()
            .and_then(|a| validate_alerts(a, &mut problems));
        let source = validate_source(&self.source, &mut problems);
        let state = validate_state(&self, &mut problems);
        let warehouse = validate_warehouse(&self.warehouse, &mut problems);
        if let WarehouseConfig::Database(db) = &warehouse
            && db.mode == super::TargetMode::Replica
        {
            for (i, table) in self.tables.iter().enumerate() {
                if table.soft_delete {
                    problems.add(
                        format!("tables[{i}].soft_delete"),
                        "a replica holds the source's rows only, with no `deleted` flag: leave                          soft_delete out, or use mode = \"history\"",
                    );
                }
            }
        }
        if self.batch.max_objects == 0 {
            problems.add("batch.max_objects", "must be greater than 0");
        }
        if self.batch.memory_limit_mib < 256 {
            problems.add(
                "batch.memory_limit_mib",
                "must be at least 256 (sorts need room to merge their spilled runs)",
            );
        }
        if self.batch.max_bytes == 0 {
            problems.add("batch.max_bytes", "must be greater than 0");
        }
        validate_metadata(&self.metadata_columns, &mut problems);
        for (i, extra) in self.source.extra_columns.iter().enumerate() {
            if let Some((key, _)) = self
                .metadata_columns
                .named()
                .into_iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(extra))
            {
                problems.add(
                    format!("source.extra_columns[{i}]"),
                    format!(
                        "{extra:?} is also the name of a metadata column; rename that one with `metadata_columns.{key}`"
                    ),
                );
            }
        }
        if self.tables.is_empty() {
            problems.add("tables", "no tables: add at least one [[tables]] section");
        }
        let mut targets = HashSet::new();
        let tables: Vec<Table> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, table)| {
                let t = validate_table(i, table, &self, &mut problems);
                if !targets.insert(t.target.clone()) {
                    problems.add(
                        format!("tables[{i}].target"),
                        format!(
                            "warehouse table {:?} is used twice; set a distinct `target`",
                            t.target
                        ),
                    );
                }
                t
            })
            .collect();

        if !problems.0.is_empty() {
            return Err(Error::Config {
                path: origin.to_string(),
                problems: problems.0,
            });
        }
        Ok(Pipeline {
            name: self.name,
            schedule,
            catchup: self.catchup,
            max_parallel_tables: self.max_parallel_tables,
            retry,
            lease_ttl,
            source: source.expect("checked above"),
            state,
            warehouse,
            batch: self.batch,
            meta: self.metadata_columns,
            tables,
            alerts,
        })
    }
}

/// The object-store settings of a `[source]`-shaped table found at `field`
/// (a capture's `target`), checked as a pipeline's source is.
pub fn store_of(file: &super::SourceFile, field: &str) -> Result<Source> {
    let mut problems = Problems(Vec::new());
    let source = validate_source(file, &mut problems);
    match source {
        Some(source) if problems.0.is_empty() => Ok(source),
        _ => Err(Error::Usage(format!(
            "{field} is invalid:\n{}",
            problems
                .0
                .iter()
                .map(|p| format!("  - {}", p.replace("`source.", &format!("`{field}."))))
                .collect::<Vec<_>>()
                .join("\n")
        ))),
    }
}

fn validate_source(source: &super::SourceFile, problems: &mut Problems) -> Option<Source> {
    let url = parse_source_url(&source.url).map_err(|msg| problems.add("source.url", msg));
    let csv = validate_csv(&source.csv, problems);
    if let Some(seq) = &source.sequence_column
        && !source.extra_columns.contains(seq)
    {
        problems.add(
            "source.sequence_column",
            format!(
                "{seq:?} must be one of `source.extra_columns` ({:?})",
                source.extra_columns
            ),
        );
    }
    let mut seen = HashSet::new();
    for (i, col) in source.extra_columns.iter().enumerate() {
        if !seen.insert(col) || source.timestamp_column.as_ref() == Some(col) {
            problems.add(
                format!("source.extra_columns[{i}]"),
                format!("{col:?} is named twice"),
            );
        }
    }
    let lateness = parse_duration(&source.lateness).map_err(|e| problems.add("source.lateness", e));
    let full = parse_duration(&source.full_listing_every)
        .map_err(|e| problems.add("source.full_listing_every", e));
    let url = url.ok()?;
    let store_options = store_options(source, &url, problems);
    Some(Source {
        url,
        store_options,
        profile: source.profile.clone(),
        lateness: lateness.ok()?,
        full_listing_every: full.ok()?,
        format: source.format,
        timestamp_column: source.timestamp_column.clone(),
        extra_columns: source.extra_columns.clone(),
        sequence_column: source.sequence_column.clone(),
        include_op_for_full_load: source.include_op_for_full_load,
        csv,
    })
}

/// The explicit store options: the named keys plus `[source.options]`, each
/// checked against object_store's keys for the URL's scheme.
fn store_options(
    source: &super::SourceFile,
    url: &url::Url,
    problems: &mut Problems,
) -> Vec<(String, super::Secret)> {
    let mut options: Vec<(String, super::Secret)> = Vec::new();
    let s3 = matches!(url.scheme(), "s3" | "s3a");
    for (field, key, value) in [
        ("source.region", "aws_region", source.region.clone()),
        ("source.endpoint", "aws_endpoint", source.endpoint.clone()),
        (
            "source.allow_http",
            "aws_allow_http",
            source.allow_http.map(|b| b.to_string()),
        ),
    ] {
        if let Some(value) = value {
            if s3 {
                options.push((key.to_string(), super::Secret(value)));
            } else {
                problems.add(
                    field,
                    format!(
                        "applies to s3:// sources only (the source is {})",
                        url.scheme()
                    ),
                );
            }
        }
    }
    if source.profile.is_some() && !s3 {
        problems.add("source.profile", "applies to s3:// sources only");
    }
    for (key, value) in &source.options {
        let known = match url.scheme() {
            "s3" | "s3a" => key.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
            "gs" => key.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
            "az" | "abfss" => key.parse::<object_store::azure::AzureConfigKey>().is_ok(),
            _ => false,
        };
        if known {
            options.push((key.clone(), value.clone()));
        } else {
            problems.add(
                format!("source.options.{key}"),
                format!("is not an object_store option for {}:// (e.g. aws_session_token, google_service_account, azure_storage_account_key)", url.scheme()),
            );
        }
    }
    options
}

fn parse_source_url(raw: &str) -> Result<url::Url, String> {
    if let Some(path) = raw.strip_prefix("file://") {
        if path.is_empty() {
            return Err("`file://` needs a directory, e.g. \"file://testdata/dms\"".into());
        }
        let dir = absolute(path);
        return url::Url::from_directory_path(&dir)
            .map_err(|_| format!("{} is not a usable directory path", dir.display()));
    }
    let url = url::Url::parse(raw).map_err(|err| {
        format!("{raw:?} is not a URL ({err}); use file://<dir> or s3://<bucket>/<prefix>")
    })?;
    match url.scheme() {
        "s3" | "s3a" | "gs" | "az" | "abfss" => Ok(url),
        other => Err(format!(
            "scheme {other:?} is not supported; use file://<dir> or s3://<bucket>/<prefix>"
        )),
    }
}

fn validate_csv(csv: &CsvFile, problems: &mut Problems) -> CsvOptions {
    let delimiter = match csv.delimiter.as_bytes() {
        [b] if b.is_ascii() && *b != b'"' && *b != b'\n' && *b != b'\r' => *b,
        _ => {
            problems.add(
                "source.csv.delimiter",
                format!(
                    "{:?} must be a single ASCII character other than a quote or newline",
                    csv.delimiter
                ),
            );
            b','
        }
    };
    if csv.null_value.contains(['"', '\n', '\r']) || csv.null_value.contains(delimiter as char) {
        problems.add(
            "source.csv.null_value",
            "must not contain quotes, newlines or the delimiter",
        );
    }
    CsvOptions {
        delimiter,
        header: csv.header,
        null_value: csv.null_value.clone(),
    }
}

fn validate_alerts(file: &AlertsFile, problems: &mut Problems) -> Option<Alerts> {
    let webhook = match (&file.webhook, &file.webhook_env) {
        (Some(url), None) if url.starts_with("http://") || url.starts_with("https://") => {
            Some(Webhook::Url(url.clone()))
        }
        (Some(url), None) => {
            problems.add(
                "alerts.webhook",
                format!(
                    "{:?} is not an http:// or https:// URL",
                    crate::tls::redact_url(url)
                ),
            );
            None
        }
        (None, Some(var)) if !var.is_empty() => Some(Webhook::Env(var.clone())),
        _ => {
            problems.add(
                "alerts",
                "give the webhook's URL as exactly one of `webhook` or `webhook_env` (the \
                 environment variable holding it)",
            );
            None
        }
    };
    let format = match file.format.as_str() {
        "slack" => Some(AlertFormat::Slack),
        "json" => Some(AlertFormat::Json),
        other => {
            problems.add(
                "alerts.format",
                format!("{other:?} is not a format: \"slack\" or \"json\""),
            );
            None
        }
    };
    let lag = file.lag.as_deref().and_then(|text| {
        parse_duration(text)
            .map_err(|err| problems.add("alerts.lag", err))
            .ok()
    });
    Some(Alerts {
        webhook: webhook?,
        format: format?,
        lag,
    })
}

fn validate_state(file: &PipelineFile, problems: &mut Problems) -> StateConfig {
    let fallback = || StateConfig::Sqlite(PathBuf::new());
    let Some(url) = &file.state.url else {
        return StateConfig::Sqlite(absolute(&format!(".cdcflow/{}.db", file.name)));
    };
    if let Some(path) = url.strip_prefix("sqlite://")
        && !path.is_empty()
    {
        return StateConfig::Sqlite(absolute(path));
    }
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        problems.add(
            "state.url",
            format!(
                "{:?} is not supported; use sqlite://<file>, e.g. \"sqlite://.cdcflow/shop.db\", \
                 or postgres://user@host:port/database",
                crate::tls::redact_url(url)
            ),
        );
        return fallback();
    }
    let (url, tls) = match Tls::from_url(url, false) {
        Ok(parsed) => parsed,
        Err(e) => {
            problems.add("state.url", e);
            return fallback();
        }
    };
    if let Err(e) = url.parse::<tokio_postgres::Config>() {
        problems.add("state.url", format!("not a PostgreSQL URL: {e}"));
        return fallback();
    }
    let password_env = file.state.password_env.clone();
    StateConfig::Postgres {
        url,
        tls,
        password_env: password_env.unwrap_or_else(|| "PGPASSWORD".into()),
    }
}

fn validate_metadata(meta: &MetadataColumns, problems: &mut Problems) {
    let mut seen = HashSet::new();
    for (key, name) in meta.named() {
        if name.is_empty() {
            problems.add(format!("metadata_columns.{key}"), "must not be empty");
        } else if !seen.insert(name.to_ascii_lowercase()) {
            problems.add(
                format!("metadata_columns.{key}"),
                format!("{name:?} is used twice"),
            );
        }
    }
}

fn validate_table(
    i: usize,
    table: &TableFile,
    file: &PipelineFile,
    problems: &mut Problems,
) -> Table {
    let at = |field: &str| format!("tables[{i}].{field}");
    for (field, value) in [("schema", &table.schema), ("name", &table.name)] {
        if value.is_empty() || value.contains(['/', '\\']) {
            problems.add(
                at(field),
                format!("{value:?} must be a folder name (non-empty, no slashes)"),
            );
        }
    }
    let target = table.target.clone().unwrap_or_else(|| table.name.clone());
    if !target
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        || target.is_empty()
    {
        problems.add(
            at("target"),
            format!("warehouse table name {target:?} may hold only letters, digits and `_`; set `target`"),
        );
    }
    if table.primary_key.is_empty() {
        problems.add(
            at("primary_key"),
            "must name at least one column, e.g. [\"id\"]",
        );
    }
    let columns = table.columns.as_ref().map(|cols| {
        let mut seen = HashSet::new();
        cols.iter()
            .enumerate()
            .filter_map(|(j, col)| {
                if !seen.insert(col.name.to_ascii_lowercase()) {
                    problems.add(
                        at(&format!("columns[{j}].name")),
                        format!("{:?} is declared twice", col.name),
                    );
                }
                match col.sql_type.parse::<SqlType>() {
                    Ok(sql_type) => Some(super::Column {
                        name: col.name.clone(),
                        sql_type,
                        existing: None,
                    }),
                    Err(msg) => {
                        problems.add(at(&format!("columns[{j}].type")), msg);
                        None
                    }
                }
            })
            .collect::<Vec<_>>()
    });
    match &table.columns {
        Some(cols) => {
            for key in &table.primary_key {
                if !cols.iter().any(|c| &c.name == key) {
                    problems.add(
                        at("primary_key"),
                        format!("{key:?} is not one of the declared columns"),
                    );
                }
            }
            for col in cols {
                let reserved = file
                    .metadata_columns
                    .named()
                    .into_iter()
                    .find(|(_, name)| name.eq_ignore_ascii_case(&col.name));
                if let Some((key, _)) = reserved {
                    problems.add(
                        at("columns"),
                        format!(
                            "source column {:?} collides with a metadata column; rename it with `metadata_columns.{key}`",
                            col.name
                        ),
                    );
                }
            }
        }
        None if file.source.format == Format::Csv || file.source.csv.header => {
            problems.add(
                at("columns"),
                "CSV objects carry no types: declare the columns, e.g. columns = [{ name = \"id\", type = \"bigint\" }]",
            );
        }
        None => {}
    }
    Table {
        schema: table.schema.clone(),
        name: table.name.clone(),
        target,
        primary_key: table.primary_key.clone(),
        columns,
        soft_delete: table.soft_delete,
    }
}

fn validate_warehouse(file: &WarehouseFile, problems: &mut Problems) -> WarehouseConfig {
    match file {
        WarehouseFile::Delta {
            path,
            deletion_vectors,
            region,
            endpoint,
            allow_http,
            profile,
            options,
        } => {
            let location = if path.contains("://") {
                let store = super::SourceFile {
                    url: path.clone(),
                    region: region.clone(),
                    endpoint: endpoint.clone(),
                    allow_http: *allow_http,
                    profile: profile.clone(),
                    options: options.clone(),
                    ..super::SourceFile::for_url("")
                };
                match store_of(&store, "warehouse") {
                    Ok(store) if store.url.scheme() != "file" => {
                        DeltaLocation::Store(Box::new(store))
                    }
                    Ok(store) => DeltaLocation::Dir(store.url.to_file_path().unwrap_or_default()),
                    Err(e) => {
                        problems.add("warehouse.path", e.to_string());
                        DeltaLocation::Dir(PathBuf::new())
                    }
                }
            } else {
                if path.trim().is_empty() {
                    problems.add(
                        "warehouse.path",
                        "must name a directory, e.g. \"warehouse/shop\", or an object-store prefix, e.g. \"s3://bucket/warehouse\"",
                    );
                }
                let settings = [
                    ("region", region.is_some()),
                    ("endpoint", endpoint.is_some()),
                    ("allow_http", allow_http.is_some()),
                    ("profile", profile.is_some()),
                    ("options", !options.is_empty()),
                ];
                for (field, _) in settings.iter().filter(|(_, set)| *set) {
                    problems.add(
                        format!("warehouse.{field}"),
                        "applies to an object-store path (s3://, gs://, az://) only",
                    );
                }
                DeltaLocation::Dir(absolute(path))
            };
            WarehouseConfig::Delta {
                location,
                deletion_vectors: *deletion_vectors,
            }
        }
        WarehouseFile::Bigquery {
            project,
            dataset,
            location,
            credentials,
            endpoint,
            current,
            compact_ratio,
            maximum_bytes_billed,
            upload_chunk_kib,
            json_wide_numbers,
        } => {
            if *upload_chunk_kib == 0 || upload_chunk_kib % 256 != 0 {
                problems.add(
                    "warehouse.upload_chunk_kib",
                    "must be a multiple of 256 (BigQuery uploads in units of 256 KiB), e.g. 16384",
                );
            }
            if !(compact_ratio.is_finite() && *compact_ratio >= 0.0) {
                problems.add(
                    "warehouse.compact_ratio",
                    "must be a number of 0 or more, e.g. 0.1 (0 compacts after every batch)",
                );
            }
            if *maximum_bytes_billed == Some(0) {
                problems.add(
                    "warehouse.maximum_bytes_billed",
                    "must be more than 0 bytes, e.g. 10000000000 (10 GB); leave it out for no limit",
                );
            }
            let id_ok =
                |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if project.is_empty()
                || !project
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:".contains(c))
            {
                problems.add(
                    "warehouse.project",
                    "must be a GCP project id, e.g. \"my-project\"",
                );
            }
            if !id_ok(dataset) {
                problems.add(
                    "warehouse.dataset",
                    "may hold only letters, digits and `_`, e.g. \"cdc\"",
                );
            }
            if let Some(endpoint) = endpoint
                && url::Url::parse(endpoint).is_err()
            {
                problems.add(
                    "warehouse.endpoint",
                    "must be a URL, e.g. \"http://127.0.0.1:19050\"",
                );
            }
            let credentials = credentials.as_deref().map(absolute);
            if let Some(path) = &credentials
                && !path.is_file()
            {
                problems.add(
                    "warehouse.credentials",
                    format!("no service-account key file at {}; leave it out to use application default credentials", path.display()),
                );
            }
            WarehouseConfig::BigQuery(BigQueryConfig {
                project: project.clone(),
                dataset: dataset.clone(),
                location: location.clone(),
                credentials,
                endpoint: endpoint.clone(),
                current: *current,
                compact_ratio: *compact_ratio,
                maximum_bytes_billed: *maximum_bytes_billed,
                upload_chunk_kib: *upload_chunk_kib,
                json_wide_numbers: *json_wide_numbers,
            })
        }
        WarehouseFile::Database {
            url,
            password_env,
            schema,
            mode,
        } => {
            let endpoint = crate::database::Endpoint::parse(url, password_env.as_deref())
                .unwrap_or_else(|e| {
                    problems.add("warehouse.url", e);
                    crate::database::Endpoint {
                        engine: crate::database::Engine::Postgres,
                        url: String::new(),
                        tls: Tls {
                            mode: crate::tls::TlsMode::Disable,
                            root_cert: None,
                        },
                    }
                });
            let schema = match (endpoint.engine, schema) {
                (crate::database::Engine::Postgres, schema) => {
                    schema.clone().unwrap_or_else(|| "public".to_string())
                }
                (crate::database::Engine::MySql, Some(_)) => {
                    problems.add(
                        "warehouse.schema",
                        "applies to PostgreSQL only: a MySQL warehouse's tables are in the URL's database",
                    );
                    String::new()
                }
                (crate::database::Engine::MySql, None) => {
                    endpoint.database().unwrap_or_else(|| {
                        if !endpoint.url.is_empty() {
                            problems.add(
                                "warehouse.url",
                                "name the database: mysql://user@host:3306/<database>",
                            );
                        }
                        String::new()
                    })
                }
            };
            WarehouseConfig::Database(DatabaseConfig {
                endpoint,
                schema,
                mode: *mode,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<Pipeline> {
        PipelineFile::parse(toml, "test.toml")?.validate("test.toml")
    }

    const GOOD: &str = r#"
        name = "shop"
        schedule = "*/15 * * * *"
        [source]
        url = "file://testdata/dms"
        [warehouse]
        kind = "local"
        path = "warehouse/shop"
        [[tables]]
        schema = "public"
        name = "orders"
        primary_key = ["id"]
        columns = [{ name = "id", type = "bigint" }, { name = "amount", type = "decimal(12,2)" }]
    "#;

    #[test]
    fn accepts_a_good_file() {
        let p = check(GOOD).unwrap();
        assert_eq!(p.tables[0].history_name(), "orders_history");
        assert!(p.source.url.as_str().ends_with("/testdata/dms/"));
        assert!(
            matches!(&p.state, StateConfig::Sqlite(path) if path.ends_with(".cdcflow/shop.db"))
        );
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let bad = GOOD
            .replace("*/15 * * * *", "every day")
            .replace("decimal(12,2)", "decimal")
            .replace("[\"id\"]", "[\"idx\"]")
            .replace("name = \"shop\"", "name = \"Shop!\"");
        let err = check(&bad).unwrap_err().to_string();
        for needle in [
            "`name`",
            "`schedule`",
            "`tables[0].columns[1].type`",
            "`tables[0].primary_key`",
        ] {
            assert!(err.contains(needle), "{needle} missing in:\n{err}");
        }
    }

    /// `kind = "delta"` (and its old name `local`) takes a directory or an
    /// object-store prefix; store settings apply to a prefix only, and are
    /// checked as a source's.
    #[test]
    fn a_delta_warehouse_lives_in_a_directory_or_object_storage() {
        let warehouse = |lines: &str| {
            GOOD.replace("kind = \"local\"\n        path = \"warehouse/shop\"", lines)
        };
        let p = check(&warehouse("kind = \"delta\"\npath = \"warehouse/shop\"")).unwrap();
        assert!(matches!(
            &p.warehouse,
            WarehouseConfig::Delta { location: DeltaLocation::Dir(dir), .. } if dir.is_absolute() && dir.ends_with("warehouse/shop")
        ));
        for url in ["s3://lake/cdc", "gs://lake/cdc", "az://lake/cdc"] {
            let p = check(&warehouse(&format!("kind = \"delta\"\npath = \"{url}\""))).unwrap();
            assert!(
                matches!(&p.warehouse, WarehouseConfig::Delta { location: DeltaLocation::Store(s), .. } if s.url.as_str() == url),
                "{url}: {:?}",
                p.warehouse
            );
        }
        let p = check(&warehouse(
            "kind = \"local\"\npath = \"s3://lake/cdc\"\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"",
        ))
        .unwrap();
        let WarehouseConfig::Delta {
            location: DeltaLocation::Store(s),
            ..
        } = &p.warehouse
        else {
            panic!("{:?}", p.warehouse)
        };
        let options: Vec<&str> = s.store_options.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(options, ["aws_region", "aws_endpoint"]);
        let err = check(&warehouse(
            "kind = \"delta\"\npath = \"warehouse/shop\"\nregion = \"eu-west-1\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`warehouse.region`") && err.contains("object-store path"),
            "{err}"
        );
        let err = check(&warehouse(
            "kind = \"delta\"\npath = \"gs://lake/cdc\"\n[warehouse.options]\naws_secret_access_key = \"x\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`warehouse.options.aws_secret_access_key`"),
            "{err}"
        );
        let err = check(&warehouse("kind = \"delta\"\npath = \"ftp://lake/cdc\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`warehouse.path`") && err.contains("ftp"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = check(&GOOD.replace("[source]", "[source]\nformt = \"csv\"")).unwrap_err();
        assert!(err.to_string().contains("unknown field `formt`"), "{err}");
    }

    #[test]
    fn metadata_collisions_name_the_fix() {
        let err = check(&GOOD.replace("name = \"amount\"", "name = \"op\"")).unwrap_err();
        assert!(err.to_string().contains("metadata_columns.op"), "{err}");
    }

    /// `GOOD` reading from `url`, with `extra` lines in `[source]`.
    fn remote(url: &str, extra: &str) -> String {
        GOOD.replace(
            "url = \"file://testdata/dms\"",
            &format!("url = \"{url}\"\n{extra}"),
        )
    }

    #[test]
    fn gcs_and_azure_sources_take_their_own_options() {
        for (url, option) in [
            ("gs://bucket/dms", "google_service_account"),
            ("az://container/dms", "azure_storage_account_name"),
            (
                "abfss://container@account.dfs.core.windows.net/dms",
                "azure_storage_account_key",
            ),
        ] {
            let p = check(&remote(url, &format!("[source.options]\n{option} = \"x\""))).unwrap();
            assert_eq!(p.source.url.as_str(), url);
            // Another cloud's option, or an S3-only setting, names the field and the fix.
            let err = check(&remote(url, "[source.options]\naws_access_key_id = \"x\""))
                .unwrap_err()
                .to_string();
            assert!(err.contains("source.options.aws_access_key_id"), "{err}");
            assert!(err.contains("google_service_account"), "{err}");
            let err = check(&remote(url, "region = \"eu-west-1\"")).unwrap_err();
            assert!(
                err.to_string().contains("applies to s3:// sources only"),
                "{err}"
            );
        }
    }

    #[test]
    fn alerts_take_one_webhook_a_known_format_and_a_duration() {
        let with = |alerts: &str| check(&format!("{GOOD}\n[alerts]\n{alerts}"));
        let p = with("webhook_env = \"HOOK\"\nlag = \"30m\"").unwrap();
        assert_eq!(
            p.alerts,
            Some(Alerts {
                webhook: Webhook::Env("HOOK".into()),
                format: AlertFormat::Slack,
                lag: Some(Duration::from_secs(1800)),
            })
        );
        for (alerts, needle) in [
            ("format = \"json\"", "`alerts`: give the webhook"),
            (
                "webhook = \"http://h\"\nwebhook_env = \"H\"",
                "exactly one of",
            ),
            ("webhook = \"ftp://h\"", "`alerts.webhook`"),
            (
                "webhook = \"http://h\"\nformat = \"teams\"",
                "`alerts.format`",
            ),
            ("webhook = \"http://h\"\nlag = \"soon\"", "`alerts.lag`"),
        ] {
            let err = with(alerts).unwrap_err().to_string();
            assert!(err.contains(needle), "{alerts}: {err}");
        }
    }
}
