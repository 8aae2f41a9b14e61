//! The pipeline's lease ([`Leases`]) in PostgreSQL: taken, renewed and
//! expired by the server's clock, so workers on machines whose clocks
//! differ agree on who holds it.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::error::Result;
use crate::state::{LeaseOutcome, Leases, stamp};

/// `ttl` as microseconds, the unit the statements add to `now()`.
fn micros(ttl: std::time::Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

impl Leases for PostgresStore {
    fn acquire_lease(
        &self,
        owner: &str,
        ttl: std::time::Duration,
        dead_holder: Option<&str>,
    ) -> Result<LeaseOutcome> {
        self.with("taking the lease", |c| {
            loop {
                // One statement: of two processes taking it at once, one wins
                // the row and the other sees it held. The token is raised in
                // the same transaction.
                let mut tx = c.transaction()?;
                let taken = tx.query_opt(
                    "INSERT INTO cdcflow.leases (pipeline, owner, acquired_at, expires_at)
                     VALUES ($1, $2, now(), now() + $3::bigint * interval '1 microsecond')
                     ON CONFLICT (pipeline) DO UPDATE SET owner = excluded.owner,
                       acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
                     WHERE cdcflow.leases.owner = excluded.owner
                        OR cdcflow.leases.owner = $4
                        OR cdcflow.leases.expires_at <= now()
                     RETURNING owner",
                    &[&self.pipeline, &owner, &micros(ttl), &dead_holder],
                )?;
                if taken.is_some() {
                    let token: i64 = tx
                        .query_one(
                            "INSERT INTO cdcflow.lease_tokens (pipeline, token) VALUES ($1, 1)
                             ON CONFLICT (pipeline) DO UPDATE
                               SET token = cdcflow.lease_tokens.token + 1
                             RETURNING token",
                            &[&self.pipeline],
                        )?
                        .get(0);
                    tx.commit()?;
                    self.fence.store(token, Ordering::SeqCst);
                    return Ok(LeaseOutcome::Acquired { token });
                }
                // Released between the two statements: try again.
                if let Some(held) = tx.query_opt(
                    "SELECT owner, expires_at FROM cdcflow.leases WHERE pipeline = $1",
                    &[&self.pipeline],
                )? {
                    return Ok(LeaseOutcome::Held {
                        owner: held.try_get(0)?,
                        expires_at: stamp(held.try_get::<_, DateTime<Utc>>(1)?),
                    });
                }
            }
        })
    }

    fn renew_lease(&self, owner: &str, ttl: std::time::Duration) -> Result<bool> {
        self.with("renewing the lease", |c| {
            Ok(c.execute(
                "UPDATE cdcflow.leases
                 SET expires_at = now() + $3::bigint * interval '1 microsecond'
                 WHERE pipeline = $1 AND owner = $2",
                &[&self.pipeline, &owner, &micros(ttl)],
            )? == 1)
        })
    }

    fn release_lease(&self, owner: &str) -> Result<()> {
        self.fence.store(0, Ordering::SeqCst);
        self.with("releasing the lease", |c| {
            c.execute(
                "DELETE FROM cdcflow.leases WHERE pipeline = $1 AND owner = $2",
                &[&self.pipeline, &owner],
            )
            .map(drop)
        })
    }
}
