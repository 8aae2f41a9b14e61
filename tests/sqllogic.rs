//! The merge SQL (`sql/*.sql`) and the latest-change collector, checked by
//! sqllogictest files with hand-written expectations (`sql/test/*.slt`).
//!
//! The files run in DataFusion. Besides plain SQL they use three commands
//! that go through the product's own code, for a table `(id BIGINT key,
//! v VARCHAR)` with the default metadata columns (`op`, `commit_ts`,
//! `change_seq`, `source_file`, `ingested_at`):
//! * `@current <history>` / `@current_soft <history>`: each key's latest
//!   change of the history rows in table `<history>` (`merge::LatestChanges`),
//!   then the current-state rows of `sql/current_rebuild.sql`, with hard or
//!   soft deletes;
//! * `@late_changes <history> <batch>`: `sql/late_changes.sql`;
//! * `@versions <history>`: `sql/versions.sql`.
//!
//! A command returns its rows, or with `INTO <name>` (as a statement)
//! registers them as table `<name>` for the queries that follow.
//!
//! A table given to them may declare simpler types (`TIMESTAMP`): its
//! columns are cast to the history schema by name.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use cdcflow::config::{Column, MetadataColumns, SqlType};
use cdcflow::merge::{LatestChanges, Merger, sql};
use datafusion::prelude::SessionContext;
use sqllogictest::{DBOutput, DefaultColumnType};

struct MergeDb {
    ctx: SessionContext,
}

#[derive(Debug)]
struct Failed(String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

fn failed(e: impl std::fmt::Display) -> Failed {
    Failed(e.to_string())
}

fn merger(soft_delete: bool) -> Merger {
    let column = |name: &str, sql_type| Column {
        name: name.into(),
        sql_type,
        existing: None,
    };
    Merger {
        key: vec!["id".into()],
        columns: vec![column("id", SqlType::BigInt), column("v", SqlType::Text)],
        extra_columns: Vec::new(),
        sequence_column: None,
        meta: MetadataColumns::default(),
        soft_delete,
    }
}

impl MergeDb {
    /// The rows of table `name`, cast to the history schema by column name.
    async fn history_rows(&self, name: &str, merger: &Merger) -> Result<Vec<RecordBatch>, Failed> {
        let schema = merger.history_schema();
        let batches = self
            .ctx
            .sql(&format!("SELECT * FROM {}", sql::ident(name)))
            .await
            .map_err(failed)?
            .collect()
            .await
            .map_err(failed)?;
        batches
            .iter()
            .map(|b| {
                let columns = schema
                    .fields()
                    .iter()
                    .map(|f| {
                        let column = b
                            .column_by_name(f.name())
                            .ok_or_else(|| failed(format!("{name} has no column {}", f.name())))?;
                        arrow::compute::cast(column, f.data_type()).map_err(failed)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                RecordBatch::try_new(schema.clone(), columns).map_err(failed)
            })
            .collect()
    }

    async fn command(&self, words: &[&str]) -> Result<Vec<RecordBatch>, Failed> {
        let frame = match words {
            [command @ ("@current" | "@current_soft"), history] => {
                let merger = merger(*command == "@current_soft");
                let mut latest = LatestChanges::new(&merger).map_err(failed)?;
                for rows in self.history_rows(history, &merger).await? {
                    latest.push(&rows).map_err(failed)?;
                }
                let schema = latest.schema();
                let (kept, _, _) = latest.finish().map_err(failed)?;
                let kept = kept.into_held().map_err(failed)?;
                let table = datafusion::datasource::MemTable::try_new(schema, vec![kept])
                    .map_err(failed)?;
                let _ = self.ctx.deregister_table("latest");
                self.ctx
                    .register_table("latest", Arc::new(table))
                    .map_err(failed)?;
                merger
                    .current_state(&self.ctx, "latest")
                    .await
                    .map_err(failed)?
            }
            ["@late_changes", history, batch] => merger(false)
                .late_changes(&self.ctx, history, batch)
                .await
                .map_err(failed)?,
            ["@versions", history] => {
                let query =
                    merger(false).versions_sql(&sql::ident(history), sql::Dialect::DataFusion);
                self.ctx.sql(&query).await.map_err(failed)?
            }
            _ => return Err(failed(format!("unknown command {words:?}"))),
        };
        frame.collect().await.map_err(failed)
    }
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for MergeDb {
    type Error = Failed;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, text: &str) -> Result<DBOutput<DefaultColumnType>, Failed> {
        let text = text.trim();
        let batches = if text.starts_with('@') {
            let words: Vec<&str> = text.split_whitespace().collect();
            let (command, into) = match words.iter().position(|w| w.eq_ignore_ascii_case("INTO")) {
                Some(i) => (&words[..i], words.get(i + 1)),
                None => (&words[..], None),
            };
            let batches = self.command(command).await?;
            if let Some(name) = into {
                let schema = batches
                    .first()
                    .map(|b| b.schema())
                    .ok_or_else(|| failed(format!("{text}: no result schema")))?;
                let table = datafusion::datasource::MemTable::try_new(schema, vec![batches])
                    .map_err(failed)?;
                self.ctx
                    .register_table(*name, Arc::new(table))
                    .map_err(failed)?;
                return Ok(DBOutput::StatementComplete(0));
            }
            batches
        } else {
            let frame = self.ctx.sql(text).await.map_err(failed)?;
            let batches = frame.collect().await.map_err(failed)?;
            let first = text.split_whitespace().next().unwrap_or_default();
            let is_query = ["select", "with", "values"]
                .iter()
                .any(|w| first.eq_ignore_ascii_case(w));
            if !is_query {
                return Ok(DBOutput::StatementComplete(0));
            }
            batches
        };
        let options = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        let mut width = 0;
        for batch in &batches {
            width = batch.num_columns();
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).map_err(failed))
                .collect::<Result<Vec<_>, _>>()?;
            for row in 0..batch.num_rows() {
                rows.push(
                    formatters
                        .iter()
                        .map(|f| f.value(row).to_string())
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; width],
            rows,
        })
    }

    async fn shutdown(&mut self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merge_sql_gives_the_hand_written_results() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/test");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "slt files in {}: {files:?}",
        dir.display()
    );
    for file in files {
        let mut runner = sqllogictest::Runner::new(|| async {
            Ok(MergeDb {
                ctx: SessionContext::new(),
            })
        });
        runner.with_column_validator(|_, _| true);
        runner
            .run_file_async(&file)
            .await
            .unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
    }
}
