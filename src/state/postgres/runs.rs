//! Runs, task attempts and the schedule's last tick ([`RunLog`]) in PostgreSQL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::PostgresStore;
use crate::error::Result;
use crate::state::{
    KEPT_LOGS, RunLog, RunRecord, RunTotals, TaskAttempt, TaskState, Trigger, stamp,
};

impl RunLog for PostgresStore {
    fn begin_run(
        &self,
        trigger: Trigger,
        interval: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<i64> {
        self.with("recording a run", |c| {
            c.query_one(
                "INSERT INTO cdcflow.runs
                   (pipeline, trigger, interval_start, interval_end, started_at, status)
                 VALUES ($1, $2, $3, $4, now(), 'running')
                 RETURNING run_id",
                &[
                    &self.pipeline,
                    &trigger.as_str(),
                    &interval.map(|i| i.0),
                    &interval.map(|i| i.1),
                ],
            )?
            .try_get(0)
        })
    }

    fn finish_run(&self, run_id: i64, success: bool, summary: &str) -> Result<()> {
        let status = if success { "success" } else { "failed" };
        self.with("finishing a run", |c| {
            c.execute(
                "UPDATE cdcflow.runs SET finished_at = now(), status = $2, summary = $3
                 WHERE run_id = $1",
                &[&run_id, &status, &summary],
            )
            .map(drop)
        })
    }

    fn record_attempt(&self, run_id: i64, a: &TaskAttempt) -> Result<()> {
        let finished = matches!(
            a.state,
            TaskState::Success | TaskState::Failed | TaskState::UpForRetry | TaskState::Skipped
        );
        self.with("recording a task attempt", |c| {
            c.execute(
                "INSERT INTO cdcflow.task_attempts
                   (run_id, tbl, try_number, state, started_at, finished_at, rows, error)
                 VALUES ($1, $2, $3, $4, now(), CASE WHEN $5 THEN now() END, $6, $7)
                 ON CONFLICT (run_id, tbl, try_number) DO UPDATE SET
                   state = excluded.state, finished_at = excluded.finished_at,
                   rows = excluded.rows, error = excluded.error",
                &[
                    &run_id,
                    &a.table,
                    &(a.try_number as i32),
                    &a.state.as_str(),
                    &finished,
                    &(a.rows as i64),
                    &a.error,
                ],
            )
            .map(drop)
        })
    }

    fn record_attempt_log(
        &self,
        run_id: i64,
        table: &str,
        try_number: u32,
        log: &str,
    ) -> Result<()> {
        self.with("keeping a task attempt's log", |c| {
            c.execute(
                "INSERT INTO cdcflow.attempt_logs (run_id, tbl, try_number, log)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (run_id, tbl, try_number) DO UPDATE SET log = excluded.log",
                &[&run_id, &table, &(try_number as i32), &log],
            )?;
            c.execute(
                "DELETE FROM cdcflow.attempt_logs WHERE run_id IN
                   (SELECT run_id FROM cdcflow.runs WHERE pipeline = $1
                    ORDER BY run_id DESC OFFSET $2)",
                &[&self.pipeline, &KEPT_LOGS],
            )
            .map(drop)
        })
    }

    fn attempts(&self, run_id: i64, table: &str) -> Result<Vec<(TaskAttempt, Option<String>)>> {
        self.with("reading a task's attempts", |c| {
            c.query(
                "SELECT a.try_number, a.state, a.rows, a.error, l.log FROM cdcflow.task_attempts a
                 JOIN cdcflow.runs r ON r.run_id = a.run_id AND r.pipeline = $1
                 LEFT JOIN cdcflow.attempt_logs l
                   ON l.run_id = a.run_id AND l.tbl = a.tbl AND l.try_number = a.try_number
                 WHERE a.run_id = $2 AND a.tbl = $3 ORDER BY a.try_number",
                &[&self.pipeline, &run_id, &table],
            )?
            .iter()
            .map(|r| {
                Ok((
                    TaskAttempt {
                        table: table.to_string(),
                        try_number: r.try_get::<_, i32>(0)?.max(0) as u32,
                        state: TaskState::parse(r.try_get(1)?),
                        rows: r.try_get::<_, Option<i64>>(2)?.unwrap_or(0).max(0) as u64,
                        error: r.try_get(3)?,
                    },
                    r.try_get(4)?,
                ))
            })
            .collect()
        })
    }

    fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        self.with("reading runs", |c| {
            let mut runs = Vec::new();
            for r in c.query(
                "SELECT run_id, trigger, interval_start, interval_end, started_at, status, summary
                 FROM cdcflow.runs WHERE pipeline = $1 ORDER BY run_id DESC LIMIT $2",
                &[&self.pipeline, &(limit as i64)],
            )? {
                let start: Option<DateTime<Utc>> = r.try_get(2)?;
                let end: Option<DateTime<Utc>> = r.try_get(3)?;
                runs.push(RunRecord {
                    id: r.try_get(0)?,
                    trigger: r.try_get(1)?,
                    interval: start.map(stamp).zip(end.map(stamp)),
                    started_at: stamp(r.try_get(4)?),
                    status: r.try_get(5)?,
                    attempts: Vec::new(),
                    bytes_billed: super::super::billed_in_summary(
                        r.try_get::<_, Option<String>>(6)?.as_deref(),
                    ),
                });
            }
            let attempts = c.prepare(
                "SELECT tbl, try_number, state, rows, error FROM cdcflow.task_attempts
                 WHERE run_id = $1 ORDER BY tbl, try_number",
            )?;
            for run in &mut runs {
                for r in c.query(&attempts, &[&run.id])? {
                    run.attempts.push(TaskAttempt {
                        table: r.try_get(0)?,
                        try_number: r.try_get::<_, i32>(1)?.max(0) as u32,
                        state: TaskState::parse(r.try_get(2)?),
                        rows: r.try_get::<_, Option<i64>>(3)?.unwrap_or(0).max(0) as u64,
                        error: r.try_get(4)?,
                    });
                }
            }
            Ok(runs)
        })
    }

    fn run_totals(&self) -> Result<RunTotals> {
        self.with("reading the run totals", |c| {
            let mut attempts = Vec::new();
            for r in c.query(
                "SELECT a.tbl, a.state, COUNT(*) FROM cdcflow.task_attempts a
                 JOIN cdcflow.runs r ON r.run_id = a.run_id
                 WHERE r.pipeline = $1 GROUP BY a.tbl, a.state ORDER BY a.tbl, a.state",
                &[&self.pipeline],
            )? {
                let n: i64 = r.try_get(2)?;
                attempts.push((
                    r.try_get(0)?,
                    TaskState::parse(r.try_get(1)?),
                    n.max(0) as u64,
                ));
            }
            let run_seconds = c
                .query_one(
                    "SELECT COALESCE(array_agg(EXTRACT(EPOCH FROM finished_at - started_at)::float8), '{}')
                     FROM cdcflow.runs WHERE pipeline = $1 AND finished_at IS NOT NULL",
                    &[&self.pipeline],
                )?
                .try_get(0)?;
            Ok(RunTotals {
                attempts,
                run_seconds,
            })
        })
    }

    fn open_incidents(&self) -> Result<BTreeMap<String, String>> {
        self.with("reading the open incidents", |c| {
            c.query(
                "SELECT incident, detail FROM cdcflow.incidents WHERE pipeline = $1",
                &[&self.pipeline],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
        })
    }

    fn set_incident(&self, key: &str, detail: Option<&str>) -> Result<()> {
        self.with("recording an incident", |c| {
            match detail {
                Some(detail) => c.execute(
                    "INSERT INTO cdcflow.incidents (pipeline, incident, detail, opened_at)
                     VALUES ($1, $2, $3, now())
                     ON CONFLICT (pipeline, incident) DO UPDATE SET detail = excluded.detail",
                    &[&self.pipeline, &key, &detail],
                ),
                None => c.execute(
                    "DELETE FROM cdcflow.incidents WHERE pipeline = $1 AND incident = $2",
                    &[&self.pipeline, &key],
                ),
            }
            .map(|_| ())
        })
    }

    fn last_tick(&self) -> Result<Option<DateTime<Utc>>> {
        self.with("reading the schedule", |c| {
            c.query_opt(
                "SELECT last_tick FROM cdcflow.schedule WHERE pipeline = $1",
                &[&self.pipeline],
            )?
            .map(|r| r.try_get(0))
            .transpose()
        })
    }

    fn set_last_tick(&self, tick: DateTime<Utc>) -> Result<()> {
        self.with("advancing the schedule", |c| {
            c.execute(
                "INSERT INTO cdcflow.schedule (pipeline, last_tick) VALUES ($1, $2)
                 ON CONFLICT (pipeline) DO UPDATE
                   SET last_tick = GREATEST(cdcflow.schedule.last_tick, excluded.last_tick)",
                &[&self.pipeline, &tick],
            )
            .map(drop)
        })
    }
}
