//! The pipeline's lease ([`Leases`]) in SQLite.

use chrono::Utc;
use std::sync::atomic::Ordering;

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, parse_stamp};
use crate::error::Result;
use crate::state::stamp;
use crate::state::{LeaseOutcome, Leases};

impl Leases for SqliteStore {
    fn acquire_lease(
        &self,
        owner: &str,
        ttl: std::time::Duration,
        dead_holder: Option<&str>,
    ) -> Result<LeaseOutcome> {
        self.with(
            |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let current: Option<(String, String)> = tx
                    .query_row(
                        "SELECT owner, expires_at FROM leases WHERE pipeline = ?1",
                        params![self.pipeline],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let now_t = Utc::now();
                if let Some((holder, expires)) = &current
                    && holder != owner
                    && Some(holder.as_str()) != dead_holder
                    && parse_stamp(expires).is_some_and(|e| e > now_t)
                {
                    return Ok(LeaseOutcome::Held { owner: holder.clone(), expires_at: expires.clone() });
                }
                tx.execute(
                    "INSERT INTO leases (pipeline, owner, acquired_at, expires_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (pipeline) DO UPDATE SET owner = excluded.owner,
                       acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                    params![self.pipeline, owner, stamp(now_t), stamp(now_t + ttl)],
                )?;
                let token: i64 = tx.query_row(
                    "INSERT INTO lease_tokens (pipeline, token) VALUES (?1, 1)
                     ON CONFLICT (pipeline) DO UPDATE SET token = lease_tokens.token + 1
                     RETURNING token",
                    params![self.pipeline],
                    |r| r.get(0),
                )?;
                tx.commit()?;
                self.fence.store(token, Ordering::SeqCst);
                Ok(LeaseOutcome::Acquired { token })
            },
            "taking the lease",
        )
    }

    fn renew_lease(&self, owner: &str, ttl: std::time::Duration) -> Result<bool> {
        self.with(
            |c| {
                let changed = c.execute(
                    "UPDATE leases SET expires_at = ?3 WHERE pipeline = ?1 AND owner = ?2",
                    params![self.pipeline, owner, stamp(Utc::now() + ttl)],
                )?;
                Ok(changed == 1)
            },
            "renewing the lease",
        )
    }

    fn release_lease(&self, owner: &str) -> Result<()> {
        self.fence.store(0, Ordering::SeqCst);
        self.with(
            |c| {
                c.execute(
                    "DELETE FROM leases WHERE pipeline = ?1 AND owner = ?2",
                    params![self.pipeline, owner],
                )
                .map(|_| ())
            },
            "releasing the lease",
        )
    }
}
