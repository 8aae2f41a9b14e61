//! The object manifest and batches ([`Manifest`]) in SQLite.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, now, parse_objects, parse_stamp, seconds_between};
use crate::error::Result;
use crate::state::stamp;
use crate::state::{
    Batch, BatchMode, BatchStats, CommittedBatch, Manifest, ObjectRecord, ObjectRef, ObjectStatus,
    Restored, TableTotals,
};

impl Manifest for SqliteStore {
    fn store_id(&self) -> &str {
        &self.id
    }

    fn restore(&self, table: &str, restored: &Restored) -> Result<()> {
        self.with(
            |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "DELETE FROM batches WHERE pipeline = ?1 AND tbl = ?2",
                    params![self.pipeline, table],
                )?;
                tx.execute(
                    "DELETE FROM objects WHERE pipeline = ?1 AND tbl = ?2 AND status = 'processed'",
                    params![self.pipeline, table],
                )?;
                if restored.number > 0 {
                    let committed = Batch {
                        number: restored.number,
                        id: restored.id.clone(),
                        objects: restored.objects.clone(),
                        mode: BatchMode::Append,
                    };
                    self.insert_planned(&tx, table, &committed)?;
                    self.commit_planned(&tx, table, restored.number, &restored.stats)?;
                }
                if let Some(p) = &restored.pending {
                    for object in &p.objects {
                        tx.execute(
                            "DELETE FROM objects WHERE pipeline = ?1 AND tbl = ?2 AND key = ?3",
                            params![self.pipeline, table, object.key],
                        )?;
                    }
                    self.insert_planned(&tx, table, p)?;
                }
                tx.commit()
            },
            "restoring a table's state from the warehouse",
        )
    }

    fn objects(&self, table: &str) -> Result<HashMap<String, ObjectRecord>> {
        self.with(
            |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT key, etag, size, status, batch_no, error, reason, updated_at
                     FROM objects WHERE pipeline = ?1 AND tbl = ?2",
                )?;
                let rows = stmt.query_map(params![self.pipeline, table], |r| {
                    let status = ObjectStatus::from_columns(
                        &r.get::<_, String>(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    );
                    Ok(ObjectRecord {
                        object: ObjectRef {
                            key: r.get(0)?,
                            etag: r.get(1)?,
                            size: r.get::<_, i64>(2)? as u64,
                            last_modified: DateTime::default(),
                        },
                        status,
                        updated_at: r.get(7)?,
                    })
                })?;
                rows.map(|r| r.map(|rec| (rec.object.key.clone(), rec)))
                    .collect()
            },
            "reading objects",
        )
    }

    fn pending_batch(&self, table: &str) -> Result<Option<Batch>> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT batch_no, batch_id, objects, mode FROM batches
                     WHERE pipeline = ?1 AND tbl = ?2 AND status = 'planned'",
                    params![self.pipeline, table],
                    |r| {
                        Ok(Batch {
                            number: r.get(0)?,
                            id: r.get(1)?,
                            objects: parse_objects(&r.get::<_, String>(2)?)?,
                            mode: BatchMode::parse(&r.get::<_, String>(3)?),
                        })
                    },
                )
                .optional()
            },
            "reading the pending batch",
        )
    }

    fn plan_batch(&self, table: &str, objects: &[ObjectRef], mode: BatchMode) -> Result<Batch> {
        let id = Batch::id_of(&self.pipeline, table, objects);
        self.write(table, "planning a batch", |tx| {
            let number: i64 = tx.query_row(
                "SELECT COALESCE(MAX(batch_no), 0) + 1 FROM batches WHERE pipeline = ?1 AND tbl = ?2",
                params![self.pipeline, table],
                |r| r.get(0),
            )?;
            let batch = Batch { number, id: id.clone(), objects: objects.to_vec(), mode };
            self.insert_planned(tx, table, &batch)?;
            Ok(batch)
        })
    }

    fn replan_batch(
        &self,
        table: &str,
        number: i64,
        objects: &[ObjectRef],
    ) -> Result<Option<Batch>> {
        self.write(table, "re-planning a batch", |tx| {
            if objects.is_empty() {
                tx.execute(
                    "DELETE FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3 AND status = 'planned'",
                    params![self.pipeline, table, number],
                )?;
                return Ok(None);
            }
            let id = Batch::id_of(&self.pipeline, table, objects);
            let mode: String = tx.query_row(
                "UPDATE batches SET batch_id = ?4, objects = ?5
                 WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3 AND status = 'planned'
                 RETURNING mode",
                params![self.pipeline, table, number, id, serde_json::to_string(objects).expect("objects serialize")],
                |r| r.get(0),
            )?;
            Ok(Some(Batch { number, id, objects: objects.to_vec(), mode: BatchMode::parse(&mode) }))
        })
    }

    fn commit_batch(&self, table: &str, number: i64, stats: &BatchStats) -> Result<()> {
        self.write(table, "committing a batch", |tx| {
            self.commit_planned(tx, table, number, stats)
        })
    }

    fn recent_batches(&self, table: &str, limit: usize) -> Result<Vec<CommittedBatch>> {
        self.with(
            |c| {
                c.prepare_cached(
                    "SELECT batch_no, objects, rows, inserts, updates, deletes, max_seq, committed_at,
                       batch_id, max_commit_ts, planned_at, bytes_processed, bytes_billed FROM batches
                     WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'
                     ORDER BY batch_no DESC LIMIT ?3",
                )?
                .query_map(params![self.pipeline, table, limit as i64], |r| {
                    let time = |i| -> rusqlite::Result<DateTime<Utc>> {
                        Ok(r.get::<_, Option<String>>(i)?
                            .as_deref()
                            .and_then(parse_stamp)
                            .unwrap_or_default())
                    };
                    Ok(CommittedBatch {
                        number: r.get(0)?,
                        id: r.get(8)?,
                        objects: parse_objects(&r.get::<_, String>(1)?)?.len(),
                        stats: BatchStats {
                            rows: r.get::<_, i64>(2)? as u64,
                            inserts: r.get::<_, i64>(3)? as u64,
                            updates: r.get::<_, i64>(4)? as u64,
                            deletes: r.get::<_, i64>(5)? as u64,
                            max_seq: r.get(6)?,
                            max_commit_ts: r
                                .get::<_, Option<String>>(9)?
                                .as_deref()
                                .and_then(parse_stamp),
                            bytes_processed: r.get::<_, Option<i64>>(11)?.map(|b| b.max(0) as u64),
                            bytes_billed: r.get::<_, Option<i64>>(12)?.map(|b| b.max(0) as u64),
                        },
                        planned_at: time(10)?,
                        committed_at: time(7)?,
                    })
                })?
                .collect()
            },
            "reading the recent batches",
        )
    }

    fn max_seq(&self, table: &str) -> Result<Option<String>> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT MAX(max_seq) FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )
            },
            "reading the watermark",
        )
    }

    fn quarantine(&self, table: &str, object: &ObjectRef, error: &str) -> Result<()> {
        self.set_status(table, object, "quarantined", Some(error), None)
    }

    fn release(&self, table: &str, key: &str) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "DELETE FROM objects WHERE pipeline = ?1 AND tbl = ?2 AND key = ?3 AND status = 'quarantined'",
                    params![self.pipeline, table, key],
                )
                .map(|_| ())
            },
            "releasing a quarantined object",
        )
    }

    fn skip(&self, table: &str, object: &ObjectRef, reason: &str) -> Result<()> {
        self.set_status(table, object, "skipped", None, Some(reason))
    }

    fn max_commit_ts(&self, table: &str) -> Result<Option<DateTime<Utc>>> {
        let max: Option<String> = self.with(
            |c| {
                c.query_row(
                    "SELECT MAX(max_commit_ts) FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )
            },
            "reading the newest commit time",
        )?;
        Ok(max.as_deref().and_then(parse_stamp))
    }

    fn totals(&self, table: &str) -> Result<TableTotals> {
        self.with(
            |c| {
                let mut totals = c.query_row(
                    "SELECT COUNT(*), SUM(rows), SUM(inserts), SUM(updates), SUM(deletes),
                       SUM(bytes_billed) FROM batches
                     WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'",
                    params![self.pipeline, table],
                    |r| {
                        let figure = |i| -> rusqlite::Result<u64> {
                            Ok(r.get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
                        };
                        Ok(TableTotals {
                            batches: figure(0)?,
                            rows: figure(1)?,
                            inserts: figure(2)?,
                            updates: figure(3)?,
                            deletes: figure(4)?,
                            bytes_billed: figure(5)?,
                            ..TableTotals::default()
                        })
                    },
                )?;
                (totals.objects, totals.bytes) = c.query_row(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM objects
                     WHERE pipeline = ?1 AND tbl = ?2 AND status = 'processed'",
                    params![self.pipeline, table],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )?;
                totals.batch_seconds = c
                    .prepare_cached(
                        "SELECT planned_at, committed_at FROM batches
                         WHERE pipeline = ?1 AND tbl = ?2 AND status = 'committed'",
                    )?
                    .query_map(params![self.pipeline, table], |r| {
                        Ok(seconds_between(
                            &r.get::<_, String>(0)?,
                            &r.get::<_, String>(1)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                Ok(totals)
            },
            "reading the table's totals",
        )
    }

    fn last_full_listing(&self, table: &str) -> Result<Option<DateTime<Utc>>> {
        let at: Option<String> = self.with(
            |c| {
                c.query_row(
                    "SELECT full_at FROM listings WHERE pipeline = ?1 AND tbl = ?2",
                    params![self.pipeline, table],
                    |r| r.get(0),
                )
                .optional()
            },
            "reading the last full listing",
        )?;
        Ok(at.as_deref().and_then(parse_stamp))
    }

    fn set_last_full_listing(&self, table: &str, at: DateTime<Utc>) -> Result<()> {
        self.with(
            |c| {
                c.execute(
                    "INSERT INTO listings (pipeline, tbl, full_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (pipeline, tbl) DO UPDATE SET full_at = excluded.full_at",
                    params![self.pipeline, table, stamp(at)],
                )
                .map(|_| ())
            },
            "recording a full listing",
        )
    }
}

impl SqliteStore {
    /// Records `batch` as planned (its number given).
    fn insert_planned(
        &self,
        tx: &rusqlite::Transaction<'_>,
        table: &str,
        batch: &Batch,
    ) -> rusqlite::Result<()> {
        let json = serde_json::to_string(&batch.objects).expect("objects serialize");
        tx.execute(
            "INSERT INTO batches (pipeline, tbl, batch_no, batch_id, objects, status, mode, planned_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'planned', ?6, ?7)",
            params![self.pipeline, table, batch.number, batch.id, json, batch.mode.as_str(), now()],
        )
        .map(drop)
    }

    /// Marks planned batch `number` committed with `stats`, and its objects
    /// processed by it.
    fn commit_planned(
        &self,
        tx: &rusqlite::Transaction<'_>,
        table: &str,
        number: i64,
        stats: &BatchStats,
    ) -> rusqlite::Result<()> {
        let json: String = tx.query_row(
            "SELECT objects FROM batches WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3 AND status = 'planned'",
            params![self.pipeline, table, number],
            |r| r.get(0),
        )?;
        let at = now();
        for object in parse_objects(&json)? {
            tx.execute(
                "INSERT INTO objects (pipeline, tbl, key, etag, size, status, batch_no, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'processed', ?6, ?7)
                 ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
                   etag = excluded.etag, size = excluded.size, status = 'processed',
                   batch_no = excluded.batch_no, error = NULL, reason = NULL,
                   updated_at = excluded.updated_at",
                params![
                    self.pipeline,
                    table,
                    object.key,
                    object.etag,
                    object.size as i64,
                    number,
                    at
                ],
            )?;
        }
        tx.execute(
            "UPDATE batches SET status = 'committed', rows = ?4, inserts = ?5, updates = ?6,
               deletes = ?7, max_seq = ?8, committed_at = ?9, max_commit_ts = ?10,
               bytes_processed = ?11, bytes_billed = ?12
             WHERE pipeline = ?1 AND tbl = ?2 AND batch_no = ?3",
            params![
                self.pipeline,
                table,
                number,
                stats.rows as i64,
                stats.inserts as i64,
                stats.updates as i64,
                stats.deletes as i64,
                stats.max_seq,
                at,
                stats.max_commit_ts.map(stamp),
                stats.bytes_processed.map(|b| b as i64),
                stats.bytes_billed.map(|b| b as i64)
            ],
        )
        .map(drop)
    }

    fn set_status(
        &self,
        table: &str,
        object: &ObjectRef,
        status: &str,
        error: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        self.write(table, "recording an object", |tx| {
            tx.execute(
                "INSERT INTO objects (pipeline, tbl, key, etag, size, status, error, reason, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
                   etag = excluded.etag, size = excluded.size, status = excluded.status,
                   error = excluded.error, reason = excluded.reason, updated_at = excluded.updated_at
                 WHERE objects.status <> 'processed'",
                params![self.pipeline, table, object.key, object.etag, object.size as i64, status, error, reason, now()],
            )
            .map(drop)
        })
    }
}
