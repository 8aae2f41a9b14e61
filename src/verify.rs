//! `cdcflow verify`: does the target hold what the source holds now?
//!
//! The source side is read as capture reads a full load: every selected
//! table under one snapshot (PostgreSQL: an exported snapshot, read-only;
//! MySQL: a consistent-snapshot transaction), through the capture's table
//! mapping and masks, into LOAD objects in a temporary folder, which the
//! pipeline's own decoding loads into a temporary local warehouse. So both
//! sides carry the same names, types and masked values, and the comparison
//! is the pipeline's data columns of `<t>`, row by row in key order: row
//! counts, then a checksum of each range of `RANGE_ROWS` keys, then the rows
//! of each range whose checksums differ (keys and columns; masked columns as
//! masked). No lock is taken on the source and nothing is written to it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use sha2::{Digest, Sha256};

use crate::capture::Capture;
use crate::config::{DeltaLocation, Pipeline, SqlType, StateConfig, Table, WarehouseConfig};
use crate::error::{Error, Result};
use crate::pipeline::Runner;
use crate::shutdown::Shutdown;
use crate::state::Trigger;

/// Keys per checksummed range.
const RANGE_ROWS: usize = 1000;
/// Differing rows printed per table at most.
const SHOWN: usize = 20;

/// What `verify` found for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    /// `schema.table`.
    pub table: String,
    /// Rows in the source (after the capture's mapping).
    pub source_rows: usize,
    /// Rows in the target's current table.
    pub target_rows: usize,
    /// Key ranges whose checksums differ, of all ranges.
    pub ranges: (usize, usize),
    /// The differing rows: key, and what each side holds (`None`: no row).
    pub differences: Vec<Difference>,
}

/// One key whose row differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// `column=value` of the key.
    pub key: String,
    /// The source's row (`column=value, …`), if it has the key.
    pub source: Option<String>,
    /// The target's row, if it has the key.
    pub target: Option<String>,
}

impl TableCheck {
    /// Source and target hold the same rows.
    pub fn equal(&self) -> bool {
        self.differences.is_empty() && self.source_rows == self.target_rows
    }
}

/// Compares the source database of `capture` with the current tables of
/// `pipeline`'s warehouse (`tables`: `schema.table` or names; empty: all).
pub async fn verify(
    capture: &Capture,
    pipeline: &Pipeline,
    tables: &[String],
    stop: &Shutdown,
) -> Result<Vec<TableCheck>> {
    let work = tempfile::tempdir().map_err(|e| Error::io("creating", "a temporary folder", e))?;
    let objects = work.path().join("objects");
    let rows = capture.snapshot_into(&objects).await?;
    tracing::info!(rows, "source snapshot read");
    let reference = Runner::open(reference_pipeline(pipeline, work.path(), &objects)?)?;
    let report = reference.run(Trigger::Manual, None, stop).await?;
    if let Some(failed) = report.tables.iter().find(|t| t.error.is_some()) {
        return Err(Error::Usage(format!(
            "verify: the source snapshot of {} could not be loaded: {}",
            failed.table,
            failed.error.as_deref().unwrap_or_default()
        )));
    }
    let target = Runner::open(pipeline.clone())?;
    let mut checks = Vec::new();
    for table in &pipeline.tables {
        let selected = tables.is_empty()
            || tables
                .iter()
                .any(|t| t == &table.qualified() || t == &table.name || t == &table.target);
        if selected {
            checks.push(check_table(&reference, &target, table).await?);
        }
    }
    Ok(checks)
}

/// `pipeline` reading `objects` into a local warehouse and state under `dir`.
fn reference_pipeline(pipeline: &Pipeline, dir: &Path, objects: &Path) -> Result<Pipeline> {
    let mut reference = pipeline.clone();
    reference.source.url = url::Url::from_directory_path(objects)
        .map_err(|()| Error::Usage(format!("verify: no folder {}", objects.display())))?;
    reference.source.store_options.clear();
    reference.source.profile = None;
    reference.state = StateConfig::Sqlite(dir.join("state.db"));
    reference.warehouse = WarehouseConfig::Delta {
        location: DeltaLocation::Dir(dir.join("warehouse")),
        deletion_vectors: true,
    };
    Ok(reference)
}

/// The rows of `table`'s current table in `runner`'s warehouse: each row's
/// key and data columns as text, by key text.
async fn current_rows(
    runner: &Runner,
    table: &Table,
    columns: &[(String, SqlType)],
) -> Result<BTreeMap<Vec<String>, Vec<String>>> {
    let dialect = runner.warehouse().queries().dialect();
    let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    let sql = format!(
        "SELECT {} FROM {}",
        dialect.list(&names),
        dialect.ident(&table.target)
    );
    let batches = runner.query(&sql).await?;
    let key: Vec<usize> = table
        .primary_key
        .iter()
        .filter_map(|k| names.iter().position(|n| n == k))
        .collect();
    let mut rows = BTreeMap::new();
    for batch in &batches {
        let texts = batch_texts(batch, columns)?;
        for row in 0..batch.num_rows() {
            let values: Vec<String> = texts.iter().map(|c| c[row].clone()).collect();
            rows.insert(key.iter().map(|&k| values[k].clone()).collect(), values);
        }
    }
    Ok(rows)
}

/// Each column of `batch` as canonical text: cast to the column's type
/// (a database answers MySQL DATETIME without a zone, BOOLEAN as 0/1), JSON
/// re-serialized with sorted keys, NULL as `NULL`.
fn batch_texts(batch: &RecordBatch, columns: &[(String, SqlType)]) -> Result<Vec<Vec<String>>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::with_capacity(columns.len());
    for (i, (name, ty)) in columns.iter().enumerate() {
        let column: ArrayRef = arrow::compute::cast(batch.column(i), &ty.arrow_type())
            .map_err(|e| Error::Usage(format!("verify: column {name}: {e}")))?;
        let formatter = ArrayFormatter::try_new(column.as_ref(), &options)
            .map_err(|e| Error::Internal(format!("verify: column {name}: {e}")))?;
        out.push(
            (0..column.len())
                .map(|row| {
                    let text = formatter.value(row).to_string();
                    match (ty, column.is_null(row)) {
                        (SqlType::Json, false) => serde_json::from_str::<serde_json::Value>(&text)
                            .map_or(text, |v| v.to_string()),
                        _ => text,
                    }
                })
                .collect(),
        );
    }
    Ok(out)
}

/// Compares `table` in the reference (the source's snapshot) and the target.
async fn check_table(reference: &Runner, target: &Runner, table: &Table) -> Result<TableCheck> {
    let columns: Vec<(String, SqlType)> = reference
        .loaded_merger(table)
        .await?
        .columns
        .into_iter()
        .map(|c| (c.name, c.sql_type))
        .collect();
    let source = if columns.is_empty() {
        BTreeMap::new()
    } else {
        current_rows(reference, table, &columns).await?
    };
    let target_rows = current_rows(target, table, &columns).await?;
    let checksum = |rows: &mut dyn Iterator<Item = &Vec<String>>| {
        let mut hash = Sha256::new();
        for row in rows {
            for value in row {
                hash.update(value.as_bytes());
                hash.update([0]);
            }
        }
        hash.finalize()
    };
    // Ranges of the union of keys, RANGE_ROWS at a time: a range whose
    // checksums agree holds the same rows on both sides.
    let keys: Vec<&Vec<String>> = {
        let mut all: Vec<&Vec<String>> = source.keys().chain(target_rows.keys()).collect();
        all.sort();
        all.dedup();
        all
    };
    let mut differences = Vec::new();
    let mut differing = 0;
    let ranges: Vec<&[&Vec<String>]> = keys.chunks(RANGE_ROWS).collect();
    for range in &ranges {
        let (first, last) = (range[0], range[range.len() - 1]);
        let bounds = (
            std::ops::Bound::Included(first.clone()),
            std::ops::Bound::Included(last.clone()),
        );
        let ours = checksum(&mut source.range(bounds.clone()).map(|(_, v)| v));
        let theirs = checksum(&mut target_rows.range(bounds).map(|(_, v)| v));
        if ours == theirs {
            continue;
        }
        differing += 1;
        for key in range.iter() {
            let (s, t) = (source.get(*key), target_rows.get(*key));
            if s != t {
                let show = |row: Option<&Vec<String>>| {
                    row.map(|values| {
                        columns
                            .iter()
                            .zip(values)
                            .map(|((name, _), v)| format!("{name}={v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                };
                differences.push(Difference {
                    key: table
                        .primary_key
                        .iter()
                        .zip(key.iter())
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    source: show(s),
                    target: show(t),
                });
            }
        }
    }
    Ok(TableCheck {
        table: table.qualified(),
        source_rows: source.len(),
        target_rows: target_rows.len(),
        ranges: (differing, ranges.len()),
        differences,
    })
}

/// What `verify` prints for `checks`.
pub fn render(checks: &[TableCheck]) -> String {
    let mut out = String::new();
    for c in checks {
        let verdict = if c.equal() { "equal" } else { "DIFFERENT" };
        let _ = writeln!(
            out,
            "{}: {verdict}: source {} rows, target {} rows; {} of {} key ranges differ",
            c.table, c.source_rows, c.target_rows, c.ranges.0, c.ranges.1
        );
        for d in c.differences.iter().take(SHOWN) {
            let side = |row: &Option<String>| row.clone().unwrap_or_else(|| "(no row)".into());
            let _ = writeln!(
                out,
                "  key {}\n    source: {}\n    target: {}",
                d.key,
                side(&d.source),
                side(&d.target)
            );
        }
        if c.differences.len() > SHOWN {
            let _ = writeln!(out, "  … and {} more", c.differences.len() - SHOWN);
        }
    }
    out
}
