//! Integration tests: one binary, one module per area.

mod support;

mod alerts;
mod bad_input;
mod bigquery;
mod capture_mysql;
mod capture_pg;
mod chaos;
mod cli;
mod crash;
mod database;
mod decode;
mod fleet;
mod fuzz;
mod integrity;
mod lakehouse;
mod layers;
mod pipeline_local;
mod s3;
mod samples;
mod schedule;
mod serve;
mod sqllogic;
mod state;
mod walkthroughs;
