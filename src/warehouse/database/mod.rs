//! PostgreSQL and MySQL / MariaDB as warehouses (`[warehouse] kind =
//! "postgres"` / `"mysql"`): a migration's target, a reverse sync, a masked
//! copy for developers.
//!
//! Each batch is applied in **one transaction** together with its row in
//! `cdcflow_batches` (pipeline, table, batch number and id, the state store
//! that planned it, the lease token, its figures and columns): a crash at any
//! point leaves either the whole batch and its row or neither, and a batch
//! whose row is there is not applied again. Tables and columns are created
//! before the transaction (MySQL commits DDL at once), and only ever added.
//!
//! - `mode = "history"`: `<t>_history` (every change, bulk loaded), `<t>`
//!   (the newest change per key) and the `<t>_versions` view, as in every
//!   warehouse. An in-order batch's changes are newer than every row and
//!   apply as they are; a late batch recomputes its keys from history, so an
//!   older change never overwrites a newer one; a backfill replaces its
//!   objects' history rows and rebuilds `<t>`.
//! - `mode = "replica"`: only `<t>`, under the source's names, with the
//!   source's columns and nothing added: the batch's newest change per key is
//!   applied (deletes, upserts, a truncate first), with foreign keys deferred
//!   to the batch's end, and on PostgreSQL each sequence moved past the
//!   largest value loaded. A replica keeps no history, so it cannot apply a
//!   change older than one it holds: a late batch or a backfill is refused.

mod session;

use arrow::array::RecordBatch;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Apply, LoadRequest, Queries, Recorded, SqlEngine, Warehouse};
use crate::config::{Column, DatabaseConfig, SqlType, Table, TargetMode};
use crate::database::Engine;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::merge::sql::{self, Dialect};
use crate::merge::{Latest, LatestChanges, Merger};
use crate::state::{Batch, BatchStats, ObjectRef, Restored};
use session::{Session, column_type, sequence_type};

/// The ledger table, in the warehouse's schema.
const LEDGER: &str = "cdcflow_batches";
/// The session's staging table of the batch's newest change per key.
const STAGE: &str = "cdcflow_stage";

/// A PostgreSQL or MySQL / MariaDB warehouse.
pub struct DatabaseWarehouse {
    config: DatabaseConfig,
    pipeline: String,
    /// Bytes of a batch's latest changes held before they are spilled.
    latest_memory: usize,
}

/// A row of `cdcflow_batches`.
struct LedgerRow {
    number: i64,
    id: String,
    store: String,
    stats: BatchStats,
    columns: Vec<Column>,
    lease_token: Option<i64>,
}

/// A column as the ledger keeps it.
#[derive(Serialize, Deserialize)]
struct LedgerColumn {
    name: String,
    #[serde(rename = "type")]
    sql_type: String,
}

impl DatabaseWarehouse {
    /// A warehouse in `config`'s database, for pipeline `pipeline`.
    /// `latest_memory`: bytes of a batch's latest changes held before they
    /// are spilled (staged from the spill file, one chunk at a time).
    pub fn new(config: DatabaseConfig, pipeline: &str, latest_memory: usize) -> Self {
        DatabaseWarehouse {
            config,
            pipeline: pipeline.to_string(),
            latest_memory,
        }
    }

    fn engine(&self) -> Engine {
        self.config.endpoint.engine
    }

    fn replica(&self) -> bool {
        self.config.mode == TargetMode::Replica
    }

    /// The statement `name` of `sql/database/`: the engine's own, else the shared one.
    fn template(&self, name: &str) -> &'static str {
        let own = match self.engine() {
            Engine::Postgres => sql::DB_POSTGRES,
            Engine::MySql => sql::DB_MYSQL,
        };
        if own.contains(&format!("-- name: {name}\n")) {
            sql::section(own, name)
        } else {
            sql::section(sql::DB_COMMON, name)
        }
    }

    fn render(&self, name: &str, params: &[(&str, &str)]) -> String {
        sql::render(self.template(name), params)
    }

    fn dialect(&self) -> Dialect {
        Dialect::Database
    }

    fn ident(&self, name: &str) -> String {
        self.dialect().ident(name)
    }

    fn literal(&self, value: &str) -> String {
        self.dialect().literal(value)
    }

    /// `"schema"."name"`.
    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", self.ident(&self.config.schema), self.ident(name))
    }

    async fn session(&self) -> Result<Session> {
        let setup = match self.engine() {
            Engine::MySql => self.template("session"),
            Engine::Postgres => "",
        };
        Session::open(&self.config.endpoint, setup).await
    }

    /// A session, when the database has a ledger (`None`: nothing was ever
    /// loaded into it).
    async fn ledger_session(&self) -> Result<Option<Session>> {
        let mut s = self.session().await?;
        let exists = !self.existing_columns(&mut s, LEDGER).await?.is_empty();
        Ok(exists.then_some(s))
    }

    /// The columns `name` has; empty when there is no such table.
    async fn existing_columns(&self, s: &mut Session, name: &str) -> Result<Vec<String>> {
        let query = self.render(
            "columns",
            &[
                ("schema", &self.literal(&self.config.schema)),
                ("table", &self.literal(name)),
            ],
        );
        let found = s
            .rows(&query, &format!("reading the columns of {name}"))
            .await?;
        Ok(found
            .rows
            .into_iter()
            .filter_map(|mut r| r.remove(0))
            .collect())
    }

    /// The data columns with their types (`key` columns bounded for MySQL indexes).
    fn data_definitions(&self, table: &Table, merger: &Merger) -> Vec<(String, String)> {
        merger
            .columns
            .iter()
            .map(|c| {
                let key = table.primary_key.contains(&c.name);
                (c.name.clone(), column_type(self.engine(), c.sql_type, key))
            })
            .collect()
    }

    fn text_type(&self) -> String {
        column_type(self.engine(), SqlType::Text, false)
    }

    fn time_type(&self) -> String {
        column_type(self.engine(), SqlType::TimestampTz, false)
    }

    /// The history table's columns, in history's order.
    fn history_definitions(&self, table: &Table, merger: &Merger) -> Vec<(String, String)> {
        let m = &merger.meta;
        let mut columns = self.data_definitions(table, merger);
        columns.extend(
            merger
                .extra_columns
                .iter()
                .map(|c| (c.clone(), self.text_type())),
        );
        columns.extend([
            (m.op.clone(), "VARCHAR(1) NOT NULL".to_string()),
            (
                m.commit_ts.clone(),
                format!("{} NOT NULL", self.time_type()),
            ),
            (
                m.change_seq.clone(),
                format!("{} NOT NULL", sequence_type(self.engine())),
            ),
            (
                m.source_file.clone(),
                format!("{} NOT NULL", self.text_type()),
            ),
            (
                m.ingested_at.clone(),
                format!("{} NOT NULL", self.time_type()),
            ),
        ]);
        columns
    }

    /// The current table's columns: the data columns, and in history mode
    /// commit_ts, change_seq and (soft delete) deleted.
    fn current_definitions(&self, table: &Table, merger: &Merger) -> Vec<(String, String)> {
        let mut columns = self.data_definitions(table, merger);
        if !self.replica() {
            let m = &merger.meta;
            columns.push((
                m.commit_ts.clone(),
                format!("{} NOT NULL", self.time_type()),
            ));
            columns.push((
                m.change_seq.clone(),
                format!("{} NOT NULL", sequence_type(self.engine())),
            ));
            if merger.soft_delete {
                columns.push((m.deleted.clone(), "BOOLEAN NOT NULL".to_string()));
            }
        }
        columns
    }

    /// Creates `name` with `columns` and `key` when missing, else adds the
    /// columns it lacks (with their value for the rows it holds, where the
    /// source gave one). Returns whether anything changed.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_table(
        &self,
        s: &mut Session,
        name: &str,
        columns: &[(String, String)],
        key: &[String],
        index: Option<&[String]>,
        existing: &[Column],
    ) -> Result<bool> {
        let have = self.existing_columns(s, name).await?;
        let target = self.qualified(name);
        let context = format!("preparing table {name}");
        if have.is_empty() {
            let mut parts: Vec<String> = columns
                .iter()
                .map(|(c, ty)| format!("{} {ty}", self.ident(c)))
                .collect();
            if !key.is_empty() {
                parts.push(format!("PRIMARY KEY ({})", self.dialect().list(key)));
            }
            if let (Some(index), Engine::MySql) = (index, self.engine()) {
                parts.push(format!("KEY cdcflow_key ({})", self.dialect().list(index)));
            }
            let suffix = match self.engine() {
                Engine::MySql => " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                Engine::Postgres => "",
            };
            s.execute(
                &format!(
                    "CREATE TABLE IF NOT EXISTS {target} ({}){suffix}",
                    parts.join(", ")
                ),
                &context,
            )
            .await?;
            if let (Some(index), Engine::Postgres) = (index, self.engine()) {
                s.execute(
                    &format!(
                        "CREATE INDEX IF NOT EXISTS {} ON {target} ({})",
                        self.ident(&format!("{name}_cdcflow_key")),
                        self.dialect().list(index)
                    ),
                    &context,
                )
                .await?;
            }
            return Ok(true);
        }
        let mut changed = false;
        for (column, ty) in columns {
            if have.iter().any(|h| h == column) {
                continue;
            }
            let value = existing
                .iter()
                .find(|c| &c.name == column)
                .and_then(|c| c.existing.as_deref());
            let ty = ty.trim_end_matches(" NOT NULL");
            let add = |default: &str| {
                format!(
                    "ALTER TABLE {target} ADD COLUMN {} {ty}{default}",
                    self.ident(column)
                )
            };
            match value {
                Some(value) => {
                    s.execute(&add(&format!(" DEFAULT {}", self.literal(value))), &context)
                        .await?;
                    s.execute(
                        &format!(
                            "ALTER TABLE {target} ALTER COLUMN {} DROP DEFAULT",
                            self.ident(column)
                        ),
                        &context,
                    )
                    .await?;
                }
                None => {
                    s.execute(&add(""), &context).await?;
                }
            }
            changed = true;
        }
        Ok(changed)
    }

    /// The tables of `table` exist with every column of `merger`.
    async fn prepare(&self, s: &mut Session, table: &Table, merger: &Merger) -> Result<()> {
        if self.engine() == Engine::Postgres {
            // PostgreSQL's CREATE … IF NOT EXISTS races with itself (two
            // tables loading at once create the ledger): one at a time. The
            // lock ends with the session at the latest.
            s.execute(self.template("ddl_lock"), "waiting for other DDL")
                .await?;
            s.execute(
                &format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    self.ident(&self.config.schema)
                ),
                "creating the schema",
            )
            .await?;
        }
        s.execute(
            &self.render("ledger_create", &[("ledger", &self.qualified(LEDGER))]),
            "creating the batch ledger",
        )
        .await?;
        let key = &table.primary_key;
        let current = &table.target;
        if self.replica() {
            self.ensure_table(
                s,
                current,
                &self.current_definitions(table, merger),
                key,
                None,
                &merger.columns,
            )
            .await?;
            self.check_unique_key(s, table).await?;
            return self.end_ddl(s).await;
        }
        let mut index = key.clone();
        index.push(merger.meta.change_seq.clone());
        let history = table.history_name();
        let mut changed = self
            .ensure_table(
                s,
                &history,
                &self.history_definitions(table, merger),
                &[],
                Some(&index),
                &[],
            )
            .await?;
        changed |= self
            .ensure_table(
                s,
                current,
                &self.current_definitions(table, merger),
                key,
                None,
                &merger.columns,
            )
            .await?;
        let view = table.versions_name();
        if changed || self.existing_columns(s, &view).await?.is_empty() {
            s.execute(
                &format!("DROP VIEW IF EXISTS {}", self.qualified(&view)),
                "replacing the versions view",
            )
            .await?;
            let query = merger.versions_sql(&self.qualified(&history), self.dialect());
            s.execute(
                &self.render(
                    "versions",
                    &[("view", &self.qualified(&view)), ("query", &query)],
                ),
                "creating the versions view",
            )
            .await?;
        }
        self.end_ddl(s).await
    }

    async fn end_ddl(&self, s: &mut Session) -> Result<()> {
        if self.engine() == Engine::Postgres {
            s.execute(self.template("ddl_unlock"), "ending DDL").await?;
        }
        Ok(())
    }

    /// MySQL applies an upsert to any unique index, and without one it
    /// inserts a second row: a replica's table must have one on the key.
    async fn check_unique_key(&self, s: &mut Session, table: &Table) -> Result<()> {
        if self.engine() != Engine::MySql {
            return Ok(());
        }
        let query = self.render(
            "unique_keys",
            &[
                ("schema", &self.literal(&self.config.schema)),
                ("table", &self.literal(&table.target)),
            ],
        );
        let found = s.rows(&query, "reading the table's unique keys").await?;
        let wanted = table.primary_key.join(",");
        if found
            .rows
            .iter()
            .any(|r| r.get(1).cloned().flatten().as_deref() == Some(wanted.as_str()))
        {
            return Ok(());
        }
        Err(Error::Usage(format!(
            "table {}.{} has no PRIMARY KEY or UNIQUE index on ({}), the pipeline's primary_key: \
             without one a change would add a row instead of replacing it. Add it, e.g. \
             ALTER TABLE {} ADD PRIMARY KEY ({})",
            self.config.schema, table.target, wanted, table.target, wanted
        )))
    }

    /// The table's last ledger row (`number`: that batch's row instead);
    /// `lock` holds it until the transaction ends.
    async fn ledger_row(
        &self,
        s: &mut Session,
        table: &Table,
        number: Option<i64>,
        lock: bool,
    ) -> Result<Option<LedgerRow>> {
        let query = self.render(
            "ledger_last",
            &[
                ("ledger", &self.qualified(LEDGER)),
                ("pipeline", &self.literal(&self.pipeline)),
                ("table", &self.literal(&table.qualified())),
                (
                    "number",
                    &number.map_or(String::new(), |n| format!("AND number = {n}")),
                ),
                ("lock", if lock { "FOR UPDATE" } else { "" }),
            ],
        );
        let found = s.rows(&query, "reading the batch ledger").await?;
        let Some(row) = found.rows.into_iter().next() else {
            return Ok(None);
        };
        let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let bad = |what: &str, e: String| {
            Error::Internal(format!(
                "{LEDGER} of {}: unreadable {what}: {e}",
                table.qualified()
            ))
        };
        let columns: Vec<LedgerColumn> =
            serde_json::from_str(&text(4)).map_err(|e| bad("columns", e.to_string()))?;
        Ok(Some(LedgerRow {
            number: text(0).parse().map_err(|e| bad("number", format!("{e}")))?,
            id: text(1),
            store: text(2),
            stats: serde_json::from_str(&text(3)).map_err(|e| bad("stats", e.to_string()))?,
            columns: columns
                .into_iter()
                .map(|c| {
                    Ok(Column {
                        sql_type: c.sql_type.parse().map_err(|e| bad("column type", e))?,
                        name: c.name,
                        existing: None,
                    })
                })
                .collect::<Result<_>>()?,
            lease_token: text(5).parse().ok(),
        }))
    }

    /// Deletes the rows of `table`'s current table whose key is staged and
    /// for which `filter` (over `t`, the row, and `s`, the staged change) holds.
    async fn delete_staged(
        &self,
        s: &mut Session,
        table: &Table,
        filter: &str,
        context: &str,
    ) -> Result<()> {
        let sql = self.render(
            "delete_join",
            &[
                ("target", &self.qualified(&table.target)),
                ("stage", &self.ident(STAGE)),
                (
                    "key_equal",
                    &self.dialect().key_equal("t", "s", &table.primary_key),
                ),
                ("filter", filter),
            ],
        );
        s.execute(&sql, context).await.map(drop)
    }

    /// Deletes the rows of `table`'s current table for which `filter` holds.
    async fn delete_where(
        &self,
        s: &mut Session,
        table: &Table,
        filter: &str,
        context: &str,
    ) -> Result<()> {
        let sql = self.render(
            "delete_where",
            &[
                ("target", &self.qualified(&table.target)),
                ("filter", filter),
            ],
        );
        s.execute(&sql, context).await.map(drop)
    }

    /// Applies the staged newest changes to the current table.
    async fn apply_current(
        &self,
        s: &mut Session,
        req: &LoadRequest<'_>,
        apply: Apply,
        truncated: Option<&str>,
    ) -> Result<()> {
        let (table, merger) = (req.table, req.merger);
        let m = &merger.meta;
        let target = self.qualified(&table.target);
        let stage = self.ident(STAGE);
        let seq = self.ident(&m.change_seq);
        let mut target_columns: Vec<String> =
            merger.columns.iter().map(|c| c.name.clone()).collect();
        if !self.replica() {
            target_columns.extend([m.commit_ts.clone(), m.change_seq.clone()]);
        }
        let mut select_columns: Vec<String> =
            target_columns.iter().map(|c| self.ident(c)).collect();
        if merger.soft_delete && !self.replica() {
            target_columns.push(m.deleted.clone());
            select_columns.push(format!("({} = 'D')", self.ident(&m.op)));
        }
        let context = format!("applying the batch to {}", table.target);
        if apply != Apply::InOrder {
            // History holds every change: the keys' current rows are rebuilt from it.
            let history = self.qualified(&table.history_name());
            let key = self.dialect().list(&table.primary_key);
            let scope = match apply {
                Apply::Late => {
                    self.delete_staged(s, table, "1 = 1", &context).await?;
                    format!("({key}) IN (SELECT {key} FROM {stage})")
                }
                _ => {
                    self.delete_where(s, table, "1 = 1", &context).await?;
                    "1 = 1".to_string()
                }
            };
            let keep = if merger.soft_delete {
                "1 = 1".to_string()
            } else {
                format!("{} <> 'D'", self.ident(&m.op))
            };
            return s
                .execute(
                    &self.render(
                        "rebuild",
                        &[
                            ("target", &target),
                            ("target_columns", &self.dialect().list(&target_columns)),
                            ("select_columns", &select_columns.join(", ")),
                            ("op", &self.ident(&m.op)),
                            ("key", &key),
                            ("change_seq", &seq),
                            ("history", &history),
                            ("scope", &scope),
                            ("keep", &keep),
                        ],
                    ),
                    &context,
                )
                .await
                .map(drop);
        }
        if let Some(truncated) = truncated {
            let filter = if self.replica() {
                "1 = 1".to_string()
            } else {
                format!("{seq} < {}", self.literal(truncated))
            };
            self.delete_where(s, table, &filter, &context).await?;
        }
        // An in-order batch is newer than every row: its changes apply as
        // they are (the ledger keeps a batch from applying twice).
        let op = format!("s.{}", self.ident(&m.op));
        if !merger.soft_delete || self.replica() {
            self.delete_staged(s, table, &format!("{op} = 'D'"), &context)
                .await?;
        }
        let filter = if merger.soft_delete && !self.replica() {
            "1 = 1".to_string()
        } else {
            format!("{op} <> 'D'")
        };
        // Only key columns: a row that is there stays as it is.
        let assigned: Vec<&String> = match target_columns
            .iter()
            .filter(|c| !table.primary_key.contains(c))
            .collect::<Vec<_>>()
        {
            none if none.is_empty() => vec![&table.primary_key[0]],
            some => some,
        };
        let assignments: Vec<String> = assigned
            .iter()
            .map(|c| {
                let c = self.ident(c);
                match self.engine() {
                    Engine::Postgres => format!("{c} = EXCLUDED.{c}"),
                    Engine::MySql => format!("{target}.{c} = VALUES({c})"),
                }
            })
            .collect();
        let (target_list, select_list, key_list, assignment_list) = (
            self.dialect().list(&target_columns),
            select_columns.join(", "),
            self.dialect().list(&table.primary_key),
            assignments.join(", "),
        );
        let mut params: Vec<(&str, &str)> = vec![
            ("target", target.as_str()),
            ("target_columns", &target_list),
            ("select_columns", &select_list),
            ("stage", &stage),
            ("filter", &filter),
            ("assignments", &assignment_list),
        ];
        if self.engine() == Engine::Postgres {
            params.push(("key", key_list.as_str()));
        }
        s.execute(&self.render("upsert", &params), &context).await?;
        Ok(())
    }

    /// PostgreSQL: moves each sequence that fills a column of the replica's
    /// table past the largest value loaded, so the application's inserts
    /// after a cut-over do not collide. (MySQL's AUTO_INCREMENT moves by
    /// itself past an explicit value.)
    async fn move_sequences(&self, s: &mut Session, table: &Table) -> Result<()> {
        if self.engine() != Engine::Postgres {
            return Ok(());
        }
        let target = self.qualified(&table.target);
        let query = self.render("sequences", &[("table", &self.literal(&target))]);
        let found = s.rows(&query, "reading the table's sequences").await?;
        for row in found.rows {
            let (Some(column), Some(sequence)) = (row[0].clone(), row[1].clone()) else {
                continue;
            };
            s.execute(
                &self.render(
                    "sequence_past",
                    &[
                        ("sequence", &self.literal(&sequence)),
                        ("column", &self.ident(&column)),
                        ("target", &target),
                        ("sequence_table", &sequence),
                    ],
                ),
                &format!("moving sequence {sequence} past the loaded values"),
            )
            .await?;
        }
        Ok(())
    }

    /// Writes `rows` (the newest change per key) to the session's staging table.
    async fn stage(
        &self,
        s: &mut Session,
        table: &Table,
        merger: &Merger,
        rows: &Latest,
    ) -> Result<()> {
        let schema = rows.schema();
        let m = &merger.meta;
        let mut columns = self.data_definitions(table, merger);
        columns.extend([
            (m.op.clone(), "VARCHAR(1)".to_string()),
            (m.commit_ts.clone(), self.time_type()),
            (
                m.change_seq.clone(),
                sequence_type(self.engine()).to_string(),
            ),
        ]);
        let definitions: Vec<String> = columns
            .iter()
            .map(|(c, ty)| format!("{} {ty}", self.ident(c)))
            .collect();
        let key = self.dialect().list(&table.primary_key);
        let create = match self.engine() {
            Engine::Postgres => format!(
                "CREATE TEMPORARY TABLE {} ({}, PRIMARY KEY ({key})) ON COMMIT DROP",
                self.ident(STAGE),
                definitions.join(", ")
            ),
            Engine::MySql => format!(
                "CREATE TEMPORARY TABLE {} ({}, PRIMARY KEY ({key})) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
                self.ident(STAGE),
                definitions.join(", ")
            ),
        };
        s.execute(&create, "creating the staging table").await?;
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let list = self.dialect().list(&names);
        for batch in rows.batches()? {
            s.insert(
                &self.ident(STAGE),
                &list,
                &batch?,
                "staging the batch's newest changes",
            )
            .await?;
        }
        Ok(())
    }

    /// The batch's ledger row.
    fn ledger_record(&self, req: &LoadRequest<'_>, stats: &BatchStats) -> Result<String> {
        let columns: Vec<LedgerColumn> = req
            .merger
            .columns
            .iter()
            .map(|c| LedgerColumn {
                name: c.name.clone(),
                sql_type: c.sql_type.to_string(),
            })
            .collect();
        Ok(self.render(
            "ledger_record",
            &[
                ("ledger", &self.qualified(LEDGER)),
                ("pipeline", &self.literal(&self.pipeline)),
                ("table", &self.literal(&req.table.qualified())),
                ("number", &req.batch.number.to_string()),
                ("batch_id", &self.literal(&req.batch.id)),
                ("store", &self.literal(req.store)),
                (
                    "lease_token",
                    &req.lease_token
                        .map_or("NULL".to_string(), |t| t.to_string()),
                ),
                ("stats", &self.literal(&json(stats)?)),
                ("columns", &self.literal(&json(&columns)?)),
                ("objects", &self.literal(&json(&req.batch.objects)?)),
            ],
        ))
    }

    /// Applies `req` inside the open transaction of `s`.
    async fn apply(&self, s: &mut Session, req: &LoadRequest<'_>) -> Result<BatchStats> {
        let (table, merger) = (req.table, req.merger);
        if let Some(last) = self.ledger_row(s, table, None, true).await? {
            if let (Some(ours), Some(theirs)) = (req.lease_token, last.lease_token)
                && theirs > ours
            {
                return Err(Error::LeaseLost {
                    pipeline: self.pipeline.clone(),
                });
            }
            if last.number >= req.batch.number {
                let row = self
                    .ledger_row(s, table, Some(req.batch.number), false)
                    .await?;
                return Ok(row.map_or(last.stats, |r| r.stats));
            }
        }
        if self.replica() {
            s.execute(
                self.template("defer_foreign_keys"),
                "deferring foreign keys",
            )
            .await
            .map_err(|e| match (self.engine(), e) {
                (
                    Engine::Postgres,
                    Error::Database {
                        context,
                        message,
                        retry,
                    },
                ) => Error::Database {
                    context,
                    message: format!(
                        "{message}: replica mode sets session_replication_role = replica \
                                 for the batch, which needs a superuser (on RDS or Cloud SQL, a \
                                 member of rds_superuser / cloudsqlsuperuser)"
                    ),
                    retry,
                },
                (_, e) => e,
            })?;
        }
        let history = self.qualified(&table.history_name());
        if !self.replica() && req.batch.mode == crate::state::BatchMode::Replace {
            let objects: Vec<String> = req
                .batch
                .objects
                .iter()
                .map(|o| self.literal(&o.key))
                .collect();
            s.execute(
                &self.render(
                    "history_forget",
                    &[
                        ("history", &history),
                        ("source_file", &self.ident(&merger.meta.source_file)),
                        ("objects", &objects.join(", ")),
                    ],
                ),
                "replacing the backfilled objects' history",
            )
            .await?;
        }
        let mut stream = req.rows.take().ok_or_else(|| {
            Error::Usage(format!(
                "the rows of batch {} were already read",
                req.batch.number
            ))
        })?;
        let mut latest = LatestChanges::new(merger)?.spill_past(self.latest_memory);
        let names: Vec<String> = merger
            .history_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let history_columns = self.dialect().list(&names);
        while let Some(rows) = stream.next().await {
            let rows = rows.map_err(|e| Error::query("producing the batch's rows", e))?;
            latest.push(&rows)?;
            if !self.replica() {
                s.insert(&history, &history_columns, &rows, "appending to history")
                    .await?;
            }
        }
        failpoint::hit("load.between_history_and_current");
        let (rows, stats, order) = latest.finish()?;
        let apply = Apply::choose(
            req.batch.mode,
            order.min_seq.as_deref(),
            req.loaded_max.as_deref(),
        );
        if self.replica() && apply != Apply::InOrder {
            return Err(Error::Usage(format!(
                "table {}: batch {} {}; a replica keeps no history to apply it from, so nothing of \
                 it was applied. Load such objects into a warehouse in mode = \"history\", or \
                 rebuild the replica: empty its tables and the pipeline's state, then run again",
                table.qualified(),
                req.batch.number,
                match apply {
                    Apply::Late => format!(
                        "holds changes older than ones already applied (from {} on; applied up to {})",
                        order.min_seq.as_deref().unwrap_or("?"),
                        req.loaded_max.as_deref().unwrap_or("?")
                    ),
                    _ => "is a backfill".to_string(),
                }
            )));
        }
        self.stage(s, table, merger, &rows).await?;
        self.apply_current(s, req, apply, order.truncated.as_deref())
            .await?;
        if self.replica() {
            self.move_sequences(s, table).await?;
        }
        s.execute(&self.ledger_record(req, &stats)?, "recording the batch")
            .await?;
        failpoint::hit("load.before_database_commit");
        Ok(stats)
    }
}

/// The column of `values` (a server's text) parsed as `ty`; `None` when a
/// value does not parse, and the caller keeps the column as text.
fn typed<'a>(
    ty: SqlType,
    values: impl Iterator<Item = Option<&'a str>>,
) -> Option<arrow::array::ArrayRef> {
    let mut builder = crate::decode::columns::ColumnBuilder::new(ty, 0);
    for value in values {
        match value {
            None => builder.append_null(),
            Some(v) => builder.append_text(v).ok()?,
        }
    }
    Some(builder.finish())
}

/// The ledger's JSON text of `value`.
fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("ledger JSON: {e}")))
}

#[async_trait::async_trait]
impl Warehouse for DatabaseWarehouse {
    async fn load(&self, req: LoadRequest<'_>) -> Result<BatchStats> {
        let mut s = self.session().await?;
        self.prepare(&mut s, req.table, req.merger).await?;
        s.execute("BEGIN", "starting the batch's transaction")
            .await?;
        match self.apply(&mut s, &req).await {
            Ok(stats) => {
                s.execute("COMMIT", "committing the batch").await?;
                Ok(stats)
            }
            Err(e) => {
                // The session ends here, and with it the transaction.
                let _ = s.execute("ROLLBACK", "rolling back the batch").await;
                Err(e)
            }
        }
    }

    async fn last_recorded(&self, table: &Table) -> Result<Recorded> {
        let row = match self.ledger_session().await? {
            Some(mut s) => self.ledger_row(&mut s, table, None, false).await?,
            None => None,
        };
        Ok(Recorded::Batch {
            number: row.as_ref().map_or(0, |r| r.number),
            id: row.as_ref().map(|r| r.id.clone()),
            store: row.map(|r| r.store),
        })
    }

    async fn ledger(&self, table: &Table, _merger: &Merger) -> Result<Option<Restored>> {
        let mut restored = Restored {
            number: 0,
            id: String::new(),
            objects: Vec::new(),
            stats: BatchStats::default(),
            pending: None,
        };
        let Some(mut s) = self.ledger_session().await? else {
            return Ok(Some(restored));
        };
        let query = self.render(
            "ledger_all",
            &[
                ("ledger", &self.qualified(LEDGER)),
                ("pipeline", &self.literal(&self.pipeline)),
                ("table", &self.literal(&table.qualified())),
            ],
        );
        let bad = |what: &str, e: String| {
            Error::Internal(format!(
                "{LEDGER} of {}: unreadable {what}: {e}",
                table.qualified()
            ))
        };
        // Each batch applied in full (one transaction each, so none is
        // pending); a backfill's objects appear again, the later entry kept.
        let mut objects = std::collections::BTreeMap::new();
        for row in s.rows(&query, "reading the batch ledger").await?.rows {
            let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            restored.number = text(0).parse().map_err(|e| bad("number", format!("{e}")))?;
            restored.id = text(1);
            let stats: BatchStats =
                serde_json::from_str(&text(2)).map_err(|e| bad("stats", e.to_string()))?;
            restored.stats.add(&stats);
            let batch: Vec<ObjectRef> =
                serde_json::from_str(&text(3)).map_err(|e| bad("objects", e.to_string()))?;
            objects.extend(batch.into_iter().map(|o| (o.key.clone(), o)));
        }
        restored.objects = objects.into_values().collect();
        Ok(Some(restored))
    }

    async fn batch_started(&self, table: &Table, batch: &Batch, _store: &str) -> Result<bool> {
        Ok(match self.last_recorded(table).await? {
            Recorded::Batch { number, .. } => number >= batch.number,
            Recorded::Untracked => false,
        })
    }

    async fn columns(&self, table: &Table, _merger: &Merger) -> Result<Option<Vec<Column>>> {
        let Some(mut s) = self.ledger_session().await? else {
            return Ok(None);
        };
        Ok(self
            .ledger_row(&mut s, table, None, false)
            .await?
            .map(|row| row.columns))
    }

    fn queries(&self) -> Queries<'_> {
        Queries::Engine(self)
    }

    fn keeps_history(&self) -> bool {
        !self.replica()
    }

    fn refuses_column(&self, name: &str) -> Option<String> {
        let limit = match self.engine() {
            Engine::Postgres => 63,
            Engine::MySql => 64,
        };
        (name.len() > limit).then(|| format!("the database allows names of at most {limit} bytes"))
    }
}

#[async_trait::async_trait]
impl SqlEngine for DatabaseWarehouse {
    async fn query(&self, query: &str) -> Result<Vec<RecordBatch>> {
        let mut s = self.session().await?;
        if self.engine() == Engine::Postgres {
            s.execute(
                &format!("SET search_path TO {}", self.ident(&self.config.schema)),
                "setting the schema",
            )
            .await?;
        }
        let found = s.rows(query, "running the query").await?;
        let mut fields = Vec::with_capacity(found.names.len());
        let mut columns = Vec::with_capacity(found.names.len());
        for (i, name) in found.names.iter().enumerate() {
            let ty = found.types.get(i).copied().unwrap_or(SqlType::Text);
            let column = typed(ty, found.rows.iter().map(|r| r[i].as_deref()))
                .or_else(|| typed(SqlType::Text, found.rows.iter().map(|r| r[i].as_deref())))
                .expect("text takes any value");
            fields.push(arrow::datatypes::Field::new(
                name,
                column.data_type().clone(),
                true,
            ));
            columns.push(column);
        }
        let batch = RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
            columns,
        )
        .map_err(|e| Error::Internal(format!("query rows: {e}")))?;
        Ok(vec![batch])
    }

    fn dialect(&self) -> Dialect {
        Dialect::Database
    }
}
