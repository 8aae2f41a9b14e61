//! The pipeline lease: one process at a time works on a pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Pipeline;
use crate::error::{Error, Result};
use crate::state::{LeaseOutcome, Leases};

/// A held lease, renewed in the background every third of its time to live.
/// Dropping or releasing it stops the heartbeat and gives the lease up.
pub struct Lease {
    state: Arc<dyn Leases>,
    owner: String,
    /// The fencing token the store gave this take.
    token: i64,
    pipeline: String,
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes the lease or fails with [`Error::LeaseHeld`].
    pub fn acquire(state: Arc<dyn Leases>, pipeline: &Pipeline) -> Result<Self> {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        let nonce = chrono::Utc::now().timestamp_subsec_nanos();
        let owner = format!("{host}:{}:{nonce:08x}", std::process::id());
        let ttl = pipeline.lease_ttl;
        let mut outcome = state.acquire_lease(&owner, ttl, None)?;
        if let LeaseOutcome::Held { owner: holder, .. } = &outcome
            && is_dead_local_process(holder, &host)
        {
            tracing::warn!(holder = %holder, "taking over the lease of a process of this host that no longer runs");
            outcome = state.acquire_lease(&owner, ttl, Some(holder))?;
        }
        let token = match outcome {
            LeaseOutcome::Acquired { token } => token,
            LeaseOutcome::Held {
                owner: holder,
                expires_at,
            } => {
                return Err(Error::LeaseHeld {
                    pipeline: pipeline.name.clone(),
                    owner: holder,
                    expires_at,
                });
            }
        };
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (state, owner, lost) = (state.clone(), owner.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let (store, holder) = (state.clone(), owner.clone());
                    let renewed =
                        tokio::task::spawn_blocking(move || store.renew_lease(&holder, ttl)).await;
                    if !matches!(renewed, Ok(Ok(true))) {
                        tracing::error!(owner = %owner, "lost the pipeline lease; stopping before the next batch");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            })
        };
        Ok(Lease {
            state,
            owner,
            token,
            pipeline: pipeline.name.clone(),
            lost,
            heartbeat,
        })
    }

    /// Fails with [`Error::LeaseLost`] once the heartbeat could not renew the lease.
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseLost {
                pipeline: self.pipeline.clone(),
            });
        }
        Ok(())
    }

    /// The fencing token of this take (greater than every earlier take's).
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Gives the lease up now.
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
