//! Table leases: one process at a time loads a table. A run takes each
//! table's lease as its task starts; a pipeline-wide operation (backfill,
//! repair, vacuum) takes all of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::config::{Pipeline, Table};
use crate::error::{Error, Result};
use crate::state::{LeaseOutcome, Leases};

/// Held leases of one or more tables, renewed in the background every third
/// of their time to live. Dropping or releasing it stops the heartbeat and
/// gives them up.
pub struct Lease {
    state: Arc<dyn Leases>,
    owner: String,
    /// The fencing token the store gave each table's take.
    tokens: BTreeMap<String, i64>,
    pipeline: String,
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes the leases of every table of `pipeline` (a pipeline-wide
    /// operation), or fails with [`Error::LeaseHeld`].
    pub fn acquire(state: Arc<dyn Leases>, pipeline: &Pipeline) -> Result<Self> {
        let tables: Vec<&Table> = pipeline.tables.iter().collect();
        Self::acquire_tables(state, pipeline, &tables)
    }

    /// Takes the leases of `tables`, all or none: when one is held, those
    /// taken are given back and it fails with [`Error::LeaseHeld`] naming it.
    pub fn acquire_tables(
        state: Arc<dyn Leases>,
        pipeline: &Pipeline,
        tables: &[&Table],
    ) -> Result<Self> {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        // Distinct per lease, also between the leases one process holds.
        static TAKES: AtomicU32 = AtomicU32::new(0);
        let nonce = chrono::Utc::now().timestamp_subsec_nanos();
        let take = TAKES.fetch_add(1, Ordering::Relaxed);
        let owner = format!("{host}:{}:{nonce:08x}{take:x}", std::process::id());
        let ttl = pipeline.lease_ttl;
        let mut keys: Vec<String> = tables.iter().map(|t| t.qualified()).collect();
        keys.sort();
        keys.dedup();
        let mut tokens = BTreeMap::new();
        for key in keys {
            let mut outcome = state.acquire_lease(&key, &owner, ttl, None)?;
            if let LeaseOutcome::Held { owner: holder, .. } = &outcome
                && is_dead_local_process(holder, &host)
            {
                tracing::warn!(holder = %holder, table = %key, "taking over the lease of a process of this host that no longer runs");
                outcome = state.acquire_lease(&key, &owner, ttl, Some(holder))?;
            }
            match outcome {
                LeaseOutcome::Acquired { token } => {
                    tokens.insert(key, token);
                }
                LeaseOutcome::Held {
                    owner: holder,
                    expires_at,
                } => {
                    state.release_lease(&owner)?;
                    return Err(Error::LeaseHeld {
                        pipeline: pipeline.name.clone(),
                        table: key,
                        owner: holder,
                        expires_at,
                    });
                }
            }
        }
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (state, owner, lost, held) =
                (state.clone(), owner.clone(), lost.clone(), tokens.len());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let (store, holder) = (state.clone(), owner.clone());
                    let renewed =
                        tokio::task::spawn_blocking(move || store.renew_lease(&holder, ttl)).await;
                    if !matches!(renewed, Ok(Ok(n)) if n == held) {
                        tracing::error!(owner = %owner, "lost a table's lease; stopping before the next batch");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            })
        };
        Ok(Lease {
            state,
            owner,
            tokens,
            pipeline: pipeline.name.clone(),
            lost,
            heartbeat,
        })
    }

    /// Fails with [`Error::LeaseLost`] once the heartbeat could not renew the leases.
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseLost {
                pipeline: self.pipeline.clone(),
            });
        }
        Ok(())
    }

    /// The fencing token of the take of `table` (`schema.table`; greater
    /// than every earlier take's), or 0 when this lease does not cover it.
    pub fn token(&self, table: &str) -> i64 {
        self.tokens.get(table).copied().unwrap_or(0)
    }

    /// Gives the leases up now.
    pub fn release(self) {
        drop(self);
    }
}

/// True when `holder` (`host:pid:nonce`) names this host and a PID that is not running.
fn is_dead_local_process(holder: &str, host: &str) -> bool {
    let mut parts = holder.rsplitn(3, ':');
    let (_nonce, pid, holder_host) = (parts.next(), parts.next(), parts.next());
    holder_host == Some(host)
        && pid
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if let Err(err) = self.state.release_lease(&self.owner) {
            tracing::warn!(error = %err, "could not release the lease; it expires by itself");
        }
    }
}
