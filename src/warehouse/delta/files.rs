//! A batch's rows written as Parquet by several writers at once.
//!
//! delta-rs drains every input of an unpartitioned write through one writer
//! task, so a batch's Parquet encoding (most of its cost) ran on one core
//! however many the process had. Here each of `writers` tasks takes the next
//! chunk of the shared row stream and encodes it into files of its own. The
//! caller commits all their files in one commit that records the batch, so a
//! batch is still loaded whole or not at all: a writer that fails stops the
//! others, and the files written until then are in no commit, which no reader
//! sees (vacuum removes them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::execution::SendableRecordBatchStream;
use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::operations::write::WriterStatsConfig;
use deltalake::operations::write::writer::{DeltaWriter, WriterConfig};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaResult, DeltaTable, DeltaTableError};
use futures::StreamExt;

/// Rows all writers together hold in unfinished row groups: each writer's
/// row groups are this divided by the writers, so memory stays the same
/// however many write at once. A writer holds a row group twice as it ends
/// (its encoded pages, and their copy in the file buffer): at 1M rows that
/// was 110 MB of a 10M-change batch's peak.
const BUFFERED_ROWS: usize = 1 << 18;

/// Rows taken before each further writer starts: a small batch is one file,
/// not a file per thread.
const ROWS_PER_WRITER: u64 = 1 << 16;

/// Appends `rows` (of `table`'s schema) to `table` in one commit with `commit`'s
/// properties (the batch's application transaction and ledger entry).
pub(super) async fn append(
    table: &DeltaTable,
    rows: SendableRecordBatchStream,
    properties: WriterProperties,
    commit: CommitProperties,
) -> DeltaResult<()> {
    let actions = write(table, rows, properties).await?;
    self::commit(table, actions, commit, SaveMode::Append).await
}

/// Replaces every row of `table` by `rows` (of its schema) in one commit with
/// `commit`'s properties. `rows` may read `table`: its files are removed only
/// by the commit.
pub(super) async fn overwrite(
    table: &DeltaTable,
    rows: SendableRecordBatchStream,
    properties: WriterProperties,
    commit: CommitProperties,
) -> DeltaResult<()> {
    let mut actions: Vec<Action> = table
        .snapshot()?
        .log_data()
        .iter()
        .map(|file| Action::Remove(file.remove_action(true)))
        .collect();
    actions.extend(write(table, rows, properties).await?);
    self::commit(table, actions, commit, SaveMode::Overwrite).await
}

async fn commit(
    table: &DeltaTable,
    actions: Vec<Action>,
    commit: CommitProperties,
    mode: SaveMode,
) -> DeltaResult<()> {
    CommitBuilder::from(commit)
        .with_actions(actions)
        .build(
            Some(table.snapshot()?),
            table.log_store(),
            DeltaOperation::Write {
                mode,
                partition_by: None,
                predicate: None,
            },
        )
        .await?;
    Ok(())
}

/// Writes `rows` (of `table`'s schema) into new Parquet files of `table`, a
/// writer per thread ([`crate::threads`]), and returns the files' add
/// actions, uncommitted.
pub(super) async fn write(
    table: &DeltaTable,
    rows: SendableRecordBatchStream,
    properties: WriterProperties,
) -> DeltaResult<Vec<Action>> {
    let writers = crate::threads::count();
    let state = table.snapshot()?;
    let schema = state.snapshot().arrow_schema();
    let stats = WriterStatsConfig::from_config(state.snapshot().table_configuration());
    let properties = properties
        .into_builder()
        .set_max_row_group_row_count(Some((BUFFERED_ROWS / writers).max(1 << 14)))
        .build();
    let config = WriterConfig::new(
        schema.clone(),
        Vec::new(),
        Some(properties),
        Some(state.table_config().target_file_size()),
        None,
        stats.num_indexed_cols,
        stats.stats_columns,
    );
    let shared = Arc::new(Shared {
        rows: tokio::sync::Mutex::new(rows.fuse()),
        taken: tokio::sync::watch::channel(0).0,
        failed: AtomicBool::new(false),
        schema,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..writers {
        let writer = DeltaWriter::new(table.object_store(), config.clone());
        let shared = shared.clone();
        tasks.spawn(async move {
            // Writer i starts once the others took i × ROWS_PER_WRITER rows.
            let start = i as u64 * ROWS_PER_WRITER;
            let _ = shared.taken.subscribe().wait_for(|&n| n >= start).await;
            let written = shared.fill(writer).await;
            if written.is_err() {
                shared.failed.store(true, Ordering::SeqCst);
            }
            // The rows ended or a writer failed: the writers still waiting stop.
            shared.taken.send_replace(u64::MAX);
            written
        });
    }
    let failed = &shared.failed;
    let mut actions = Vec::new();
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let done = done.unwrap_or_else(|join| {
            failed.store(true, Ordering::SeqCst);
            Err(DeltaTableError::Generic(format!(
                "a Parquet writer stopped: {join}"
            )))
        });
        match done {
            Ok(adds) => actions.extend(adds.into_iter().map(Action::Add)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(actions),
    }
}

/// What the writers of one write share.
struct Shared {
    /// Fused: each writer asks for more rows after they ended.
    rows: tokio::sync::Mutex<futures::stream::Fuse<SendableRecordBatchStream>>,
    /// Rows taken so far (`u64::MAX` once they ended or a writer failed).
    taken: tokio::sync::watch::Sender<u64>,
    failed: AtomicBool,
    schema: arrow::datatypes::SchemaRef,
}

impl Shared {
    /// One writer: takes chunks until the rows end (then closes its files)
    /// or any writer failed (then abandons them).
    async fn fill(&self, mut writer: DeltaWriter) -> DeltaResult<Vec<deltalake::kernel::Add>> {
        loop {
            let next = match self.failed.load(Ordering::SeqCst) {
                true => None,
                false => self.rows.lock().await.next().await,
            };
            let Some(chunk) = next else { break };
            let written = match chunk
                .map_err(DeltaTableError::from)
                .and_then(|c| conform(&self.schema, c))
            {
                Ok(chunk) => {
                    let rows = chunk.num_rows() as u64;
                    self.taken.send_modify(|n| *n = n.saturating_add(rows));
                    writer.write(&chunk).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        if self.failed.load(Ordering::SeqCst) {
            let _ = writer.abort().await;
            return Ok(Vec::new());
        }
        writer.close().await
    }
}

/// `chunk` with the table's columns, found by name, in the table's order,
/// with its nullability and types (a scan yields string views where the
/// table stores strings; a column added to the table comes last there); a
/// value the table's type cannot hold is an error, never a null.
fn conform(
    schema: &arrow::datatypes::SchemaRef,
    chunk: arrow::array::RecordBatch,
) -> DeltaResult<arrow::array::RecordBatch> {
    let options = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = chunk.column_by_name(field.name()).ok_or_else(|| {
                DeltaTableError::Generic(format!(
                    "the rows lack the table's column {:?}",
                    field.name()
                ))
            })?;
            Ok(match column.data_type() == field.data_type() {
                true => column.clone(),
                false => arrow::compute::cast_with_options(column, field.data_type(), &options)?,
            })
        })
        .collect::<DeltaResult<Vec<_>>>()?;
    Ok(arrow::array::RecordBatch::try_new(schema.clone(), columns)?)
}
