//! What the commands print: run reports, the runs grid, status, query results.

use std::path::Path;
use std::process::ExitCode;

use arrow::array::RecordBatch;
use comfy_table::{Table as Grid, presets::UTF8_FULL_CONDENSED};

use super::OutputFormat;
use crate::config::Pipeline;
use crate::error::{Error, Result};
use crate::pipeline::{RunReport, Runner, humanize};
use crate::state::{RunRecord, TaskState};

pub(super) async fn print_query(runner: &Runner, query: &str, format: OutputFormat) -> Result<()> {
    print_batches(&runner.query(query).await?, format)
}

/// Writes `batches` to stdout in `format`.
pub(super) fn print_batches(batches: &[RecordBatch], format: OutputFormat) -> Result<()> {
    let context = "formatting the result";
    let mut out = Vec::new();
    match format {
        OutputFormat::Table => {
            let text = arrow::util::pretty::pretty_format_batches(batches)
                .map_err(|e| Error::query(context, e.into()))?;
            out.extend_from_slice(format!("{text}\n").as_bytes());
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::Writer::new(&mut out);
            for b in batches {
                writer
                    .write(b)
                    .map_err(|e| Error::query(context, e.into()))?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                writer
                    .write(b)
                    .map_err(|e| Error::query(context, e.into()))?;
            }
            writer
                .finish()
                .map_err(|e| Error::query(context, e.into()))?;
        }
    }
    use std::io::Write;
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| Error::io("writing the result", "stdout", e))
}

pub(super) fn print_runs(pipeline: &Pipeline, runs: &[RunRecord]) {
    let mut grid = Grid::new();
    let mut header = vec!["table".to_string()];
    for run in runs.iter().rev() {
        let when = run
            .interval
            .as_ref()
            .map_or(run.started_at.as_str(), |(_, end)| end.as_str());
        header.push(format!(
            "#{} {}\n{}",
            run.id,
            run.trigger,
            &when[..16.min(when.len())]
        ));
    }
    grid.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for table in &pipeline.tables {
        let mut row = vec![table.qualified()];
        for run in runs.iter().rev() {
            let tries: Vec<_> = run
                .attempts
                .iter()
                .filter(|a| a.table == table.qualified())
                .collect();
            row.push(match tries.last() {
                None => "·".to_string(),
                Some(last) => {
                    let mark = match last.state {
                        TaskState::Success => "✔",
                        TaskState::Failed => "✘",
                        TaskState::UpForRetry => "↻",
                        TaskState::Running => "▶",
                        TaskState::Queued => "…",
                        TaskState::Skipped => "–",
                    };
                    let rows: u64 = tries.iter().map(|a| a.rows).sum();
                    let retried = if tries.len() > 1 {
                        format!(" ({} tries)", tries.len())
                    } else {
                        String::new()
                    };
                    format!("{mark} {rows}{retried}")
                }
            });
        }
        grid.add_row(row);
    }
    if runs.iter().any(|r| r.bytes_billed.is_some()) {
        let mut row = vec!["billed".to_string()];
        row.extend(
            runs.iter()
                .rev()
                .map(|r| r.bytes_billed.map_or("·".into(), bytes)),
        );
        grid.add_row(row);
    }
    out!("{grid}");
    out!("✔ success  ✘ failed  ↻ up for retry  ▶ running  · not run; numbers are rows loaded");
    for run in runs {
        for a in &run.attempts {
            if let Some(err) = &a.error {
                out!("run #{} {} try {}: {err}", run.id, a.table, a.try_number);
            }
        }
    }
}

/// `text`, and the bytes the warehouse billed for `stats` where it bills.
fn with_billed(text: String, stats: &crate::state::BatchStats) -> String {
    match stats.bytes_billed {
        Some(billed) => format!("{text}, {} billed", bytes(billed)),
        None => text,
    }
}

/// `n` bytes in B, KB, MB, GB or TB (powers of 1000, as BigQuery bills).
fn bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

pub(super) fn print_run(report: &RunReport) {
    let mut grid = Grid::new();
    let billed = report.tables.iter().any(|t| t.stats.bytes_billed.is_some());
    let mut header = vec![
        "table", "objects", "rows", "inserts", "updates", "deletes", "seconds", "status",
    ];
    if billed {
        header.insert(6, "billed");
    }
    grid.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    let mut rows = 0;
    for t in &report.tables {
        rows += t.stats.rows;
        let status = if t.error.is_some() {
            "FAILED (below)".to_string()
        } else if let Some(held) = &t.held_by {
            format!("left to {} (loading it)", held.owner)
        } else if let Some((key, _)) = t.quarantined.first() {
            format!("WAITING at {key} (see `cdcflow status`)")
        } else {
            "ok".to_string()
        };
        let mut row = vec![
            t.table.clone(),
            t.objects.to_string(),
            t.stats.rows.to_string(),
            t.stats.inserts.to_string(),
            t.stats.updates.to_string(),
            t.stats.deletes.to_string(),
            format!("{:.2}", t.seconds),
            status,
        ];
        if billed {
            row.insert(6, bytes(t.stats.bytes_billed.unwrap_or(0)));
        }
        grid.add_row(row);
    }
    out!("{grid}");
    let rate = if report.seconds > 0.0 {
        rows as f64 / report.seconds
    } else {
        0.0
    };
    out!(
        "pipeline {} run #{} ({}): {rows} changes in {:.2} s ({rate:.0} rows/s){}",
        report.pipeline,
        report.run_id,
        report.trigger.as_str(),
        report.seconds,
        if report.interrupted {
            "; stopped early on request, the rest waits for the next run"
        } else {
            ""
        }
    );
    for t in &report.tables {
        if let Some(err) = &t.error {
            out!("{}: FAILED after {} tries: {err}", t.table, t.tries);
        }
        for key in &t.changed {
            out!(
                "WARNING {}: {key} changed after it was loaded; it was not re-applied",
                t.table
            );
        }
        for (key, err) in &t.quarantined {
            out!(
                "{}: waiting at {key}:\n  {err}\n  fix: replace the object (the next run retries it) or `cdcflow skip --table {} --object {key} --reason ...`",
                t.table,
                t.table
            );
        }
    }
}

const TIME: &str = "%Y-%m-%d %H:%M:%S";

/// `cdcflow status`: per table what is loaded and what waits, then what to
/// do. Fits a 120-column terminal; `wide` adds every column.
pub(super) async fn status(pipeline: Pipeline, file: &Path, wide: bool) -> Result<ExitCode> {
    let runner = Runner::open(pipeline.clone())?;
    let mut grid = Grid::new();
    grid.load_preset(UTF8_FULL_CONDENSED).set_header(if wide {
        vec![
            "table",
            "objects",
            "loaded",
            "waiting",
            "last batch",
            "rows (last)",
            "loaded at",
            "quarantined",
            "skipped",
            "newest object",
            "loaded up to",
            "lag",
        ]
    } else {
        vec![
            "table",
            "loaded",
            "waiting",
            "quarantined",
            "last batch",
            "loaded up to",
            "lag",
        ]
    });
    let mut notes = Vec::new();
    let (mut all_waiting, mut all_quarantined) = (0, 0);
    for t in &pipeline.tables {
        let s = runner.table_status(t).await?;
        let key = &s.table;
        for object in &s.changed {
            notes.push(format!("{key}: {object} changed after it was loaded"));
        }
        for (object, error) in &s.quarantined {
            notes.push(format!("{key}: waiting at {object}: {error}"));
        }
        for (object, reason) in &s.skipped {
            notes.push(format!("{key}: skipped {object} ({reason})"));
        }
        if let Some((owner, until)) = &s.held_by {
            notes.push(format!(
                "{key}: being loaded by {owner} (its lease runs to {})",
                until.format("%Y-%m-%d %H:%M:%S UTC")
            ));
        }
        all_waiting += s.waiting;
        all_quarantined += s.quarantined.len();
        let lag = s.lag().map_or("not loaded".into(), humanize);
        let time = |t: Option<chrono::DateTime<chrono::Utc>>, format: &str| {
            t.map_or("-".into(), |t| t.format(format).to_string())
        };
        let last = s.last_batch.as_ref();
        let row = if wide {
            vec![
                key.clone(),
                s.objects.to_string(),
                s.loaded.to_string(),
                s.waiting.to_string(),
                last.map_or("-".into(), |b| format!("#{}", b.number)),
                last.map_or("-".into(), |b| {
                    with_billed(b.stats.rows.to_string(), &b.stats)
                }),
                time(last.map(|b| b.committed_at), "%Y-%m-%d %H:%M:%S UTC"),
                s.quarantined.len().to_string(),
                s.skipped.len().to_string(),
                time(s.newest, TIME),
                time(s.loaded_up_to, TIME),
                lag,
            ]
        } else {
            vec![
                key.clone(),
                s.loaded.to_string(),
                s.waiting.to_string(),
                s.quarantined.len().to_string(),
                last.map_or("-".into(), |b| {
                    with_billed(format!("#{}, {} rows", b.number, b.stats.rows), &b.stats)
                }),
                time(s.loaded_up_to, "%Y-%m-%d %H:%M"),
                lag,
            ]
        };
        grid.add_row(row);
        if s.pending_batch {
            notes.push(format!(
                "{key}: a batch is pending (a run was interrupted); the next run finishes it"
            ));
        }
    }
    out!("{grid}");
    for note in &notes {
        out!("{note}");
    }
    if all_quarantined > 0 {
        out!(
            "behind: {all_quarantined} object(s) quarantined: replace them (the next run retries \
             them) or `cdcflow skip` them (see above)"
        );
    }
    if all_waiting > 0 {
        out!("{}", waiting_note(&runner, all_waiting, file)?);
    } else if all_quarantined == 0 {
        out!("up to date");
    }
    Ok(ExitCode::SUCCESS)
}

/// When the `waiting` new objects will be loaded, and how to load them now.
fn waiting_note(runner: &Runner, waiting: usize, file: &Path) -> Result<String> {
    let file = file.display();
    let now = chrono::Utc::now();
    let Some(schedule) = &runner.pipeline().schedule else {
        return Ok(format!(
            "behind: {waiting} object(s) waiting: `cdcflow run -p {file}` loads them"
        ));
    };
    let due = schedule.due(runner.state().last_tick()?, now, runner.pipeline().catchup);
    Ok(match (due.last(), schedule.next_after(now)) {
        (Some(tick), _) => format!(
            "behind: {waiting} object(s) waiting; a scheduled run is due: `cdcflow run -p {file}` \
             loads those written before {}\n  (`cdcflow run --now -p {file}` loads all of them)",
            tick.end.format("%Y-%m-%d %H:%M UTC")
        ),
        (None, Some(next)) => format!(
            "behind: {waiting} object(s) waiting for the next scheduled run, at {} (in {})\n  \
             to load them now: `cdcflow run --now -p {file}`",
            next.format("%Y-%m-%d %H:%M UTC"),
            humanize(next - now)
        ),
        (None, None) => format!(
            "behind: {waiting} object(s) waiting, and the schedule has no next tick: \
             `cdcflow run --now -p {file}` loads them"
        ),
    })
}

/// The objects a backfill takes, per table; every object with `dry_run`.
pub(super) fn print_backfill_plan(
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    plan: &crate::pipeline::BackfillPlan,
    dry_run: bool,
) {
    let mut grid = Grid::new();
    grid.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["table", "objects", "bytes", "first", "last"]);
    let key =
        |o: Option<&crate::source::SourceObject>| o.map(|o| o.key.clone()).unwrap_or_default();
    for (table, objects) in plan {
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        grid.add_row([
            table.clone(),
            objects.len().to_string(),
            bytes.to_string(),
            key(objects.first()),
            key(objects.last()),
        ]);
    }
    out!("backfill {from} .. {to}:\n{grid}");
    if dry_run {
        for (table, objects) in plan {
            for o in objects {
                out!("{table}\t{}\t{}", o.key, o.size);
            }
        }
        out!("dry run: nothing was changed");
    }
}
