//! The task of one table in a run: finish a pending batch, then plan and
//! load objects in change order until none is left, the table is blocked,
//! or a stop is requested. Transient failures are retried with backoff.

use std::sync::Arc;

use indicatif::ProgressBar;
use serde::Serialize;

use super::history::produce_history;
use super::{Lease, Runner, Work, redelivery};
use crate::config::{Column, Table};
use crate::decode::{self, DecodeSpec};
use tracing::Instrument as _;

use crate::cron::Interval;
use crate::error::{Error, Result, RetryPolicy};
use crate::failpoint;
use crate::logs;
use crate::merge::Merger;
use crate::shutdown::Shutdown;
use crate::source::{ObjectName, ObjectOrder, SourceObject};
use crate::state::{
    Batch, BatchMode, BatchStats, ObjectRef, ObjectStatus, TaskAttempt, TaskState, Trigger,
};
use crate::warehouse::{HistoryRows, LoadRequest};

/// What happened to one table in a run.
#[derive(Debug, Default, Serialize)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Objects loaded.
    pub objects: usize,
    /// Batches committed.
    pub batches: usize,
    /// Rows and operations loaded.
    pub stats: BatchStats,
    /// Wall time.
    pub seconds: f64,
    /// Tries of the table task (1 when it needed no retry).
    pub tries: u32,
    /// Objects waiting for an operator: (key, error).
    pub quarantined: Vec<(String, String)>,
    /// Loaded objects that changed afterwards (same key, new ETag).
    pub changed: Vec<String>,
    /// Files under the table prefix that are not DMS data files.
    pub ignored: Vec<String>,
    /// Objects listed (all, or after the incremental watermark).
    pub listed: usize,
    /// LIST requests made.
    pub list_requests: u64,
    /// The error that stopped the table, if any.
    pub error: Option<String>,
    /// Another process held the table's lease: this run left it alone.
    pub held_by: Option<HeldBy>,
}

/// Who held a table's lease when a run came to it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldBy {
    /// The holder (host:pid:nonce).
    pub owner: String,
    /// When its lease runs out unless renewed.
    pub until: String,
}

/// What every table task of a run shares.
pub(super) struct RunContext<'a> {
    pub(super) runner: &'a Runner,
    pub(super) trigger: Trigger,
    pub(super) interval: Option<Interval>,
    /// The run's id, once a table was taken and the run recorded.
    pub(super) run_id: &'a tokio::sync::OnceCell<i64>,
    /// The run's span; its `run_id` is recorded with the run.
    pub(super) span: &'a tracing::Span,
    /// A lease over every table of the run (a pipeline-wide operation);
    /// `None`: each task takes its table's.
    pub(super) held: Option<&'a Lease>,
    pub(super) shutdown: &'a Shutdown,
    pub(super) progress: &'a ProgressBar,
}

/// The lease a table task works under.
enum TableLease<'a> {
    /// The run's lease over all its tables.
    Shared(&'a Lease),
    /// The table's own, taken by the task.
    Own(Lease),
}

impl std::ops::Deref for TableLease<'_> {
    type Target = Lease;

    fn deref(&self) -> &Lease {
        match self {
            TableLease::Shared(lease) => lease,
            TableLease::Own(lease) => lease,
        }
    }
}

/// What came of a table task's claim on its table.
pub(super) enum Claimed {
    /// It ran (successfully or not).
    Ran(TableReport),
    /// Another process holds the table.
    Held(String, HeldBy),
    /// Taking the lease or recording the run failed.
    Failed(String, Error),
}

impl Claimed {
    /// The table's report in a run that was recorded.
    pub(super) fn into_report(self) -> TableReport {
        match self {
            Claimed::Ran(report) => report,
            Claimed::Held(table, held_by) => TableReport {
                table,
                held_by: Some(held_by),
                ..TableReport::default()
            },
            Claimed::Failed(table, err) => TableReport {
                table,
                error: Some(crate::error::chain(&err)),
                ..TableReport::default()
            },
        }
    }
}

/// The task of one table.
pub(super) struct TableRun<'a> {
    ctx: &'a RunContext<'a>,
    runner: &'a Runner,
    table: &'a Table,
    lease: TableLease<'a>,
    run_id: i64,
    key: String,
    work: Work,
    report: TableReport,
    merger: Option<Merger>,
    /// A batch ended early (before a column's first object): list again
    /// for the objects it left.
    cut_short: bool,
}

impl<'a> TableRun<'a> {
    /// Takes `table`'s lease (unless the run holds all), records the run if
    /// it is the first table taken, and runs the task.
    pub(super) async fn claim(ctx: &'a RunContext<'a>, table: &'a Table, work: Work) -> Claimed {
        let key = table.qualified();
        let runner = ctx.runner;
        let lease = match ctx.held {
            Some(lease) => TableLease::Shared(lease),
            None => match Lease::acquire_tables(runner.state.clone(), &runner.pipeline, &[table]) {
                Ok(lease) => TableLease::Own(lease),
                Err(Error::LeaseHeld {
                    owner, expires_at, ..
                }) => {
                    tracing::info!(table = %key, holder = %owner, "another process is loading this table; leaving it to it");
                    let held_by = HeldBy {
                        owner,
                        until: expires_at,
                    };
                    return Claimed::Held(key, held_by);
                }
                Err(err) => return Claimed::Failed(key, err),
            },
        };
        let interval = ctx.interval.map(|i| (i.start, i.end));
        let run_id = match ctx
            .run_id
            .get_or_try_init(|| async {
                let id = runner.state.begin_run(ctx.trigger, interval)?;
                ctx.span.record("run_id", id);
                Ok(id)
            })
            .await
        {
            Ok(id) => *id,
            Err(err) => return Claimed::Failed(key, err),
        };
        Claimed::Ran(TableRun::new(ctx, table, work, lease, run_id).run().await)
    }

    fn new(
        ctx: &'a RunContext<'a>,
        table: &'a Table,
        work: Work,
        lease: TableLease<'a>,
        run_id: i64,
    ) -> Self {
        let key = table.qualified();
        TableRun {
            ctx,
            runner: ctx.runner,
            table,
            lease,
            run_id,
            report: TableReport {
                table: key.clone(),
                ..TableReport::default()
            },
            key,
            work,
            merger: None,
            cut_short: false,
        }
    }

    fn record(&self, try_number: u32, state: TaskState, rows: u64, error: Option<String>) {
        let attempt = TaskAttempt {
            table: self.key.clone(),
            try_number,
            state,
            rows,
            error,
        };
        if let Err(err) = self.runner.state.record_attempt(self.run_id, &attempt) {
            tracing::warn!(table = %self.key, error = %err, "could not record the task attempt");
        }
    }

    /// Runs the task with retries on transient errors. Each try runs in a
    /// [`logs::TASK_SPAN`] span; what it logged is kept in the run log.
    pub(super) async fn run(mut self) -> TableReport {
        let started = std::time::Instant::now();
        let policy = self.runner.pipeline.retry;
        let mut try_number = 1;
        loop {
            self.report.tries = try_number;
            let rows_before = self.report.stats.rows;
            self.record(try_number, TaskState::Running, 0, None);
            let span = tracing::info_span!(logs::TASK_SPAN, table = %self.key, try_number);
            let outcome = self.run_batches().instrument(span.clone()).await;
            let rows = self.report.stats.rows - rows_before;
            let retry = match &outcome {
                Err(err)
                    if err.retry_policy() == RetryPolicy::Retry
                        && try_number <= policy.count
                        && !self.ctx.shutdown.requested()
                        && self.lease.check().is_ok() =>
                {
                    Some(retry_delay(&policy, try_number))
                }
                _ => None,
            };
            span.in_scope(|| match (&outcome, retry) {
                (Err(err), Some(delay)) => tracing::warn!(table = %self.key, error = %err, try_number, ?delay, "transient failure; retrying"),
                (Err(err), None) => tracing::error!(table = %self.key, error = %err, "table stopped"),
                (Ok(()), _) => {}
            });
            self.keep_log(try_number, &span);
            match (outcome, retry) {
                (Ok(()), _) => {
                    self.record(try_number, TaskState::Success, rows, None);
                    self.report.error = None;
                    break;
                }
                (Err(err), Some(delay)) => {
                    self.record(
                        try_number,
                        TaskState::UpForRetry,
                        rows,
                        Some(err.to_string()),
                    );
                    self.ctx.shutdown.sleep(delay).await;
                    try_number += 1;
                }
                (Err(err), None) => {
                    let message = crate::error::chain(&err);
                    self.record(try_number, TaskState::Failed, rows, Some(message.clone()));
                    self.report.error = Some(message);
                    break;
                }
            }
        }
        self.report.seconds = started.elapsed().as_secs_f64();
        self.report
    }

    /// Keeps what try `try_number` logged in its `span`.
    fn keep_log(&self, try_number: u32, span: &tracing::Span) {
        let Some(log) = logs::take_attempt_log(span) else {
            return;
        };
        if let Err(err) =
            self.runner
                .state
                .record_attempt_log(self.run_id, &self.key, try_number, &log)
        {
            tracing::warn!(table = %self.key, error = %err, "could not keep the task attempt's log");
        }
    }

    async fn run_batches(&mut self) -> Result<()> {
        let state = self.runner.state.clone();
        let recorded = self.runner.warehouse.last_recorded(self.table).await?;
        super::ledger::check(&self.key, state.as_ref(), &recorded)?;
        // Whether the last listing found more new objects than one batch holds.
        let mut more = true;
        loop {
            self.lease.check()?;
            let batch = match state.pending_batch(&self.key)? {
                Some(pending) => {
                    tracing::info!(table = %self.key, batch = pending.number, "finishing the batch a previous run left pending");
                    pending
                }
                None => {
                    if self.ctx.shutdown.requested() || !more {
                        return Ok(());
                    }
                    let next = match &mut self.work {
                        Work::New { before } => {
                            let before = *before;
                            self.list_new(before).await?.map(|(objects, rest)| {
                                more = rest;
                                (objects, BatchMode::Append)
                            })
                        }
                        Work::Replace(remaining) => {
                            let take = self
                                .runner
                                .pipeline
                                .batch
                                .take(remaining.iter().map(|o| o.size));
                            let objects: Vec<ObjectRef> =
                                remaining.drain(..take).map(object_ref).collect();
                            more = !remaining.is_empty();
                            (take > 0).then_some((objects, BatchMode::Replace))
                        }
                    };
                    let Some((objects, mode)) = next else {
                        return Ok(());
                    };
                    failpoint::pause("plan.before_record").await;
                    let batch = state.plan_batch(&self.key, &objects, mode)?;
                    failpoint::hit("plan.after_record");
                    batch
                }
            };
            self.process(batch).await?;
            more |= std::mem::take(&mut self.cut_short);
        }
    }

    /// New objects to load next, bounded by the batch limits, and whether
    /// more new objects wait behind them; `None` when there is nothing (or
    /// nothing before a quarantined object).
    async fn list_new(
        &mut self,
        before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Option<(Vec<ObjectRef>, bool)>> {
        let state = &self.runner.state;
        let source = &self.runner.pipeline.source;
        let recorded = state.objects(&self.key)?;
        let now = chrono::Utc::now();
        let full_due = state
            .last_full_listing(&self.key)?
            .is_none_or(|at| (now - at).to_std().unwrap_or_default() >= source.full_listing_every);
        let incremental = !full_due && self.runner.source.lists_incrementally();
        let start_after = if incremental {
            incremental_start(&recorded, source.lateness)
        } else {
            None
        };
        let listing = self
            .runner
            .source
            .list_table(&self.table.schema, &self.table.name, start_after.as_deref())
            .await?;
        if start_after.is_none() {
            state.set_last_full_listing(&self.key, now)?;
        }
        tracing::debug!(table = %self.key, start_after = ?start_after, listed = listing.objects.len(), requests = listing.requests, "listed");
        self.report.listed += listing.objects.len();
        self.report.list_requests += listing.requests;
        self.report.ignored = listing.ignored;
        let mut new = Vec::new();
        let mut blocked_at: Option<ObjectOrder> = None;
        self.report.quarantined.clear();
        // The listing is sorted by change order, then key: objects whose
        // names give the same place in the order are neighbours.
        let mut previous: Option<(ObjectOrder, String)> = None;
        for object in listing.objects {
            let tie = previous
                .take()
                .filter(|(order, _)| *order == object.name.order)
                .map(|(_, key)| key);
            previous = Some((object.name.order, object.key.clone()));
            if let Some(other) = tie
                && !recorded.contains_key(&object.key)
            {
                // Their rows would get the same change_seq values: which change
                // came first cannot be told, so neither is guessed.
                let error = format!(
                    "{}: its name gives the same place in the change order as {other} (the time \
                     or LOAD number in a name is its order), so their changes cannot be ordered. \
                     Rename one of them, or skip one",
                    object.key
                );
                tracing::error!(table = %self.key, object = %object.key, other = %other, "two objects with the same place in the change order");
                state.quarantine(&self.key, &object_ref(object.clone()), &error)?;
                blocked_at =
                    Some(blocked_at.map_or(object.name.order, |b| b.min(object.name.order)));
                self.report.quarantined.push((object.key, error));
                continue;
            }
            if let (Some(end), Some(written)) = (before, object.name.order.cdc_time())
                && written >= end
            {
                continue; // belongs to a later data interval
            }
            match recorded
                .get(&object.key)
                .map(|r| (&r.status, &r.object.etag))
            {
                None => new.push(object),
                Some((ObjectStatus::Processed { .. }, etag)) => {
                    if !etag.is_empty()
                        && *etag != object.etag
                        && !self.report.changed.contains(&object.key)
                    {
                        tracing::warn!(table = %self.key, object = %object.key, "a loaded object changed afterwards; it is not re-applied");
                        self.report.changed.push(object.key);
                    }
                }
                Some((ObjectStatus::Skipped { .. }, _)) => {}
                Some((ObjectStatus::Quarantined { error }, etag)) => {
                    if *etag != object.etag {
                        tracing::info!(table = %self.key, object = %object.key, "a quarantined object was replaced; trying it again");
                        state.release(&self.key, &object.key)?;
                        new.push(object);
                    } else {
                        blocked_at = Some(
                            blocked_at.map_or(object.name.order, |b| b.min(object.name.order)),
                        );
                        self.report.quarantined.push((object.key, error.clone()));
                    }
                }
            }
        }
        if let Some(block) = blocked_at {
            new.retain(|o| o.name.order < block);
        }
        let take = self.runner.pipeline.batch.take(new.iter().map(|o| o.size));
        let more = new.len() > take;
        Ok((take > 0).then(|| (new.into_iter().take(take).map(object_ref).collect(), more)))
    }

    fn spec(&self, columns: Vec<Column>) -> DecodeSpec {
        let source = &self.runner.pipeline.source;
        let meta = &self.runner.pipeline.meta;
        DecodeSpec {
            columns,
            op_name: meta.op.clone(),
            commit_ts_name: meta.commit_ts.clone(),
            timestamp_column: source.timestamp_column.clone(),
            extra_columns: source.extra_columns.clone(),
            include_op_for_full_load: source.include_op_for_full_load,
            csv: source.csv.clone(),
            evolving: self.table.columns.is_none(),
        }
    }

    /// The table's columns: declared, else as loaded before, else from the first Parquet object.
    async fn merger(&mut self, first: &SourceObject) -> Result<Merger> {
        if let Some(m) = &self.merger {
            return Ok(m.clone());
        }
        let pipeline = &self.runner.pipeline;
        let template = Merger::new(self.table, Vec::new(), &pipeline.source, &pipeline.meta);
        let columns = match &self.table.columns {
            Some(columns) => columns.clone(),
            None => match self.runner.warehouse.columns(self.table, &template).await? {
                Some(columns) => columns,
                None => {
                    let fetched = self.runner.source.get(&first.key).await?;
                    decode::parquet_columns(first, fetched.bytes, &self.spec(Vec::new()))?
                }
            },
        };
        self.check_columns(&columns)?;
        for key in &self.table.primary_key {
            if !columns.iter().any(|c| &c.name == key) {
                return Err(Error::Usage(format!(
                    "table {}: primary key column {key:?} is not among the columns {:?}",
                    self.key,
                    columns.iter().map(|c| &c.name).collect::<Vec<_>>()
                )));
            }
        }
        let merger = Merger::new(self.table, columns, &pipeline.source, &pipeline.meta);
        self.merger = Some(merger.clone());
        Ok(merger)
    }

    /// Refuses a column the warehouse cannot hold, before anything is loaded.
    fn check_columns(&self, columns: &[Column]) -> Result<()> {
        for column in columns {
            if let Some(why) = self.runner.warehouse.refuses_column(&column.name) {
                return Err(Error::Usage(format!(
                    "table {}: column {:?} cannot be loaded: {why}. Rename the column in the source \
                     (or in the DMS task's table mapping)",
                    self.key, column.name
                )));
            }
        }
        Ok(())
    }

    async fn process(&mut self, batch: Batch) -> Result<()> {
        let runner = self.runner;
        self.ctx.progress.inc_length(batch.objects.len() as u64);
        let objects: Vec<SourceObject> = batch
            .objects
            .iter()
            .map(|r| SourceObject {
                name: ObjectName::parse(&r.key).expect("planned objects have DMS names"),
                key: r.key.clone(),
                etag: r.etag.clone(),
                size: r.size,
                last_modified: r.last_modified,
            })
            .collect();
        let merger = self.merger(&objects[0]).await?;
        let loaded_max = runner.state.max_seq(&self.key)?;
        let failure = Arc::new(std::sync::Mutex::new(None::<(usize, Error)>));
        let mut rows = produce_history(
            runner,
            objects,
            merger.clone(),
            self.spec(merger.columns.clone()),
            batch.number,
            failure.clone(),
        );
        let keys = batch.objects.iter().map(|o| o.key.clone());
        // Without history (a replica), a change at or below the loaded
        // maximum cannot be told from a redelivery: the batch is late, and
        // the warehouse refuses it.
        let sieve = runner
            .warehouse
            .keeps_history()
            .then(|| redelivery::Sieve::new(&merger, keys, loaded_max.clone()))
            .flatten();
        if let Some(sieve) = sieve {
            let (warehouse, table, m) =
                (runner.warehouse.clone(), self.table.clone(), merger.clone());
            rows = redelivery::sifted(
                rows,
                sieve,
                self.key.to_string(),
                batch.number,
                move |lo, hi| async move {
                    redelivery::history_between(warehouse.as_ref(), &table, &m, &lo, &hi).await
                },
            );
        }
        failpoint::fault("load")?;
        let loaded = runner
            .warehouse
            .load(LoadRequest {
                table: self.table,
                batch: &batch,
                merger: &merger,
                rows: HistoryRows::new(rows),
                loaded_max,
                store: runner.state.store_id(),
                lease_token: Some(self.lease.token(&self.key)),
            })
            .await;
        let stats = match loaded {
            Ok(stats) => stats,
            // What stopped the stream is the cause: the warehouse saw only a broken stream.
            Err(err) => {
                let cause = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
                return self.recover(&batch, cause, err).await;
            }
        };
        failpoint::hit("load.after_warehouse");
        let mut stats = stats;
        stats.max_seq = stats.max_seq.max(runner.state.max_seq(&self.key)?);
        runner.state.commit_batch(&self.key, batch.number, &stats)?;
        failpoint::hit("commit.after_state");
        tracing::info!(table = %self.key, batch = batch.number, objects = batch.objects.len(), rows = stats.rows, "batch committed");
        self.report.objects += batch.objects.len();
        self.report.batches += 1;
        self.report.stats.add(&stats);
        self.ctx.progress.inc(batch.objects.len() as u64);
        Ok(())
    }

    /// After a failed load: a bad object is quarantined and the batch shrinks
    /// to the objects before it; new columns are added to the table's and the
    /// batch runs again; an object changed before anything of the
    /// batch was loaded is taken as it is now; anything else is the error.
    async fn recover(
        &mut self,
        batch: &Batch,
        failure: Option<(usize, Error)>,
        err: Error,
    ) -> Result<()> {
        let runner = self.runner;
        match failure {
            Some((i, bad @ Error::Decode { .. })) => {
                tracing::error!(table = %self.key, error = %bad, "object quarantined");
                runner
                    .state
                    .quarantine(&self.key, &batch.objects[i], &bad.to_string())?;
                self.report
                    .quarantined
                    .push((batch.objects[i].key.clone(), bad.to_string()));
                runner
                    .state
                    .replan_batch(&self.key, batch.number, &batch.objects[..i])?;
                Ok(())
            }
            // A column added with a value for the rows stored before it: the
            // warehouse gives that value to the current rows when it adds the
            // column, so the batch must start at the column's first object
            // (the changes before it come first, in a batch of their own).
            Some((i, Error::NewColumns { columns, .. }))
                if i > 0
                    && batch.mode == BatchMode::Append
                    && columns.iter().any(|c| c.existing.is_some()) =>
            {
                self.cut_short = true;
                tracing::info!(table = %self.key, batch = batch.number, object = %batch.objects[i].key, "new columns with a value for existing rows; the batch ends before their first object");
                runner
                    .state
                    .replan_batch(&self.key, batch.number, &batch.objects[..i])?;
                Ok(())
            }
            Some((_, Error::NewColumns { object, columns })) => {
                self.check_columns(&columns)?;
                let mut merger = self.merger.clone().expect("a batch ran with a merger");
                tracing::info!(table = %self.key, object = %object, columns = ?columns.iter().map(|c| &c.name).collect::<Vec<_>>(), "new columns; the tables grow them and the batch runs again");
                merger.columns.extend(columns);
                self.merger = Some(merger);
                Ok(())
            }
            Some((_, Error::ObjectChanged { object, .. }))
                if !runner
                    .warehouse
                    .batch_started(self.table, batch, runner.state.store_id())
                    .await? =>
            {
                tracing::warn!(table = %self.key, object = %object, batch = batch.number, "an object changed before its batch was loaded; re-planning the batch with the current versions");
                self.replan_with_current_versions(batch).await
            }
            Some((_, cause)) => Err(cause),
            None => Err(err),
        }
    }
}

/// Where an incremental listing may start: the largest recorded key whose
/// CDC time is older than the newest recorded one by more than `lateness`.
/// `None` (list everything) when nothing is recorded yet, when an object is
/// quarantined (its replacement must be seen), or when keys do not sort in
/// time order (a date-folder layout such as DDMMYYYY).
fn incremental_start(
    recorded: &std::collections::HashMap<String, crate::state::ObjectRecord>,
    lateness: std::time::Duration,
) -> Option<String> {
    if recorded
        .values()
        .any(|r| matches!(r.status, ObjectStatus::Quarantined { .. }))
    {
        return None;
    }
    let mut cdc: Vec<(i64, &str)> = recorded
        .keys()
        .filter_map(|key| match ObjectName::parse(key)?.order {
            ObjectOrder::Cdc(us) => Some((us, key.as_str())),
            ObjectOrder::Load(_) => None,
        })
        .collect();
    cdc.sort_unstable();
    if cdc.windows(2).any(|w| w[1].1 < w[0].1) {
        return None;
    }
    let cutoff = cdc.last()?.0 - i64::try_from(lateness.as_micros()).unwrap_or(i64::MAX);
    cdc.iter()
        .rev()
        .find(|(us, _)| *us <= cutoff)
        .map(|(_, key)| key.to_string())
}

impl TableRun<'_> {
    /// Re-records a pending batch (nothing of it loaded) with the objects'
    /// current ETags and sizes; objects that are gone leave the batch.
    async fn replan_with_current_versions(&self, batch: &Batch) -> Result<()> {
        let listing = self
            .runner
            .source
            .list_table(&self.table.schema, &self.table.name, None)
            .await?;
        let current: Vec<ObjectRef> = batch
            .objects
            .iter()
            .filter_map(|planned| {
                listing
                    .objects
                    .iter()
                    .find(|o| o.key == planned.key)
                    .cloned()
                    .map(object_ref)
            })
            .collect();
        self.runner
            .state
            .replan_batch(&self.key, batch.number, &current)?;
        Ok(())
    }
}

fn object_ref(o: SourceObject) -> ObjectRef {
    ObjectRef {
        key: o.key,
        etag: o.etag,
        size: o.size,
        last_modified: o.last_modified,
    }
}

/// How long to wait before retry `retry` of a task (exponential, capped, jittered).
fn retry_delay(policy: &crate::config::RetryPolicy, retry: u32) -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    policy.backoff(retry, random)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ObjectRecord, ObjectStatus};

    fn recorded(keys: &[&str]) -> std::collections::HashMap<String, ObjectRecord> {
        keys.iter()
            .map(|k| {
                let object = ObjectRef {
                    key: k.to_string(),
                    etag: String::new(),
                    size: 0,
                    last_modified: Default::default(),
                };
                (
                    k.to_string(),
                    ObjectRecord {
                        object,
                        status: ObjectStatus::Processed { batch_no: 1 },
                        updated_at: String::new(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn incremental_listing_starts_before_the_lateness_window() {
        let hour = std::time::Duration::from_secs(3600);
        let keys = [
            "t/LOAD00000001.csv",
            "t/2024/05/01/20240501-100000000.csv",
            "t/2024/05/01/20240501-103000000.csv",
            "t/2024/05/01/20240501-120000000.csv",
        ];
        assert_eq!(
            incremental_start(&recorded(&keys), hour).as_deref(),
            Some("t/2024/05/01/20240501-103000000.csv")
        );
        assert_eq!(
            incremental_start(&recorded(&keys), hour * 5),
            None,
            "nothing older than the window: list all"
        );
        // DDMMYYYY folders do not sort in time order: always list everything.
        let unordered = [
            "t/30/04/2024/20240430-100000000.csv",
            "t/01/05/2024/20240501-100000000.csv",
            "t/02/05/2024/20240502-100000000.csv",
        ];
        assert_eq!(incremental_start(&recorded(&unordered), hour), None);
    }
}
