//! Command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::capture::Capture;
use crate::config::{self, Pipeline};
use crate::error::{Error, Result};
use crate::logs;
use crate::pipeline::{RunReport, Runner};
use crate::schedule::{self, DueOutcome};
use crate::serve::Server;
use crate::shutdown::Shutdown;
use crate::state::Trigger;
use crate::synth;

/// `println!` for the commands' output. When the reader has gone (`cdcflow
/// status | head -1`) the process ends quietly with success, as Unix tools
/// do, where `println!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::cli::stdout_failed(e)
        }
    }};
}

mod output;

use output::{print_backfill_plan, print_batches, print_query, print_run, print_runs, status};

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
        A pipeline file (pipelines/*.toml) names the source folder or bucket, the tables and the warehouse\n\
        (local Delta Lake tables, or a BigQuery dataset).\n\
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
    /// Log lines as text, or as one JSON object per line for log collectors (each with the
    /// pipeline, run id, table and try of the work it is about).
    #[arg(long, value_enum, default_value_t = logs::Format::Text, env = "CDCFLOW_LOG_FORMAT", global = true)]
    log_format: logs::Format,
    /// Threads for decoding, merging and writing (default: the cores this process may use,
    /// which follows `taskset` and a container's CPU limit). One run uses them all.
    #[arg(long, env = "CDCFLOW_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
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
        /// Also serve the web UI, /metrics, /healthz and /readyz here (as `cdcflow serve`), e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        #[command(flatten)]
        served: ServeOptions,
    },
    /// Serve the web UI, /metrics (Prometheus), /healthz and /readyz for every pipeline of a folder.
    ///
    /// The web UI (/) shows each table's state, lag and quarantined objects, the runs grid, and the
    /// life of one row (the table page's key lookup). Read-only, and it schedules nothing
    /// (`schedule --listen` does both). Figures are read at each
    /// scrape from the state stores (counters: rows by operation, batches, objects and bytes loaded,
    /// task attempts by state; histograms: batch and run seconds) and from a listing of each table's
    /// source prefix (gauges: waiting, quarantined and skipped objects, lag), so any number of
    /// processes serve the same figures and counters survive restarts. /readyz answers 503 while a
    /// pipeline's state store does not answer. Binds to loopback by default: to expose it, bind
    /// 0.0.0.0 inside a pod or container and let the network policy decide who scrapes it.
    Serve {
        /// Folder of pipeline files (`*.toml`).
        #[arg(long, default_value = "pipelines")]
        pipelines: PathBuf,
        /// Address to listen on (port 0: any free port, printed at start).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        listen: SocketAddr,
        #[command(flatten)]
        served: ServeOptions,
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
        /// Also reprocess objects an operator skipped (or that wait quarantined) in the range;
        /// without it their skip stands and the backfill leaves them out.
        #[arg(long)]
        include_skipped: bool,
    },
    /// Delete the warehouse files no table version younger than `--retain-hours` reads: the
    /// files that rewrites and merges replaced (local Delta warehouse; BigQuery manages its own
    /// storage). Readers of older versions (time travel) lose them.
    Vacuum {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Keep the files versions of the last this many hours read.
        #[arg(long, default_value_t = 168)]
        retain_hours: u64,
        /// List the files, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow a retention under one hour: a reader (or another writer of the same
        /// directory) still using a newer version loses its files.
        #[arg(long)]
        force: bool,
    },
    /// Rebuild the state store from what the warehouse recorded, after the state store was lost,
    /// restored from an older backup or replaced (a run refuses such a table and says so).
    ///
    /// Each Delta commit of cdcflow names its batch, the batch's objects and the state store that
    /// planned it. For every table whose state store disagrees with the warehouse, the objects the
    /// warehouse loaded are recorded as processed, the watermark is taken from history, and a batch
    /// the warehouse applied in part is left pending; the next run finishes it and loads exactly
    /// what is missing. Tables that agree are left as they are. Skips stay.
    Repair {
        /// Pipeline file.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Take the warehouse's account (the only source of repair so far).
        #[arg(long, required = true)]
        from_warehouse: bool,
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
        /// Every column (object counts, last batch time, newest object); the default fits 120
        /// columns.
        #[arg(long)]
        wide: bool,
    },
    /// Run SQL over the warehouse: `<t>`, `<t>_history`, `<t>_versions` (DataFusion SQL over the
    /// local warehouse; GoogleSQL in BigQuery, where names resolve in the dataset).
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
    /// Compare the source database with the target's current tables; exit 0 only when equal.
    ///
    /// Reads every table the capture selects under one snapshot (read-only, no lock; through the
    /// capture's table mapping and masks) and loads it as the pipeline would into a temporary
    /// local warehouse, then compares each table's data columns with the pipeline's `<t>`: row
    /// counts, a checksum per range of 1,000 keys, and the rows of the ranges that differ (key
    /// and columns, masked values as masked). Run it after the last capture and load of a
    /// migration, before the cut-over; changes made after the snapshot show up as differences.
    Verify {
        /// Capture file (the source database, its mapping and masks).
        #[arg(long, short)]
        capture: PathBuf,
        /// Pipeline file (the target warehouse).
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Only these tables (`name` or `schema.name`), comma separated.
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
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
    /// Capture a PostgreSQL or MySQL / MariaDB database into DMS-format objects (replaces AWS DMS).
    ///
    /// Writes a full load of every selected table under one snapshot (LOAD00000001.parquet…),
    /// then the changes as CDC objects (yyyyMMdd-HHmmssSSS.parquet) with `Op`, the commit time and
    /// a change sequence. PostgreSQL (`postgres://…`): the publication and logical replication
    /// slot are created when missing, and the slot is advanced only after the objects holding its
    /// changes are written. MySQL / MariaDB (`mysql://…`): the row binlog is read from the
    /// snapshot's position; the checkpoint keeps file:pos and the GTID. A crash or kill -9 loses
    /// nothing and writes nothing twice. Point a pipeline at the target folder with
    /// `extra_columns = ["cdc_seq"]`, `sequence_column = "cdc_seq"` (see the README).
    Capture {
        /// Capture file (TOML), e.g. pipelines/capture/postgres.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Capture up to the server's position at start, then exit (cron, CronJob, tests).
        #[arg(long)]
        once: bool,
        /// Print the checkpoint and how far the slot is behind the server, change nothing.
        #[arg(long, conflicts_with = "once")]
        status: bool,
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
        /// Formats: mixed (orders CSV, order_items Parquet), or both tables as csv or parquet.
        #[arg(long, value_enum, default_value_t = synth::Formats::Mixed)]
        format: synth::Formats,
    },
}

/// What `serve` and `schedule --listen` show besides the pipelines, and who may act.
#[derive(Args)]
struct ServeOptions {
    /// Folder of capture files (`*.toml`) whose checkpoint, lag behind the database and changes
    /// written to show (the UI's overview and /captures/NAME, `cdcflow_capture_*` metrics); each
    /// scrape connects to the database. With `schedule`: needs --listen.
    #[arg(long, value_name = "DIR")]
    captures: Option<PathBuf>,
    /// The environment variable holding the operator token. With it, the UI can skip or retry a
    /// quarantined object and start a run, for a browser logged in at /login (or a request with
    /// `Authorization: Bearer <token>`); without it, everything is read-only. With `schedule`:
    /// needs --listen.
    #[arg(long, value_name = "VAR")]
    token_env: Option<String>,
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
    logs::init(cli.log_format, filter);
    let runtime = crate::threads::runtime(cli.threads.map(usize::from));
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
                        out!(
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
        Command::Schedule {
            pipelines,
            listen,
            served,
        } => {
            let loaded = config::load_folder(&pipelines)?;
            let shutdown = on_signals();
            let server = match listen {
                Some(listen) => Some(listening(loaded.clone(), served, listen).await?),
                None if served.captures.is_some() || served.token_env.is_some() => {
                    return Err(Error::Usage(
                        "--captures and --token-env are for the web server: add --listen ADDR"
                            .into(),
                    ));
                }
                None => None,
            };
            eprintln!(
                "serving {} pipeline(s); SIGTERM or Ctrl-C stops after the batches in flight",
                loaded.len()
            );
            match server {
                Some(server) => {
                    let (scheduled, served) = tokio::join!(
                        schedule::serve(loaded, shutdown.clone()),
                        server.run(shutdown)
                    );
                    scheduled.and(served)?;
                }
                None => schedule::serve(loaded, shutdown).await?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            pipelines,
            listen,
            served,
        } => {
            let loaded = config::load_folder(&pipelines)?;
            let server = listening(loaded, served, listen).await?;
            server.run(on_signals()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            pipeline,
            from,
            to,
            tables,
            dry_run,
            include_skipped,
        } => {
            if from > to {
                return Err(Error::Usage(format!("--from {from} is after --to {to}")));
            }
            let runner = Runner::open(config::load(&pipeline)?)?;
            let plan = runner
                .backfill_plan(from, to, &tables, include_skipped)
                .await?;
            print_backfill_plan(from, to, &plan, dry_run);
            if dry_run {
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
                    Ok(p) => out!(
                        "{}: ok (pipeline {:?}, {} tables)",
                        path.display(),
                        p.name,
                        p.tables.len()
                    ),
                    Err(err) => {
                        failed = true;
                        out!("{err}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status { pipeline, wide } => {
            status(config::load(&pipeline)?, &pipeline, wide).await
        }
        Command::Vacuum {
            pipeline,
            retain_hours,
            dry_run,
            force,
        } => {
            if retain_hours < 1 && !force {
                return Err(Error::Usage(
                    "--retain-hours 0 deletes files a reader of a recent version may still read; \
                     give at least 1, or add --force"
                        .into(),
                ));
            }
            let runner = Runner::open(config::load(&pipeline)?)?;
            // Files a run wrote and has not committed yet are in no version:
            // only one process at a time, so none is in flight.
            let lease = crate::pipeline::Lease::acquire(runner.state_handle(), runner.pipeline())?;
            let retain = std::time::Duration::from_secs(retain_hours * 3600);
            for table in &runner.pipeline().tables {
                let Some(files) = runner.warehouse().vacuum(table, retain, dry_run).await? else {
                    out!("the warehouse manages its own storage: nothing to vacuum");
                    break;
                };
                let verb = if dry_run { "would delete" } else { "deleted" };
                out!("{}: {verb} {} files", table.qualified(), files.len());
                for file in files {
                    out!("  {file}");
                }
            }
            lease.release();
            Ok(ExitCode::SUCCESS)
        }
        Command::Repair {
            pipeline,
            from_warehouse: _,
        } => {
            let runner = Runner::open(config::load(&pipeline)?)?;
            for (table, restored) in runner.repair_from_warehouse().await? {
                match restored {
                    None => {
                        out!("{table}: the state store agrees with the warehouse; unchanged")
                    }
                    Some(r) => {
                        out!(
                            "{table}: restored batch {} with {} objects, {} changes, watermark {}",
                            r.number,
                            r.objects.len(),
                            r.stats.rows,
                            r.stats.max_seq.as_deref().unwrap_or("none")
                        );
                        if let Some(p) = r.pending {
                            out!(
                                "{table}: batch {} ({} objects) is in history but not in current state: \
                                 pending, the next run finishes it",
                                p.number,
                                p.objects.len()
                            );
                        }
                    }
                }
            }
            out!("repaired; `cdcflow run` now loads what is missing");
            Ok(ExitCode::SUCCESS)
        }
        Command::Query {
            pipeline,
            sql,
            format,
        } => {
            let runner = Runner::open(config::load(&pipeline)?)?;
            print_query(&runner, &sql, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            capture,
            pipeline,
            tables,
        } => {
            let capture = Capture::load(&capture)?;
            let pipeline = config::load(&pipeline)?;
            let checks = crate::verify::verify(&capture, &pipeline, &tables, &on_signals()).await?;
            print!("{}", crate::verify::render(&checks));
            Ok(if checks.iter().all(|c| c.equal()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::History {
            pipeline,
            table,
            key,
            format,
        } => {
            let pipeline = config::load(&pipeline)?;
            let t = find_table(&pipeline, &table)?.clone();
            let runner = Runner::open(pipeline)?;
            let batches = runner.key_history(&t, &key).await?;
            print_batches(&batches, format)?;
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
            runner.skip_object(&t, &object, &reason).await?;
            out!(
                "skipped {object} of {} (reason: {reason}); the next run goes on after it",
                t.qualified()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Capture {
            config,
            once,
            status,
        } => {
            let capture = Capture::load(&config)?;
            if status {
                print!("{}", capture.status().await?);
            } else {
                let rows = capture.run(once, &on_signals()).await?;
                out!("captured {rows} changes");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth {
            out,
            changes,
            seed,
            format,
        } => {
            let summary = synth::write_dataset(
                &out,
                &synth::Options {
                    changes,
                    seed,
                    formats: format,
                },
            )?;
            out!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Binds the HTTP endpoints for `pipelines` and the options' captures
/// (actions allowed with the token in the options' variable) and says where.
async fn listening(
    pipelines: Vec<Pipeline>,
    options: ServeOptions,
    listen: SocketAddr,
) -> Result<Server> {
    let captures = match options.captures {
        Some(dir) => config::toml_files(&dir, "the captures folder")?
            .iter()
            .map(|p| Capture::load(p))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let token = match options.token_env {
        None => None,
        Some(var) => match std::env::var(&var) {
            Ok(token) if !token.trim().is_empty() => Some(token.trim().to_string()),
            _ => {
                return Err(Error::Usage(format!(
                    "--token-env {var}: the variable is unset or empty; set it to the operator \
                     token, or drop --token-env for a read-only UI"
                )));
            }
        },
    };
    let server = Server::bind(pipelines, captures, listen, token).await?;
    eprintln!(
        "listening on http://{}: the web UI at /, /metrics, /healthz, /readyz",
        server.addr()?
    );
    Ok(server)
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

/// Ends the process after a failed write to standard output: quietly when
/// the reader has gone, with the error otherwise (a full disk).
pub(crate) fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to standard output: {e}");
    std::process::exit(1);
}
