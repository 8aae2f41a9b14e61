//! Integration tests: one binary, one module per area.

mod support;

mod crash;
mod pipeline_local;
