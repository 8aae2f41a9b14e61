//! What an operator does to a table that waits: skip an object on purpose
//! (`cdcflow skip`, the web UI), or let a quarantined one be read again.

use super::Runner;
use crate::config::Table;
use crate::error::{Error, Result};
use crate::state::{ObjectRef, ObjectStatus};

impl Runner {
    /// Records object `key` of `table` as skipped for `reason`: the next run
    /// goes on after it. Refused for an object not listed or already loaded.
    pub async fn skip_object(&self, table: &Table, key: &str, reason: &str) -> Result<()> {
        let listing = self
            .source()
            .list_table(&table.schema, &table.name, None)
            .await?;
        let found = listing
            .objects
            .into_iter()
            .find(|o| o.key == key)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no object {key:?} under table {}; `cdcflow status` lists the keys",
                    table.qualified()
                ))
            })?;
        if let Some(rec) = self.state().objects(&table.qualified())?.get(key)
            && let ObjectStatus::Processed { batch_no } = rec.status
        {
            return Err(Error::Usage(format!(
                "{key} was already loaded in batch {batch_no}; nothing to skip"
            )));
        }
        let object = ObjectRef {
            key: found.key,
            etag: found.etag,
            size: found.size,
            last_modified: found.last_modified,
        };
        self.state().skip(&table.qualified(), &object, reason)
    }

    /// Lets quarantined object `key` of `table` be read again by the next
    /// run (after it was replaced, or the reader was fixed).
    pub fn retry_object(&self, table: &Table, key: &str) -> Result<()> {
        match self.state().objects(&table.qualified())?.get(key) {
            Some(rec) if matches!(rec.status, ObjectStatus::Quarantined { .. }) => {
                self.state().release(&table.qualified(), key)
            }
            _ => Err(Error::Usage(format!(
                "{key} of {} is not quarantined; nothing to retry",
                table.qualified()
            ))),
        }
    }
}
