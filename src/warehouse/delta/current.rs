//! The current-state table: rebuilt from the latest changes (a first load,
//! a backfill, a compaction), merged with them (in order), or from the whole
//! history of the keys a late batch touches; and columns added to it.

use super::*;

impl DeltaWarehouse {
    /// Applies the batch's latest changes per key to the current table
    /// unless it holds the batch already (queries read them as [`LATEST`]
    /// in `ctx`).
    pub(super) async fn load_current(
        &self,
        req: &LoadRequest<'_>,
        app: &str,
        ctx: &SessionContext,
        latest: Latest,
        apply: Apply,
        order: &BatchOrder,
    ) -> Result<()> {
        let name = req.table.target.clone();
        let mut table = self.open(&name).await?;
        if self.recorded(&table, &name, app).await? >= req.batch.number {
            return Ok(());
        }
        if table.version().is_none() {
            table = create_empty(table, &name, req.merger.current_schema()).await?;
        }
        let table = self.add_current_columns(table, &name, req.merger).await?;
        let table = if self.deletion_vectors {
            deletion_vectors::enable(table, &name).await?
        } else {
            table
        };
        let truncated = order.truncated.as_deref();
        match apply {
            // Nothing to merge with (a first load), or a rebuild: the state is
            // written as it is, without the MERGE's join.
            Apply::Replace => {
                register_latest(ctx, latest)?;
                self.write_current(table, req, app, ctx).await
            }
            Apply::InOrder if is_empty(&table, &name)? => {
                register_latest(ctx, latest)?;
                self.write_current(table, req, app, ctx).await
            }
            // The usual batch: its cost is its own rows (and a scan of the
            // table's keys), not a rewrite of the files its keys are in.
            Apply::InOrder if self.deletion_vectors && truncated.is_none() => {
                // A batch starting at the loaded maximum (the same change in
                // two objects) may hold changes no newer than the table's.
                let compare_seq = matches!(
                    (order.min_seq.as_deref(), req.loaded_max.as_deref()),
                    (Some(min), Some(max)) if min <= max
                );
                deletion_vectors::apply(table, &name, req, app, ctx, latest, compare_seq).await?;
                let table = self.open(&name).await?;
                if deletion_vectors::rewrite_due(&table, &name)? {
                    self.compact(table, &name, req.merger).await?;
                }
                Ok(())
            }
            Apply::InOrder | Apply::Late => {
                register_latest(ctx, latest)?;
                let latest = ctx
                    .table(LATEST)
                    .await
                    .map_err(|e| Error::query("reading the latest changes", e))?;
                self.merge_current(table, req, latest, app, ctx, truncated)
                    .await
            }
        }
    }

    /// Overwrites the current table with the state the latest changes
    /// (registered as [`LATEST`]) give: of the whole history for a backfill,
    /// of the batch for a first load.
    pub(super) async fn write_current(
        &self,
        table: DeltaTable,
        req: &LoadRequest<'_>,
        app: &str,
        ctx: &SessionContext,
    ) -> Result<()> {
        let name = req.table.target.as_str();
        let rows = req
            .merger
            .current_state(ctx, LATEST)
            .await?
            // Query output may use other encodings (string views): cast to the table's types.
            .select(cast_to(&req.merger.current_schema()))
            .map_err(|e| Error::query("current_rebuild.sql", e))?
            .execute_stream()
            .await
            .map_err(|e| Error::query("current_rebuild.sql", e))?;
        let properties =
            writer_properties(&req.merger.current_schema(), &req.merger.meta.change_seq);
        files::overwrite(&table, rows, properties, Self::commit(app, req))
            .await
            .map_err(|e| {
                Error::warehouse(
                    name,
                    format!("writing current state for batch {}", req.batch.number),
                    e,
                )
            })
    }

    /// Rewrites the current table `name` as it reads (deletion vectors
    /// applied) into new files: readers no longer skip marked rows, and the
    /// small files of many batches become a few. It changes no row and
    /// records no batch: after a crash before its commit, the next batch
    /// finds it due again.
    pub(super) async fn compact(
        &self,
        table: DeltaTable,
        name: &str,
        merger: &Merger,
    ) -> Result<()> {
        let rows = self
            .scan(&table, name)
            .await?
            .execute_stream()
            .await
            .map_err(|e| Error::query(format!("reading {name}"), e))?;
        tracing::info!(
            table = name,
            "rewriting the current table without its deleted rows"
        );
        let properties = writer_properties(&merger.current_schema(), &merger.meta.change_seq);
        files::overwrite(&table, rows, properties, CommitProperties::default())
            .await
            .map_err(|e| Error::warehouse(name, "compacting", e))
    }

    /// `table` (`name`) as it reads now (deletion vectors applied).
    pub(super) async fn scan(
        &self,
        table: &DeltaTable,
        name: &str,
    ) -> Result<datafusion::prelude::DataFrame> {
        let read = |e| Error::query(format!("reading {name}"), e);
        let provider = table.table_provider().await.map_err(read)?;
        session(self.memory_limit)
            .read_table(provider)
            .map_err(read)
    }

    /// Adds the current table's missing columns. A column with a value for
    /// rows stored before it was added ([`Column::existing`]) gets that value
    /// in every row the table holds: they all predate it, since a batch
    /// starts at the first object that has the column. One commit rewrites
    /// the table, so a crash leaves either the old table or the filled one.
    pub(super) async fn add_current_columns(
        &self,
        table: DeltaTable,
        name: &str,
        merger: &Merger,
    ) -> Result<DeltaTable> {
        use datafusion::prelude::{cast, col, lit};
        let schema = merger.current_schema();
        let have = column_names(&table, name)?;
        let existing = |field: &str| {
            merger
                .columns
                .iter()
                .find(|c| c.name == field && !have.contains(&c.name))
                .and_then(|c| c.existing.as_deref())
        };
        if !schema.fields().iter().any(|f| existing(f.name()).is_some()) || is_empty(&table, name)?
        {
            return add_missing_columns(table, name, &schema).await;
        }
        let mut columns = Vec::new();
        for f in schema.fields() {
            let column = if have.contains(f.name()) {
                cast(col(sql::ident(f.name())), f.data_type().clone())
            } else {
                lit(typed_value(name, f, existing(f.name()))?)
            };
            columns.push(column.alias(f.name()));
        }
        let plan = self
            .scan(&table, name)
            .await?
            .select(columns)
            .map_err(|e| Error::query(format!("reading {name}"), e))?
            .into_unoptimized_plan();
        tracing::info!(
            table = name,
            "adding columns with the value rows stored before them hold"
        );
        overwrite_current(table, plan, merger)
            .with_schema_mode(SchemaMode::Merge)
            .await
            .map_err(|e| {
                Error::warehouse(name, "adding columns with the value of existing rows", e)
            })
    }

    pub(super) async fn merge_current(
        &self,
        table: DeltaTable,
        req: &LoadRequest<'_>,
        latest: datafusion::prelude::DataFrame,
        app: &str,
        ctx: &SessionContext,
        truncated: Option<&str>,
    ) -> Result<()> {
        let name = req.table.target.as_str();
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
            .with_session_state(Arc::new(ctx.state()))
            .with_writer_properties(writer_properties(
                &req.merger.current_schema(),
                &req.merger.meta.change_seq,
            ))
            .with_commit_properties(Self::commit(app, req));
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
        // A truncate removes the rows the batch does not touch too.
        if let Some(seq) = truncated {
            let older = format!("t.{} < {}", sql::ident(&m.change_seq), sql::literal(seq));
            builder = if req.merger.soft_delete {
                builder.when_not_matched_by_source_update(|u| {
                    u.predicate(older).update(m.deleted.as_str(), "TRUE")
                })
            } else {
                builder.when_not_matched_by_source_delete(|d| d.predicate(older))
            }
            .map_err(fail)?;
        }
        builder.await.map_err(fail)?;
        Ok(())
    }
}

/// An overwrite of the current-state table `table` with the rows of `plan`.
pub(super) fn overwrite_current(
    table: DeltaTable,
    plan: datafusion::logical_expr::LogicalPlan,
    merger: &Merger,
) -> deltalake::operations::write::WriteBuilder {
    table
        .write(Vec::new())
        .with_input_plan(plan)
        .with_save_mode(SaveMode::Overwrite)
        .with_writer_properties(writer_properties(
            &merger.current_schema(),
            &merger.meta.change_seq,
        ))
}

/// Registers `latest` as [`LATEST`] in `ctx`, in place of what it held:
/// held rows as a memory table, spilled ones as a table that reads the spill
/// file (one batch at a time) at each scan.
pub(super) fn register_latest(ctx: &SessionContext, latest: Latest) -> Result<()> {
    let fail = |e| Error::query("registering the latest changes", e);
    let table: Arc<dyn datafusion::catalog::TableProvider> = match latest {
        Latest::Held { schema, rows } => {
            Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![rows]).map_err(fail)?)
        }
        spilled => {
            let schema = spilled.schema();
            let scan = SpillScan {
                schema: schema.clone(),
                latest: Arc::new(spilled),
            };
            Arc::new(
                datafusion::catalog::streaming::StreamingTable::try_new(
                    schema,
                    vec![Arc::new(scan)],
                )
                .map_err(fail)?,
            )
        }
    };
    ctx.deregister_table(LATEST).map_err(fail)?;
    ctx.register_table(LATEST, table).map_err(fail)?;
    Ok(())
}

/// Spilled latest changes as a partition of a table: each scan reads them again.
struct SpillScan {
    schema: arrow::datatypes::SchemaRef,
    latest: Arc<Latest>,
}

impl std::fmt::Debug for SpillScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpillScan({} rows)", self.latest.num_rows())
    }
}

impl datafusion::physical_plan::streaming::PartitionStream for SpillScan {
    fn schema(&self) -> &arrow::datatypes::SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<datafusion::execution::TaskContext>) -> SendableRecordBatchStream {
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        use futures::StreamExt;
        let latest = self.latest.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let read = match latest.batches() {
                Ok(read) => read,
                Err(e) => return drop(tx.blocking_send(Err(external(e)))),
            };
            for batch in read {
                if tx.blocking_send(batch.map_err(external)).is_err() {
                    return;
                }
            }
        });
        // Every row of the file, or an error: a reader that stopped early
        // (a panic) must not leave the latest changes short.
        let expected = self.latest.num_rows();
        let rows = futures::stream::unfold(Some((rx, 0usize)), move |state| async move {
            let (mut rx, seen) = state?;
            match rx.recv().await {
                Some(Ok(batch)) => {
                    let seen = seen + batch.num_rows();
                    Some((Ok(batch), Some((rx, seen))))
                }
                Some(Err(e)) => Some((Err(e), None)),
                None if seen != expected => Some((
                    Err(external(Error::Internal(format!(
                        "the spilled latest changes read back {seen} of {expected} rows"
                    )))),
                    None,
                )),
                None => None,
            }
        })
        .boxed();
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), rows))
    }
}

fn external(e: Error) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::External(Box::new(e))
}

/// Every column of `schema`, cast to its type there (query output may use
/// other encodings, such as string views).
pub(super) fn cast_to(schema: &arrow::datatypes::Schema) -> Vec<datafusion::prelude::Expr> {
    use datafusion::prelude::{cast, col};
    schema
        .fields()
        .iter()
        .map(|f| cast(col(sql::ident(f.name())), f.data_type().clone()).alias(f.name()))
        .collect()
}

/// The latest changes per key (and figures) of the rows of the registered
/// table `rows`, which has the history columns; past `budget` bytes they
/// are spilled.
pub(super) async fn latest_of(
    ctx: &SessionContext,
    rows: &str,
    merger: &Merger,
    budget: usize,
) -> Result<LatestChanges> {
    use futures::StreamExt;
    let fail = |e| Error::query(format!("reading {rows}"), e);
    // Scans may use other encodings (string views): cast to the history types.
    let mut stream = ctx
        .table(rows)
        .await
        .map_err(fail)?
        .select(cast_to(&merger.history_schema()))
        .map_err(fail)?
        .execute_stream()
        .await
        .map_err(fail)?;
    let mut collected = LatestChanges::new(merger)?.spill_past(budget);
    while let Some(chunk) = stream.next().await {
        collected.push(&chunk.map_err(fail)?)?;
    }
    Ok(collected)
}

/// `stream`, with every chunk also handed to `collector`.
pub(super) fn collect_latest(
    stream: SendableRecordBatchStream,
    collector: Arc<std::sync::Mutex<Option<LatestChanges>>>,
) -> SendableRecordBatchStream {
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use futures::StreamExt;
    let schema = stream.schema();
    let stream = stream.map(move |chunk| {
        let chunk = chunk?;
        if let Some(collector) = collector.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            collector
                .push(&chunk)
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        }
        Ok(chunk)
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}
