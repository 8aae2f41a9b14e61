//! The tables' leases ([`Leases`]) in PostgreSQL: taken, renewed and
//! expired by the server's clock, so workers on machines whose clocks
//! differ agree on who holds one.

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
        table: &str,
        owner: &str,
        ttl: std::time::Duration,
        dead_holder: Option<&str>,
    ) -> Result<LeaseOutcome> {
        let token = self.with("taking a table's lease", |c| {
            loop {
                // One statement: of two processes taking it at once, one wins
                // the row and the other sees it held. The token is raised in
                // the same transaction (and rolled back with a lost race).
                let mut tx = c.transaction()?;
                let token: i64 = tx
                    .query_one(
                        "INSERT INTO cdcflow.lease_tokens (pipeline, token) VALUES ($1, 1)
                         ON CONFLICT (pipeline) DO UPDATE
                           SET token = cdcflow.lease_tokens.token + 1
                         RETURNING token",
                        &[&self.pipeline],
                    )?
                    .get(0);
                let taken = tx.query_opt(
                    "INSERT INTO cdcflow.table_leases
                       (pipeline, tbl, owner, acquired_at, expires_at, token)
                     VALUES ($1, $2, $3, now(), now() + $4::bigint * interval '1 microsecond', $6)
                     ON CONFLICT (pipeline, tbl) DO UPDATE SET owner = excluded.owner,
                       acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
                       token = excluded.token
                     WHERE cdcflow.table_leases.owner = excluded.owner
                        OR cdcflow.table_leases.owner = $5
                        OR cdcflow.table_leases.expires_at <= now()
                     RETURNING owner",
                    &[
                        &self.pipeline,
                        &table,
                        &owner,
                        &micros(ttl),
                        &dead_holder,
                        &token,
                    ],
                )?;
                if taken.is_some() {
                    tx.commit()?;
                    return Ok(Ok(token));
                }
                // Released between the two statements: try again.
                if let Some(held) = tx.query_opt(
                    "SELECT owner, expires_at FROM cdcflow.table_leases
                     WHERE pipeline = $1 AND tbl = $2",
                    &[&self.pipeline, &table],
                )? {
                    return Ok(Err(LeaseOutcome::Held {
                        owner: held.try_get(0)?,
                        expires_at: stamp(held.try_get::<_, DateTime<Utc>>(1)?),
                    }));
                }
            }
        })?;
        Ok(match token {
            Ok(token) => {
                self.fences.took(table, owner, token);
                LeaseOutcome::Acquired { token }
            }
            Err(held) => held,
        })
    }

    fn renew_lease(&self, owner: &str, ttl: std::time::Duration) -> Result<usize> {
        self.with("renewing the tables' leases", |c| {
            c.execute(
                "UPDATE cdcflow.table_leases
                 SET expires_at = now() + $3::bigint * interval '1 microsecond'
                 WHERE pipeline = $1 AND owner = $2",
                &[&self.pipeline, &owner, &micros(ttl)],
            )
            .map(|n| n as usize)
        })
    }

    fn lease_holder(&self, table: &str) -> Result<Option<(String, String)>> {
        self.with("reading a table's lease", |c| {
            c.query_opt(
                "SELECT owner, expires_at FROM cdcflow.table_leases WHERE pipeline = $1 AND tbl = $2",
                &[&self.pipeline, &table],
            )?
            .map(|r| Ok((r.try_get(0)?, stamp(r.try_get::<_, DateTime<Utc>>(1)?))))
            .transpose()
        })
    }

    fn release_lease(&self, owner: &str) -> Result<()> {
        self.fences.released(owner);
        self.with("releasing the tables' leases", |c| {
            c.execute(
                "DELETE FROM cdcflow.table_leases WHERE pipeline = $1 AND owner = $2",
                &[&self.pipeline, &owner],
            )
            .map(drop)
        })
    }
}
