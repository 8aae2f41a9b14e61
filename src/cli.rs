//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table as Grid, presets::UTF8_FULL_CONDENSED};
use datafusion::prelude::SessionContext;

use crate::config::{self, Pipeline};
use crate::error::{Error, Result};
use crate::merge::sql;
use crate::pipeline::{RunReport, Runner, Shutdown};
use crate::schedule::{self, DueOutcome};
use crate::state::{ObjectRef, ObjectStatus, RunRecord, TaskState, Trigger};
use crate::synth;

/// Exit code of a run that finished but left a table failed or blocked.
pub const EXIT_TABLES_FAILED: u8 = 3;
/// Exit code when another process holds the pipeline's lease.
pub const EXIT_LEASE_HELD: u8 = 4;

#[derive(Parser)]
#[command(
    name = "cdcflow",
    version,
    about = "Load AWS DMS-format CDC files into history, current-state and versions tables, exactly once.",
    long_about = "Load AWS DMS-format CDC files into history, current-state and versions tables, exactly once.\n\n\
        A pipeline file (pipelines/*.toml) names the source folder or bucket, the tables and the warehouse.\n\
        `cdcflow run` loads every new object once and exits: safe to run from cron, to interrupt, and to rerun.\n\n\
        Quick start:\n  cdcflow run --pipeline pipelines/example.toml\n  \
        cdcflow query --pipeline pipelines/example.toml \"SELECT * FROM orders LIMIT 5\"",
    after_help = "Exit codes: 0 success; 1 error; 2 bad arguments; 3 a table failed or waits for an operator (see `cdcflow status`);\n\
        4 another process is running the pipeline (one run at a time).\n\
        Logs: set -v/-vv or RUST_LOG=cdcflow=debug."
)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run what is due now, then exit (for cron or a Kubernetes CronJob).
    ///
    /// Each cron tick of the pipeline's `schedule` is a run whose data interval ends at the tick: it
    /// loads the new objects written (by their DMS name) before it. With `catchup = true` every missed
    /// tick runs in order; otherwise they coalesce into one run. Nothing due: exits 0 and says when the
    /// next tick is. A pipeline without a schedule, or `--now`, runs at once over everything new.
    ///
    /// A run first finishes a batch a crashed run left pending. A bad object stops its own table at
    /// that object (see `status`); other tables go on. SIGTERM finishes the batch in flight and exits.
    Run {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Run now over everything new, whatever the schedule (a manual run).
        #[arg(long)]
        now: bool,
        /// Evaluate the schedule as of this time instead of the clock (RFC 3339), e.g. to replay.
        #[arg(long, value_name = "TIME")]
        at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Stay up and run every pipeline of a folder on its cron ticks (SIGTERM stops cleanly).
    Schedule {
        /// Folder of pipeline files (`*.toml`).
        #[arg(long, default_value = "pipelines")]
        pipelines: PathBuf,
    },
    /// Reprocess the objects of a date range: their history rows are replaced, never doubled,
    /// and current state is rebuilt from history.
    ///
    /// Objects are chosen by the date in their CDC file name (UTC), from `--from` to `--to` inclusive.
    /// Full-load files have no date and are not part of a backfill.
    Backfill {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// First day, e.g. 2024-05-01.
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last day (inclusive).
        #[arg(long)]
        to: chrono::NaiveDate,
        /// Only these tables (comma separated names).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// List what would be reprocessed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Recent runs as a grid of tables × runs (like Airflow's grid view).
    Runs {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// How many runs.
        #[arg(long, default_value_t = 10)]
        last: usize,
    },
    /// Check pipeline files without touching any data; print every problem with its field path.
    Validate {
        /// Pipeline files.
        #[arg(long, short, required = true, num_args = 1..)]
        pipeline: Vec<PathBuf>,
    },
    /// Per table: objects pending, last batch, rows, quarantined and changed objects.
    Status {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
    },
    /// Run SQL (DataFusion) over the warehouse: `<t>`, `<t>_history`, `<t>_versions`.
    Query {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// The SQL statement.
        sql: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// The whole life of one row: every change of one key, with its validity interval.
    History {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Table (`name`, `schema.name` or its warehouse name).
        #[arg(long, short)]
        table: String,
        /// Key values in primary-key order, comma separated (e.g. `--key 42` or `--key 7,3`).
        #[arg(long, short)]
        key: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Skip an object the table waits at (recorded with your reason); the table then goes on.
    ///
    /// Prefer replacing a bad object with a corrected one at the same key: the next run retries it.
    /// Skipping loses that object's changes, so the reason is kept in the state store.
    Skip {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Table (`name` or `schema.name`).
        #[arg(long, short)]
        table: String,
        /// Object key as shown by `status`.
        #[arg(long, short)]
        object: String,
        /// Why it is skipped (kept in the state store).
        #[arg(long, short)]
        reason: String,
    },
    /// Write a deterministic, realistic DMS dataset (CSV and Parquet, LOAD + CDC, date folders).
    Synth {
        /// Output directory (the source folder of a pipeline).
        #[arg(long, short)]
        out: PathBuf,
        /// Number of changes per table.
        #[arg(long, default_value_t = 2000)]
        changes: usize,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// Aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Json,
}

/// Parses the command line, runs the command, prints errors, returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "cdcflow=warn",
        1 => "cdcflow=info",
        _ => "cdcflow=debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => code,
        Err(err @ Error::LeaseHeld { .. }) => {
            eprintln!("{err}");
            ExitCode::from(EXIT_LEASE_HELD)
        }
        Err(err) => {
            let mut message = format!("error: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { pipeline, now, at } => {
            let runner = Runner::open(config::load(&pipeline)?)?;
            let shutdown = on_signals();
            let reports = if now {
                vec![runner.run(Trigger::Manual, None, &shutdown).await?]
            } else {
                match schedule::run_due(&runner, at.unwrap_or_else(chrono::Utc::now), &shutdown)
                    .await?
                {
                    DueOutcome::Ran(reports) => reports,
                    DueOutcome::NothingDue(next) => {
                        let next = next.map_or("never".to_string(), |t| t.to_rfc3339());
                        println!(
                            "nothing due for pipeline {} (next tick {next}); `--now` runs anyway",
                            runner.pipeline().name
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            };
            for report in &reports {
                print_run(report);
            }
            Ok(if reports.iter().all(RunReport::ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_TABLES_FAILED)
            })
        }
        Command::Schedule { pipelines } => {
            let entries = std::fs::read_dir(&pipelines).map_err(|e| {
                Error::io("cannot read the pipelines folder", pipelines.display(), e)
            })?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            let loaded = paths
                .iter()
                .map(|p| config::load(p))
                .collect::<Result<Vec<_>>>()?;
            eprintln!(
                "serving {} pipeline(s); SIGTERM or Ctrl-C stops after the batches in flight",
                loaded.len()
            );
            schedule::serve(loaded, on_signals()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            pipeline,
            from,
            to,
            tables,
            dry_run,
        } => {
            if from > to {
                return Err(Error::Usage(format!("--from {from} is after --to {to}")));
            }
            let runner = Runner::open(config::load(&pipeline)?)?;
            let plan = runner.backfill_plan(from, to, &tables).await?;
            let mut grid = Grid::new();
            grid.load_preset(UTF8_FULL_CONDENSED)
                .set_header(["table", "objects", "bytes", "first", "last"]);
            for (table, objects) in &plan {
                let bytes: u64 = objects.iter().map(|o| o.size).sum();
                let key = |o: Option<&crate::source::SourceObject>| {
                    o.map(|o| o.key.clone()).unwrap_or_default()
                };
                grid.add_row([
                    table.clone(),
                    objects.len().to_string(),
                    bytes.to_string(),
                    key(objects.first()),
                    key(objects.last()),
                ]);
            }
            println!("backfill {from} .. {to}:\n{grid}");
            if dry_run {
                for (table, objects) in &plan {
                    for o in objects {
                        println!("{table}\t{}\t{}", o.key, o.size);
                    }
                }
                println!("dry run: nothing was changed");
                return Ok(ExitCode::SUCCESS);
            }
            let report = runner.backfill(plan, &on_signals()).await?;
            print_run(&report);
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_TABLES_FAILED)
            })
        }
        Command::Runs { pipeline, last } => {
            let pipeline = config::load(&pipeline)?;
            let runner = Runner::open(pipeline.clone())?;
            print_runs(&pipeline, &runner.state().recent_runs(last)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { pipeline } => {
            let mut failed = false;
            for path in pipeline {
                match config::load(&path) {
                    Ok(p) => println!(
                        "{}: ok (pipeline {:?}, {} tables)",
                        path.display(),
                        p.name,
                        p.tables.len()
                    ),
                    Err(err) => {
                        failed = true;
                        println!("{err}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status { pipeline } => status(config::load(&pipeline)?).await,
        Command::Query {
            pipeline,
            sql,
            format,
        } => {
            let ctx = session(&config::load(&pipeline)?).await?;
            print_query(&ctx, &sql, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            pipeline,
            table,
            key,
            format,
        } => {
            let pipeline = config::load(&pipeline)?;
            let t = find_table(&pipeline, &table)?;
            let values: Vec<&str> = key.split(',').map(str::trim).collect();
            if values.len() != t.primary_key.len() {
                return Err(Error::Usage(format!(
                    "table {} has primary key ({}): give {} comma-separated value(s) to --key",
                    t.qualified(),
                    t.primary_key.join(", "),
                    t.primary_key.len()
                )));
            }
            let key_match = t
                .primary_key
                .iter()
                .zip(&values)
                .map(|(k, v)| format!("CAST({} AS VARCHAR) = {}", sql::ident(k), sql::literal(v)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let query = sql::render(
                sql::KEY_HISTORY,
                &[
                    ("versions", &sql::ident(&t.versions_name())),
                    ("key_match", &key_match),
                    ("change_seq", &sql::ident(&pipeline.meta.change_seq)),
                ],
            );
            let ctx = session(&pipeline).await?;
            print_query(&ctx, &query, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip {
            pipeline,
            table,
            object,
            reason,
        } => {
            let pipeline = config::load(&pipeline)?;
            let t = find_table(&pipeline, &table)?.clone();
            let runner = Runner::open(pipeline)?;
            let listing = runner.source().list_table(&t.schema, &t.name, None).await?;
            let found = listing
                .objects
                .into_iter()
                .find(|o| o.key == object)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "no object {object:?} under table {}; `cdcflow status` lists the keys",
                        t.qualified()
                    ))
                })?;
            if let Some(rec) = runner.state().objects(&t.qualified())?.get(&object)
                && let ObjectStatus::Processed { batch_no } = rec.status
            {
                return Err(Error::Usage(format!(
                    "{object} was already loaded in batch {batch_no}; nothing to skip"
                )));
            }
            let object_ref = ObjectRef {
                key: found.key,
                etag: found.etag,
                size: found.size,
                last_modified: found.last_modified,
            };
            runner.state().skip(&t.qualified(), &object_ref, &reason)?;
            println!(
                "skipped {object} of {} (reason: {reason}); the next run goes on after it",
                t.qualified()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth { out, changes, seed } => {
            let summary = synth::write_dataset(&out, &synth::Options { changes, seed })?;
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn find_table<'a>(pipeline: &'a Pipeline, name: &str) -> Result<&'a config::Table> {
    pipeline
        .tables
        .iter()
        .find(|t| t.name == name || t.qualified() == name || t.target == name)
        .ok_or_else(|| {
            let names: Vec<String> = pipeline.tables.iter().map(|t| t.qualified()).collect();
            Error::Usage(format!(
                "no table {name:?} in pipeline {}; tables: {}",
                pipeline.name,
                names.join(", ")
            ))
        })
}

/// A DataFusion session over the pipeline's warehouse tables.
async fn session(pipeline: &Pipeline) -> Result<SessionContext> {
    let (ctx, missing) = Runner::open(pipeline.clone())?.query_session().await?;
    for table in missing {
        eprintln!("note: table {table} has not been loaded yet (run `cdcflow run` first)");
    }
    Ok(ctx)
}

async fn print_query(ctx: &SessionContext, query: &str, format: OutputFormat) -> Result<()> {
    let df = ctx.sql(query).await.map_err(|e| Error::query(query, e))?;
    let batches = df.collect().await.map_err(|e| Error::query(query, e))?;
    let mut out = Vec::new();
    match format {
        OutputFormat::Table => {
            let text = arrow::util::pretty::pretty_format_batches(&batches)
                .map_err(|e| Error::query(query, e.into()))?;
            out.extend_from_slice(format!("{text}\n").as_bytes());
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::Writer::new(&mut out);
            for b in &batches {
                writer.write(b).map_err(|e| Error::query(query, e.into()))?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in &batches {
                writer.write(b).map_err(|e| Error::query(query, e.into()))?;
            }
            writer.finish().map_err(|e| Error::query(query, e.into()))?;
        }
    }
    use std::io::Write;
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| Error::io("writing the result", "stdout", e))
}

/// A shutdown handle that turns on at SIGTERM or SIGINT.
fn on_signals() -> Shutdown {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("stop requested: finishing the batches in flight, then exiting");
        let _ = tx.send(true);
    });
    Shutdown::new(rx)
}

fn print_runs(pipeline: &Pipeline, runs: &[RunRecord]) {
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
    println!("{grid}");
    println!("✔ success  ✘ failed  ↻ up for retry  ▶ running  · not run; numbers are rows loaded");
    for run in runs {
        for a in &run.attempts {
            if let Some(err) = &a.error {
                println!("run #{} {} try {}: {err}", run.id, a.table, a.try_number);
            }
        }
    }
}

fn print_run(report: &RunReport) {
    let mut grid = Grid::new();
    grid.load_preset(UTF8_FULL_CONDENSED).set_header([
        "table", "objects", "rows", "inserts", "updates", "deletes", "seconds", "status",
    ]);
    let mut rows = 0;
    for t in &report.tables {
        rows += t.stats.rows;
        let status = if t.error.is_some() {
            "FAILED (below)".to_string()
        } else if let Some((key, _)) = t.quarantined.first() {
            format!("WAITING at {key} (see `cdcflow status`)")
        } else {
            "ok".to_string()
        };
        grid.add_row([
            t.table.clone(),
            t.objects.to_string(),
            t.stats.rows.to_string(),
            t.stats.inserts.to_string(),
            t.stats.updates.to_string(),
            t.stats.deletes.to_string(),
            format!("{:.2}", t.seconds),
            status,
        ]);
    }
    println!("{grid}");
    let rate = if report.seconds > 0.0 {
        rows as f64 / report.seconds
    } else {
        0.0
    };
    println!(
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
            println!("{}: FAILED after {} tries: {err}", t.table, t.tries);
        }
        for key in &t.changed {
            println!(
                "WARNING {}: {key} changed after it was loaded; it was not re-applied",
                t.table
            );
        }
        for (key, err) in &t.quarantined {
            println!(
                "{}: waiting at {key}:\n  {err}\n  fix: replace the object (the next run retries it) or `cdcflow skip --table {} --object {key} --reason ...`",
                t.table, t.table
            );
        }
    }
}

const TIME: &str = "%Y-%m-%d %H:%M:%S";

fn humanize(d: chrono::TimeDelta) -> String {
    let secs = d.num_seconds();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

async fn status(pipeline: Pipeline) -> Result<ExitCode> {
    let runner = Runner::open(pipeline.clone())?;
    let mut grid = Grid::new();
    grid.load_preset(UTF8_FULL_CONDENSED).set_header([
        "table",
        "objects",
        "loaded",
        "pending",
        "last batch",
        "rows (last)",
        "loaded at",
        "quarantined",
        "skipped",
        "newest object",
        "loaded up to",
        "lag",
    ]);
    let mut notes = Vec::new();
    let mut behind = false;
    for t in &pipeline.tables {
        let key = t.qualified();
        let listing = runner.source().list_table(&t.schema, &t.name, None).await?;
        let recorded = runner.state().objects(&key)?;
        let (mut loaded, mut quarantined, mut skipped, mut pending) = (0, 0, 0, 0);
        for object in &listing.objects {
            match recorded.get(&object.key).map(|r| &r.status) {
                Some(ObjectStatus::Processed { .. }) => {
                    loaded += 1;
                    if recorded[&object.key].object.etag != object.etag {
                        notes.push(format!("{key}: {} changed after it was loaded", object.key));
                    }
                }
                Some(ObjectStatus::Quarantined { error }) => {
                    quarantined += 1;
                    notes.push(format!("{key}: waiting at {}: {error}", object.key));
                }
                Some(ObjectStatus::Skipped { reason }) => {
                    skipped += 1;
                    notes.push(format!("{key}: skipped {} ({reason})", object.key));
                }
                None => pending += 1,
            }
        }
        behind |= pending > 0 || quarantined > 0;
        let last = runner.state().last_batch(&key)?;
        // When the newest object was written: the time in CDC names (full-load files only when
        // there is no CDC file yet, by their last-modified time), vs the newest change loaded.
        let newest = listing
            .objects
            .iter()
            .filter_map(|o| o.name.order.cdc_time())
            .max()
            .or_else(|| listing.objects.iter().map(|o| o.last_modified).max());
        let loaded_up_to = runner.state().max_commit_ts(&key)?;
        grid.add_row([
            key.clone(),
            listing.objects.len().to_string(),
            loaded.to_string(),
            pending.to_string(),
            last.as_ref()
                .map(|b| format!("#{}", b.number))
                .unwrap_or_else(|| "-".into()),
            last.as_ref()
                .map(|b| b.stats.rows.to_string())
                .unwrap_or_else(|| "-".into()),
            last.as_ref()
                .map(|b| b.committed_at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "-".into()),
            quarantined.to_string(),
            skipped.to_string(),
            newest.map_or("-".into(), |t| t.format(TIME).to_string()),
            loaded_up_to.map_or("-".into(), |t| t.format(TIME).to_string()),
            match (newest, loaded_up_to) {
                (Some(n), Some(l)) if n > l => humanize(n - l),
                (Some(_), None) => "not loaded".into(),
                _ => "0s".into(),
            },
        ]);
        if runner.state().pending_batch(&key)?.is_some() {
            notes.push(format!(
                "{key}: a batch is pending (a run was interrupted); the next run finishes it"
            ));
        }
    }
    println!("{grid}");
    for note in &notes {
        println!("{note}");
    }
    println!(
        "{}",
        if behind {
            "behind: objects are waiting (run `cdcflow run`, or fix the quarantined objects)"
        } else {
            "up to date"
        }
    );
    Ok(ExitCode::SUCCESS)
}
