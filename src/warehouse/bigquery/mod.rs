//! The BigQuery warehouse: `<t>_history` (partitioned by DATE(commit_ts),
//! clustered by the key), `<t>` (clustered by the key) and the
//! `<t>_versions` view in one dataset, created on demand.
//!
//! Per batch: the history rows are written to a local Parquet file, loaded
//! into a staging table by one load job, merged into history by one query
//! job and into current state by another; then the staging table is dropped.
//!
//! Idempotency: both MERGE jobs have ids made from the pipeline, table,
//! batch number and batch id (`cdcflow_<pipeline>_<table>_<n>_<id>_history`).
//! A step whose job already succeeded is not run again; and each MERGE is
//! idempotent by itself (history replaces the rows of the batch's objects;
//! current applies a change only over an older `change_seq`), so a replay
//! after a crash between any two steps changes nothing.

mod api;
mod types;

use arrow::array::RecordBatch;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::StreamExt;
use gcp_bigquery_client::model::clustering::Clustering;
use gcp_bigquery_client::model::query_parameter::QueryParameter;
use gcp_bigquery_client::model::table::Table as BqTable;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_schema::TableSchema;
use gcp_bigquery_client::model::time_partitioning::TimePartitioning;
use tokio::sync::OnceCell;

use super::{Apply, LoadRequest, Queries, SqlEngine, Warehouse};
use crate::config::{BigQueryConfig, Column, CurrentMode, JsonWideNumbers, SqlType, Table};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::merge::Merger;
use crate::merge::sql::{self, Dialect};
use crate::state::{Batch, BatchMode, BatchStats};
use api::{Api, Billed};

const BQ: Dialect = Dialect::BigQuery;
/// BigQuery clusters by at most four columns.
const MAX_CLUSTER_COLUMNS: usize = 4;

/// Tables in one BigQuery dataset.
pub struct BigQueryWarehouse {
    config: BigQueryConfig,
    pipeline: String,
    api: OnceCell<Api>,
}

/// A batch's history rows, staged in a local Parquet file.
struct Staged {
    file: tempfile::NamedTempFile,
    stats: BatchStats,
    order: crate::merge::BatchOrder,
    /// First and last commit day (`YYYY-MM-DD`), when the batch has rows.
    days: Option<(String, String)>,
}

impl BigQueryWarehouse {
    /// A warehouse in the configured dataset; connects at first use.
    pub fn new(config: BigQueryConfig, pipeline: &str) -> Self {
        BigQueryWarehouse {
            config,
            pipeline: pipeline.to_string(),
            api: OnceCell::new(),
        }
    }

    async fn api(&self) -> Result<&Api> {
        self.api
            .get_or_try_init(|| async {
                let mut api = Api::connect(&self.config, &self.pipeline).await?;
                api.check_dataset(self.config.location.as_deref()).await?;
                Ok(api)
            })
            .await
    }

    /// The id of a step's job for a batch: deterministic, so a retried step
    /// is recognized. Job ids are project-wide and kept six months, so the
    /// id names the destination dataset and the state store too: the same
    /// pipeline loading another dataset of the project (dev and prod), or a
    /// new state store, never takes another's job for its own.
    fn job_id(&self, table: &Table, batch: &Batch, store: &str, step: &str) -> String {
        use sha2::{Digest, Sha256};
        let scope = Sha256::digest(
            format!("{}\0{}\0{store}", self.config.project, self.config.dataset).as_bytes(),
        );
        let raw = format!(
            "cdcflow_{}_{}_{}_{}_{}_{step}",
            self.pipeline,
            table.target,
            batch.number,
            batch.id,
            hex::encode(&scope[..6])
        );
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// A step's job: its id (see [`BigQueryWarehouse::job_id`]) and labels
    /// naming the table, state store, batch and step (beside the pipeline
    /// and dataset every job names), so `INFORMATION_SCHEMA.JOBS` and the
    /// console find a batch's jobs by label; and the fencing token of the
    /// lease it ran under, to tell a stale worker's jobs.
    fn job(&self, req: &LoadRequest<'_>, step: &str) -> api::JobName {
        let (table, batch) = (req.table, req.batch);
        let number = batch.number.to_string();
        let token = req.lease_token.map(|t| t.to_string());
        let mut pairs = vec![
            ("cdcflow_table", table.target.as_str()),
            ("cdcflow_store", req.store),
            ("cdcflow_batch", number.as_str()),
            ("cdcflow_step", step),
        ];
        if let Some(token) = &token {
            pairs.push(("cdcflow_lease_token", token));
        }
        let labels = api::labels(pairs);
        api::JobName {
            id: self.job_id(table, batch, req.store, step),
            labels,
        }
    }

    fn stage_name(table: &Table, batch: &Batch) -> String {
        format!("{}__cdcflow_stage_{}", table.target, batch.number)
    }

    /// Writes the batch's history rows to a Parquet file and reads its figures.
    async fn stage_locally(&self, req: &LoadRequest<'_>) -> Result<Staged> {
        let mut stream = req.rows.take().ok_or_else(|| {
            Error::Usage(format!(
                "the rows of batch {} were already read",
                req.batch.number
            ))
        })?;
        let file = tempfile::Builder::new()
            .prefix("cdcflow-stage-")
            .suffix(".parquet")
            .tempfile()
            .map_err(|e| {
                Error::io(
                    "creating the staging file",
                    std::env::temp_dir().display(),
                    e,
                )
            })?;
        let path = file.path().to_path_buf();
        let writer_file = file
            .reopen()
            .map_err(|e| Error::io("opening the staging file", path.display(), e))?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let parquet_error = |e: parquet::errors::ParquetError| {
            Error::io(
                "writing the staging file",
                path.display(),
                std::io::Error::other(e),
            )
        };
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            writer_file,
            req.merger.history_schema(),
            Some(props),
        )
        .map_err(parquet_error)?;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| Error::query("producing the batch's rows", e))?;
            writer.write(&batch).map_err(parquet_error)?;
        }
        writer.close().map_err(parquet_error)?;

        let ctx = SessionContext::new();
        ctx.register_parquet(
            "stage",
            path.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        )
        .await
        .map_err(|e| Error::query("reading the staging file", e))?;
        let (stats, order) = req.merger.batch_stats(&ctx, "stage").await?;
        let days_sql = sql::render(
            sql::BQ_STAGE_DAYS,
            &[
                ("commit_ts", &sql::ident(&req.merger.meta.commit_ts)),
                ("rows", "stage"),
            ],
        );
        let fail = |e| Error::query("stage_days.sql", e);
        let rows = ctx
            .sql(&days_sql)
            .await
            .map_err(fail)?
            .collect()
            .await
            .map_err(fail)?;
        let days = rows.first().filter(|b| b.num_rows() == 1).and_then(|b| {
            use arrow::array::{Array, AsArray};
            let text = |i: usize| {
                let column =
                    arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).ok()?;
                let column = column.as_string::<i32>();
                column.is_valid(0).then(|| column.value(0).to_string())
            };
            Some((text(0)?, text(1)?))
        });
        Ok(Staged {
            file,
            stats,
            order,
            days,
        })
    }

    /// Creates the history and current tables and the versions view when
    /// missing; adds columns the batch has and the tables lack.
    /// The current table's new columns that come with a value for the rows
    /// stored before them ([`Column::existing`]): the ones it lacks, or all
    /// of them when an earlier try of this batch started filling them.
    /// [`BigQueryWarehouse::fill_columns`] adds and fills them in one job.
    async fn columns_to_fill<'m>(
        &self,
        api: &Api,
        req: &LoadRequest<'m>,
        mode: CurrentMode,
    ) -> Result<Vec<&'m Column>> {
        let with_value = req.merger.columns.iter().filter(|c| c.existing.is_some());
        if with_value.clone().next().is_none() {
            return Ok(Vec::new());
        }
        // A table made now has every column, and no row to fill.
        let Some(current) = api.table(&current_table(req.table, mode)).await? else {
            return Ok(Vec::new());
        };
        let fill = self.job(req, "fill");
        let started = api.job(&fill.id).await?.is_some();
        let have = current.schema.fields.unwrap_or_default();
        Ok(with_value
            .filter(|c| started || !have.iter().any(|h| h.name.eq_ignore_ascii_case(&c.name)))
            .collect())
    }

    /// Adds `columns` to the current-state tables with their value in every
    /// row (see `sql/bigquery/fill_columns.sql`), as the batch's `fill` job.
    /// A log's rows of this batch's objects (appended by an earlier try)
    /// keep the values they came with.
    async fn fill_columns(
        &self,
        api: &Api,
        req: &LoadRequest<'_>,
        columns: &[&Column],
        mode: CurrentMode,
    ) -> Result<Billed> {
        let schema = types::table_schema(
            &req.merger.current_schema(),
            req.merger.columns.as_slice(),
            false,
        );
        let type_of = |name: &str| {
            schema
                .fields
                .iter()
                .flatten()
                .find(|f| f.name == name)
                .map(|f| types::type_name(&f.r#type))
                .expect("a merger column is a current column")
        };
        let mut add = Vec::new();
        let mut set = Vec::new();
        for c in columns {
            let (column, ty) = (BQ.ident(&c.name), type_of(&c.name));
            let value = BQ.literal(c.existing.as_deref().unwrap_or_default());
            add.push(format!("ADD COLUMN IF NOT EXISTS {column} {ty}"));
            set.push(format!("{column} = CAST({value} AS {ty})"));
        }
        let (add, set) = (add.join(", "), set.join(", "));
        let fill = |table: &str, rows: &str| {
            sql::render(
                sql::BQ_FILL_COLUMNS,
                &[
                    ("current", &api.path(table)),
                    ("add", &add),
                    ("set", &set),
                    ("rows", rows),
                ],
            )
        };
        let sql = match mode {
            CurrentMode::Merge => fill(&req.table.target, "TRUE"),
            CurrentMode::Log => {
                let objects = req
                    .batch
                    .objects
                    .iter()
                    .map(|o| BQ.literal(&o.key))
                    .collect::<Vec<_>>()
                    .join(", ");
                let source_file = BQ.ident(&req.merger.meta.source_file);
                format!(
                    "{};\n{}",
                    fill(&base_name(req.table), "TRUE"),
                    fill(
                        &log_name(req.table),
                        &format!("{source_file} NOT IN ({objects})")
                    )
                )
            }
        };
        tracing::info!(table = %req.table.target, columns = ?columns.iter().map(|c| &c.name).collect::<Vec<_>>(), "adding columns with the value rows stored before them hold");
        let job = self.job(req, "fill");
        api.run_job(&job, &sql, &[]).await
    }

    /// Creates or grows `table`'s tables to `merger`'s columns, but leaves
    /// the columns to `fill` out of the current-state tables (they are added
    /// with their value, see [`BigQueryWarehouse::fill_columns`]).
    async fn prepare_tables(
        &self,
        api: &Api,
        table: &Table,
        merger: &Merger,
        fill: &[&Column],
        mode: CurrentMode,
    ) -> Result<()> {
        let current_fields = types::table_schema(&merger.current_schema(), &merger.columns, false)
            .fields
            .unwrap_or_default();
        let (cluster_by, left_out) =
            types::cluster_fields(&table.primary_key, &current_fields, MAX_CLUSTER_COLUMNS);
        if !left_out.is_empty() {
            tracing::warn!(table = %table.qualified(), columns = ?left_out,
                "key columns of a type BigQuery cannot cluster on (FLOAT64, BYTES, JSON, TIME) are left out of the clustering");
        }
        let cluster = (!cluster_by.is_empty()).then_some(Clustering {
            fields: Some(cluster_by),
        });
        let mut changed = false;
        let mut tables = vec![(table.history_name(), merger.history_schema(), true)];
        match mode {
            CurrentMode::Merge => {
                tables.push((table.target.clone(), merger.current_schema(), false))
            }
            CurrentMode::Log => tables.extend([
                (base_name(table), base_schema(merger), false),
                (log_name(table), merger.history_schema(), false),
            ]),
        }
        for (name, schema, partitioned) in tables {
            let mut wanted = types::table_schema(&schema, &merger.columns, false);
            if !partitioned {
                let fields = wanted.fields.take().unwrap_or_default();
                wanted.fields = Some(
                    fields
                        .into_iter()
                        .filter(|f| !fill.iter().any(|c| c.name == f.name))
                        .collect(),
                );
            }
            match api.table(&name).await? {
                None => {
                    let commit_ts = merger.meta.commit_ts.clone();
                    api.create_table(&name, |mut t| {
                        t.schema = wanted.clone();
                        t.clustering = cluster.clone();
                        if partitioned {
                            t.time_partitioning =
                                Some(TimePartitioning::per_day().field(&commit_ts));
                        }
                        t
                    })
                    .await?;
                    changed = true;
                }
                Some(existing) => {
                    let have = existing.schema.fields.unwrap_or_default();
                    if let Some(fields) = evolve(&name, &have, &wanted)? {
                        let added = &fields[have.len()..];
                        tracing::info!(table = %name, columns = ?added.iter().map(|f| &f.name).collect::<Vec<_>>(), "adding new columns");
                        // The patch sets the schema with the columns' declared types;
                        // the DDL (a no-op where the patch already added them) is
                        // what bqemulator needs to add them to its storage too.
                        api.set_schema(&name, TableSchema::new(fields.clone()))
                            .await?;
                        let ddl = added
                            .iter()
                            .map(|f| {
                                format!(
                                    "ADD COLUMN IF NOT EXISTS {} {}",
                                    BQ.ident(&f.name),
                                    types::type_name(&f.r#type)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ");
                        api.query(&format!("ALTER TABLE {} {ddl}", api.path(&name)))
                            .await?;
                        changed = true;
                    }
                }
            }
        }
        let versions = table.versions_name();
        if changed || api.table(&versions).await?.is_none() {
            let view = format!(
                "CREATE OR REPLACE VIEW {} AS {}",
                api.path(&versions),
                merger.versions_sql(&api.path(&table.history_name()), BQ)
            );
            api.query(&view).await?;
        }
        Ok(())
    }

    /// `(SELECT … FROM stage)`: the staged rows with JSON columns parsed
    /// (numbers BigQuery cannot hold exactly as `json_wide_numbers` says).
    fn stage_source(&self, api: &Api, stage: &str, merger: &Merger) -> String {
        let mode = match self.config.json_wide_numbers {
            JsonWideNumbers::Exact => "",
            JsonWideNumbers::Round => ", wide_number_mode => 'round'",
        };
        let json: Vec<String> = merger
            .columns
            .iter()
            .filter(|c| c.sql_type == SqlType::Json)
            .map(|c| format!("PARSE_JSON({0}{mode}) AS {0}", BQ.ident(&c.name)))
            .collect();
        if json.is_empty() {
            api.path(stage)
        } else {
            format!(
                "(SELECT * REPLACE ({}) FROM {})",
                json.join(", "),
                api.path(stage)
            )
        }
    }

    /// The history MERGE of the batch and its query parameters.
    fn history_merge_sql(
        &self,
        api: &Api,
        req: &LoadRequest<'_>,
        stage: &str,
        staged: &Staged,
    ) -> (String, Vec<QueryParameter>) {
        let m = &req.merger.meta;
        let names = history_columns(req.merger);
        let prune = match &staged.days {
            Some((first, last)) => prune_days(&BQ.ident(&m.commit_ts), first, last),
            None => "TRUE".to_string(),
        };
        let values = names
            .iter()
            .map(|n| format!("s.{}", BQ.ident(n)))
            .collect::<Vec<_>>()
            .join(", ");
        let history = api.path(&req.table.history_name());
        let stage = self.stage_source(api, stage, req.merger);
        let (source_file, columns) = (BQ.ident(&m.source_file), BQ.list(&names));
        let mut params = vec![
            ("history", history.as_str()),
            ("stage", stage.as_str()),
            ("source_file", source_file.as_str()),
            ("columns", columns.as_str()),
            ("values", values.as_str()),
        ];
        let change_seq = BQ.ident(&m.change_seq);
        let section = match req.batch.mode {
            BatchMode::Append => {
                params.extend([
                    ("change_seq", change_seq.as_str()),
                    ("prune", prune.as_str()),
                ]);
                "append"
            }
            BatchMode::Replace => "replace",
        };
        // Only a backfill names its objects (their old rows are replaced).
        let values = match req.batch.mode {
            BatchMode::Replace => vec![api::strings_param(
                "objects",
                req.batch.objects.iter().map(|o| o.key.as_str()),
            )],
            BatchMode::Append => Vec::new(),
        };
        (
            sql::render(sql::section(sql::BQ_HISTORY_MERGE, section), &params),
            values,
        )
    }

    /// `current = "merge"`: the changes a batch applied as `apply` MERGEs
    /// into the current table: the staged rows, their keys' whole history
    /// (late), or all of history (backfill).
    fn merge_changes(&self, api: &Api, req: &LoadRequest<'_>, stage: &str, apply: Apply) -> String {
        let merger = req.merger;
        let stage_source = self.stage_source(api, stage, merger);
        let history = api.path(&req.table.history_name());
        match apply {
            Apply::InOrder => stage_source,
            Apply::Late => sql::render(
                sql::section(sql::BQ_CURRENT_MERGE, "late_changes"),
                &[
                    ("history", &history),
                    ("key", &BQ.list(&merger.key)),
                    ("stage", &stage_source),
                    ("key_equal", &BQ.key_equal("h", "b", &merger.key)),
                ],
            ),
            Apply::Replace => history,
        }
    }

    /// The MERGE of `changes` (rows in the history schema) into the
    /// current-state table `target` and its query parameters. With
    /// `tombstones`, a deleted key stays, flagged in the `deleted` column
    /// (soft delete, and always in a log's base).
    fn current_merge_sql(
        api: &Api,
        merger: &Merger,
        target: &str,
        changes: &str,
        apply: Apply,
        tombstones: bool,
        truncated: Option<&str>,
    ) -> (String, Vec<QueryParameter>) {
        let m = &merger.meta;
        let newer = match apply {
            Apply::Replace => "TRUE".to_string(),
            _ => format!("s.{0} > t.{0}", BQ.ident(&m.change_seq)),
        };
        let mut targets: Vec<(String, String)> = merger
            .columns
            .iter()
            .map(|c| c.name.clone())
            .chain([m.commit_ts.clone(), m.change_seq.clone()])
            .map(|c| (BQ.ident(&c), format!("s.{}", BQ.ident(&c))))
            .collect();
        if tombstones {
            targets.push((BQ.ident(&m.deleted), "s.__gone".to_string()));
        }
        let assignments = targets
            .iter()
            .map(|(c, v)| format!("{c} = {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let columns = targets
            .iter()
            .map(|(c, _)| c.clone())
            .collect::<Vec<_>>()
            .join(", ");
        let values = targets
            .iter()
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
            .join(", ");
        let section = |name: &str| sql::section(sql::BQ_CURRENT_MERGE, name);
        let op = BQ.ident(&m.op);
        let mut clauses = Vec::new();
        if !tombstones {
            clauses.push(sql::render(section("delete"), &[("newer", &newer)]));
        }
        clauses.push(sql::render(
            section("update"),
            &[("newer", &newer), ("assignments", &assignments)],
        ));
        let insert_when = if tombstones { "TRUE" } else { "NOT s.__gone" };
        clauses.push(sql::render(
            section("insert"),
            &[
                ("insert_when", insert_when),
                ("columns", &columns),
                ("values", &values),
            ],
        ));
        let mut values = Vec::new();
        if apply == Apply::Replace {
            clauses.push(section("drop_missing").to_string());
        } else if let Some(seq) = truncated {
            values.push(api::param("truncated", "STRING", seq));
            // A truncate removes the rows the batch does not touch too.
            let action = if tombstones {
                format!("UPDATE SET {} = TRUE", BQ.ident(&m.deleted))
            } else {
                "DELETE".to_string()
            };
            clauses.push(sql::render(
                section("truncate"),
                &[
                    ("change_seq", &BQ.ident(&m.change_seq)),
                    ("action", &action),
                ],
            ));
        }
        let sql = sql::render(
            section("merge"),
            &[
                ("current", &api.path(target)),
                ("changes", changes),
                ("key", &BQ.list(&merger.key)),
                ("change_seq", &BQ.ident(&m.change_seq)),
                ("op", &op),
                ("key_equal", &BQ.key_equal("t", "s", &merger.key)),
                ("clauses", &clauses.join("\n")),
            ],
        );
        (sql, values)
    }

    /// How `table`'s current state is kept: as configured, except that a
    /// `<t>` made as a table (`current = "merge"`, or a version before
    /// `"log"`) stays merged until it is moved aside. With `"log"`, also
    /// `<t>` as read to decide it (`None`: not there yet).
    async fn mode(&self, api: &Api, table: &Table) -> Result<(CurrentMode, Option<BqTable>)> {
        if self.config.current == CurrentMode::Merge {
            return Ok((CurrentMode::Merge, None));
        }
        let target = api.table(&table.target).await?;
        if target
            .as_ref()
            .is_some_and(|t| t.r#type.as_deref() != Some("VIEW"))
        {
            tracing::debug!(table = %table.target, "current state is a table: merged every batch (drop it and run a backfill to switch to current = \"log\")");
            return Ok((CurrentMode::Merge, target));
        }
        Ok((CurrentMode::Log, target))
    }

    /// `current = "log"`: applies the batch. In order or late, its changes
    /// are appended to the log (the view takes each key's latest, so a late
    /// change falls in its place) and the log is compacted when due (never
    /// in a batch that fills new columns: their fill must not meet this
    /// batch's rows in the base). A backfill rebuilds the base from history
    /// and clears the log.
    async fn apply_to_log(
        &self,
        api: &Api,
        req: &LoadRequest<'_>,
        stage: &str,
        apply: Apply,
        may_compact: bool,
    ) -> Result<Billed> {
        let (table, merger) = (req.table, req.merger);
        let (base, log) = (base_name(table), log_name(table));
        let m = &merger.meta;
        let section = |name: &str| sql::section(sql::BQ_CURRENT_LOG, name);
        let op = BQ.ident(&m.op);
        if apply == Apply::Replace {
            let history = api.path(&table.history_name());
            let (rebuild, values) =
                Self::current_merge_sql(api, merger, &base, &history, apply, true, None);
            let mut billed = api
                .run_job(&self.job(req, "current"), &rebuild, &values)
                .await?;
            let clear = sql::render(section("clear"), &[("log", &api.path(&log)), ("op", &op)]);
            billed += api.run_job(&self.job(req, "clear"), &clear, &[]).await?;
            return Ok(billed);
        }
        let names = BQ.list(&history_columns(merger));
        let append = sql::render(
            section("append"),
            &[
                ("log", &api.path(&log)),
                ("columns", &names),
                ("stage", &self.stage_source(api, stage, merger)),
            ],
        );
        let mut billed = api.run_job(&self.job(req, "current"), &append, &[]).await?;
        if !may_compact {
            return Ok(billed);
        }
        let sizes = sql::render(
            section("sizes"),
            &[("log", &api.path(&log)), ("base", &api.path(&base))],
        );
        let (counts, sized) = api.scalars(&sizes).await?;
        billed += sized;
        let count = |i: usize| {
            counts
                .get(i)
                .cloned()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (log_rows, base_rows) = (count(0), count(1));
        if log_rows == 0 || (log_rows as f64) <= self.config.compact_ratio * base_rows as f64 {
            return Ok(billed);
        }
        tracing::info!(table = %table.target, log_rows, base_rows, "compacting the log into the base");
        let seq = BQ.ident(&m.change_seq);
        let truncated = sql::render(
            section("truncated"),
            &[("log", &api.path(&log)), ("op", &op), ("change_seq", &seq)],
        );
        let (truncated, read) = api.scalars(&truncated).await?;
        billed += read;
        let truncated = truncated.into_iter().next().flatten();
        let (compact, values) = Self::current_merge_sql(
            api,
            merger,
            &base,
            &api.path(&log),
            Apply::InOrder,
            true,
            truncated.as_deref(),
        );
        billed += api
            .run_job(&self.job(req, "compact"), &compact, &values)
            .await?;
        failpoint::hit("load.in_compaction");
        let clean = sql::render(
            section("clean"),
            &[
                ("log", &api.path(&log)),
                ("base", &api.path(&base)),
                ("op", &op),
                ("change_seq", &seq),
                ("key_equal", &BQ.key_equal("b", "l", &merger.key)),
            ],
        );
        billed += api.run_job(&self.job(req, "clean"), &clean, &[]).await?;
        Ok(billed)
    }

    /// `current = "log"`: makes `<t>` (`view`, as read when the load began)
    /// the view over base and log with the current columns, unless it
    /// already is.
    async fn ensure_view(
        &self,
        api: &Api,
        table: &Table,
        merger: &Merger,
        view: Option<&BqTable>,
    ) -> Result<()> {
        let m = &merger.meta;
        let names: Vec<String> = merger
            .current_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| !(merger.soft_delete && *n == m.deleted))
            .collect();
        let section = |name: &str| sql::section(sql::BQ_CURRENT_LOG, name);
        let seq = BQ.ident(&m.change_seq);
        let gone = sql::render(section("gone"), &[("change_seq", &seq)]);
        let gone = gone.trim();
        let list = BQ.list(&names);
        let (select, filter) = if merger.soft_delete {
            (
                format!("{list}, {gone} AS {}", BQ.ident(&m.deleted)),
                String::new(),
            )
        } else {
            (list.clone(), format!("WHERE NOT {gone}"))
        };
        let query = sql::render(
            section("view"),
            &[
                ("select", &select),
                ("names", &list),
                ("deleted", &BQ.ident(&m.deleted)),
                ("base", &api.path(&base_name(table))),
                ("log", &api.path(&log_name(table))),
                ("op", &BQ.ident(&m.op)),
                ("key", &BQ.list(&merger.key)),
                ("change_seq", &seq),
                ("filter", &filter),
            ],
        );
        let query = query.trim();
        if view
            .and_then(|t| t.view.as_ref())
            .is_some_and(|v| v.query.trim() == query)
        {
            return Ok(());
        }
        api.query(&format!(
            "CREATE OR REPLACE VIEW {} AS {query}",
            api.path(&table.target)
        ))
        .await
        .map(drop)
    }
}

/// The filter on history rows `h` that limits a MERGE to the partitions of
/// the days `first` to `last` (`YYYY-MM-DD`): a constant range of the
/// partitioning column itself, which BigQuery prunes by (a filter on
/// `DATE(column)` it may not).
fn prune_days(commit_ts: &str, first: &str, last: &str) -> String {
    let next = chrono::NaiveDate::parse_from_str(last, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.succ_opt());
    match next {
        Some(next) => format!(
            "h.{commit_ts} >= TIMESTAMP {} AND h.{commit_ts} < TIMESTAMP {}",
            sql::literal(first),
            sql::literal(&next.format("%Y-%m-%d").to_string())
        ),
        None => "TRUE".to_string(),
    }
}

/// `current = "log"`: the table holding each key's latest change as of the last compaction.
fn base_name(table: &Table) -> String {
    format!("{}__base", table.target)
}

/// `current = "log"`: the table of changes loaded since the last compaction.
fn log_name(table: &Table) -> String {
    format!("{}__log", table.target)
}

/// The columns of history (and of a log), in order.
fn history_columns(merger: &Merger) -> Vec<String> {
    merger
        .history_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// The table whose columns are the current state's: `<t>`, or its base.
fn current_table(table: &Table, mode: CurrentMode) -> String {
    match mode {
        CurrentMode::Merge => table.target.clone(),
        CurrentMode::Log => base_name(table),
    }
}

/// A log's base: the current-state columns with the `deleted` flag, which
/// marks tombstones whether or not the table soft-deletes.
fn base_schema(merger: &Merger) -> arrow::datatypes::SchemaRef {
    let current = merger.current_schema();
    if merger.soft_delete {
        return current;
    }
    let mut fields = current.fields().to_vec();
    fields.push(std::sync::Arc::new(arrow::datatypes::Field::new(
        &merger.meta.deleted,
        arrow::datatypes::DataType::Boolean,
        false,
    )));
    std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
}

/// The fields of `name` after adding the ones `wanted` has and `have`
/// lacks (nullable), or `None` when nothing is missing. A column whose type
/// changed is an error: BigQuery cannot change it in place.
fn evolve(
    name: &str,
    have: &[TableFieldSchema],
    wanted: &TableSchema,
) -> Result<Option<Vec<TableFieldSchema>>> {
    let mut fields = have.to_vec();
    for field in wanted.fields.iter().flatten() {
        match have
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(&field.name))
        {
            Some(h) => {
                if let (Some(old), Some(new)) =
                    (types::declared_type(h), types::declared_type(field))
                    && old != new
                {
                    return Err(Error::Usage(format!(
                        "BigQuery table {name}: column {} is {old} there but {new} in this batch; \
                         BigQuery cannot change a column's type. Declare the column as {old} in the \
                         pipeline file, or move the table aside and reload it",
                        field.name,
                    )));
                }
            }
            None => {
                let mut added = field.clone();
                added.mode = Some("NULLABLE".into());
                fields.push(added);
            }
        }
    }
    Ok((fields.len() > have.len()).then_some(fields))
}

#[async_trait::async_trait]
impl Warehouse for BigQueryWarehouse {
    async fn load(&self, req: LoadRequest<'_>) -> Result<BatchStats> {
        let api = self.api().await?;
        let (mode, target) = self.mode(api, req.table).await?;
        let fill = self.columns_to_fill(api, &req, mode).await?;
        self.prepare_tables(api, req.table, req.merger, &fill, mode)
            .await?;
        let staged = self.stage_locally(&req).await?;
        let stage = Self::stage_name(req.table, req.batch);
        let history_job = self.job(&req, "history");
        let current_job = self.job(&req, "current");
        let history_done = api.job_succeeded(&history_job.id).await?;
        let current_done = api.job_succeeded(&current_job.id).await?;
        let mut billed = Billed::default();
        if !current_done && (!history_done || api.table(&stage).await?.is_none()) {
            let schema =
                types::table_schema(&req.merger.history_schema(), &req.merger.columns, true);
            let load_job = self.job(&req, "load");
            billed += api
                .load_parquet(&load_job, &stage, schema, staged.file.path())
                .await?;
        }
        let (history_merge, values) = self.history_merge_sql(api, &req, &stage, &staged);
        billed += api.run_job(&history_job, &history_merge, &values).await?;
        failpoint::hit("load.between_history_and_current");
        if !fill.is_empty() {
            billed += self.fill_columns(api, &req, &fill, mode).await?;
        }
        let apply = Apply::choose(
            req.batch.mode,
            staged.order.min_seq.as_deref(),
            req.loaded_max.as_deref(),
        );
        match mode {
            CurrentMode::Merge => {
                if apply == Apply::Late {
                    tracing::warn!(table = %req.table.qualified(), batch = req.batch.number, "batch holds objects older than loaded ones; recomputing current state of its keys from history");
                }
                let changes = self.merge_changes(api, &req, &stage, apply);
                let (current_merge, values) = Self::current_merge_sql(
                    api,
                    req.merger,
                    &req.table.target,
                    &changes,
                    apply,
                    req.merger.soft_delete,
                    staged.order.truncated.as_deref(),
                );
                billed += api.run_job(&current_job, &current_merge, &values).await?;
            }
            CurrentMode::Log => {
                billed += self
                    .apply_to_log(api, &req, &stage, apply, fill.is_empty())
                    .await?;
                self.ensure_view(api, req.table, req.merger, target.as_ref())
                    .await?;
            }
        }
        api.drop_table(&stage).await?;
        tracing::info!(table = %req.table.target, batch = req.batch.number, bytes_processed = billed.processed, bytes_billed = billed.billed, "BigQuery jobs of the batch");
        Ok(BatchStats {
            bytes_processed: Some(billed.processed),
            bytes_billed: Some(billed.billed),
            ..staged.stats
        })
    }

    async fn batch_started(&self, table: &Table, batch: &Batch, store: &str) -> Result<bool> {
        let api = self.api().await?;
        api.job_succeeded(&self.job_id(table, batch, store, "history"))
            .await
    }

    async fn columns(&self, table: &Table, merger: &Merger) -> Result<Option<Vec<Column>>> {
        let api = self.api().await?;
        let Some(history) = api.table(&table.history_name()).await? else {
            return Ok(None);
        };
        // A column history has and current state lacks (a crash in the batch
        // that added it, before its fill job) is new again: the batch that
        // finishes adds it to current state with its value.
        let current = match self.mode(api, table).await? {
            (CurrentMode::Merge, Some(target)) => Some(target),
            (mode, _) => api.table(&current_table(table, mode)).await?,
        };
        let current = match current {
            Some(current) => current.schema.fields.unwrap_or_default(),
            None => history.schema.fields.clone().unwrap_or_default(),
        };
        Ok(Some(
            history
                .schema
                .fields
                .unwrap_or_default()
                .iter()
                .filter(|f| merger.is_data_column(&f.name))
                .filter(|f| current.iter().any(|c| c.name.eq_ignore_ascii_case(&f.name)))
                .filter_map(|f| {
                    types::declared_type(f).map(|t| Column {
                        name: f.name.clone(),
                        sql_type: t,
                        existing: None,
                    })
                })
                .collect(),
        ))
    }

    fn queries(&self) -> Queries<'_> {
        Queries::Engine(self)
    }

    fn refuses_column(&self, name: &str) -> Option<String> {
        let mut chars = name.chars();
        let fits = name.len() <= 300
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        let reserved = [
            "_table_",
            "_file_",
            "_partition",
            "_row_timestamp",
            "__root__",
            "_colidentifier",
        ]
        .iter()
        .any(|p| name.to_ascii_lowercase().starts_with(p));
        (!fits || reserved).then(|| {
            "a BigQuery column name is letters, digits and underscores, starts with a letter or \
             underscore, is at most 300 characters, and does not start with _TABLE_, _FILE_, \
             _PARTITION, _ROW_TIMESTAMP, __ROOT__ or _COLIDENTIFIER"
                .to_string()
        })
    }
}

#[async_trait::async_trait]
impl SqlEngine for BigQueryWarehouse {
    async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let api = self.api().await?;
        let (schema, rows) = api.query(sql).await?;
        Ok(vec![types::to_arrow(&schema, &rows)?])
    }

    fn dialect(&self) -> Dialect {
        BQ
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetadataColumns;

    fn config(json_wide_numbers: JsonWideNumbers) -> BigQueryConfig {
        BigQueryConfig {
            project: "p".into(),
            dataset: "d".into(),
            location: None,
            credentials: None,
            endpoint: Some("http://127.0.0.1:9".into()),
            current: CurrentMode::Log,
            compact_ratio: 0.1,
            maximum_bytes_billed: None,
            upload_chunk_kib: 256,
            json_wide_numbers,
        }
    }

    /// A JSON column is parsed as BigQuery's default does (a number it
    /// cannot hold exactly fails the job) unless rounding was asked for.
    #[tokio::test]
    async fn json_columns_round_wide_numbers_only_when_asked() {
        let merger = Merger {
            key: vec!["id".into()],
            columns: vec![Column {
                name: "doc".into(),
                sql_type: SqlType::Json,
                existing: None,
            }],
            extra_columns: Vec::new(),
            sequence_column: None,
            meta: MetadataColumns::default(),
            soft_delete: false,
        };
        for (mode, expected) in [
            (JsonWideNumbers::Exact, "PARSE_JSON(`doc`) AS `doc`"),
            (
                JsonWideNumbers::Round,
                "PARSE_JSON(`doc`, wide_number_mode => 'round') AS `doc`",
            ),
        ] {
            let warehouse = BigQueryWarehouse::new(config(mode), "test");
            let api = Api::connect(&config(mode), "test").await.unwrap();
            let sql = warehouse.stage_source(&api, "stage", &merger);
            assert!(sql.contains(expected), "{mode:?}: {sql}");
        }
    }

    /// The history MERGE's filter is a constant range of the partitioning
    /// column from the first day to the day after the last (a month end and
    /// a leap day included).
    #[test]
    fn history_is_pruned_by_a_constant_range_of_days() {
        assert_eq!(
            prune_days("`commit_ts`", "2024-01-31", "2024-02-29"),
            "h.`commit_ts` >= TIMESTAMP '2024-01-31' AND h.`commit_ts` < TIMESTAMP '2024-03-01'"
        );
        assert_eq!(prune_days("`commit_ts`", "2024-01-31", "not a day"), "TRUE");
    }
}
