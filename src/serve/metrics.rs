//! `/metrics`: every pipeline's figures as Prometheus / OpenMetrics text.
//!
//! Computed at each scrape, not counted in memory: counters are sums over
//! the state store's committed batches and task attempts, so they agree
//! between processes, survive restarts and never count a batch twice;
//! gauges come from a listing of each table's source prefix, as in
//! `cdcflow status`. A pipeline whose state or source does not answer has
//! `cdcflow_up 0` and no other sample; the others are unaffected. Captures
//! (`serve --captures`) are read the same way: their checkpoint, and how
//! far it is behind the server, asked at each scrape.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::capture::Capture;
use crate::error::Result;
use crate::pipeline::Runner;

type Labels = Vec<(&'static str, String)>;
type Durations = Family<Labels, Histogram, fn() -> Histogram>;
type Seconds = Gauge<f64, AtomicU64>;

/// Batch and run durations: 0.25 s to about 2 hours.
fn durations() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 15))
}

/// The metric families of one scrape.
#[derive(Default)]
struct Families {
    up: Family<Labels, Gauge>,
    rows: Family<Labels, Counter>,
    batches: Family<Labels, Counter>,
    objects_loaded: Family<Labels, Counter>,
    bytes_loaded: Family<Labels, Counter>,
    bytes_billed: Family<Labels, Counter>,
    objects: Family<Labels, Gauge>,
    pending_batch: Family<Labels, Gauge>,
    lag: Family<Labels, Seconds>,
    loaded_up_to: Family<Labels, Seconds>,
    attempts: Family<Labels, Counter>,
}

/// The capture families of one scrape.
#[derive(Default)]
struct CaptureFamilies {
    up: Family<Labels, Gauge>,
    behind: Family<Labels, Gauge>,
    checkpoint: Family<Labels, Seconds>,
    full_load: Family<Labels, Gauge>,
    changes: Family<Labels, Counter>,
    objects: Family<Labels, Counter>,
}

/// The text of one scrape of `runners` and `captures`.
pub(super) async fn render(runners: &[Runner], captures: &[Capture]) -> String {
    let families = Families::default();
    let batch_seconds = Durations::new_with_constructor(durations);
    let run_seconds = Durations::new_with_constructor(durations);
    for runner in runners {
        let pipeline = runner.pipeline().name.clone();
        let up = match collect(runner, &families, &batch_seconds, &run_seconds).await {
            Ok(()) => 1,
            Err(err) => {
                tracing::warn!(pipeline = %pipeline, error = %err, "metrics: the pipeline does not answer");
                0
            }
        };
        families
            .up
            .get_or_create(&vec![("pipeline", pipeline)])
            .set(up);
    }
    let capture = CaptureFamilies::default();
    for c in captures {
        let labels = vec![("capture", c.name().to_string())];
        let up = match c.report().await {
            Ok(r) => {
                if let Some(bytes) = r.lag.bytes {
                    capture.behind.get_or_create(&labels).set(bytes as i64);
                }
                if let Some(at) = r.checkpoint_at {
                    capture
                        .checkpoint
                        .get_or_create(&labels)
                        .set(at.timestamp_micros() as f64 / 1e6);
                }
                capture
                    .full_load
                    .get_or_create(&labels)
                    .set(i64::from(r.full_load_done));
                for (table, t) in &r.tables {
                    let mut labels = labels.clone();
                    labels.push(("table", table.clone()));
                    capture.changes.get_or_create(&labels).inc_by(t.changes);
                    capture.objects.get_or_create(&labels).inc_by(t.objects);
                }
                1
            }
            Err(err) => {
                tracing::warn!(capture = %c.name(), error = %err, "metrics: the capture's database or target does not answer");
                0
            }
        };
        capture.up.get_or_create(&labels).set(up);
    }
    let mut registry = Registry::with_prefix("cdcflow");
    registry.register(
        "capture_up",
        "1 when the capture's database and target answered this scrape",
        capture.up,
    );
    registry.register("capture_behind_bytes", "Bytes of WAL (PostgreSQL slot) or binlog (same file) the server wrote past the capture's checkpoint", capture.behind);
    registry.register(
        "capture_checkpoint_timestamp_seconds",
        "When the capture last wrote its checkpoint, in Unix seconds",
        capture.checkpoint,
    );
    registry.register(
        "capture_full_load_done",
        "1 once the capture's full load is done",
        capture.full_load,
    );
    registry.register(
        "capture_changes_written",
        "Changes the capture wrote in CDC objects it confirmed, by source table (not the full load)",
        capture.changes,
    );
    registry.register(
        "capture_objects_written",
        "CDC objects the capture wrote and confirmed, by source table",
        capture.objects,
    );
    let f = families;
    registry.register(
        "up",
        "1 when the pipeline's state store and source answered this scrape",
        f.up,
    );
    registry.register(
        "rows_loaded",
        "Changes loaded into history, by operation (insert, update, delete)",
        f.rows,
    );
    registry.register("batches", "Batches committed", f.batches);
    registry.register("objects_loaded", "Source objects loaded", f.objects_loaded);
    registry.register(
        "bytes_loaded",
        "Bytes of the source objects loaded",
        f.bytes_loaded,
    );
    registry.register(
        "warehouse_bytes_billed",
        "Bytes the warehouse billed for the batches' jobs (BigQuery's totalBytesBilled)",
        f.bytes_billed,
    );
    registry.register("objects", "Source objects by state: waiting (new), quarantined (the table waits at the first), skipped", f.objects);
    registry.register(
        "pending_batch",
        "1 when a batch is planned and not committed (a run was interrupted)",
        f.pending_batch,
    );
    registry.register("lag_seconds", "How far the newest change loaded is behind the newest object (absent until the table loads)", f.lag);
    registry.register(
        "loaded_up_to_timestamp_seconds",
        "Commit time of the newest change loaded, in Unix seconds",
        f.loaded_up_to,
    );
    registry.register(
        "task_attempts",
        "Tries of table tasks, by final state (up_for_retry: retried)",
        f.attempts,
    );
    registry.register(
        "batch_duration_seconds",
        "Seconds from a batch's plan to its commit",
        batch_seconds,
    );
    registry.register(
        "run_duration_seconds",
        "Seconds of each finished run",
        run_seconds,
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String does not fail");
    text
}

/// Adds `runner`'s samples.
async fn collect(
    runner: &Runner,
    f: &Families,
    batch_seconds: &Durations,
    run_seconds: &Durations,
) -> Result<()> {
    let pipeline = &runner.pipeline().name;
    // Read everything first: a pipeline that fails halfway adds nothing.
    let mut tables = Vec::new();
    for table in &runner.pipeline().tables {
        let status = runner.table_status(table).await?;
        let totals = runner.state().totals(&status.table)?;
        tables.push((status, totals));
    }
    let runs = runner.state().run_totals()?;
    let labels = |table: &str| vec![("pipeline", pipeline.clone()), ("table", table.to_string())];
    let with = |table: &str, name: &'static str, value: &str| {
        let mut l = labels(table);
        l.push((name, value.to_string()));
        l
    };
    for (s, t) in &tables {
        let table = s.table.as_str();
        for (op, n) in [
            ("insert", t.inserts),
            ("update", t.updates),
            ("delete", t.deletes),
        ] {
            f.rows.get_or_create(&with(table, "op", op)).inc_by(n);
        }
        f.batches.get_or_create(&labels(table)).inc_by(t.batches);
        f.objects_loaded
            .get_or_create(&labels(table))
            .inc_by(t.objects);
        f.bytes_loaded.get_or_create(&labels(table)).inc_by(t.bytes);
        f.bytes_billed
            .get_or_create(&labels(table))
            .inc_by(t.bytes_billed);
        for (state, n) in [
            ("waiting", s.waiting),
            ("quarantined", s.quarantined.len()),
            ("skipped", s.skipped.len()),
        ] {
            f.objects
                .get_or_create(&with(table, "state", state))
                .set(n as i64);
        }
        f.pending_batch
            .get_or_create(&labels(table))
            .set(i64::from(s.pending_batch));
        if let Some(lag) = s.lag() {
            f.lag
                .get_or_create(&labels(table))
                .set(lag.as_seconds_f64());
        }
        if let Some(at) = s.loaded_up_to {
            f.loaded_up_to
                .get_or_create(&labels(table))
                .set(at.timestamp_micros() as f64 / 1e6);
        }
        let histogram = batch_seconds.get_or_create(&labels(table));
        for &seconds in &t.batch_seconds {
            histogram.observe(seconds);
        }
    }
    for (table, state, n) in &runs.attempts {
        f.attempts
            .get_or_create(&with(table, "state", state.as_str()))
            .inc_by(*n);
    }
    let histogram = run_seconds.get_or_create(&vec![("pipeline", pipeline.clone())]);
    for &seconds in &runs.run_seconds {
        histogram.observe(seconds);
    }
    Ok(())
}
