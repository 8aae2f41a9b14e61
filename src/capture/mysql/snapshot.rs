//! The full load: every selected table read in one consistent snapshot,
//! and the binlog position of that snapshot.

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value as MyValue};

use super::MySource;
use super::connect::my;
use super::stream::Position;
use crate::capture::sink::Sink;
use crate::capture::source::Value;
use crate::capture::writer::LoadWriter;
use crate::config::SqlType;
use crate::error::{Error, Result};

impl MySource {
    /// The selected base tables of the database.
    async fn table_names(&mut self, sink: &Sink) -> Result<Vec<String>> {
        let names: Vec<String> = self
            .conn
            .exec(
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = ? AND table_type = 'BASE TABLE' ORDER BY 1",
                (&self.database,),
            )
            .await
            .map_err(my("listing tables"))?;
        Ok(names
            .into_iter()
            .filter(|n| sink.mapping().selects(&self.database, n))
            .collect())
    }

    /// Writes every selected table under one consistent snapshot and returns
    /// the binlog position of that snapshot, and the rows written.
    pub(super) async fn load(&mut self, sink: &mut Sink) -> Result<(Position, u64)> {
        let mut snap = Conn::new(self.opts.clone())
            .await
            .map_err(my("connecting for the full load"))?;
        snap.query_drop("SET time_zone = '+00:00'")
            .await
            .map_err(my("setting the session time zone"))?;
        let position = if self.mariadb {
            snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                .await
                .map_err(my("starting the snapshot"))?;
            let rows: Vec<(String, String)> = snap
                .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
                .await
                .map_err(my("reading the snapshot's binlog position"))?;
            let get = |name: &str| {
                rows.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            crate::failpoint::pause("capture.snapshot_started").await;
            let (file, pos) = (
                get("binlog_snapshot_file"),
                get("binlog_snapshot_position").parse::<u64>().unwrap_or(4),
            );
            // The GTID position of the snapshot's own binlog position: a
            // commit after the snapshot (not in the full load) is after it,
            // so the stream sends it (@@gtid_binlog_pos, read now, would
            // already count it: in neither the load nor the stream).
            let gtid: Option<String> = snap
                .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&file, pos))
                .await
                .map_err(my("reading the snapshot's GTID position"))?;
            Position {
                file,
                pos,
                gtid: gtid.filter(|g| !g.is_empty()),
            }
        } else {
            snap.query_drop("FLUSH TABLES WITH READ LOCK")
                .await
                .map_err(my("locking for the snapshot (needs RELOAD)"))?;
            snap.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                .await
                .map_err(my("starting the snapshot"))?;
            let position = self.current_position().await;
            snap.query_drop("UNLOCK TABLES")
                .await
                .map_err(my("unlocking"))?;
            position?
        };
        let mut total = 0;
        let database = self.database.clone();
        for name in self.table_names(sink).await? {
            let table = self.describe(&database, &name, None, sink).await?;
            let output = sink.load_table(&table.source);
            let cols: Vec<String> = table
                .source
                .columns
                .iter()
                .map(|c| format!("`{}`", c.name.replace('`', "``")))
                .collect();
            let sql = format!(
                "SELECT {} FROM `{}`.`{}`",
                cols.join(", "),
                database.replace('`', "``"),
                name.replace('`', "``")
            );
            let context = format!("copying {database}.{name}");
            let now = chrono::Utc::now().timestamp_micros();
            let mut load = LoadWriter::start(
                sink.target().clone(),
                sink.layout().clone(),
                output,
                context.clone(),
                now,
            )
            .await?;
            let mut result = snap.query_iter(sql).await.map_err(my(context.clone()))?;
            let mut stream = result
                .stream::<mysql_async::Row>()
                .await
                .map_err(my(context.clone()))?
                .ok_or_else(|| Error::capture(context.clone(), "no result set"))?;
            while let Some(row) = stream.next().await {
                let row = row.map_err(my(context.clone()))?;
                let texts: Vec<Option<String>> = row
                    .unwrap()
                    .into_iter()
                    .zip(&table.columns)
                    .map(|(v, c)| match v {
                        MyValue::NULL => None,
                        MyValue::Bytes(b) if c.sql_type == SqlType::Bytes => {
                            Some(format!("\\x{}", hex::encode(b)))
                        }
                        MyValue::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
                    })
                    .collect();
                let values: Vec<Value<'_>> = texts
                    .iter()
                    .map(|t| t.as_deref().map_or(Value::Null, Value::Text))
                    .collect();
                load.row(&values).await?;
            }
            drop(stream);
            drop(result);
            let rows = load.finish().await?;
            tracing::info!(table = %format!("{database}.{name}"), rows, "full load written");
            total += rows;
        }
        snap.query_drop("COMMIT")
            .await
            .map_err(my("ending the snapshot"))?;
        Ok((position, total))
    }
}
