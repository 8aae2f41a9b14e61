//! The batch ledger of a Delta warehouse: every commit of a batch carries,
//! beside its application transaction (`cdcflow:<pipeline>:<table>` = batch
//! number), a commit-info entry `cdcflow` naming the state store that planned
//! the batch, the batch id, its mode and its objects. The pipeline compares
//! the last entry with its state store before loading (a lost or restored
//! store is refused), and `cdcflow repair --from-warehouse` rebuilds a state
//! store from the entries and the history rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::super::LoadRequest;
use crate::error::{Error, Result};
use crate::merge::{Merger, sql};
use crate::state::{Batch, BatchMode, ObjectRef, Restored};

/// The commit-info key of the entry.
const KEY: &str = "cdcflow";
/// How many recent commits are searched for the entry of the recorded batch
/// (a batch adds one or two commits to history; schema changes add others).
const RECENT: usize = 32;

/// One batch's entry in a commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Entry {
    /// The state store that planned the batch.
    pub(super) store: String,
    /// Batch number.
    pub(super) batch: i64,
    /// Batch id.
    pub(super) batch_id: String,
    /// `append` or `replace`.
    pub(super) mode: String,
    /// The batch's objects, in change order.
    pub(super) objects: Vec<ObjectRef>,
    /// The fencing token of the pipeline lease the batch was loaded under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) lease_token: Option<i64>,
}

/// The commit-info metadata of `req`'s batch.
pub(super) fn entry(req: &LoadRequest<'_>) -> (String, serde_json::Value) {
    let entry = Entry {
        store: req.store.to_string(),
        batch: req.batch.number,
        batch_id: req.batch.id.clone(),
        mode: req.batch.mode.as_str().to_string(),
        objects: req.batch.objects.clone(),
        lease_token: req.lease_token,
    };
    (
        KEY.to_string(),
        serde_json::to_value(entry).expect("an entry serializes"),
    )
}

/// Entries of `table`'s commits (the latest `limit`, or all), by batch number.
async fn entries(
    table: &DeltaTable,
    name: &str,
    limit: Option<usize>,
) -> Result<BTreeMap<i64, Entry>> {
    if table.version().is_none() {
        return Ok(BTreeMap::new());
    }
    let infos: Vec<_> = table
        .history(limit)
        .try_collect()
        .await
        .map_err(|e| Error::warehouse(name, "reading the commit history", e))?;
    Ok(infos
        .into_iter()
        .filter_map(|info| serde_json::from_value::<Entry>(info.info.get(KEY)?.clone()).ok())
        .map(|e| (e.batch, e))
        .collect())
}

/// The entry of batch `number` among `table`'s recent commits, if written.
pub(super) async fn find(table: &DeltaTable, name: &str, number: i64) -> Result<Option<Entry>> {
    if number == 0 {
        return Ok(None);
    }
    // Almost always the latest commit: read one, and more only when it is not.
    for limit in [1, RECENT] {
        if let Some(entry) = entries(table, name, Some(limit)).await?.remove(&number) {
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

/// Refuses a load under lease token `ours` when `table`'s newest commit was
/// made under a greater one: another worker took the pipeline's lease
/// since, and this one must not write (fencing, see `state::Leases`).
pub(super) async fn check_fence(
    table: &DeltaTable,
    name: &str,
    pipeline: &str,
    ours: Option<i64>,
) -> Result<()> {
    let Some(ours) = ours else {
        return Ok(());
    };
    let newest = entries(table, name, Some(1))
        .await?
        .into_values()
        .filter_map(|e| e.lease_token)
        .max();
    match newest {
        Some(newest) if newest > ours => {
            tracing::error!(
                table = name,
                ours,
                newest,
                "the table was written under a newer lease; not loading"
            );
            Err(Error::LeaseLost {
                pipeline: pipeline.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// A table the warehouse holds nothing of.
pub(super) fn empty() -> Restored {
    Restored {
        number: 0,
        id: String::new(),
        objects: Vec::new(),
        stats: Default::default(),
        pending: None,
    }
}

/// What `history` (read through `provider`) recorded, as a state store
/// holds it. `loaded` and `applied`: the batch numbers recorded in history
/// and in current state; a batch in history but not in current state is
/// pending, and its entry must say which objects it holds.
pub(super) async fn restore(
    history: &DeltaTable,
    name: &str,
    provider: Arc<dyn datafusion::catalog::TableProvider>,
    merger: &Merger,
    (loaded, applied): (i64, i64),
) -> Result<Restored> {
    let entries = entries(history, name, None).await?;
    let pending = if loaded > applied {
        let entry = entries.get(&loaded).ok_or_else(|| {
            Error::Usage(format!(
                "{name} holds batch {loaded} and current state batch {applied}, and the commit of \
                 batch {loaded} does not name its objects (written by a cdcflow before 0.2): run the \
                 pipeline with the state store it was loaded with, or reload the table"
            ))
        })?;
        Some(Batch {
            number: loaded,
            id: entry.batch_id.clone(),
            objects: entry.objects.clone(),
            mode: BatchMode::parse(&entry.mode),
        })
    } else {
        None
    };
    let in_pending = |key: &str| {
        pending
            .as_ref()
            .is_some_and(|p| p.objects.iter().any(|o| o.key == key))
    };

    // Every object the committed batches named, then any other object history holds rows of.
    let mut objects: BTreeMap<String, ObjectRef> = entries
        .range(..=applied)
        .flat_map(|(_, e)| e.objects.iter().cloned())
        .filter(|o| !in_pending(&o.key))
        .map(|o| (o.key.clone(), o))
        .collect();
    let ctx = SessionContext::new();
    let fail = |e| Error::query("reading history for the repair", e);
    ctx.register_table("history", provider).map_err(fail)?;
    let source_file = sql::ident(&merger.meta.source_file);
    let pending_keys: Vec<String> = pending
        .iter()
        .flat_map(|p| p.objects.iter().map(|o| sql::literal(&o.key)))
        .collect();
    let loaded_rows = if pending_keys.is_empty() {
        "SELECT * FROM history".to_string()
    } else {
        format!(
            "SELECT * FROM history WHERE {source_file} NOT IN ({})",
            pending_keys.join(", ")
        )
    };
    let view = ctx.sql(&loaded_rows).await.map_err(fail)?;
    ctx.register_table("loaded", view.into_view())
        .map_err(fail)?;
    let files = ctx
        .sql(&format!("SELECT DISTINCT {source_file} FROM loaded"))
        .await
        .map_err(fail)?
        .collect()
        .await
        .map_err(fail)?;
    for batch in &files {
        let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| fail(e.into()))?;
        use arrow::array::{Array, AsArray};
        let keys = column.as_string::<i32>();
        for i in (0..keys.len()).filter(|&i| keys.is_valid(i)) {
            let key = keys.value(i).to_string();
            objects.entry(key.clone()).or_insert(ObjectRef {
                key,
                etag: String::new(),
                size: 0,
                last_modified: Default::default(),
            });
        }
    }
    let (stats, _) = merger.batch_stats(&ctx, "loaded").await?;
    Ok(Restored {
        number: applied,
        id: entries
            .get(&applied)
            .map_or_else(|| "repaired".to_string(), |e| e.batch_id.clone()),
        objects: objects.into_values().collect(),
        stats,
        pending,
    })
}
