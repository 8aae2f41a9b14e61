//! The run of one table: finish a pending batch, then plan and load new
//! objects in change order until none is left or the table is blocked.

use arrow::array::{AsArray, RecordBatch};
use futures::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;

use super::Runner;
use crate::config::{Column, Table};
use crate::decode::{self, DecodeSpec};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::merge::Merger;
use crate::source::{ObjectName, ObjectOrder, SourceObject};
use crate::state::{Batch, BatchStats, ObjectRef, ObjectStatus};
use crate::warehouse::LoadRequest;

/// Objects decoded at once per table.
const DECODE_PARALLELISM: usize = 4;

/// What happened to one table in a run.
#[derive(Debug, Default, Serialize)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Objects loaded.
    pub objects: usize,
    /// Batches committed.
    pub batches: usize,
    /// Rows and operations loaded.
    pub stats: BatchStats,
    /// Wall time.
    pub seconds: f64,
    /// Objects waiting for an operator: (key, error).
    pub quarantined: Vec<(String, String)>,
    /// Loaded objects that changed afterwards (same key, new ETag).
    pub changed: Vec<String>,
    /// Files under the table prefix that are not DMS data files.
    pub ignored: Vec<String>,
    /// The error that stopped the table, if any.
    pub error: Option<String>,
}

/// The run of one table.
pub(super) struct TableRun<'a> {
    runner: &'a Runner,
    table: &'a Table,
    key: String,
    progress: &'a ProgressBar,
    report: TableReport,
    merger: Option<Merger>,
}

impl<'a> TableRun<'a> {
    pub(super) fn new(runner: &'a Runner, table: &'a Table, progress: &'a ProgressBar) -> Self {
        let key = table.qualified();
        TableRun {
            runner,
            table,
            report: TableReport {
                table: key.clone(),
                ..TableReport::default()
            },
            key,
            progress,
            merger: None,
        }
    }

    pub(super) async fn run(mut self) -> TableReport {
        let started = std::time::Instant::now();
        if let Err(err) = self.run_batches().await {
            tracing::error!(table = %self.key, error = %err, "table stopped");
            self.report.error = Some(err.to_string());
        }
        self.report.seconds = started.elapsed().as_secs_f64();
        self.report
    }

    async fn run_batches(&mut self) -> Result<()> {
        let state = self.runner.state.clone();
        loop {
            let batch = match state.pending_batch(&self.key)? {
                Some(pending) => {
                    tracing::info!(table = %self.key, batch = pending.number, "finishing the batch a previous run left pending");
                    pending
                }
                None => {
                    let Some(objects) = self.list_new().await? else {
                        return Ok(());
                    };
                    let batch = state.plan_batch(&self.key, &objects)?;
                    failpoint::hit("plan.after_record");
                    batch
                }
            };
            self.process(batch).await?;
        }
    }

    /// New objects to load next, bounded by the batch limits; `None` when
    /// there is nothing (or nothing before a quarantined object).
    async fn list_new(&mut self) -> Result<Option<Vec<ObjectRef>>> {
        let state = &self.runner.state;
        let listing = self
            .runner
            .source
            .list_table(&self.table.schema, &self.table.name)
            .await?;
        self.report.ignored = listing.ignored;
        let recorded = state.objects(&self.key)?;
        let mut new = Vec::new();
        let mut blocked_at: Option<ObjectOrder> = None;
        self.report.quarantined.clear();
        for object in listing.objects {
            match recorded
                .get(&object.key)
                .map(|r| (&r.status, &r.object.etag))
            {
                None => new.push(object),
                Some((ObjectStatus::Processed { .. }, etag)) => {
                    if !etag.is_empty()
                        && *etag != object.etag
                        && !self.report.changed.contains(&object.key)
                    {
                        tracing::warn!(table = %self.key, object = %object.key, "a loaded object changed afterwards; it is not re-applied");
                        self.report.changed.push(object.key);
                    }
                }
                Some((ObjectStatus::Skipped { .. }, _)) => {}
                Some((ObjectStatus::Quarantined { error }, etag)) => {
                    if *etag != object.etag {
                        tracing::info!(table = %self.key, object = %object.key, "a quarantined object was replaced; trying it again");
                        state.release(&self.key, &object.key)?;
                        new.push(object);
                    } else {
                        blocked_at = Some(
                            blocked_at.map_or(object.name.order, |b| b.min(object.name.order)),
                        );
                        self.report.quarantined.push((object.key, error.clone()));
                    }
                }
            }
        }
        if let Some(block) = blocked_at {
            new.retain(|o| o.name.order < block);
        }
        let limits = &self.runner.pipeline.batch;
        let mut bytes = 0u64;
        let take = new
            .iter()
            .take(limits.max_objects)
            .take_while(|o| {
                bytes += o.size;
                bytes == o.size || bytes <= limits.max_bytes
            })
            .count();
        if take == 0 {
            return Ok(None);
        }
        Ok(Some(
            new.into_iter()
                .take(take)
                .map(|o| ObjectRef {
                    key: o.key,
                    etag: o.etag,
                    size: o.size,
                    last_modified: o.last_modified,
                })
                .collect(),
        ))
    }

    fn spec(&self, columns: Vec<Column>) -> DecodeSpec {
        let source = &self.runner.pipeline.source;
        let meta = &self.runner.pipeline.meta;
        DecodeSpec {
            columns,
            op_name: meta.op.clone(),
            commit_ts_name: meta.commit_ts.clone(),
            timestamp_column: source.timestamp_column.clone(),
            extra_columns: source.extra_columns.clone(),
            include_op_for_full_load: source.include_op_for_full_load,
            csv: source.csv.clone(),
        }
    }

    /// The table's columns: declared, else as loaded before, else from the first Parquet object.
    async fn merger(&mut self, first: &SourceObject) -> Result<Merger> {
        if let Some(m) = &self.merger {
            return Ok(m.clone());
        }
        let pipeline = &self.runner.pipeline;
        let template = Merger::new(self.table, Vec::new(), &pipeline.source, &pipeline.meta);
        let columns = match &self.table.columns {
            Some(columns) => columns.clone(),
            None => match self.runner.warehouse.columns(self.table, &template).await? {
                Some(columns) => columns,
                None => {
                    let fetched = self.runner.source.get(&first.key).await?;
                    decode::parquet_columns(first, fetched.bytes, &self.spec(Vec::new()))?
                }
            },
        };
        for key in &self.table.primary_key {
            if !columns.iter().any(|c| &c.name == key) {
                return Err(Error::Usage(format!(
                    "table {}: primary key column {key:?} is not among the columns {:?}",
                    self.key,
                    columns.iter().map(|c| &c.name).collect::<Vec<_>>()
                )));
            }
        }
        let merger = Merger::new(self.table, columns, &pipeline.source, &pipeline.meta);
        self.merger = Some(merger.clone());
        Ok(merger)
    }

    async fn process(&mut self, mut batch: Batch) -> Result<()> {
        let runner = self.runner;
        self.progress.inc_length(batch.objects.len() as u64);
        let objects: Vec<SourceObject> = batch
            .objects
            .iter()
            .map(|r| SourceObject {
                name: ObjectName::parse(&r.key).expect("planned objects have DMS names"),
                key: r.key.clone(),
                etag: r.etag.clone(),
                size: r.size,
                last_modified: r.last_modified,
            })
            .collect();
        let merger = self.merger(&objects[0]).await?;
        let spec = self.spec(merger.columns.clone());
        let decoded: Vec<Result<(SourceObject, RecordBatch)>> =
            futures::stream::iter(objects.iter().cloned())
                .map(|object| {
                    let spec = spec.clone();
                    async move {
                        let fetched = runner.source.get(&object.key).await?;
                        if !object.etag.is_empty()
                            && !fetched.etag.is_empty()
                            && fetched.etag != object.etag
                        {
                            return Err(Error::ObjectChanged {
                                object: object.key.clone(),
                                batch: 0,
                                old_etag: object.etag.clone(),
                                new_etag: fetched.etag,
                            });
                        }
                        let decoded = tokio::task::spawn_blocking(move || {
                            decode::decode(&object, fetched.bytes, &spec).map(|b| (object, b))
                        })
                        .await
                        .expect("decoder does not panic")?;
                        Ok(decoded)
                    }
                })
                .buffered(DECODE_PARALLELISM)
                .collect()
                .await;

        let mut good = Vec::with_capacity(decoded.len());
        for (i, result) in decoded.into_iter().enumerate() {
            match result {
                Ok(pair) => good.push(pair),
                Err(err @ Error::Decode { .. }) => {
                    // The table stops at this object: load what precedes it,
                    // keep it for the operator, leave the rest waiting.
                    tracing::error!(table = %self.key, error = %err, "object quarantined");
                    runner
                        .state
                        .quarantine(&self.key, &batch.objects[i], &err.to_string())?;
                    self.report
                        .quarantined
                        .push((batch.objects[i].key.clone(), err.to_string()));
                    match runner
                        .state
                        .replan_batch(&self.key, batch.number, &batch.objects[..i])?
                    {
                        Some(shrunk) => batch = shrunk,
                        None => return Ok(()),
                    }
                    break;
                }
                Err(err @ Error::ObjectChanged { .. }) => {
                    let Error::ObjectChanged {
                        object,
                        old_etag,
                        new_etag,
                        ..
                    } = err
                    else {
                        unreachable!()
                    };
                    return Err(Error::ObjectChanged {
                        object,
                        batch: batch.number,
                        old_etag,
                        new_etag,
                    });
                }
                Err(err) => return Err(err),
            }
        }
        let object_count = good.len();
        let history = merger.history(good, chrono::Utc::now())?;
        let late = match (
            runner.state.max_seq(&self.key)?,
            min_seq(&history.batches, &merger),
        ) {
            (Some(loaded), Some(min)) => min < loaded,
            _ => false,
        };
        if late {
            tracing::warn!(table = %self.key, batch = batch.number, "batch holds objects older than loaded ones; recomputing current state of its keys from history");
        }
        runner
            .warehouse
            .load(LoadRequest {
                table: self.table,
                batch: &batch,
                merger: &merger,
                history: &history,
                late,
            })
            .await?;
        failpoint::hit("load.after_warehouse");
        let mut stats = history.stats.clone();
        if let Some(prev) = runner.state.max_seq(&self.key)?
            && stats.max_seq.as_ref().is_none_or(|m| *m < prev)
        {
            stats.max_seq = Some(prev);
        }
        runner.state.commit_batch(&self.key, batch.number, &stats)?;
        failpoint::hit("commit.after_state");
        self.report.objects += object_count;
        self.report.batches += 1;
        let total = &mut self.report.stats;
        total.rows += stats.rows;
        total.inserts += stats.inserts;
        total.updates += stats.updates;
        total.deletes += stats.deletes;
        total.max_seq = stats.max_seq;
        self.progress.inc(batch.objects.len() as u64);
        Ok(())
    }
}

fn min_seq(batches: &[RecordBatch], merger: &Merger) -> Option<String> {
    batches
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name(&merger.meta.change_seq)
                .expect("history has change_seq");
            col.as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string)
                .min()
        })
        .min()
}
