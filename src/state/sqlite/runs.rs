//! Runs, task attempts and the schedule's last tick ([`RunLog`]) in SQLite.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, now, parse_stamp, seconds_between};
use crate::error::Result;
use crate::state::stamp;
use crate::state::{KEPT_LOGS, RunLog, RunRecord, RunTotals, TaskAttempt, TaskState, Trigger};

impl RunLog for SqliteStore {
    fn begin_run(
        &self,
        trigger: Trigger,
        interval: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Result<i64> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO runs (pipeline, trigger, interval_start, interval_end, started_at, status)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
                    params![
                        self.pipeline,
                        trigger.as_str(),
                        interval.map(|i| stamp(i.0)),
                        interval.map(|i| stamp(i.1)),
                        now()
                    ],
                )?;
                Ok(c.last_insert_rowid())
            },
            "recording a run",
        )
    }

    fn finish_run(&self, run_id: i64, success: bool, summary: &str) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "UPDATE runs SET finished_at = ?2, status = ?3, summary = ?4 WHERE run_id = ?1",
                    params![
                        run_id,
                        now(),
                        if success { "success" } else { "failed" },
                        summary
                    ],
                )
                .map(|_| ())
            },
            "finishing a run",
        )
    }

    fn record_attempt(&self, run_id: i64, a: &TaskAttempt) -> Result<()> {
        self.with(
            |c| {
                let at = now();
                let finished = matches!(a.state, TaskState::Success | TaskState::Failed | TaskState::UpForRetry | TaskState::Skipped)
                    .then(|| at.clone());
                c.execute(
                    "INSERT INTO task_attempts (run_id, tbl, try_number, state, started_at, finished_at, rows, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (run_id, tbl, try_number) DO UPDATE SET
                       state = excluded.state, finished_at = excluded.finished_at,
                       rows = excluded.rows, error = excluded.error",
                    params![run_id, a.table, a.try_number, a.state.as_str(), at, finished, a.rows as i64, a.error],
                )
                .map(|_| ())
            },
            "recording a task attempt",
        )
    }

    fn record_attempt_log(
        &self,
        run_id: i64,
        table: &str,
        try_number: u32,
        log: &str,
    ) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO attempt_logs (run_id, tbl, try_number, log) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (run_id, tbl, try_number) DO UPDATE SET log = excluded.log",
                    params![run_id, table, try_number, log],
                )?;
                c.execute(
                    "DELETE FROM attempt_logs WHERE run_id IN
                       (SELECT run_id FROM runs WHERE pipeline = ?1
                        ORDER BY run_id DESC LIMIT -1 OFFSET ?2)",
                    params![self.pipeline, KEPT_LOGS],
                )
                .map(drop)
            },
            "keeping a task attempt's log",
        )
    }

    fn attempts(&self, run_id: i64, table: &str) -> Result<Vec<(TaskAttempt, Option<String>)>> {
        self.with(
            |c| {
                c.prepare_cached(
                    "SELECT a.try_number, a.state, a.rows, a.error, l.log FROM task_attempts a
                     JOIN runs r ON r.run_id = a.run_id AND r.pipeline = ?1
                     LEFT JOIN attempt_logs l
                       ON l.run_id = a.run_id AND l.tbl = a.tbl AND l.try_number = a.try_number
                     WHERE a.run_id = ?2 AND a.tbl = ?3 ORDER BY a.try_number",
                )?
                .query_map(params![self.pipeline, run_id, table], |r| {
                    Ok((
                        TaskAttempt {
                            table: table.to_string(),
                            try_number: r.get(0)?,
                            state: TaskState::parse(&r.get::<_, String>(1)?),
                            rows: r.get::<_, Option<i64>>(2)?.unwrap_or(0) as u64,
                            error: r.get(3)?,
                        },
                        r.get(4)?,
                    ))
                })?
                .collect()
            },
            "reading a task's attempts",
        )
    }

    fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        self.with(
            |c| {
                let mut runs = c
                    .prepare_cached(
                        "SELECT run_id, trigger, interval_start, interval_end, started_at, status,
                           summary FROM runs
                         WHERE pipeline = ?1 ORDER BY run_id DESC LIMIT ?2",
                    )?
                    .query_map(params![self.pipeline, limit as i64], |r| {
                        let start: Option<String> = r.get(2)?;
                        let end: Option<String> = r.get(3)?;
                        Ok(RunRecord {
                            id: r.get(0)?,
                            trigger: r.get(1)?,
                            interval: start.zip(end),
                            started_at: r.get(4)?,
                            status: r.get(5)?,
                            attempts: Vec::new(),
                            bytes_billed: super::super::billed_in_summary(
                                r.get::<_, Option<String>>(6)?.as_deref(),
                            ),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut stmt = c.prepare_cached(
                    "SELECT tbl, try_number, state, rows, error FROM task_attempts WHERE run_id = ?1 ORDER BY tbl, try_number",
                )?;
                for run in &mut runs {
                    run.attempts = stmt
                        .query_map(params![run.id], |r| {
                            Ok(TaskAttempt {
                                table: r.get(0)?,
                                try_number: r.get(1)?,
                                state: TaskState::parse(&r.get::<_, String>(2)?),
                                rows: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                                error: r.get(4)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                }
                Ok(runs)
            },
            "reading runs",
        )
    }

    fn run_totals(&self) -> Result<RunTotals> {
        self.with(
            |c| {
                let attempts = c
                    .prepare_cached(
                        "SELECT a.tbl, a.state, COUNT(*) FROM task_attempts a
                         JOIN runs r ON r.run_id = a.run_id
                         WHERE r.pipeline = ?1 GROUP BY a.tbl, a.state ORDER BY a.tbl, a.state",
                    )?
                    .query_map(params![self.pipeline], |r| {
                        Ok((
                            r.get(0)?,
                            TaskState::parse(&r.get::<_, String>(1)?),
                            r.get::<_, i64>(2)? as u64,
                        ))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let run_seconds = c
                    .prepare_cached(
                        "SELECT started_at, finished_at FROM runs
                         WHERE pipeline = ?1 AND finished_at IS NOT NULL",
                    )?
                    .query_map(params![self.pipeline], |r| {
                        Ok(seconds_between(
                            &r.get::<_, String>(0)?,
                            &r.get::<_, String>(1)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                Ok(RunTotals {
                    attempts,
                    run_seconds,
                })
            },
            "reading the run totals",
        )
    }

    fn open_incidents(&self) -> Result<BTreeMap<String, String>> {
        self.with(
            |c| {
                c.prepare_cached("SELECT incident, detail FROM incidents WHERE pipeline = ?1")?
                    .query_map(params![self.pipeline], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            },
            "reading the open incidents",
        )
    }

    fn set_incident(&self, key: &str, detail: Option<&str>) -> Result<()> {
        self.with(
            |c| match detail {
                Some(detail) => c.execute(
                    "INSERT INTO incidents (pipeline, incident, detail, opened_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (pipeline, incident) DO UPDATE SET detail = excluded.detail",
                    params![self.pipeline, key, detail, now()],
                ),
                None => c.execute(
                    "DELETE FROM incidents WHERE pipeline = ?1 AND incident = ?2",
                    params![self.pipeline, key],
                ),
            }
            .map(|_| ()),
            "recording an incident",
        )
    }

    fn last_tick(&self) -> Result<Option<DateTime<Utc>>> {
        let tick: Option<String> = self.with(
            |c| {
                c.query_row(
                    "SELECT last_tick FROM schedule WHERE pipeline = ?1",
                    params![self.pipeline],
                    |r| r.get(0),
                )
                .optional()
            },
            "reading the schedule",
        )?;
        Ok(tick.as_deref().and_then(parse_stamp))
    }

    fn set_last_tick(&self, tick: DateTime<Utc>) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO schedule (pipeline, last_tick) VALUES (?1, ?2)
                     ON CONFLICT (pipeline) DO UPDATE SET last_tick = MAX(last_tick, excluded.last_tick)",
                    params![self.pipeline, stamp(tick)],
                )
                .map(|_| ())
            },
            "advancing the schedule",
        )
    }
}
