//! Before a table loads anything, its state store and its warehouse must
//! tell the same story of its batches; `repair --from-warehouse` makes the
//! state store tell the warehouse's when they do not.
//!
//! The warehouse's last recorded batch `r` (with its batch id) against the
//! state store's last committed batch `c` and pending batch `p`:
//! - `r == p`: the pending batch was loaded in part or in full; it must be
//!   the same batch (same id), else another store planned it;
//! - `r == c`: the last committed batch must be the same batch;
//! - `r` above both: the state store is behind the warehouse (lost,
//!   restored from an older backup, or a second store);
//! - `r` below `c`: the warehouse is behind (restored or replaced).
//!
//! Loading in any of the last three cases would skip batches the warehouse
//! takes for its own, or load them twice: the table is refused instead.

use crate::error::{Error, Result};
use crate::state::Manifest;
use crate::warehouse::Recorded;

/// What an operator runs to rebuild the state store from the warehouse.
const REPAIR: &str = "cdcflow repair --from-warehouse --pipeline <this pipeline file>";

/// Refuses `table` when the warehouse's `recorded` batch does not fit the
/// state store's batches (see the module doc).
pub(crate) fn check(table: &str, state: &dyn Manifest, recorded: &Recorded) -> Result<()> {
    let Recorded::Batch { number, id, store } = recorded else {
        return Ok(());
    };
    let (number, id) = (*number, id.as_deref());
    let committed = state.last_batch(table)?;
    let pending = state.pending_batch(table)?;
    let c = committed.as_ref().map_or(0, |b| b.number);
    let same = |ours: &str| id.is_none_or(|theirs| theirs == ours);
    let writer = match store.as_deref() {
        Some(s) if s == state.store_id() => "this state store".to_string(),
        Some(s) => format!("state store {s}"),
        None => "a state store".to_string(),
    };
    let refuse = |message: String| {
        Err(Error::Ledger {
            table: table.to_string(),
            message,
        })
    };
    match (&pending, &committed) {
        (Some(p), _) if p.number == number => {
            if same(&p.id) {
                return Ok(());
            }
            refuse(format!(
                "the warehouse's batch {number} (planned by {writer}) holds other objects than this \
                 state store's pending batch {number}: another state store loads this warehouse. \
                 Nothing was loaded. Give each pipeline its own warehouse tables, or rebuild this \
                 state store with `{REPAIR}`"
            ))
        }
        (_, Some(b)) if b.number == number => {
            if same(&b.id) {
                return Ok(());
            }
            refuse(format!(
                "the warehouse's batch {number} (planned by {writer}) holds other objects than this \
                 state store's batch {number}: another state store loads this warehouse. Nothing was \
                 loaded. Give each pipeline its own warehouse tables, or rebuild this state store \
                 with `{REPAIR}`"
            ))
        }
        _ if number == 0 && c == 0 => Ok(()),
        _ if number > c => refuse(format!(
            "the state store is behind the warehouse: the warehouse holds batch {number} (planned by \
             {writer}), this state store ({}) has committed {}. The state store was lost, restored \
             from an older backup, or replaced. Loading now would skip or double changes, so nothing \
             was loaded. Run `{REPAIR}` to rebuild the state store from what the warehouse recorded; \
             the next run then loads exactly what is missing",
            state.store_id(),
            if c == 0 {
                "no batch".to_string()
            } else {
                format!("batch {c}")
            },
        )),
        _ => refuse(format!(
            "the warehouse is behind the state store: the warehouse holds batch {number}, the state \
             store committed batch {c}. The warehouse tables were restored or replaced, so changes the \
             state store counts as loaded are missing. Nothing was loaded. To reload from the source, \
             move both the warehouse tables and the state store aside and run again; to keep this \
             warehouse, run `{REPAIR}`"
        )),
    }
}
