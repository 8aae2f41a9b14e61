//! Crash switches for the crash-safety tests.
//!
//! `CDCFLOW_FAILPOINT=<name>` makes the process abort (no cleanup, like a
//! `kill -9`) when it reaches the named step boundary of the run protocol.
//! The names are listed in [`NAMES`]; unset, this costs one env lookup per
//! boundary per batch.

/// Every step boundary a test can crash at, in protocol order.
pub const NAMES: &[&str] = &[
    "plan.after_record",
    "load.between_history_and_current",
    "load.after_warehouse",
    "commit.after_state",
];

/// Aborts the process if `CDCFLOW_FAILPOINT` names this boundary.
pub fn hit(name: &str) {
    debug_assert!(NAMES.contains(&name), "unknown failpoint {name}");
    if std::env::var("CDCFLOW_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("cdcflow: failpoint {name} hit, aborting");
        std::process::abort();
    }
}
