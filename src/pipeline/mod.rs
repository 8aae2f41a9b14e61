//! One run of a pipeline: for each table `list → plan → merge → load →
//! commit` (DESIGN §3), tables in parallel, a table's batches in order.
//!
//! Crash safety comes from the order of the steps: a batch is recorded in
//! the state store before anything of it is loaded; the warehouse load is
//! idempotent per batch number; the state commit comes last. A run first
//! finishes a table's pending batch, so a crash at any point is repaired by
//! the next run without losing or doubling a row.

mod table;

use std::sync::Arc;
use std::time::Duration;

use datafusion::prelude::SessionContext;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use table::TableReport;

use crate::config::Pipeline;
use crate::error::Result;
use crate::merge::Merger;
use crate::source::{ObjectSource, StoreSource};
use crate::state::{SqliteStore, StateStore};
use crate::warehouse::{DeltaWarehouse, Warehouse};

/// How many tables run at once.
const MAX_PARALLEL_TABLES: usize = 4;

/// What one run did, per table.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Pipeline name.
    pub pipeline: String,
    /// One entry per table, in pipeline order.
    pub tables: Vec<TableReport>,
    /// Wall time of the run.
    pub seconds: f64,
}

impl RunReport {
    /// True when no table failed or is blocked.
    pub fn ok(&self) -> bool {
        self.tables
            .iter()
            .all(|t| t.error.is_none() && t.quarantined.is_empty())
    }
}

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
        let state = Arc::new(SqliteStore::open(&pipeline.state_path, &pipeline.name)?);
        let warehouse = Arc::new(DeltaWarehouse::new(
            pipeline.warehouse_path.clone(),
            &pipeline.name,
        ));
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

    /// The object source.
    pub fn source(&self) -> &dyn ObjectSource {
        self.source.as_ref()
    }

    /// The warehouse.
    pub fn warehouse(&self) -> &dyn Warehouse {
        self.warehouse.as_ref()
    }

    /// A DataFusion session with every loaded table registered by name:
    /// `<t>`, `<t>_history` and the `<t>_versions` view. Tables not loaded
    /// yet are left out and named in the returned list.
    pub async fn query_session(&self) -> Result<(SessionContext, Vec<String>)> {
        let ctx = SessionContext::new();
        let mut missing = Vec::new();
        for table in &self.pipeline.tables {
            let p = &self.pipeline;
            let template = Merger::new(table, Vec::new(), &p.source, &p.meta);
            let columns = self
                .warehouse
                .columns(table, &template)
                .await?
                .unwrap_or_default();
            let merger = Merger::new(table, columns, &p.source, &p.meta);
            if !self.warehouse.register(&ctx, table, &merger).await? {
                missing.push(table.target.clone());
            }
        }
        Ok((ctx, missing))
    }

    /// Processes everything new, once. A failing table does not stop the others;
    /// its error is in its report.
    pub async fn run(&self) -> Result<RunReport> {
        let started = std::time::Instant::now();
        let run_id = self.state.begin_run()?;
        let progress = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} objects, {per_sec}, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        progress.set_message(format!("loading {}", self.pipeline.name));
        progress.enable_steady_tick(Duration::from_millis(200));
        let mut tables: Vec<TableReport> = futures::stream::iter(self.pipeline.tables.iter())
            .map(|table| table::TableRun::new(self, table, &progress).run())
            .buffer_unordered(MAX_PARALLEL_TABLES)
            .collect()
            .await;
        progress.finish_and_clear();
        let order = |t: &TableReport| {
            self.pipeline
                .tables
                .iter()
                .position(|x| x.qualified() == t.table)
        };
        tables.sort_by_key(order);
        let report = RunReport {
            pipeline: self.pipeline.name.clone(),
            tables,
            seconds: started.elapsed().as_secs_f64(),
        };
        let summary = serde_json::to_string(&report).expect("report serializes");
        self.state.finish_run(run_id, report.ok(), &summary)?;
        Ok(report)
    }
}
