//! Applying an in-order batch to a current-state table by deletion vectors.
//!
//! A copy-on-write MERGE rewrites every file that holds a changed key: when
//! changes are spread over the keys, that is the whole table, so one more
//! small object costs as much as the table. Here the rows a batch replaces
//! are marked deleted in their files instead (Delta deletion vectors: a
//! bitmap of row positions per file, in one small file per commit), and the
//! batch's new rows are appended as a new file. The cost is the batch plus
//! one scan of the table's key columns. Readers must apply deletion vectors
//! (`make bench` checks the tables with Polars over Python `deltalake`).
//!
//! Readers skip the marked rows until the table is rewritten: [`rewrite_due`]
//! asks for that once they are a quarter of the table's rows (or the table
//! has many files), so the rewritten rows per changed row stay bounded and
//! the table does not grow without end.
//!
//! The semantics are those of `sql/current_merge.sql`: a target row whose
//! key has a newer change is replaced (deleted, and the change's row
//! appended unless it is a hard delete); a change no newer than the target
//! row of its key is dropped; a change to a key the table lacks is appended
//! unless it is a hard delete.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use datafusion::prelude::SessionContext;
use delta_kernel::actions::deletion_vector_writer::{
    KernelDeletionVector, StreamingDeletionVectorWriter,
};
use deltalake::DeltaTable;
use deltalake::DeltaTableError;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor, Remove, StorageType};
use deltalake::logstore::parquet_reader::ParquetObjectReader;
use deltalake::protocol::DeltaOperation;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::ProjectionMask;

use super::{DeltaWarehouse, LATEST, cast_to, register_latest, writer_properties};
use crate::error::{Error, Result};
use crate::merge::{KeyLookup, Latest, Loc, Merger};
use crate::warehouse::LoadRequest;

/// The table property that lets writers add deletion vectors (and makes
/// the table's protocol require readers that apply them).
const ENABLE: &str = "delta.enableDeletionVectors";

/// A table with more files than this is due for a rewrite. Each file costs
/// a batch a few milliseconds (its deletion vector and footer are read); a
/// rewrite of a 2M-row table under a second (`make bench`): every 16
/// batches keeps both small.
const MAX_FILES: usize = 16;

/// Turns deletion vectors on for `table` unless they are on already.
pub(super) async fn enable(table: DeltaTable, name: &str) -> Result<DeltaTable> {
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::warehouse(name, "reading the table's properties", e))?;
    let enabled = snapshot
        .metadata()
        .configuration()
        .get(ENABLE)
        .is_some_and(|v| v == "true");
    if enabled {
        return Ok(table);
    }
    table
        .set_tbl_properties()
        .with_properties([(ENABLE.to_string(), "true".to_string())].into())
        .await
        .map_err(|e| Error::warehouse(name, "enabling deletion vectors", e))
}

/// Whether `table` is due for a rewrite that drops the rows marked deleted:
/// when they are a quarter of its rows, or it has too many files.
pub(super) fn rewrite_due(table: &DeltaTable, name: &str) -> Result<bool> {
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::warehouse(name, "reading the snapshot", e))?;
    let (mut rows, mut deleted, mut files) = (0u64, 0u64, 0usize);
    for file in snapshot.log_data().iter() {
        files += 1;
        rows += file.num_records().unwrap_or(0) as u64;
        deleted += file
            .deletion_vector_descriptor()
            .map_or(0, |dv| dv.cardinality as u64);
    }
    Ok(files > MAX_FILES || (deleted > 0 && deleted * 4 >= rows))
}

/// One file whose deletion vector grows.
struct Marked {
    add: Add,
    remove: Remove,
    deleted: KernelDeletionVector,
}

/// Applies the latest changes of `req`'s batch, registered as [`LATEST`] in
/// `ctx`, to `table`, in one commit that records the
/// batch under `app`.
/// `compare_seq`: the batch may hold changes no newer than rows of the
/// table (its first change equals the loaded maximum), so each target row's
/// `change_seq` is compared; otherwise every change is newer.
pub(super) async fn apply(
    table: DeltaTable,
    name: &str,
    req: &LoadRequest<'_>,
    app: &str,
    ctx: &SessionContext,
    latest: Latest,
    compare_seq: bool,
) -> Result<()> {
    let merger = req.merger;
    let fail = |context: &str, e: DeltaTableError| Error::warehouse(name, context.to_string(), e);
    // The keys (not the rows: a spilled set stays on disk, read off the runtime's threads).
    let (lookup, latest) = off_runtime(merger, move |merger| {
        KeyLookup::new(merger, &latest, compare_seq).map(|lookup| (Arc::new(lookup), latest))
    })
    .await?;
    // Changes no newer than their key's row in the table: not applied.
    let mut stale = HashSet::new();
    let mut marked = Vec::new();
    if latest.num_rows() > 0 {
        let snapshot = table
            .snapshot()
            .map_err(|e| fail("reading the snapshot", e))?;
        let engine = table.log_store().engine(None);
        let root = table.log_store().root_url().clone();
        let store = table.object_store();
        for file in snapshot.log_data().iter() {
            let path = file.object_store_path();
            let data = ParquetObjectReader::new(store.clone(), path.clone())
                .with_file_size(file.size() as u64);
            let found = key_matches(&path, data, &lookup, merger, compare_seq)
                .await
                .map_err(|e| fail("reading the key columns", e))?;
            if found.is_empty() {
                continue;
            }
            // Only a file holding changed keys has its deletion vector read.
            let before = match file.deletion_vector_descriptor() {
                None => roaring::RoaringTreemap::new(),
                Some(dv) => read_deletion_vector(dv, engine.clone(), root.clone())
                    .await
                    .map_err(|e| fail("reading a deletion vector", e))?,
            };
            let mut replaced = Vec::new();
            // A row marked already is no key's row any more.
            for (row, loc, newer) in found.into_iter().filter(|m| !before.contains(m.0)) {
                if newer {
                    replaced.push(row);
                } else {
                    stale.insert(loc);
                }
            }
            if replaced.is_empty() {
                continue;
            }
            let mut deleted = KernelDeletionVector::new();
            deleted.add_deleted_row_indexes(before.iter());
            deleted.add_deleted_row_indexes(replaced);
            let remove = file.remove_action(true);
            marked.push(Marked {
                add: add_of(&file, &remove),
                remove,
                deleted,
            });
        }
    }
    let mut actions = write_deletion_vectors(&table, marked)
        .await
        .map_err(|e| fail("writing deletion vectors", e))?;
    // The changes to append: all but the stale ones, as current-state rows.
    drop(lookup);
    let fresh = off_runtime(merger, move |_| latest.without(&stale)).await?;
    if fresh.num_rows() > 0 {
        register_latest(ctx, fresh)?;
        let rows = merger
            .current_state(ctx, LATEST)
            .await?
            .select(cast_to(&merger.current_schema()))
            .map_err(|e| Error::query("current_rebuild.sql", e))?
            .execute_stream()
            .await
            .map_err(|e| Error::query("current_rebuild.sql", e))?;
        let properties = writer_properties(&merger.current_schema(), &merger.meta.change_seq);
        let added = super::files::write(&table, rows, properties)
            .await
            .map_err(|e| fail("writing new rows", e))?;
        actions.extend(added);
    }
    let snapshot = table
        .snapshot()
        .map_err(|e| fail("reading the snapshot", e))?;
    CommitBuilder::from(DeltaWarehouse::commit(app, req))
        .with_actions(actions)
        .build(
            Some(snapshot),
            table.log_store(),
            DeltaOperation::Merge {
                predicate: None,
                merge_predicate: None,
                matched_predicates: Vec::new(),
                not_matched_predicates: Vec::new(),
                not_matched_by_source_predicates: Vec::new(),
            },
        )
        .await
        .map_err(|e| fail("committing the batch", e))?;
    Ok(())
}

/// Runs `work` (file reads, CPU) on a blocking thread, with a copy of `merger`.
async fn off_runtime<T: Send + 'static>(
    merger: &Merger,
    work: impl FnOnce(&Merger) -> Result<T> + Send + 'static,
) -> Result<T> {
    let merger = merger.clone();
    tokio::task::spawn_blocking(move || work(&merger))
        .await
        .map_err(|e| Error::Internal(format!("reading the latest changes: {e}")))?
}

/// The rows of a file already marked deleted, read by Delta's kernel
/// (whichever way the descriptor stores them).
async fn read_deletion_vector(
    dv: DeletionVectorDescriptor,
    engine: Arc<dyn delta_kernel::Engine>,
    root: url::Url,
) -> std::result::Result<roaring::RoaringTreemap, DeltaTableError> {
    let dv: delta_kernel::actions::deletion_vector::DeletionVectorDescriptor = dv.try_into()?;
    // The kernel reads synchronously: off the async workers.
    tokio::task::spawn_blocking(move || dv.read(engine.storage_handler(), &root))
        .await
        .map_err(|e| DeltaTableError::Generic(e.to_string()))?
        .map_err(DeltaTableError::from)
}

/// Scans the key columns of the data file `data` at `path` (and `change_seq` when
/// `compare_seq`): for each of its rows whose key has a change in `latest`,
/// the row's position, the change, and whether the change is newer.
async fn key_matches(
    path: &object_store::path::Path,
    data: ParquetObjectReader,
    lookup: &KeyLookup,
    merger: &Merger,
    compare_seq: bool,
) -> std::result::Result<Vec<(u64, Loc, bool)>, DeltaTableError> {
    let builder = ParquetRecordBatchStreamBuilder::new(data).await?;
    let mut names: Vec<&str> = merger.key.iter().map(String::as_str).collect();
    if compare_seq {
        names.push(&merger.meta.change_seq);
    }
    let missing = |name: &str| DeltaTableError::Generic(format!("{path} has no column {name:?}"));
    let columns = names
        .iter()
        .map(|n| builder.schema().index_of(n).map_err(|_| missing(n)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // The file's column order is kept: columns are picked by name below.
    let mask = ProjectionMask::roots(builder.parquet_schema(), columns);
    let mut reader = builder
        .with_projection(mask)
        .with_batch_size(65_536)
        .build()?;
    let mut matches = Vec::new();
    let mut position = 0u64;
    while let Some(chunk) = reader.next().await {
        let chunk = chunk?;
        let column = |name: &str| {
            chunk
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| missing(name))
        };
        let keys = merger
            .key
            .iter()
            .map(|k| column(k))
            .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
        let seqs = compare_seq
            .then(|| column(&merger.meta.change_seq))
            .transpose()?;
        let seqs = seqs.as_ref().map(|s| s.as_string::<i32>());
        let found = lookup
            .find(&keys)
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        for (i, loc) in found.into_iter().enumerate() {
            let Some(loc) = loc else { continue };
            let newer =
                seqs.is_none_or(|seqs| lookup.seq(loc).is_none_or(|seq| seq > seqs.value(i)));
            matches.push((position + i as u64, loc, newer));
        }
        position += chunk.num_rows() as u64;
    }
    Ok(matches)
}

/// Writes the grown deletion vectors into one new file; returns the actions
/// that swap each data file's old descriptor for its new one.
async fn write_deletion_vectors(
    table: &DeltaTable,
    marked: Vec<Marked>,
) -> std::result::Result<Vec<Action>, DeltaTableError> {
    if marked.is_empty() {
        return Ok(Vec::new());
    }
    let id = uuid::Uuid::new_v4();
    let mut bytes = Vec::new();
    let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
    let mut written = Vec::with_capacity(marked.len());
    for m in marked {
        let result = writer.write_deletion_vector(m.deleted)?;
        written.push((m.add, m.remove, result));
    }
    writer.finalize()?;
    let path = object_store::path::Path::from(format!("deletion_vector_{id}.bin"));
    table.object_store().put(&path, bytes.into()).await?;
    let mut actions = Vec::with_capacity(2 * written.len());
    for (mut add, remove, result) in written {
        add.deletion_vector = Some(DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: z85::encode(id.as_bytes()),
            offset: Some(result.offset),
            size_in_bytes: result.size_in_bytes,
            cardinality: result.cardinality,
        });
        actions.push(Action::Remove(remove));
        actions.push(Action::Add(add));
    }
    Ok(actions)
}

/// The add action of `file` as it is (its deletion vector is replaced by
/// the caller). Its statistics stay those of all its physical rows, which
/// the protocol allows once they are flagged as not tight.
fn add_of(file: &deltalake::kernel::LogicalFileView, remove: &Remove) -> Add {
    let stats = file.stats().map(
        |stats| match serde_json::from_str::<serde_json::Value>(&stats) {
            Ok(serde_json::Value::Object(mut fields)) => {
                fields.insert("tightBounds".into(), false.into());
                serde_json::Value::Object(fields).to_string()
            }
            _ => stats,
        },
    );
    Add {
        path: remove.path.clone(),
        partition_values: remove.partition_values.clone().unwrap_or_default(),
        size: file.size(),
        modification_time: file.modification_time(),
        data_change: true,
        stats,
        tags: remove.tags.clone(),
        deletion_vector: None,
        base_row_id: remove.base_row_id,
        default_row_commit_version: remove.default_row_commit_version,
        clustering_provider: None,
    }
}
