//! `cdcflow schedule`: every pipeline fires on its own cron ticks until
//! SIGTERM/SIGINT. A stop lets the batch in flight finish (or leaves it
//! safely pending), then the process exits 0.

use chrono::Utc;

use super::{DueOutcome, run_due};
use crate::config::Pipeline;
use crate::error::{Error, Result};
use crate::pipeline::Runner;
use crate::shutdown::Shutdown;

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

async fn serve_one(runner: Runner, shutdown: Shutdown) -> Result<()> {
    let name = runner.pipeline().name.clone();
    while !shutdown.requested() {
        let next = match run_due(&runner, Utc::now(), &shutdown).await {
            Ok(DueOutcome::NothingDue(next)) => next,
            Ok(DueOutcome::Ran(reports)) => {
                for r in &reports {
                    let rows: u64 = r.tables.iter().map(|t| t.stats.rows).sum();
                    tracing::info!(pipeline = %name, run = r.run_id, rows, ok = r.ok(), seconds = r.seconds, "run finished");
                }
                continue; // look again: more may have come due
            }
            Err(err) => {
                if matches!(err, Error::LeaseHeld { .. }) {
                    tracing::warn!(pipeline = %name, error = %err, "another process is running this pipeline; waiting for the next tick");
                } else {
                    tracing::error!(pipeline = %name, error = %err, "run failed; waiting for the next tick");
                }
                let schedule = runner.pipeline().schedule.as_ref();
                schedule.and_then(|s| s.next_after(Utc::now()))
            }
        };
        let Some(next) = next else { break };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tracing::debug!(pipeline = %name, %next, "sleeping until the next tick");
        shutdown.sleep(wait).await;
    }
    Ok(())
}
