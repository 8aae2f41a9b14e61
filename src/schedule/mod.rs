//! Running what is due: `run` executes the pipeline's due ticks in order
//! (the cron arithmetic is in [`crate::cron`]), and [`serve`] is the daemon
//! that does so for every pipeline at each tick.

mod daemon;

use chrono::{DateTime, Utc};

pub use daemon::serve;

/// What `run` found due and did.
#[derive(Debug)]
pub enum DueOutcome {
    /// Runs executed, oldest interval first.
    Ran(Vec<crate::pipeline::RunReport>),
    /// Nothing due; the next tick.
    NothingDue(Option<DateTime<Utc>>),
}

/// Executes the runs of `runner`'s pipeline that are due at `now`, in order,
/// and moves the schedule forward after each (also when a table failed: its
/// objects stay new and the next run takes them). A pipeline without a
/// schedule runs once, now, as a manual run.
pub async fn run_due(
    runner: &crate::pipeline::Runner,
    now: DateTime<Utc>,
    shutdown: &crate::shutdown::Shutdown,
) -> crate::error::Result<DueOutcome> {
    use crate::state::Trigger;
    let pipeline = runner.pipeline();
    let Some(schedule) = &pipeline.schedule else {
        return Ok(DueOutcome::Ran(vec![
            runner.run(Trigger::Manual, None, shutdown).await?,
        ]));
    };
    let last = runner.state().last_tick()?;
    let due = schedule.due(last, now, pipeline.catchup);
    if due.is_empty() {
        return Ok(DueOutcome::NothingDue(schedule.next_after(now)));
    }
    let mut reports = Vec::with_capacity(due.len());
    for interval in due {
        if shutdown.requested() {
            break;
        }
        let report = runner
            .run(Trigger::Schedule, Some(interval), shutdown)
            .await?;
        let interrupted = report.interrupted;
        reports.push(report);
        if interrupted {
            break;
        }
        runner.state().set_last_tick(interval.end)?;
    }
    Ok(DueOutcome::Ran(reports))
}
