//! Warehouses: where history and current-state tables are loaded.
//!
//! Contract of every [`Warehouse`]: loading is idempotent per batch.
//! A table's batches are loaded in increasing number; loading a batch whose
//! number the warehouse has already recorded for that table changes
//! nothing and answers [`LoadOutcome::AlreadyLoaded`]. The history rows and
//! the current-state changes of a batch may become visible in two steps, but
//! each step is atomic and recorded, so a retry after a crash between them
//! finishes the second step without repeating the first.
//!
//! A warehouse that keeps a batch ledger (Delta) names, in each commit, the
//! state store and the batch id the commit belongs to, and answers
//! [`Warehouse::last_recorded`] with them: the pipeline compares that with
//! its state store before loading anything, so a lost, restored or second
//! state store is refused instead of skipping or doubling batches, and
//! [`Warehouse::ledger`] lets `cdcflow repair --from-warehouse` rebuild it.

mod bigquery;
mod database;
mod delta;

use arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;

pub use bigquery::BigQueryWarehouse;
pub use database::DatabaseWarehouse;
pub use delta::DeltaWarehouse;

use crate::config::{Column, Table};
use crate::error::Result;
use crate::merge::Merger;
use crate::merge::sql::Dialect;
use crate::state::{Batch, BatchMode, BatchStats, Restored};

/// One batch to load.
pub struct LoadRequest<'a> {
    /// The table.
    pub table: &'a Table,
    /// The recorded batch.
    pub batch: &'a Batch,
    /// Its merger (schemas and SQL).
    pub merger: &'a Merger,
    /// Its history rows, streamed once (not read when history already holds the batch).
    pub rows: HistoryRows,
    /// The largest `change_seq` loaded before this batch.
    pub loaded_max: Option<String>,
    /// The id of the state store that planned the batch.
    pub store: &'a str,
    /// The fencing token of the pipeline lease the load runs under: a
    /// warehouse that records it refuses a load under an older token than
    /// one it holds (see `state::Leases`).
    pub lease_token: Option<i64>,
}

/// The last batch a warehouse recorded for a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The warehouse keeps no ledger: its loads are idempotent by content
    /// (BigQuery: history merges on `(change_seq, source_file)` and current
    /// state applies only newer changes, so a replay adds nothing).
    Untracked,
    /// The last batch number recorded (0: none) and, when the commit names
    /// them, its batch id and the state store that planned it.
    Batch {
        /// Batch number.
        number: i64,
        /// Batch id ([`Batch::id`]).
        id: Option<String>,
        /// State store id.
        store: Option<String>,
    },
}

/// The history rows of a batch as a one-shot stream, produced while they are read.
pub struct HistoryRows(std::sync::Mutex<Option<SendableRecordBatchStream>>);

impl HistoryRows {
    /// Wraps the stream.
    pub fn new(stream: SendableRecordBatchStream) -> Self {
        HistoryRows(std::sync::Mutex::new(Some(stream)))
    }

    /// Takes the stream; `None` the second time.
    pub fn take(&self) -> Option<SendableRecordBatchStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// How a batch is applied to the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Newer than everything loaded: append history, merge the latest change per key.
    InOrder,
    /// Holds changes older than ones already loaded: append history, then
    /// recompute the current state of its keys from their whole history.
    Late,
    /// Backfill: the history rows of the batch's objects replace the ones
    /// loaded before (atomically), then current state is rebuilt from history.
    Replace,
}

impl Apply {
    /// How a batch of `mode` whose smallest `change_seq` is `min_seq` applies
    /// after `loaded_max`.
    pub fn choose(mode: BatchMode, min_seq: Option<&str>, loaded_max: Option<&str>) -> Apply {
        match (mode, min_seq, loaded_max) {
            (BatchMode::Replace, ..) => Apply::Replace,
            (BatchMode::Append, Some(min), Some(loaded)) if min < loaded => Apply::Late,
            _ => Apply::InOrder,
        }
    }
}

/// A place to load history and current-state tables.
#[async_trait::async_trait]
pub trait Warehouse: Send + Sync {
    /// Applies one batch; idempotent per batch number (see the module contract).
    /// Returns the batch's figures as the warehouse holds them.
    async fn load(&self, request: LoadRequest<'_>) -> Result<BatchStats>;

    /// The last batch recorded for `table` (in its history table, the first
    /// step of a load). Default: [`Recorded::Untracked`].
    async fn last_recorded(&self, _table: &Table) -> Result<Recorded> {
        Ok(Recorded::Untracked)
    }

    /// What the warehouse recorded of `table`, as a state store would hold
    /// it: the last batch applied in full with every object loaded up to it
    /// and their figures, and a batch applied in part. `None`: no ledger
    /// (see [`Recorded::Untracked`]).
    async fn ledger(&self, _table: &Table, _merger: &Merger) -> Result<Option<Restored>> {
        Ok(None)
    }

    /// Whether any step of `batch` has been applied to `table`'s tables:
    /// `false` means the batch left no trace and may still be re-planned.
    async fn batch_started(&self, table: &Table, batch: &Batch, store: &str) -> Result<bool>;

    /// The data columns of `table` if the warehouse holds it already.
    async fn columns(&self, table: &Table, merger: &Merger) -> Result<Option<Vec<Column>>>;

    /// Deletes the files of `table`'s tables that no version younger than
    /// `retain` reads any more (files a rewrite replaced), or with `dry_run`
    /// only lists them; returns their paths. `None`: the warehouse manages
    /// its own storage.
    async fn vacuum(
        &self,
        _table: &Table,
        _retain: std::time::Duration,
        _dry_run: bool,
    ) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    /// Whether the warehouse keeps `<t>_history`, which the redelivery check
    /// reads (a database replica keeps only current rows). Default: true.
    fn keeps_history(&self) -> bool {
        true
    }

    /// Why column `name` cannot be a column of this warehouse's tables, if
    /// it cannot; checked before anything of a table is loaded.
    fn refuses_column(&self, _name: &str) -> Option<String> {
        None
    }

    /// How its tables answer SQL: the capability beside loading.
    fn queries(&self) -> Queries<'_>;
}

/// How a warehouse's tables answer SQL (history lookups of the redelivery
/// check, `cdcflow query`, `cdcflow history`).
pub enum Queries<'a> {
    /// The warehouse runs SQL in its own engine (BigQuery).
    Engine(&'a dyn SqlEngine),
    /// Its tables register in a DataFusion session, which runs the SQL (Delta).
    DataFusion(&'a dyn DataFusionTables),
}

impl Queries<'_> {
    /// The dialect the SQL is written in.
    pub fn dialect(&self) -> Dialect {
        match self {
            Queries::Engine(engine) => engine.dialect(),
            Queries::DataFusion(_) => Dialect::DataFusion,
        }
    }
}

/// A warehouse with an SQL engine of its own.
#[async_trait::async_trait]
pub trait SqlEngine: Send + Sync {
    /// Runs `sql` (in [`SqlEngine::dialect`]; unqualified table names
    /// resolve in the warehouse's dataset) and returns its rows.
    async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>>;

    /// Its SQL dialect.
    fn dialect(&self) -> Dialect;
}

/// A warehouse whose tables DataFusion reads.
#[async_trait::async_trait]
pub trait DataFusionTables: Send + Sync {
    /// Registers `<t>`, `<t>_history` and the `<t>_versions` view in `ctx`;
    /// returns false when the table has not been loaded yet.
    async fn register(&self, ctx: &SessionContext, table: &Table, merger: &Merger) -> Result<bool>;
}
