//! The tables' leases ([`Leases`]) in SQLite.

use chrono::Utc;

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, parse_stamp};
use crate::error::Result;
use crate::state::stamp;
use crate::state::{LeaseOutcome, Leases};

impl Leases for SqliteStore {
    fn acquire_lease(
        &self,
        table: &str,
        owner: &str,
        ttl: std::time::Duration,
        dead_holder: Option<&str>,
    ) -> Result<LeaseOutcome> {
        self.with(
            |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let current: Option<(String, String)> = tx
                    .query_row(
                        "SELECT owner, expires_at FROM table_leases WHERE pipeline = ?1 AND tbl = ?2",
                        params![self.pipeline, table],
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
                let token: i64 = tx.query_row(
                    "INSERT INTO lease_tokens (pipeline, token) VALUES (?1, 1)
                     ON CONFLICT (pipeline) DO UPDATE SET token = lease_tokens.token + 1
                     RETURNING token",
                    params![self.pipeline],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO table_leases (pipeline, tbl, owner, acquired_at, expires_at, token)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (pipeline, tbl) DO UPDATE SET owner = excluded.owner,
                       acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
                       token = excluded.token",
                    params![self.pipeline, table, owner, stamp(now_t), stamp(now_t + ttl), token],
                )?;
                tx.commit()?;
                self.fences.took(table, owner, token);
                Ok(LeaseOutcome::Acquired { token })
            },
            "taking a table's lease",
        )
    }

    fn renew_lease(&self, owner: &str, ttl: std::time::Duration) -> Result<usize> {
        self.with(
            |c| {
                c.execute(
                    "UPDATE table_leases SET expires_at = ?3 WHERE pipeline = ?1 AND owner = ?2",
                    params![self.pipeline, owner, stamp(Utc::now() + ttl)],
                )
            },
            "renewing the tables' leases",
        )
    }

    fn lease_holder(&self, table: &str) -> Result<Option<(String, String)>> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT owner, expires_at FROM table_leases WHERE pipeline = ?1 AND tbl = ?2",
                    params![self.pipeline, table],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
            },
            "reading a table's lease",
        )
    }

    fn release_lease(&self, owner: &str) -> Result<()> {
        self.fences.released(owner);
        self.with(
            |c| {
                c.execute(
                    "DELETE FROM table_leases WHERE pipeline = ?1 AND owner = ?2",
                    params![self.pipeline, owner],
                )
                .map(|_| ())
            },
            "releasing the tables' leases",
        )
    }
}
