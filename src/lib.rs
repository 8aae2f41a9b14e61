//! cdcflow: DMS-format CDC objects → history, current-state and versions tables.
//!
//! One run of a table is `list → plan → merge → load → commit`
//! ([`pipeline`]): the [`source`] lists new objects, the [`state`] store
//! records a batch before anything is loaded, [`decode`] turns each object
//! into Arrow rows, [`merge`] assigns the change order and computes the latest
//! change per key with DataFusion, and the [`warehouse`] applies the batch
//! idempotently. A crash anywhere is finished by the next run.

pub mod capture;
pub mod cli;
pub mod config;
pub mod cron;
pub mod database;
pub mod decode;
pub mod error;
pub mod failpoint;
pub mod logs;
pub mod merge;
pub mod model;
pub mod pipeline;
pub mod schedule;
pub mod serve;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod synth;
pub mod threads;
pub mod tls;
pub mod verify;
pub mod warehouse;
