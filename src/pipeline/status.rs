//! Where a table stands: its objects in the source against the state's
//! decisions (`cdcflow status` prints it, `/metrics` exports it), and the
//! life of one of its rows (`cdcflow history`, the web UI).

use arrow::array::RecordBatch;
use chrono::{DateTime, TimeDelta, Utc};

use super::Runner;
use crate::config::Table;
use crate::error::{Error, Result};
use crate::merge::sql;
use crate::state::{CommittedBatch, ObjectStatus};

/// One table's objects and loads, as of a listing of its source prefix.
#[derive(Debug, Clone)]
pub struct TableStatus {
    /// `schema.table`.
    pub table: String,
    /// Objects listed.
    pub objects: usize,
    /// Of those, loaded.
    pub loaded: usize,
    /// Of those, new: the next run loads them.
    pub waiting: usize,
    /// Quarantined objects (key, error): the table waits at the first.
    pub quarantined: Vec<(String, String)>,
    /// Objects an operator skipped (key, reason).
    pub skipped: Vec<(String, String)>,
    /// Loaded objects whose ETag changed since.
    pub changed: Vec<String>,
    /// When the newest object was written: the time in CDC names (full-load
    /// files only when there is no CDC file yet, by their last-modified time).
    pub newest: Option<DateTime<Utc>>,
    /// The newest change loaded.
    pub loaded_up_to: Option<DateTime<Utc>>,
    /// The last committed batch.
    pub last_batch: Option<CommittedBatch>,
    /// A batch planned and not committed (a run was interrupted).
    pub pending_batch: bool,
    /// The worker loading the table now and when its lease runs out,
    /// while that lease is unexpired.
    pub held_by: Option<(String, DateTime<Utc>)>,
}

impl TableStatus {
    /// How far the loaded changes are behind the newest object: `None` when
    /// objects exist and nothing is loaded yet.
    pub fn lag(&self) -> Option<TimeDelta> {
        match (self.newest, self.loaded_up_to) {
            (Some(n), Some(l)) => Some((n - l).max(TimeDelta::zero())),
            (Some(_), None) => None,
            _ => Some(TimeDelta::zero()),
        }
    }
}

/// A duration as an operator reads it: `42s`, `17m`, `5h`, `3d`.
pub fn humanize(d: chrono::TimeDelta) -> String {
    let secs = d.num_seconds();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

impl Runner {
    /// Lists `table`'s source prefix and compares it with the state.
    pub async fn table_status(&self, table: &Table) -> Result<TableStatus> {
        let key = table.qualified();
        let listing = self
            .source()
            .list_table(&table.schema, &table.name, None)
            .await?;
        let recorded = self.state().objects(&key)?;
        let mut status = TableStatus {
            objects: listing.objects.len(),
            loaded: 0,
            waiting: 0,
            quarantined: Vec::new(),
            skipped: Vec::new(),
            changed: Vec::new(),
            newest: listing
                .objects
                .iter()
                .filter_map(|o| o.name.order.cdc_time())
                .max()
                .or_else(|| listing.objects.iter().map(|o| o.last_modified).max()),
            loaded_up_to: self.state().max_commit_ts(&key)?,
            last_batch: self.state().last_batch(&key)?,
            pending_batch: self.state().pending_batch(&key)?.is_some(),
            held_by: self
                .state()
                .lease_holder(&key)?
                .and_then(|(owner, until)| Some((owner, crate::state::parse_stamp(&until)?)))
                .filter(|(_, until)| *until > Utc::now()),
            table: key,
        };
        for object in &listing.objects {
            let key = object.key.clone();
            match recorded.get(&object.key) {
                Some(r) => match &r.status {
                    ObjectStatus::Processed { .. } => {
                        status.loaded += 1;
                        if r.object.etag != object.etag {
                            status.changed.push(key);
                        }
                    }
                    ObjectStatus::Quarantined { error } => {
                        status.quarantined.push((key, error.clone()));
                    }
                    ObjectStatus::Skipped { reason } => status.skipped.push((key, reason.clone())),
                },
                None => status.waiting += 1,
            }
        }
        Ok(status)
    }
}

impl Runner {
    /// Every version of the row of `table` whose key is `key` (the key
    /// columns' values, comma-separated), oldest first.
    pub async fn key_history(&self, table: &Table, key: &str) -> Result<Vec<RecordBatch>> {
        let values: Vec<&str> = key.split(',').map(str::trim).collect();
        if values.len() != table.primary_key.len() {
            return Err(Error::Usage(format!(
                "table {} has primary key ({}): give {} comma-separated value(s)",
                table.qualified(),
                table.primary_key.join(", "),
                table.primary_key.len()
            )));
        }
        let dialect = self.warehouse().queries().dialect();
        let key_match = table
            .primary_key
            .iter()
            .zip(&values)
            .map(|(k, v)| {
                format!(
                    "{} = {}",
                    dialect.text(&dialect.ident(k)),
                    dialect.literal(v)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let query = sql::render(
            sql::KEY_HISTORY,
            &[
                ("versions", &dialect.ident(&table.versions_name())),
                ("key_match", &key_match),
                (
                    "change_seq",
                    &dialect.ident(&self.pipeline().meta.change_seq),
                ),
            ],
        );
        self.query(&query).await
    }
}
