//! `cdcflow schedule`: every pipeline fires on its own cron ticks until
//! SIGTERM/SIGINT. A stop lets the batch in flight finish (or leaves it
//! safely pending), then the process exits 0.

use chrono::{DateTime, Utc};

use super::{DueOutcome, run_due};
use crate::config::Pipeline;
use crate::cron::Interval;
use crate::error::{Error, Result};
use crate::pipeline::{HeldBy, RunReport, Runner};
use crate::shutdown::Shutdown;
use crate::state::{Trigger, parse_stamp};

/// Serves `pipelines` until `shutdown` is requested.
pub async fn serve(pipelines: Vec<Pipeline>, shutdown: Shutdown) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for pipeline in pipelines {
        if pipeline.schedule.is_none() {
            tracing::warn!(pipeline = %pipeline.name, "no schedule; the daemon skips it (use `cdcflow run`)");
            continue;
        }
        let runner = Runner::open(pipeline)?;
        let shutdown = shutdown.clone();
        tasks.spawn(async move { serve_one(runner, shutdown).await });
    }
    if tasks.is_empty() {
        return Err(Error::Usage(
            "no pipeline with a `schedule`: nothing to serve".into(),
        ));
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(err)) = done {
            tracing::error!(error = %err, "a pipeline's scheduler stopped");
        }
    }
    Ok(())
}

/// Tables another process was loading when this one's run came to them,
/// looked at again when their leases may have run out: a table whose holder
/// stopped renewing (it died) is taken over then, not at the next tick. A
/// table its holder released (it finished) or that another process took is
/// left alone, so that workers do not chase each other's runs.
struct Held {
    interval: Option<Interval>,
    /// Each table, with the holder seen and its lease's end then.
    tables: Vec<(String, HeldBy)>,
    at: DateTime<Utc>,
}

impl Held {
    /// The held `tables` of a run over `interval`, if any.
    fn of(interval: Option<Interval>, tables: Vec<(String, HeldBy)>) -> Option<Held> {
        let at = tables.iter().map(|(_, by)| expiry(&by.until)).min()?;
        Some(Held {
            interval,
            tables,
            at,
        })
    }

    /// Takes over the tables whose holder stopped renewing its lease; keeps
    /// watching those still renewed. What is left to watch.
    async fn look_again(self, runner: &Runner, shutdown: &Shutdown) -> Result<Option<Held>> {
        let mut watch = Vec::new();
        let mut take = Vec::new();
        for (table, seen) in self.tables {
            match runner.state().lease_holder(&table)? {
                // Renewed since: alive; look again at its new end.
                Some((owner, until)) if owner == seen.owner && until != seen.until => {
                    watch.push((table, HeldBy { owner, until }));
                }
                // Not renewed since: its holder stopped; the claim takes it
                // over once it has run out by the state server's clock.
                Some((owner, _)) if owner == seen.owner => take.push(table),
                // Released (finished) or taken by another process.
                _ => {}
            }
        }
        if !take.is_empty() {
            match runner
                .run_tables(Trigger::Schedule, self.interval, &take, shutdown)
                .await
            {
                Ok(report) => {
                    log_runs(&runner.pipeline().name, std::slice::from_ref(&report));
                    watch.extend(report.held());
                }
                Err(Error::LeaseHeld { .. }) => {
                    // Not run out yet by the server's clock: look again.
                    for table in take {
                        if let Some((owner, until)) = runner.state().lease_holder(&table)? {
                            watch.push((table, HeldBy { owner, until }));
                        }
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Held::of(self.interval, watch))
    }
}

/// When a lease that runs out at `until` (a stored time) may be taken: just
/// after it, and at least a second from now (the state server's clock may be
/// behind this machine's).
fn expiry(until: &str) -> DateTime<Utc> {
    let after = parse_stamp(until).unwrap_or_else(Utc::now) + chrono::Duration::milliseconds(100);
    after.max(Utc::now() + chrono::Duration::seconds(1))
}

/// Logs what the runs of `name` did.
fn log_runs(name: &str, reports: &[RunReport]) {
    for r in reports {
        let rows: u64 = r.tables.iter().map(|t| t.stats.rows).sum();
        let held = r.held().len();
        tracing::info!(pipeline = %name, run = r.run_id, rows, ok = r.ok(), held, seconds = r.seconds, "run finished");
    }
}

async fn serve_one(runner: Runner, shutdown: Shutdown) -> Result<()> {
    let name = runner.pipeline().name.clone();
    let next_tick = || {
        let schedule = runner.pipeline().schedule.as_ref();
        schedule.and_then(|s| s.next_after(Utc::now()))
    };
    let mut held: Option<Held> = None;
    while !shutdown.requested() {
        if let Some(h) = held.take_if(|h| h.at <= Utc::now()) {
            held = h.look_again(&runner, &shutdown).await.unwrap_or_else(|err| {
                tracing::error!(pipeline = %name, error = %err, "taking over the tables another process held failed; the next tick takes them");
                None
            });
        }
        let next = match run_due(&runner, Utc::now(), &shutdown).await {
            Ok(DueOutcome::NothingDue(next)) => next,
            Ok(DueOutcome::Ran(reports)) => {
                log_runs(&name, &reports);
                held = reports.last().and_then(|r| Held::of(r.interval, r.held()));
                continue; // look again: more may have come due
            }
            Err(Error::LeaseHeld {
                table,
                owner,
                expires_at,
                ..
            }) => {
                // Every table is being loaded by others: look again when
                // their leases may have run out (they may have died).
                tracing::info!(pipeline = %name, %table, holder = %owner, "other processes are loading this pipeline's tables; looking again when their leases run out");
                let retry = expiry(&expires_at);
                Some(next_tick().map_or(retry, |tick| tick.min(retry)))
            }
            Err(err) => {
                tracing::error!(pipeline = %name, error = %err, "run failed; waiting for the next tick");
                next_tick()
            }
        };
        let wake = match (next, held.as_ref().map(|h| h.at)) {
            (Some(next), Some(at)) => next.min(at),
            (next, at) => match next.or(at) {
                Some(wake) => wake,
                None => break,
            },
        };
        let wait = (wake - Utc::now()).to_std().unwrap_or_default();
        tracing::debug!(pipeline = %name, %wake, "sleeping until the next tick or lease expiry");
        shutdown.sleep(wait).await;
    }
    Ok(())
}
