//! The full load: every selected table read in one consistent snapshot,
//! by up to `parallel_load` sessions side by side (tables, and key ranges
//! of large tables), and the binlog position of that snapshot.
//!
//! The sessions must all read the same snapshot. MariaDB: each starts its
//! own (`START TRANSACTION WITH CONSISTENT SNAPSHOT`, no lock) and reads its
//! binlog position (`binlog_snapshot_file/position`); snapshots at the same
//! position hold the same transactions, so when one differs (a commit came
//! between them) all start again, and after a few tries the load runs in one
//! session. MySQL: the snapshots start under a brief `FLUSH TABLES WITH READ
//! LOCK`, which also gives their position.

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Value as MyValue};

use super::MySource;
use super::connect::my;
use super::stream::Position;
use super::types::{MyColumn, Table};
use crate::capture::sink::Sink;
use crate::capture::source::{PART_ROWS, RANGE_ROWS, Value, emptied, range_filters};
use crate::capture::writer::LoadWriter;
use crate::config::SqlType;
use crate::error::{Error, Result};

/// Tries at sessions whose snapshots match before the load runs in one.
const SNAPSHOT_TRIES: usize = 10;

/// One part of a table's full load, copied by one session.
struct Job<'a> {
    sql: String,
    context: String,
    columns: &'a [MyColumn],
    /// Rows expected (the catalog's estimate), to share the parts out.
    estimate: f64,
    load: LoadWriter,
}

fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

impl MySource {
    /// The selected base tables of the database, with the catalog's
    /// estimate of their rows.
    async fn table_names(&mut self, sink: &Sink) -> Result<Vec<(String, f64)>> {
        let names: Vec<(String, Option<u64>)> = self
            .conn
            .exec(
                "SELECT table_name, table_rows FROM information_schema.tables \
                 WHERE table_schema = ? AND table_type = 'BASE TABLE' ORDER BY 1",
                (&self.database,),
            )
            .await
            .map_err(my("listing tables"))?;
        Ok(names
            .into_iter()
            .filter(|(n, _)| sink.mapping().selects(&self.database, n))
            .map(|(n, rows)| (n, rows.unwrap_or(0) as f64))
            .collect())
    }

    /// `n` sessions in UTC, each in a transaction on one snapshot, and the
    /// binlog position of that snapshot. Fewer (at least one) when the
    /// server kept committing while they started (see the module comment).
    async fn snapshot_sessions(&mut self, n: usize) -> Result<(Position, Vec<Conn>)> {
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let mut conn = Conn::new(self.opts.clone())
                .await
                .map_err(my("connecting for the full load"))?;
            conn.query_drop("SET time_zone = '+00:00'")
                .await
                .map_err(my("setting the session time zone"))?;
            sessions.push(conn);
        }
        if !self.mariadb {
            let lock = &mut sessions[0];
            lock.query_drop("FLUSH TABLES WITH READ LOCK")
                .await
                .map_err(my("locking for the snapshot (needs RELOAD)"))?;
            for conn in &mut sessions {
                start_snapshot(conn).await?;
            }
            let position = self.current_position().await;
            sessions[0]
                .query_drop("UNLOCK TABLES")
                .await
                .map_err(my("unlocking"))?;
            return Ok((position?, sessions));
        }
        let mut at = Vec::with_capacity(sessions.len());
        for attempt in 0..SNAPSHOT_TRIES {
            at.clear();
            for (i, conn) in sessions.iter_mut().enumerate() {
                start_snapshot(conn).await?;
                at.push(snapshot_position(conn).await?);
                if i == 0 && attempt == 0 {
                    crate::failpoint::pause("capture.snapshot_started").await;
                }
            }
            if at.iter().all(|p| *p == at[0]) {
                break;
            }
            tracing::debug!(
                attempt,
                "a commit came between the full load's snapshots; again"
            );
            if attempt + 1 == SNAPSHOT_TRIES {
                tracing::warn!(
                    sessions = sessions.len(),
                    "the server committed between the full load's snapshots {SNAPSHOT_TRIES} \
                     times: the load runs in one session"
                );
                sessions.truncate(1);
                break;
            }
            for conn in &mut sessions {
                conn.query_drop("ROLLBACK")
                    .await
                    .map_err(my("ending a snapshot"))?;
            }
        }
        let (file, pos) = at.swap_remove(0);
        // The GTID position of the snapshot's own binlog position: a commit
        // after the snapshot (not in the full load) is after it, so the
        // stream sends it (@@gtid_binlog_pos, read now, would already count
        // it: in neither the load nor the stream).
        let gtid: Option<String> = sessions[0]
            .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&file, pos))
            .await
            .map_err(my("reading the snapshot's GTID position"))?;
        let position = Position {
            file,
            pos,
            gtid: gtid.filter(|g| !g.is_empty()),
        };
        Ok((position, sessions))
    }

    /// Writes every selected table under one consistent snapshot and returns
    /// the binlog position of that snapshot, and the rows written.
    pub(super) async fn load(&mut self, sink: &mut Sink) -> Result<(Position, u64)> {
        let database = self.database.clone();
        let mut tables = Vec::new();
        for (name, estimate) in self.table_names(sink).await? {
            let table = self.describe(&database, &name, None, sink).await?;
            tables.push((table, estimate));
        }
        let parallel = self.settings.parallel_load.max(1);
        let parts: usize = tables
            .iter()
            .map(|(t, estimate)| ranged_key(t).map_or(1, |_| range_count(*estimate, parallel)))
            .sum();
        let (position, mut sessions) = self.snapshot_sessions(parallel.min(parts)).await?;
        let now = chrono::Utc::now().timestamp_micros();
        let mut jobs = Vec::new();
        for (table, estimate) in &tables {
            let name = &table.source.name;
            let from = format!(" FROM {}.{}", quote(&database), quote(name));
            let filters = key_ranges(&mut sessions[0], table, &from, *estimate, parallel).await?;
            let context = |n: usize| format!("copying {database}.{name}{}", filters[n]);
            let output = sink.load_table(&table.source);
            let first = LoadWriter::start(
                sink.target().clone(),
                sink.layout().clone(),
                output,
                context(0),
                now,
            )
            .await?;
            let others: Vec<LoadWriter> = (1..filters.len())
                .map(|n| first.part(context(n), n as u64 * PART_ROWS))
                .collect();
            let columns: Vec<String> = table
                .source
                .columns
                .iter()
                .map(|c| quote(&c.name))
                .collect();
            for (n, load) in std::iter::once(first).chain(others).enumerate() {
                jobs.push(Job {
                    sql: format!("SELECT {}{from}{}", columns.join(", "), filters[n]),
                    context: context(n),
                    columns: &table.columns,
                    estimate: estimate / filters.len() as f64,
                    load,
                });
            }
        }
        let parts = jobs.len();
        let shares = share(jobs, sessions.len());
        let copied = futures::future::try_join_all(sessions.iter_mut().zip(shares).map(
            |(conn, jobs)| async move {
                let mut rows = 0;
                for job in jobs {
                    rows += copy(conn, job).await?;
                }
                conn.query_drop("COMMIT")
                    .await
                    .map_err(my("ending the snapshot"))?;
                Ok::<_, Error>(rows)
            },
        ))
        .await?;
        let rows = copied.iter().sum();
        tracing::info!(
            tables = tables.len(),
            parts,
            sessions = sessions.len(),
            rows,
            "full load written"
        );
        Ok((position, rows))
    }
}

async fn start_snapshot(conn: &mut Conn) -> Result<()> {
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(my("starting the snapshot"))
}

/// MariaDB: the binlog file and position of the session's snapshot.
async fn snapshot_position(conn: &mut Conn) -> Result<(String, u64)> {
    let rows: Vec<(String, String)> = conn
        .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(my("reading the snapshot's binlog position"))?;
    let get = |name: &str| {
        rows.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    Ok((
        get("binlog_snapshot_file"),
        get("binlog_snapshot_position").parse::<u64>().unwrap_or(4),
    ))
}

/// The one-column integer key a table can be copied in ranges of.
fn ranged_key(table: &Table) -> Option<usize> {
    let keys: Vec<usize> = (0..table.source.columns.len())
        .filter(|i| table.source.columns[*i].key)
        .collect();
    let [key] = keys[..] else { return None };
    matches!(
        table.columns[key].sql_type,
        SqlType::SmallInt | SqlType::Integer | SqlType::BigInt
    )
    .then_some(key)
}

/// Key ranges of a table of `estimate` rows, for `sessions`.
fn range_count(estimate: f64, sessions: usize) -> usize {
    (estimate / RANGE_ROWS).ceil().clamp(1.0, sessions as f64) as usize
}

/// The parts `table` is copied in, as `WHERE` clauses: one (no clause) for
/// a small table or one without a one-column integer key, else up to
/// `sessions` ranges between its smallest and largest key, read in the
/// snapshot (`from` is the query's `FROM` clause).
async fn key_ranges(
    snapshot: &mut Conn,
    table: &Table,
    from: &str,
    estimate: f64,
    sessions: usize,
) -> Result<Vec<String>> {
    let whole = vec![String::new()];
    let Some(key) = ranged_key(table) else {
        return Ok(whole);
    };
    let parts = range_count(estimate, sessions);
    if parts < 2 {
        return Ok(whole);
    }
    let column = quote(&table.source.columns[key].name);
    let bounds: Option<(Option<i64>, Option<i64>)> = snapshot
        .query_first(format!("SELECT MIN({column}), MAX({column}){from}"))
        .await
        .map_err(my(format!(
            "reading the key range of {}",
            table.source.name
        )))?;
    let Some((Some(low), Some(high))) = bounds else {
        return Ok(whole);
    };
    Ok(range_filters(&column, low, high, parts))
}

/// `jobs` shared out to `sessions`, largest first, each to the session
/// with the fewest rows so far.
fn share(mut jobs: Vec<Job<'_>>, sessions: usize) -> Vec<Vec<Job<'_>>> {
    jobs.sort_by(|a, b| b.estimate.total_cmp(&a.estimate));
    let mut shares: Vec<(f64, Vec<Job<'_>>)> =
        (0..sessions.max(1)).map(|_| (0.0, vec![])).collect();
    for job in jobs {
        let least = shares
            .iter_mut()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .expect("one session at least");
        least.0 += job.estimate.max(1.0);
        least.1.push(job);
    }
    shares.into_iter().map(|(_, jobs)| jobs).collect()
}

/// Copies one part on `conn` (in the snapshot) and returns its rows. Values
/// are borrowed from the row the server sent where they are UTF-8 text or
/// bytes; others are given in their text form.
async fn copy(conn: &mut Conn, job: Job<'_>) -> Result<u64> {
    let Job {
        sql,
        context,
        columns,
        mut load,
        ..
    } = job;
    let mut result = conn.query_iter(sql).await.map_err(my(context.clone()))?;
    let mut stream = result
        .stream::<mysql_async::Row>()
        .await
        .map_err(my(context.clone()))?
        .ok_or_else(|| Error::capture(context.clone(), "no result set"))?;
    let mut spare: Vec<Value<'static>> = Vec::new();
    // Values with no borrowed form (not UTF-8, or not bytes), by column.
    let mut texts: Vec<(usize, String)> = Vec::new();
    while let Some(row) = stream.next().await {
        let row = row.map_err(my(context.clone()))?.unwrap();
        texts.clear();
        let mut values = emptied(spare);
        for (i, (v, c)) in row.iter().zip(columns).enumerate() {
            values.push(match v {
                MyValue::NULL => Value::Null,
                MyValue::Bytes(b) if c.sql_type == SqlType::Bytes => Value::Bytes(b),
                MyValue::Bytes(b) => match std::str::from_utf8(b) {
                    Ok(text) => Value::Text(text),
                    Err(_) => {
                        texts.push((i, String::from_utf8_lossy(b).into_owned()));
                        Value::Null
                    }
                },
                other => {
                    texts.push((i, other.as_sql(true).trim_matches('\'').to_string()));
                    Value::Null
                }
            });
        }
        for (i, text) in &texts {
            values[*i] = Value::Text(text);
        }
        load.row(&values).await?;
        spare = emptied(values);
    }
    drop(stream);
    drop(result);
    let rows = load.finish().await?;
    tracing::info!(part = %context, rows, "full load part written");
    Ok(rows)
}
