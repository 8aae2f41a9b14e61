//! One run of a pipeline: for each table `list → plan → merge → load →
//! commit` (ARCHITECTURE §3), tables in parallel, a table's batches in order.
//!
//! Crash safety comes from the order of the steps: a batch is recorded in
//! the state store before anything of it is loaded; the warehouse load is
//! idempotent per batch number; the state commit comes last. A run first
//! finishes a table's pending batch, so a crash at any point is repaired by
//! the next run without losing or doubling a row.
//!
//! One run at a time: a run holds the pipeline's lease in the state store,
//! renewed by a heartbeat, so overlapping cron pods never work on one
//! pipeline together.

mod alerts;
mod history;
mod lease;
mod ledger;
mod operator;
mod redelivery;
mod status;
mod table;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;

use arrow::array::RecordBatch;
use chrono::NaiveDate;
use datafusion::prelude::SessionContext;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use lease::Lease;
pub use status::{TableStatus, humanize};
pub use table::{HeldBy, TableReport};

use crate::config::{Pipeline, Table, WarehouseConfig};
use crate::cron::Interval;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::merge::Merger;
use crate::source::{ObjectOrder, ObjectSource, SourceObject, StoreSource};
use crate::state::{ObjectStatus, Restored, StateStore, Trigger};
use crate::warehouse::{BigQueryWarehouse, DatabaseWarehouse, DeltaWarehouse, Queries, Warehouse};

/// What one run did, per table.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Pipeline name.
    pub pipeline: String,
    /// Run id in the state store.
    pub run_id: i64,
    /// What started it.
    pub trigger: Trigger,
    /// The data interval of a scheduled run.
    #[serde(skip)]
    pub interval: Option<Interval>,
    /// One entry per table, in pipeline order.
    pub tables: Vec<TableReport>,
    /// Wall time of the run.
    pub seconds: f64,
    /// True when a shutdown request stopped the run before all work was done.
    pub interrupted: bool,
}

impl RunReport {
    /// True when no table failed or is blocked.
    pub fn ok(&self) -> bool {
        self.tables
            .iter()
            .all(|t| t.error.is_none() && t.quarantined.is_empty())
    }

    /// The tables another process was loading (left to it), with who held
    /// them until when.
    pub fn held(&self) -> Vec<(String, table::HeldBy)> {
        self.tables
            .iter()
            .filter_map(|t| t.held_by.clone().map(|h| (t.table.clone(), h)))
            .collect()
    }
}

/// What a run works on.
#[derive(Debug, Clone)]
pub(crate) enum Work {
    /// New objects, those written before `before` when set (the data interval's end).
    New {
        before: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Backfill: reprocess these objects, replacing their history rows.
    Replace(Vec<SourceObject>),
}

/// Objects a backfill would reprocess, per table.
pub type BackfillPlan = BTreeMap<String, Vec<SourceObject>>;

/// A pipeline wired to its source, state store and warehouse.
pub struct Runner {
    pipeline: Pipeline,
    source: Arc<dyn ObjectSource>,
    state: Arc<dyn StateStore>,
    warehouse: Arc<dyn Warehouse>,
}

impl Runner {
    /// Wires a pipeline to the implementations its file names.
    pub fn open(pipeline: Pipeline) -> Result<Self> {
        let source = Arc::new(StoreSource::open(&pipeline.source)?);
        let state = crate::state::open(&pipeline.state, &pipeline.name)?;
        let warehouse: Arc<dyn Warehouse> = match &pipeline.warehouse {
            WarehouseConfig::Delta {
                location,
                deletion_vectors,
            } => Arc::new(DeltaWarehouse::new(
                location,
                &pipeline.name,
                &pipeline.batch,
                *deletion_vectors,
            )?),
            WarehouseConfig::BigQuery(config) => {
                Arc::new(BigQueryWarehouse::new(config.clone(), &pipeline.name))
            }
            WarehouseConfig::Database(config) => Arc::new(DatabaseWarehouse::new(
                config.clone(),
                &pipeline.name,
                pipeline.batch.latest_memory_mib << 20,
            )),
        };
        Ok(Self::new(pipeline, source, state, warehouse))
    }

    /// A runner over explicit implementations.
    pub fn new(
        pipeline: Pipeline,
        source: Arc<dyn ObjectSource>,
        state: Arc<dyn StateStore>,
        warehouse: Arc<dyn Warehouse>,
    ) -> Self {
        Runner {
            pipeline,
            source,
            state,
            warehouse,
        }
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The state store.
    pub fn state(&self) -> &dyn StateStore {
        self.state.as_ref()
    }

    /// The state store, shared (for a [`Lease`]).
    pub fn state_handle(&self) -> Arc<dyn StateStore> {
        self.state.clone()
    }

    /// The object source.
    pub fn source(&self) -> &dyn ObjectSource {
        self.source.as_ref()
    }

    /// The warehouse.
    pub fn warehouse(&self) -> &dyn Warehouse {
        self.warehouse.as_ref()
    }

    /// The merger of `table` with the columns its warehouse tables hold
    /// (none when not loaded yet).
    pub async fn loaded_merger(&self, table: &Table) -> Result<Merger> {
        let p = &self.pipeline;
        let template = Merger::new(table, Vec::new(), &p.source, &p.meta);
        let columns = self
            .warehouse
            .columns(table, &template)
            .await?
            .unwrap_or_default();
        Ok(Merger::new(table, columns, &p.source, &p.meta))
    }

    /// Runs `sql` over the warehouse tables: in the warehouse when it has its
    /// own engine (BigQuery), else in DataFusion with every loaded table
    /// `sql` names registered by name (`<t>`, `<t>_history`, the
    /// `<t>_versions` view). A table whose name does not appear in the text
    /// cannot be referenced, and is not opened (in object storage each
    /// costs requests).
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let tables = match self.warehouse.queries() {
            Queries::Engine(engine) => return engine.query(sql).await,
            Queries::DataFusion(tables) => tables,
        };
        let ctx = SessionContext::new();
        let mut missing = Vec::new();
        let text = sql.to_lowercase();
        let named = self
            .pipeline
            .tables
            .iter()
            .filter(|t| text.contains(&t.target.to_lowercase()));
        for table in named {
            let merger = self.loaded_merger(table).await?;
            if !tables.register(&ctx, table, &merger).await? {
                missing.push(table.target.clone());
            }
        }
        for table in missing {
            eprintln!("note: table {table} has not been loaded yet (run `cdcflow run` first)");
        }
        let context = sql.chars().take(200).collect::<String>();
        crate::merge::collect(&ctx, sql, &context).await
    }

    /// Loads everything new once (objects written before the interval's end
    /// when one is given). A failing table does not stop the others; its
    /// error is in its report. Each table's task takes the table's lease
    /// first: a table another process is loading is left to it (its report
    /// says who holds it, see [`RunReport::held`]); when every table is held,
    /// there is no run and it fails with [`Error::LeaseHeld`].
    pub async fn run(
        &self,
        trigger: Trigger,
        interval: Option<Interval>,
        shutdown: &Shutdown,
    ) -> Result<RunReport> {
        let all: Vec<String> = self.pipeline.tables.iter().map(|t| t.qualified()).collect();
        self.run_tables(trigger, interval, &all, shutdown).await
    }

    /// [`Runner::run`] over the tables of `tables` (`schema.table`) only: a
    /// retry of the tables another process held.
    pub async fn run_tables(
        &self,
        trigger: Trigger,
        interval: Option<Interval>,
        tables: &[String],
        shutdown: &Shutdown,
    ) -> Result<RunReport> {
        let work: Vec<(&Table, Work)> = self
            .pipeline
            .tables
            .iter()
            .filter(|t| tables.contains(&t.qualified()))
            .map(|t| {
                (
                    t,
                    Work::New {
                        before: interval.map(|i| i.end),
                    },
                )
            })
            .collect();
        let report = self.execute(trigger, interval, work, None, shutdown).await;
        if let Ok(report) = &report {
            alerts::notify(self, report).await;
        }
        report
    }

    /// Rebuilds the state of every table whose state store disagrees with
    /// the warehouse (see the `ledger` module) from what the warehouse
    /// recorded. Returns per table what was restored, `None` where the state
    /// store already agreed. Takes the pipeline's lease.
    pub async fn repair_from_warehouse(&self) -> Result<Vec<(String, Option<Restored>)>> {
        let lease = Lease::acquire(self.state.clone(), &self.pipeline)?;
        let mut repaired = Vec::new();
        for table in &self.pipeline.tables {
            let key = table.qualified();
            let recorded = self.warehouse.last_recorded(table).await?;
            if ledger::check(&key, self.state.as_ref(), &recorded).is_ok() {
                repaired.push((key, None));
                continue;
            }
            let merger = self.loaded_merger(table).await?;
            let restored = self
                .warehouse
                .ledger(table, &merger)
                .await?
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "table {key}: the warehouse keeps no batch ledger to repair from"
                    ))
                })?;
            self.state.restore(&key, &restored)?;
            ledger::check(&key, self.state.as_ref(), &recorded)?;
            repaired.push((key, Some(restored)));
        }
        lease.release();
        Ok(repaired)
    }

    /// The objects of `tables` (all when empty) whose CDC file-name date is in `[from, to]` (UTC).
    pub async fn backfill_plan(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        tables: &[String],
        include_skipped: bool,
    ) -> Result<BackfillPlan> {
        let mut plan = BackfillPlan::new();
        for table in self.select_tables(tables)? {
            let listing = self
                .source
                .list_table(&table.schema, &table.name, None)
                .await?;
            let recorded = self.state.objects(&table.qualified())?;
            // What an operator skipped (or what waits quarantined) stays out
            // unless asked for: a backfill redoes loads, not decisions.
            let decided = |key: &str| {
                !include_skipped
                    && recorded.get(key).is_some_and(|r| {
                        matches!(
                            r.status,
                            ObjectStatus::Skipped { .. } | ObjectStatus::Quarantined { .. }
                        )
                    })
            };
            let in_range = listing
                .objects
                .into_iter()
                .filter(|o| !decided(&o.key))
                .filter(|o| match o.name.order {
                    ObjectOrder::Cdc(_) => o
                        .name
                        .order
                        .cdc_time()
                        .is_some_and(|t| (from..=to).contains(&t.date_naive())),
                    ObjectOrder::Load(_) => false,
                })
                .collect();
            plan.insert(table.qualified(), in_range);
        }
        Ok(plan)
    }

    /// Reprocesses the planned objects: their history rows are replaced (never
    /// doubled) and each table's current state is rebuilt from history.
    pub async fn backfill(&self, plan: BackfillPlan, shutdown: &Shutdown) -> Result<RunReport> {
        let lease = Lease::acquire(self.state.clone(), &self.pipeline)?;
        let work = self
            .pipeline
            .tables
            .iter()
            .filter_map(|t| {
                plan.get(&t.qualified())
                    .map(|objects| (t, Work::Replace(objects.clone())))
            })
            .collect();
        let report = self
            .execute(Trigger::Backfill, None, work, Some(&lease), shutdown)
            .await;
        lease.release();
        report
    }

    fn select_tables(&self, names: &[String]) -> Result<Vec<&Table>> {
        if names.is_empty() {
            return Ok(self.pipeline.tables.iter().collect());
        }
        names
            .iter()
            .map(|name| {
                self.pipeline
                    .tables
                    .iter()
                    .find(|t| &t.name == name || &t.qualified() == name || &t.target == name)
                    .ok_or_else(|| {
                        let known: Vec<String> =
                            self.pipeline.tables.iter().map(|t| t.qualified()).collect();
                        Error::Usage(format!(
                            "no table {name:?} in pipeline {}; tables: {}",
                            self.pipeline.name,
                            known.join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// Runs the table tasks of `work`, under `held` (a lease over all of
    /// them) or each under its table's lease, taken as the task starts. The
    /// run is recorded once a table is taken.
    async fn execute(
        &self,
        trigger: Trigger,
        interval: Option<Interval>,
        work: Vec<(&Table, Work)>,
        held: Option<&Lease>,
        shutdown: &Shutdown,
    ) -> Result<RunReport> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "run",
            pipeline = %self.pipeline.name,
            run_id = tracing::field::Empty,
            trigger = trigger.as_str()
        );
        let run_id = tokio::sync::OnceCell::new();
        if held.is_some() {
            // Every table is taken already: the run is recorded now.
            let id = self
                .state
                .begin_run(trigger, interval.map(|i| (i.start, i.end)))?;
            run_id.set(id).expect("set once");
            span.record("run_id", id);
        }
        let progress = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} objects, {per_sec}, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        progress.set_message(format!("{} {}", trigger.as_str(), self.pipeline.name));
        progress.enable_steady_tick(Duration::from_millis(200));
        let context = table::RunContext {
            runner: self,
            trigger,
            interval,
            run_id: &run_id,
            span: &span,
            held,
            shutdown,
            progress: &progress,
        };
        let slots = tokio::sync::Semaphore::new(self.pipeline.max_parallel_tables);
        let mut tasks = Vec::with_capacity(work.len());
        for (table, work) in work {
            let (context, slots) = (&context, &slots);
            tasks.push(async move {
                let _slot = slots.acquire().await.expect("semaphore is never closed");
                table::TableRun::claim(context, table, work).await
            });
        }

        let claims = futures::future::join_all(tasks)
            .instrument(span.clone())
            .await;
        progress.finish_and_clear();
        let Some(&run_id) = run_id.get() else {
            // No table was taken: no run. Say why.
            return Err(self.none_taken(claims));
        };
        let mut tables: Vec<TableReport> = claims
            .into_iter()
            .map(table::Claimed::into_report)
            .collect();
        let order = |t: &TableReport| {
            self.pipeline
                .tables
                .iter()
                .position(|x| x.qualified() == t.table)
        };
        tables.sort_by_key(order);
        let report = RunReport {
            pipeline: self.pipeline.name.clone(),
            run_id,
            trigger,
            interval,
            tables,
            seconds: started.elapsed().as_secs_f64(),
            interrupted: shutdown.requested(),
        };
        let summary = serde_json::to_string(&report).expect("report serializes");
        self.state.finish_run(run_id, report.ok(), &summary)?;
        Ok(report)
    }

    /// Why a run took none of its tables: the first failure to take one,
    /// else the first table another process held.
    fn none_taken(&self, claims: Vec<table::Claimed>) -> Error {
        let mut held = None;
        for claim in claims {
            match claim {
                table::Claimed::Failed(_, err) => return err,
                table::Claimed::Held(table, by) if held.is_none() => held = Some((table, by)),
                _ => {}
            }
        }
        match held {
            Some((table, by)) => Error::LeaseHeld {
                pipeline: self.pipeline.name.clone(),
                table,
                owner: by.owner,
                expires_at: by.until,
            },
            None => Error::Usage(format!("pipeline {}: no table to run", self.pipeline.name)),
        }
    }
}
