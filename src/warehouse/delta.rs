//! The embedded warehouse: one Delta Lake table per warehouse table in a
//! directory, readable by any Delta reader (DuckDB, Polars, Spark).
//!
//! Idempotency: every commit carries the Delta application transaction
//! `cdcflow:<pipeline>:<table>` with version = batch number, in the same
//! atomic commit as the data. Before applying a step the table's recorded
//! version is read; a step already recorded is not applied again.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;

use super::{Apply, LoadOutcome, LoadRequest, Warehouse};
use crate::config::{Column, SqlType, Table};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::merge::{Merger, sql};

/// Delta tables under one directory.
pub struct DeltaWarehouse {
    root: PathBuf,
    pipeline: String,
}

impl DeltaWarehouse {
    /// A warehouse at `root` for `pipeline` (names the transaction app ids).
    pub fn new(root: PathBuf, pipeline: &str) -> Self {
        DeltaWarehouse {
            root,
            pipeline: pipeline.to_string(),
        }
    }

    async fn open(&self, name: &str) -> Result<DeltaTable> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("cannot create the warehouse directory", dir.display(), e))?;
        let url = url::Url::from_directory_path(&dir).map_err(|_| {
            Error::Usage(format!("warehouse path {} must be absolute", dir.display()))
        })?;
        DeltaTable::try_from_url(url)
            .await
            .map_err(|e| Error::warehouse(name, "opening", e))
    }

    /// The Delta application id of a table's commits.
    fn app_id(&self, table: &Table) -> String {
        format!("cdcflow:{}:{}", self.pipeline, table.target)
    }

    /// The batch number recorded in `table` for `app`, or 0.
    async fn recorded(&self, table: &DeltaTable, name: &str, app: &str) -> Result<i64> {
        if table.version().is_none() {
            return Ok(0);
        }
        let snapshot = table
            .snapshot()
            .map_err(|e| Error::warehouse(name, "reading the snapshot", e))?;
        Ok(snapshot
            .transaction_version(table.log_store().as_ref(), app)
            .await
            .map_err(|e| Error::warehouse(name, "reading the transaction version", e))?
            .unwrap_or(0))
    }

    fn commit(app: &str, number: i64) -> CommitProperties {
        CommitProperties::default().with_application_transaction(Transaction::new(app, number))
    }

    async fn load_history(&self, req: &LoadRequest<'_>, app: &str) -> Result<bool> {
        let name = req.table.history_name();
        let table = self.open(&name).await?;
        if self.recorded(&table, &name, app).await? >= req.batch.number {
            return Ok(false);
        }
        let table_exists = table.version().is_some();
        let mut batches = req.history.batches.clone();
        if batches.is_empty() {
            batches.push(arrow::array::RecordBatch::new_empty(
                req.merger.history_schema(),
            ));
        }
        let mut write = table
            .write(batches)
            .with_save_mode(SaveMode::Append)
            .with_commit_properties(Self::commit(app, req.batch.number));
        if req.apply == Apply::Replace && table_exists {
            let keys: Vec<String> = req
                .batch
                .objects
                .iter()
                .map(|o| sql::literal(&o.key))
                .collect();
            let predicate = format!(
                "{} IN ({})",
                sql::ident(&req.merger.meta.source_file),
                keys.join(", ")
            );
            write = write
                .with_save_mode(SaveMode::Overwrite)
                .with_replace_where(predicate);
        }
        write.await.map_err(|e| {
            Error::warehouse(&name, format!("writing batch {}", req.batch.number), e)
        })?;
        Ok(true)
    }

    async fn load_current(&self, req: &LoadRequest<'_>, app: &str) -> Result<bool> {
        let name = req.table.target.clone();
        let mut table = self.open(&name).await?;
        if self.recorded(&table, &name, app).await? >= req.batch.number {
            return Ok(false);
        }
        if table.version().is_none() {
            table = table
                .write(vec![arrow::array::RecordBatch::new_empty(
                    req.merger.current_schema(),
                )])
                .with_save_mode(SaveMode::Append)
                .await
                .map_err(|e| Error::warehouse(&name, "creating the table", e))?;
        }
        if req.apply == Apply::Replace {
            return self
                .rebuild_current(table, &name, req, app)
                .await
                .map(|_| true);
        }
        let ctx = SessionContext::new();
        let batch_rows = MemTable::try_new(
            req.merger.history_schema(),
            vec![req.history.batches.clone()],
        )
        .map_err(|e| Error::query("registering the batch", e))?;
        ctx.register_table("batch", Arc::new(batch_rows))
            .map_err(|e| Error::query("registering the batch", e))?;
        let changes = if req.apply == Apply::Late {
            self.register_history(&ctx, req).await?;
            let df = req.merger.late_changes(&ctx, "history", "batch").await?;
            ctx.register_table("changes", df.into_view())
                .map_err(|e| Error::query("registering late changes", e))?;
            "changes"
        } else {
            "batch"
        };
        let latest = req.merger.latest(&ctx, changes).await?;
        self.merge_current(table, &name, req, latest, app).await?;
        Ok(true)
    }

    /// Registers `<t>_history` in `ctx` as `history`.
    async fn register_history(&self, ctx: &SessionContext, req: &LoadRequest<'_>) -> Result<()> {
        let history = self.open(&req.table.history_name()).await?;
        let provider = history
            .table_provider()
            .await
            .map_err(|e| Error::query("reading history", e))?;
        ctx.register_table("history", provider)
            .map_err(|e| Error::query("registering history", e))?;
        Ok(())
    }

    /// Overwrites the current table with the state rebuilt from history.
    async fn rebuild_current(
        &self,
        table: DeltaTable,
        name: &str,
        req: &LoadRequest<'_>,
        app: &str,
    ) -> Result<()> {
        let ctx = SessionContext::new();
        self.register_history(&ctx, req).await?;
        let rows = req
            .merger
            .rebuilt_current(&ctx, "history")
            .await?
            .collect()
            .await
            .map_err(|e| Error::query("current_rebuild.sql", e))?;
        let schema = req.merger.current_schema();
        let mut batches = rows
            .iter()
            .map(|b| conform(b, &schema))
            .collect::<Result<Vec<_>>>()?;
        if batches.is_empty() {
            batches.push(arrow::array::RecordBatch::new_empty(schema));
        }
        table
            .write(batches)
            .with_save_mode(SaveMode::Overwrite)
            .with_commit_properties(Self::commit(app, req.batch.number))
            .await
            .map_err(|e| {
                Error::warehouse(
                    name,
                    format!("rebuilding for batch {}", req.batch.number),
                    e,
                )
            })?;
        Ok(())
    }

    async fn merge_current(
        &self,
        table: DeltaTable,
        name: &str,
        req: &LoadRequest<'_>,
        latest: datafusion::prelude::DataFrame,
        app: &str,
    ) -> Result<()> {
        let m = &req.merger.meta;
        let params = [
            ("key_equal", sql::key_equal("t", "s", &req.merger.key)),
            ("op", sql::ident(&m.op)),
            ("change_seq", sql::ident(&m.change_seq)),
        ];
        let clause = |section: &str| {
            let template = sql::section(sql::CURRENT_MERGE, section);
            let used: Vec<(&str, &str)> = params
                .iter()
                .filter(|(k, _)| template.contains(&format!("{{{k}}}")))
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            sql::render(template, &used)
        };
        let mut assignments: Vec<(String, String)> = req
            .merger
            .columns
            .iter()
            .map(|c| c.name.clone())
            .chain([m.commit_ts.clone(), m.change_seq.clone()])
            .map(|c| (c.clone(), format!("s.{}", sql::ident(&c))))
            .collect();
        if req.merger.soft_delete {
            assignments.push((m.deleted.clone(), clause("deleted_value")));
        }
        let fail = |e| Error::warehouse(name, format!("merging batch {}", req.batch.number), e);
        let mut builder = table
            .merge(latest, clause("on"))
            .with_source_alias("s")
            .with_target_alias("t")
            .with_commit_properties(Self::commit(app, req.batch.number));
        if !req.merger.soft_delete {
            builder = builder
                .when_matched_delete(|d| d.predicate(clause("delete_when")))
                .map_err(fail)?;
        }
        builder = builder
            .when_matched_update(|u| {
                assignments
                    .iter()
                    .fold(u.predicate(clause("update_when")), |u, (c, e)| {
                        u.update(c.as_str(), e.as_str())
                    })
            })
            .map_err(fail)?;
        builder = builder
            .when_not_matched_insert(|i| {
                let i = if req.merger.soft_delete {
                    i
                } else {
                    i.predicate(clause("insert_when"))
                };
                assignments
                    .iter()
                    .fold(i, |i, (c, e)| i.set(c.as_str(), e.as_str()))
            })
            .map_err(fail)?;
        builder.await.map_err(fail)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Warehouse for DeltaWarehouse {
    async fn load(&self, req: LoadRequest<'_>) -> Result<LoadOutcome> {
        let app = self.app_id(req.table);
        let history = self.load_history(&req, &app).await?;
        failpoint::hit("load.between_history_and_current");
        let current = self.load_current(&req, &app).await?;
        Ok(if history || current {
            LoadOutcome::Loaded
        } else {
            LoadOutcome::AlreadyLoaded
        })
    }

    async fn started_batch(&self, table: &Table) -> Result<i64> {
        let app = self.app_id(table);
        let mut started = 0;
        for name in [table.history_name(), table.target.clone()] {
            let delta = self.open(&name).await?;
            started = started.max(self.recorded(&delta, &name, &app).await?);
        }
        Ok(started)
    }

    async fn columns(&self, table: &Table, merger: &Merger) -> Result<Option<Vec<Column>>> {
        let name = table.history_name();
        let delta = self.open(&name).await?;
        if delta.version().is_none() {
            return Ok(None);
        }
        let provider = delta
            .table_provider()
            .await
            .map_err(|e| Error::query("reading history", e))?;
        let m = &merger.meta;
        let added = [
            &m.op,
            &m.commit_ts,
            &m.change_seq,
            &m.source_file,
            &m.ingested_at,
        ];
        let columns = provider
            .schema()
            .fields()
            .iter()
            .filter(|f| !added.contains(&f.name()) && !merger.extra_columns.contains(f.name()))
            .filter_map(|f| {
                SqlType::from_arrow(f.data_type()).map(|t| Column {
                    name: f.name().clone(),
                    sql_type: t,
                })
            })
            .collect();
        Ok(Some(columns))
    }

    async fn register(&self, ctx: &SessionContext, table: &Table, merger: &Merger) -> Result<bool> {
        for name in [table.target.clone(), table.history_name()] {
            let delta = self.open(&name).await?;
            if delta.version().is_none() {
                return Ok(false);
            }
            let provider = delta
                .table_provider()
                .await
                .map_err(|e| Error::query(format!("reading {name}"), e))?;
            ctx.register_table(sql::ident(&name).as_str(), provider)
                .map_err(|e| Error::query(format!("registering {name}"), e))?;
        }
        let view = format!(
            "CREATE VIEW {} AS {}",
            sql::ident(&table.versions_name()),
            merger.versions_sql(&table.history_name())
        );
        ctx.sql(&view)
            .await
            .map_err(|e| Error::query("versions.sql", e))?;
        Ok(true)
    }
}

/// Casts query output (e.g. string views) to the table's schema.
fn conform(
    batch: &arrow::array::RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
) -> Result<arrow::array::RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| arrow::compute::cast(column, field.data_type()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::query("current_rebuild.sql", e.into()))?;
    arrow::array::RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::query("current_rebuild.sql", e.into()))
}
