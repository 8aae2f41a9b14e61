//! Crash switches for the crash-safety tests, compiled in only with the
//! `failpoints` cargo feature (see [`ENABLED`]).
//!
//! `CDCFLOW_FAILPOINT=<name>` makes the process abort (no cleanup, like a
//! `kill -9`) when it reaches the named step boundary of the run protocol;
//! `<name>@<n>` aborts at the n-th time it is reached (e.g. the third batch).
//! The names are listed in [`NAMES`]; unset, this costs one env lookup per
//! boundary per batch.
//!
//! `CDCFLOW_PAUSE=<name>:<file>` holds the process at a [`pause`] point
//! until the test deletes `file`.
//!
//! `CDCFLOW_FAULT=<step>:<transient|permanent>[:<n>]` makes [`fault`] return
//! an error of that class at `step` the first `n` times (always without `n`),
//! to test retries against the real error classification.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether this build has the switches (the `failpoints` cargo feature,
/// which `make test` and `make chaos` turn on). Without it every function
/// here returns at once and reads no environment: a release build cannot
/// be made to crash or fail by a stray variable.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Every step boundary of a pipeline run a test can crash at, in protocol order.
pub const NAMES: &[&str] = &[
    "plan.after_record",
    "load.between_history_and_current",
    "load.after_warehouse",
    "commit.after_state",
];

/// Step boundaries of the BigQuery warehouse's `current = "log"` path.
pub const BIGQUERY_NAMES: &[&str] = &["load.in_compaction"];

/// Step boundaries of the database warehouse: its transaction is open.
pub const DATABASE_NAMES: &[&str] = &["load.before_database_commit"];

/// The step boundaries of capture's write protocol, in order.
pub const CAPTURE_NAMES: &[&str] = &[
    "capture.after_checkpoint",
    "capture.after_first_object",
    "capture.before_confirm",
];

static HITS: AtomicUsize = AtomicUsize::new(0);

/// Aborts the process if `CDCFLOW_FAILPOINT` names this boundary.
pub fn hit(name: &str) {
    debug_assert!(
        [NAMES, BIGQUERY_NAMES, DATABASE_NAMES, CAPTURE_NAMES]
            .iter()
            .any(|names| names.contains(&name)),
        "unknown failpoint {name}"
    );
    if !ENABLED {
        return;
    }
    let Ok(setting) = std::env::var("CDCFLOW_FAILPOINT") else {
        return;
    };
    let (target, nth) = match setting.split_once('@') {
        Some((target, n)) => (target, n.parse().unwrap_or(1)),
        None => (setting.as_str(), 1),
    };
    if target == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("cdcflow: failpoint {name} hit, aborting");
        std::process::abort();
    }
}

/// Where a test can hold capture while it changes the source, or a run
/// between its listing and its plan (`CDCFLOW_PAUSE=<name>:<file>`, see
/// [`pause`]).
pub const PAUSE_NAMES: &[&str] = &["capture.snapshot_started", "plan.before_record"];

/// If `CDCFLOW_PAUSE=<name>:<file>` names this point: creates `file` and
/// waits (60 s at most) until the test deletes it, so that the test can act
/// at exactly this moment (e.g. commit a change while a snapshot is open).
pub async fn pause(name: &str) {
    debug_assert!(PAUSE_NAMES.contains(&name), "unknown pause point {name}");
    if !ENABLED {
        return;
    }
    let Some(file) = std::env::var("CDCFLOW_PAUSE")
        .ok()
        .and_then(|s| Some(s.split_once(':')?.1.to_string()).filter(|_| s.starts_with(name)))
    else {
        return;
    };
    if std::fs::write(&file, name).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::path::Path::new(&file).exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

static FAULTS: AtomicUsize = AtomicUsize::new(0);

/// Returns an injected error if `CDCFLOW_FAULT` names this step.
pub fn fault(step: &str) -> crate::error::Result<()> {
    if !ENABLED {
        return Ok(());
    }
    let Ok(setting) = std::env::var("CDCFLOW_FAULT") else {
        return Ok(());
    };
    let mut parts = setting.split(':');
    let (Some(target), Some(class)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let times: usize = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    if target != step || FAULTS.fetch_add(1, Ordering::SeqCst) >= times {
        return Ok(());
    }
    Err(crate::error::Error::Injected {
        step: step.to_string(),
        transient: class == "transient",
    })
}
