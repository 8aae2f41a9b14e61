//! The embedded warehouse: one Delta Lake table per warehouse table in a
//! directory, readable by any Delta reader (DuckDB, Polars, Spark).
//!
//! Idempotency: every commit carries the Delta application transaction
//! `cdcflow:<pipeline>:<table>` with version = batch number, in the same
//! atomic commit as the data. Before applying a step the table's recorded
//! version is read; a step already recorded is not applied again.

mod current;
mod deletion_vectors;
mod files;
mod ledger;
mod log_store;

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::SchemaMode;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use super::{Apply, DataFusionTables, LoadRequest, Queries, Warehouse};
use crate::config::{Column, DeltaLocation, SqlType, Table};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::merge::{BatchOrder, Latest, LatestChanges, Merger, sql};
use crate::state::{Batch, BatchMode, BatchStats};
use current::{cast_to, collect_latest, latest_of, register_latest};

/// A DataFusion session whose memory is bounded by `limit` bytes: sorts
/// spill to the temp dir, every operator gets a fair share of the pool, and
/// an eighth is set aside for merging spilled runs (which cannot spill).
/// Its plans run in a partition per thread ([`crate::threads`]).
fn session(limit: usize) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(limit)))
        .build_arc()
        .expect("a memory-limited runtime");
    let config = SessionConfig::new()
        .with_sort_spill_reservation_bytes(limit / 8)
        .with_target_partitions(crate::threads::count());
    SessionContext::new_with_config_rt(config, runtime)
}

/// The table name of the latest changes per key a batch applies.
const LATEST: &str = "latest_changes";

/// How cdcflow writes a Delta table's Parquet files: Snappy (Delta's
/// default), and dictionary encoding only for text columns other than
/// `change_seq`. Dictionary-encoding numbers, timestamps and the unique
/// `change_seq` cost the writer a hash lookup per value for little gain:
/// without it, the 10M-change CSV load of `make bench` took 10.2 s instead of
/// 11.9 s (CPU 17.9 s instead of 20.0 s), for files 4 % larger.
fn writer_properties(schema: &arrow::datatypes::Schema, change_seq: &str) -> WriterProperties {
    use arrow::datatypes::DataType;
    use deltalake::parquet::basic::Compression;
    use deltalake::parquet::schema::types::ColumnPath;
    schema
        .fields()
        .iter()
        .filter(|f| {
            matches!(
                f.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) && f.name() != change_seq
        })
        .fold(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_dictionary_enabled(false),
            |builder, f| {
                builder.set_column_dictionary_enabled(ColumnPath::from(f.name().as_str()), true)
            },
        )
        .build()
}

/// `'key1', 'key2'…`: the objects of the batch, as SQL literals.
fn object_list(req: &LoadRequest<'_>) -> String {
    req.batch
        .objects
        .iter()
        .map(|o| sql::literal(&o.key))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A partition that hands out one stream, once.
struct OneShot {
    schema: arrow::datatypes::SchemaRef,
    stream: std::sync::Mutex<Option<SendableRecordBatchStream>>,
}

impl OneShot {
    fn new(stream: SendableRecordBatchStream) -> Self {
        OneShot {
            schema: stream.schema(),
            stream: std::sync::Mutex::new(Some(stream)),
        }
    }
}

impl std::fmt::Debug for OneShot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneShot")
    }
}

impl PartitionStream for OneShot {
    fn schema(&self) -> &arrow::datatypes::SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        self.stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("the batch's rows are read once")
    }
}

/// Creates `table` with `schema` and no rows, in a commit that records no batch.
async fn create_empty(
    table: DeltaTable,
    name: &str,
    schema: arrow::datatypes::SchemaRef,
) -> Result<DeltaTable> {
    table
        .write(vec![arrow::array::RecordBatch::new_empty(schema)])
        .with_save_mode(SaveMode::Append)
        .await
        .map_err(|e| Error::warehouse(name, "creating the table", e))
}

/// Whether `table` has exactly the columns (names and types, in order) of `schema`.
fn same_columns(table: &DeltaTable, schema: &arrow::datatypes::Schema) -> Result<bool> {
    let state = table
        .snapshot()
        .map_err(|e| Error::warehouse(table.table_url().as_str(), "reading the snapshot", e))?;
    let columns = state.snapshot().arrow_schema();
    Ok(columns.fields().len() == schema.fields().len()
        && columns
            .fields()
            .iter()
            .zip(schema.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type()))
}

/// Where a warehouse's Delta tables are.
enum Root {
    /// A local directory.
    Dir(PathBuf),
    /// A prefix in object storage: the bucket's store, and the prefix's URL
    /// (ending in `/`).
    Store {
        store: Arc<dyn object_store::ObjectStore>,
        url: url::Url,
    },
}

/// Delta tables under one directory or object-store prefix.
pub struct DeltaWarehouse {
    root: Root,
    pipeline: String,
    memory_limit: usize,
    /// Bytes of a batch's latest changes held before they are spilled.
    latest_memory: usize,
    deletion_vectors: bool,
}

impl DeltaWarehouse {
    /// A warehouse at `location` for `pipeline` (names the transaction app
    /// ids) whose merges use the memory `batch` allows before spilling
    /// (`memory_limit_mib` for queries, `latest_memory_mib` for the latest
    /// changes), and which applies in-order batches by deletion vectors when
    /// `deletion_vectors` (see the `deletion_vectors` module).
    pub fn new(
        location: &DeltaLocation,
        pipeline: &str,
        batch: &crate::config::BatchFile,
        deletion_vectors: bool,
    ) -> Result<Self> {
        let root = match location {
            DeltaLocation::Dir(dir) => Root::Dir(dir.clone()),
            DeltaLocation::Store(settings) => {
                log_store::register();
                let (store, _) = crate::source::open_store(settings)?;
                let mut url = settings.url.clone();
                if !url.path().ends_with('/') {
                    url.set_path(&format!("{}/", url.path()));
                }
                Root::Store { store, url }
            }
        };
        Ok(DeltaWarehouse {
            root,
            pipeline: pipeline.to_string(),
            memory_limit: batch.memory_limit_mib << 20,
            latest_memory: batch.latest_memory_mib << 20,
            deletion_vectors,
        })
    }

    /// Table `name`, loaded at its latest version (none yet if it has never
    /// been written).
    async fn open(&self, name: &str) -> Result<DeltaTable> {
        let fail = |e| Error::warehouse(name, "opening", e);
        let builder = match &self.root {
            Root::Dir(root) => {
                let dir = root.join(name);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    Error::io("cannot create the warehouse directory", dir.display(), e)
                })?;
                let url = url::Url::from_directory_path(&dir).map_err(|_| {
                    Error::Usage(format!("warehouse path {} must be absolute", dir.display()))
                })?;
                DeltaTableBuilder::from_url(url).map_err(fail)?
            }
            Root::Store { store, url } => {
                let url = url.join(&format!("{name}/")).map_err(|e| {
                    Error::Usage(format!("{name} cannot name a table under {url}: {e}"))
                })?;
                DeltaTableBuilder::from_url(url.clone())
                    .map_err(fail)?
                    .with_storage_backend(store.clone(), url)
            }
        };
        let mut table = builder.build().map_err(fail)?;
        match table.load().await {
            Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(table),
            Err(e) => Err(fail(e)),
        }
    }

    /// A query provider over table `name`, if it has been created.
    async fn provider(
        &self,
        name: &str,
    ) -> Result<Option<Arc<dyn datafusion::catalog::TableProvider>>> {
        let delta = self.open(name).await?;
        if delta.version().is_none() {
            return Ok(None);
        }
        let provider = delta
            .table_provider()
            .await
            .map_err(|e| Error::query(format!("reading {name}"), e))?;
        Ok(Some(provider))
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

    /// A batch's commit: the application transaction `app` = batch number,
    /// and the batch's ledger entry (see the `ledger` module).
    fn commit(app: &str, req: &LoadRequest<'_>) -> CommitProperties {
        CommitProperties::default()
            .with_application_transaction(Transaction::new(app, req.batch.number))
            .with_metadata([ledger::entry(req)])
    }

    /// Writes the batch's history rows (streamed) unless history holds the
    /// batch already. The rows are also collected into their latest change
    /// per key and the batch's figures on the way (returned), so they need
    /// not be read back.
    async fn load_history(
        &self,
        req: &LoadRequest<'_>,
        app: &str,
    ) -> Result<Option<LatestChanges>> {
        let name = req.table.history_name();
        let table = self.open(&name).await?;
        if self.recorded(&table, &name, app).await? >= req.batch.number {
            return Ok(None);
        }
        ledger::check_fence(&table, &name, &self.pipeline, req.lease_token).await?;
        let table_exists = table.version().is_some();
        let stream = req.rows.take().ok_or_else(|| {
            Error::Internal(format!(
                "the rows of batch {} were already read",
                req.batch.number
            ))
        })?;
        let collector = Arc::new(std::sync::Mutex::new(Some(
            LatestChanges::new(req.merger)?.spill_past(self.latest_memory),
        )));
        let stream = collect_latest(stream, collector.clone());
        let properties =
            writer_properties(&req.merger.history_schema(), &req.merger.meta.change_seq);
        let replace = req.batch.mode == BatchMode::Replace && table_exists;
        let table = match table_exists {
            true => table,
            false => create_empty(table, &name, req.merger.history_schema()).await?,
        };
        if !replace && same_columns(&table, &req.merger.history_schema())? {
            // The usual batch: appended by a writer per thread, in one commit.
            files::append(&table, stream, properties, Self::commit(app, req))
                .await
                .map_err(|e| {
                    Error::warehouse(&name, format!("writing batch {}", req.batch.number), e)
                })?;
            let collected = collector.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Ok(collected);
        }
        // A backfill replacing its objects' rows, or a batch with new columns.
        let source = StreamingTable::try_new(
            req.merger.history_schema(),
            vec![Arc::new(OneShot::new(stream))],
        )
        .map_err(|e| Error::query("streaming the batch", e))?;
        let plan = session(self.memory_limit)
            .read_table(Arc::new(source))
            .map_err(|e| Error::query("streaming the batch", e))?
            .into_unoptimized_plan();
        let mut write = table
            .write(Vec::new())
            .with_input_plan(plan)
            .with_save_mode(SaveMode::Append)
            // A column new to the table (schema evolution) is added to it.
            .with_schema_mode(SchemaMode::Merge)
            .with_writer_properties(properties)
            .with_commit_properties(Self::commit(app, req));
        if replace {
            let predicate = format!(
                "{} IN ({})",
                sql::ident(&req.merger.meta.source_file),
                object_list(req)
            );
            write = write
                .with_save_mode(SaveMode::Overwrite)
                .with_replace_where(predicate);
        }
        write.await.map_err(|e| {
            Error::warehouse(&name, format!("writing batch {}", req.batch.number), e)
        })?;
        let collected = collector.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(collected)
    }

    /// Registers `<t>_history` in `ctx` as `history`, and the rows of this
    /// batch (read back from it) as `batch`.
    async fn register_batch(&self, ctx: &SessionContext, req: &LoadRequest<'_>) -> Result<()> {
        let history = self.open(&req.table.history_name()).await?;
        let provider = history
            .table_provider()
            .await
            .map_err(|e| Error::query("reading history", e))?;
        ctx.register_table("history", provider)
            .map_err(|e| Error::query("registering history", e))?;
        // The key range lets Delta skip every file of other batches by its min/max
        // statistics, so reading a batch back costs the batch, not the table.
        let source_file = sql::ident(&req.merger.meta.source_file);
        let keys = req.batch.objects.iter().map(|o| o.key.as_str());
        let (first, last) = (
            keys.clone().min().unwrap_or_default(),
            keys.max().unwrap_or_default(),
        );
        // The objects themselves as a small table: a semi-join, where a long IN
        // list would be planned as a deep OR chain (and the batch is read twice).
        let objects = arrow::array::RecordBatch::try_from_iter([(
            "key",
            std::sync::Arc::new(arrow::array::StringArray::from_iter_values(
                req.batch.objects.iter().map(|o| o.key.as_str()),
            )) as arrow::array::ArrayRef,
        )])
        .map_err(|e| Error::query("listing the batch's objects", e.into()))?;
        ctx.register_batch("batch_objects", objects)
            .map_err(|e| Error::query("listing the batch's objects", e))?;
        let rows = format!(
            "SELECT * FROM history WHERE {source_file} BETWEEN {} AND {} \
             AND {source_file} IN (SELECT key FROM batch_objects)",
            sql::literal(first),
            sql::literal(last),
        );
        let df = ctx
            .sql(&rows)
            .await
            .map_err(|e| Error::query("reading the batch back", e))?;
        ctx.register_table("batch", df.into_view())
            .map_err(|e| Error::query("registering the batch", e))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Warehouse for DeltaWarehouse {
    async fn load(&self, req: LoadRequest<'_>) -> Result<BatchStats> {
        let app = self.app_id(req.table);
        let streamed = self.load_history(&req, &app).await?;
        failpoint::hit("load.between_history_and_current");
        let ctx = session(self.memory_limit);
        let registered = streamed.is_none();
        let collected = match streamed {
            Some(collected) => collected,
            // History held the batch already (a retry): read it back.
            None => {
                self.register_batch(&ctx, &req).await?;
                latest_of(&ctx, "batch", req.merger, self.latest_memory).await?
            }
        };
        let (batch_latest, stats, order) = collected.finish()?;
        let apply = Apply::choose(
            req.batch.mode,
            order.min_seq.as_deref(),
            req.loaded_max.as_deref(),
        );
        if apply != Apply::InOrder && !registered {
            self.register_batch(&ctx, &req).await?;
        }
        let latest = match apply {
            Apply::InOrder => batch_latest,
            // The whole history of its keys decides their current state.
            Apply::Late => {
                drop(batch_latest); // not needed: freed before the scan
                tracing::warn!(table = %req.table.qualified(), batch = req.batch.number, "batch holds objects older than loaded ones; recomputing current state of its keys from history");
                let changes = req.merger.late_changes(&ctx, "history", "batch").await?;
                ctx.register_table("changes", changes.into_view())
                    .map_err(|e| Error::query("registering late changes", e))?;
                let mut collected =
                    latest_of(&ctx, "changes", req.merger, self.latest_memory).await?;
                collected.truncated_at(order.truncated.as_deref());
                collected.finish()?.0
            }
            Apply::Replace => {
                drop(batch_latest); // not needed: freed before the scan
                latest_of(&ctx, "history", req.merger, self.latest_memory)
                    .await?
                    .finish()?
                    .0
            }
        };
        self.load_current(&req, &app, &ctx, latest, apply, &order)
            .await?;
        Ok(stats)
    }

    async fn last_recorded(&self, table: &Table) -> Result<super::Recorded> {
        let name = table.history_name();
        let history = self.open(&name).await?;
        let number = self.recorded(&history, &name, &self.app_id(table)).await?;
        let entry = ledger::find(&history, &name, number).await?;
        Ok(super::Recorded::Batch {
            number,
            id: entry.as_ref().map(|e| e.batch_id.clone()),
            store: entry.map(|e| e.store),
        })
    }

    async fn ledger(
        &self,
        table: &Table,
        merger: &Merger,
    ) -> Result<Option<crate::state::Restored>> {
        let app = self.app_id(table);
        let history_name = table.history_name();
        let history = self.open(&history_name).await?;
        let current = self.open(&table.target).await?;
        let loaded = self.recorded(&history, &history_name, &app).await?;
        let applied = self.recorded(&current, &table.target, &app).await?;
        let Some(provider) = self.provider(&history_name).await? else {
            return Ok(Some(ledger::empty()));
        };
        ledger::restore(&history, &history_name, provider, merger, (loaded, applied))
            .await
            .map(Some)
    }

    async fn batch_started(&self, table: &Table, batch: &Batch, _store: &str) -> Result<bool> {
        let app = self.app_id(table);
        for name in [table.history_name(), table.target.clone()] {
            let delta = self.open(&name).await?;
            if self.recorded(&delta, &name, &app).await? >= batch.number {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn vacuum(
        &self,
        table: &Table,
        retain: std::time::Duration,
        dry_run: bool,
    ) -> Result<Option<Vec<String>>> {
        let retain = chrono::Duration::from_std(retain)
            .map_err(|_| Error::Usage(format!("retention {retain:?} is too long")))?;
        let mut deleted = Vec::new();
        for name in [table.target.clone(), table.history_name()] {
            let delta = self.open(&name).await?;
            if delta.version().is_none() {
                continue;
            }
            let vacuum = |dry_run| {
                delta
                    .clone()
                    .vacuum()
                    .with_retention_period(retain)
                    // The retention asked for is the operator's call (the
                    // table's own default is a week).
                    .with_enforce_retention_duration(false)
                    // Every file in the directory, not only those the log names.
                    .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
                    .with_dry_run(dry_run)
            };
            let (_, candidates) = vacuum(true)
                .await
                .map_err(|e| Error::warehouse(&name, "vacuuming", e))?;
            // delta-rs names a file once per remove action (a file whose
            // deletion vector grew, once per growth), and files deleted
            // already: keep the ones that exist.
            let mut files = candidates.files_deleted;
            files.sort();
            files.dedup();
            let store = delta.object_store();
            let mut existing = Vec::with_capacity(files.len());
            for file in files {
                match object_store::ObjectStoreExt::head(&store, &file.as_str().into()).await {
                    Ok(_) => existing.push(file),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(Error::warehouse(&name, "vacuuming", e.into()));
                    }
                }
            }
            if !dry_run && !existing.is_empty() {
                vacuum(false)
                    .await
                    .map_err(|e| Error::warehouse(&name, "vacuuming", e))?;
            }
            deleted.extend(existing.iter().map(|f| format!("{name}/{f}")));
        }
        Ok(Some(deleted))
    }

    fn refuses_column(&self, name: &str) -> Option<String> {
        // Parquet (without Delta column mapping) refuses these characters, and
        // delta-rs reads `a.b` in a MERGE or predicate as column b of table a.
        const INVALID: &[char] = &[' ', ',', ';', '{', '}', '(', ')', '\n', '\t', '=', '.'];
        name.contains(INVALID).then(|| {
            "a Delta table column (without column mapping) cannot hold a space or any of , ; { } ( ) = . \
             or a tab or newline"
                .to_string()
        })
    }

    async fn columns(&self, table: &Table, merger: &Merger) -> Result<Option<Vec<Column>>> {
        let Some(provider) = self.provider(&table.history_name()).await? else {
            return Ok(None);
        };
        let columns = provider
            .schema()
            .fields()
            .iter()
            .filter(|f| merger.is_data_column(f.name()))
            .filter_map(|f| {
                SqlType::from_arrow(f.data_type()).map(|t| Column {
                    name: f.name().clone(),
                    sql_type: t,
                    // Recorded with the column (see `Merger::history_schema`):
                    // after a crash between the steps of the batch that added
                    // it, `add_current_columns` adds it with its value.
                    existing: f.metadata().get(crate::decode::EXISTING_METADATA).cloned(),
                })
            })
            .collect();
        Ok(Some(columns))
    }

    fn queries(&self) -> Queries<'_> {
        Queries::DataFusion(self)
    }
}

#[async_trait::async_trait]
impl DataFusionTables for DeltaWarehouse {
    async fn register(&self, ctx: &SessionContext, table: &Table, merger: &Merger) -> Result<bool> {
        for name in [table.target.clone(), table.history_name()] {
            let Some(provider) = self.provider(&name).await? else {
                return Ok(false);
            };
            ctx.register_table(sql::ident(&name).as_str(), provider)
                .map_err(|e| Error::query(format!("registering {name}"), e))?;
        }
        let view = format!(
            "CREATE VIEW {} AS {}",
            sql::ident(&table.versions_name()),
            merger.versions_sql(&sql::ident(&table.history_name()), sql::Dialect::DataFusion)
        );
        ctx.sql(&view)
            .await
            .map_err(|e| Error::query("versions.sql", e))?;
        Ok(true)
    }
}

/// Adds to `table` the columns of `schema` it lacks (columns new to the
/// source), nullable: the rows before them hold NULL.
async fn add_missing_columns(
    table: DeltaTable,
    name: &str,
    schema: &arrow::datatypes::SchemaRef,
) -> Result<DeltaTable> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    let have = column_names(&table, name)?;
    let missing = schema
        .fields()
        .iter()
        .filter(|f| !have.contains(f.name()))
        .map(|f| (&f.as_ref().clone().with_nullable(true)).try_into_kernel())
        .collect::<std::result::Result<Vec<deltalake::kernel::StructField>, _>>()
        .map_err(|e| Error::warehouse(name, "adding columns", e.into()))?;
    if missing.is_empty() {
        return Ok(table);
    }
    tracing::info!(table = name, columns = ?missing.iter().map(|f| f.name()).collect::<Vec<_>>(), "adding new columns");
    table
        .add_columns()
        .with_fields(missing)
        .await
        .map_err(|e| Error::warehouse(name, "adding columns", e))
}

/// The column names of `table` (`name`).
fn column_names(table: &DeltaTable, name: &str) -> Result<Vec<String>> {
    Ok(table
        .snapshot()
        .map_err(|e| Error::warehouse(name, "reading the schema", e))?
        .schema()
        .fields()
        .map(|f| f.name().clone())
        .collect())
}

/// `value` (text; `None`: NULL) as a value of `field`'s type; a value that
/// does not fit is an error naming the table and column.
fn typed_value(
    table: &str,
    field: &arrow::datatypes::Field,
    value: Option<&str>,
) -> Result<datafusion::scalar::ScalarValue> {
    let strict = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    let text = arrow::array::StringArray::from(vec![value]);
    arrow::compute::cast_with_options(&text, field.data_type(), &strict)
        .and_then(|typed| {
            datafusion::scalar::ScalarValue::try_from_array(&typed, 0)
                .map_err(|e| arrow::error::ArrowError::CastError(e.to_string()))
        })
        .map_err(|e| {
            Error::Usage(format!(
                "{table}: column {}: the value of the rows stored before it was added, {value:?}, \
                 is not a {}: {e}",
                field.name(),
                field.data_type()
            ))
        })
}

/// Whether `table` holds no rows.
fn is_empty(table: &DeltaTable, name: &str) -> Result<bool> {
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::warehouse(name, "reading the snapshot", e))?;
    Ok(snapshot
        .log_data()
        .iter()
        .all(|file| file.num_records() == Some(0)))
}
