//! The object manifest and batches ([`Manifest`]) in PostgreSQL.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use postgres::Row;
use postgres::types::Json;

use super::PostgresStore;
use crate::error::Result;
use crate::state::{
    Batch, BatchMode, BatchStats, CommittedBatch, Manifest, ObjectRecord, ObjectRef, ObjectStatus,
    Restored, TableTotals, stamp,
};

/// Inserts or overwrites an object as processed by batch `$6`.
const PROCESSED: &str = "INSERT INTO cdcflow.objects
       (pipeline, tbl, key, etag, size, status, batch_no, updated_at)
     VALUES ($1, $2, $3, $4, $5, 'processed', $6, now())
     ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
       etag = excluded.etag, size = excluded.size, status = 'processed',
       batch_no = excluded.batch_no, error = NULL, reason = NULL,
       updated_at = excluded.updated_at";

fn batch(row: &Row) -> std::result::Result<Batch, postgres::Error> {
    Ok(Batch {
        number: row.try_get(0)?,
        id: row.try_get(1)?,
        objects: row.try_get::<_, Json<Vec<ObjectRef>>>(2)?.0,
        mode: BatchMode::parse(row.try_get(3)?),
    })
}

fn count(n: i64) -> u64 {
    n.max(0) as u64
}

impl Manifest for PostgresStore {
    fn store_id(&self) -> &str {
        &self.id
    }

    fn restore(&self, table: &str, restored: &Restored) -> Result<()> {
        let p = &self.pipeline;
        self.with("restoring a table's state from the warehouse", |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "DELETE FROM cdcflow.batches WHERE pipeline = $1 AND tbl = $2",
                &[p, &table],
            )?;
            tx.execute(
                "DELETE FROM cdcflow.objects
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'processed'",
                &[p, &table],
            )?;
            if restored.number > 0 {
                let committed = Batch {
                    number: restored.number,
                    id: restored.id.clone(),
                    objects: restored.objects.clone(),
                    mode: BatchMode::Append,
                };
                self.insert_planned(&mut tx, table, &committed)?;
                self.commit_planned(&mut tx, table, restored.number, &restored.stats)?;
            }
            if let Some(pending) = &restored.pending {
                for object in &pending.objects {
                    tx.execute(
                        "DELETE FROM cdcflow.objects WHERE pipeline = $1 AND tbl = $2 AND key = $3",
                        &[p, &table, &object.key],
                    )?;
                }
                self.insert_planned(&mut tx, table, pending)?;
            }
            tx.commit()
        })
    }

    fn objects(&self, table: &str) -> Result<HashMap<String, ObjectRecord>> {
        self.with("reading objects", |c| {
            c.query(
                "SELECT key, etag, size, status, batch_no, error, reason, updated_at
                 FROM cdcflow.objects WHERE pipeline = $1 AND tbl = $2",
                &[&self.pipeline, &table],
            )?
            .iter()
            .map(|r| {
                let status = ObjectStatus::from_columns(
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                );
                let key: String = r.try_get(0)?;
                let record = ObjectRecord {
                    object: ObjectRef {
                        key: key.clone(),
                        etag: r.try_get(1)?,
                        size: count(r.try_get(2)?),
                        last_modified: DateTime::default(),
                    },
                    status,
                    updated_at: stamp(r.try_get(7)?),
                };
                Ok((key, record))
            })
            .collect()
        })
    }

    fn pending_batch(&self, table: &str) -> Result<Option<Batch>> {
        self.with("reading the pending batch", |c| {
            c.query_opt(
                "SELECT batch_no, batch_id, objects, mode FROM cdcflow.batches
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'planned'",
                &[&self.pipeline, &table],
            )?
            .as_ref()
            .map(batch)
            .transpose()
        })
    }

    fn plan_batch(&self, table: &str, objects: &[ObjectRef], mode: BatchMode) -> Result<Batch> {
        let id = Batch::id_of(&self.pipeline, table, objects);
        let number = self.write(table, "planning a batch", |c| {
            Ok(c.query_one(
                "INSERT INTO cdcflow.batches
                   (pipeline, tbl, batch_no, batch_id, objects, status, mode, planned_at)
                 SELECT $1, $2, COALESCE(MAX(batch_no), 0) + 1, $3, $4, 'planned', $5, now()
                 FROM cdcflow.batches WHERE pipeline = $1 AND tbl = $2
                 RETURNING batch_no",
                &[&self.pipeline, &table, &id, &Json(objects), &mode.as_str()],
            )?
            .get(0))
        })?;
        Ok(Batch {
            number,
            id,
            objects: objects.to_vec(),
            mode,
        })
    }

    fn replan_batch(
        &self,
        table: &str,
        number: i64,
        objects: &[ObjectRef],
    ) -> Result<Option<Batch>> {
        let p = &self.pipeline;
        if objects.is_empty() {
            self.write(table, "re-planning a batch", |c| {
                c.execute(
                    "DELETE FROM cdcflow.batches
                     WHERE pipeline = $1 AND tbl = $2 AND batch_no = $3 AND status = 'planned'",
                    &[p, &table, &number],
                )
            })?;
            return Ok(None);
        }
        let id = Batch::id_of(p, table, objects);
        let mode: String = self.write(table, "re-planning a batch", |c| {
            Ok(c.query_one(
                "UPDATE cdcflow.batches SET batch_id = $4, objects = $5
                 WHERE pipeline = $1 AND tbl = $2 AND batch_no = $3 AND status = 'planned'
                 RETURNING mode",
                &[p, &table, &number, &id, &Json(objects)],
            )?
            .get(0))
        })?;
        Ok(Some(Batch {
            number,
            id,
            objects: objects.to_vec(),
            mode: BatchMode::parse(&mode),
        }))
    }

    fn commit_batch(&self, table: &str, number: i64, stats: &BatchStats) -> Result<()> {
        self.write(table, "committing a batch", |tx| {
            self.commit_planned(tx, table, number, stats)
        })
    }

    fn recent_batches(&self, table: &str, limit: usize) -> Result<Vec<CommittedBatch>> {
        self.with("reading the recent batches", |c| {
            let mut batches = Vec::new();
            for r in c.query(
                "SELECT batch_no, batch_id, jsonb_array_length(objects)::bigint, rows, inserts,
                   updates, deletes, max_seq, committed_at, max_commit_ts, planned_at,
                   bytes_processed, bytes_billed
                 FROM cdcflow.batches
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'committed'
                 ORDER BY batch_no DESC LIMIT $3",
                &[&self.pipeline, &table, &(limit as i64)],
            )? {
                let figure = |i| -> std::result::Result<u64, postgres::Error> {
                    Ok(count(r.try_get::<_, Option<i64>>(i)?.unwrap_or(0)))
                };
                batches.push(CommittedBatch {
                    number: r.try_get(0)?,
                    id: r.try_get(1)?,
                    objects: figure(2)? as usize,
                    stats: BatchStats {
                        rows: figure(3)?,
                        inserts: figure(4)?,
                        updates: figure(5)?,
                        deletes: figure(6)?,
                        max_seq: r.try_get(7)?,
                        max_commit_ts: r.try_get(9)?,
                        bytes_processed: r.try_get::<_, Option<i64>>(11)?.map(count),
                        bytes_billed: r.try_get::<_, Option<i64>>(12)?.map(count),
                    },
                    planned_at: r.try_get(10)?,
                    committed_at: r.try_get(8)?,
                });
            }
            Ok(batches)
        })
    }

    fn max_seq(&self, table: &str) -> Result<Option<String>> {
        self.with("reading the watermark", |c| {
            c.query_one(
                "SELECT MAX(max_seq) FROM cdcflow.batches
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'committed'",
                &[&self.pipeline, &table],
            )?
            .try_get(0)
        })
    }

    fn max_commit_ts(&self, table: &str) -> Result<Option<DateTime<Utc>>> {
        self.with("reading the newest commit time", |c| {
            c.query_one(
                "SELECT MAX(max_commit_ts) FROM cdcflow.batches
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'committed'",
                &[&self.pipeline, &table],
            )?
            .try_get(0)
        })
    }

    fn totals(&self, table: &str) -> Result<TableTotals> {
        self.with("reading the table's totals", |c| {
            let r = c.query_one(
                "SELECT COUNT(*), SUM(rows)::bigint, SUM(inserts)::bigint, SUM(updates)::bigint,
                   SUM(deletes)::bigint, SUM(bytes_billed)::bigint,
                   COALESCE(array_agg(EXTRACT(EPOCH FROM committed_at - planned_at)::float8)
                     FILTER (WHERE committed_at IS NOT NULL), '{}')
                 FROM cdcflow.batches
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'committed'",
                &[&self.pipeline, &table],
            )?;
            let figure = |i| -> std::result::Result<u64, postgres::Error> {
                Ok(count(r.try_get::<_, Option<i64>>(i)?.unwrap_or(0)))
            };
            let objects = c.query_one(
                "SELECT COUNT(*), COALESCE(SUM(size), 0)::bigint FROM cdcflow.objects
                 WHERE pipeline = $1 AND tbl = $2 AND status = 'processed'",
                &[&self.pipeline, &table],
            )?;
            Ok(TableTotals {
                batches: figure(0)?,
                rows: figure(1)?,
                inserts: figure(2)?,
                updates: figure(3)?,
                deletes: figure(4)?,
                bytes_billed: figure(5)?,
                objects: count(objects.try_get(0)?),
                bytes: count(objects.try_get(1)?),
                batch_seconds: r.try_get(6)?,
            })
        })
    }

    fn quarantine(&self, table: &str, object: &ObjectRef, error: &str) -> Result<()> {
        self.set_status(table, object, "quarantined", Some(error), None)
    }

    fn release(&self, table: &str, key: &str) -> Result<()> {
        self.with("releasing a quarantined object", |c| {
            c.execute(
                "DELETE FROM cdcflow.objects
                 WHERE pipeline = $1 AND tbl = $2 AND key = $3 AND status = 'quarantined'",
                &[&self.pipeline, &table, &key],
            )
            .map(drop)
        })
    }

    fn skip(&self, table: &str, object: &ObjectRef, reason: &str) -> Result<()> {
        self.set_status(table, object, "skipped", None, Some(reason))
    }

    fn last_full_listing(&self, table: &str) -> Result<Option<DateTime<Utc>>> {
        self.with("reading the last full listing", |c| {
            c.query_opt(
                "SELECT full_at FROM cdcflow.listings WHERE pipeline = $1 AND tbl = $2",
                &[&self.pipeline, &table],
            )?
            .map(|r| r.try_get(0))
            .transpose()
        })
    }

    fn set_last_full_listing(&self, table: &str, at: DateTime<Utc>) -> Result<()> {
        self.with("recording a full listing", |c| {
            c.execute(
                "INSERT INTO cdcflow.listings (pipeline, tbl, full_at) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline, tbl) DO UPDATE SET full_at = excluded.full_at",
                &[&self.pipeline, &table, &at],
            )
            .map(drop)
        })
    }
}

impl PostgresStore {
    /// Records `batch` as planned (its number given).
    fn insert_planned(
        &self,
        tx: &mut postgres::Transaction<'_>,
        table: &str,
        batch: &Batch,
    ) -> std::result::Result<(), postgres::Error> {
        tx.execute(
            "INSERT INTO cdcflow.batches
               (pipeline, tbl, batch_no, batch_id, objects, status, mode, planned_at)
             VALUES ($1, $2, $3, $4, $5, 'planned', $6, now())",
            &[
                &self.pipeline,
                &table,
                &batch.number,
                &batch.id,
                &Json(&batch.objects),
                &batch.mode.as_str(),
            ],
        )
        .map(drop)
    }

    /// Marks planned batch `number` committed with `stats`, and its objects
    /// processed by it.
    fn commit_planned(
        &self,
        tx: &mut postgres::Transaction<'_>,
        table: &str,
        number: i64,
        stats: &BatchStats,
    ) -> std::result::Result<(), postgres::Error> {
        let p = &self.pipeline;
        // Locks the planned row: a second committer waits, then finds it committed.
        let objects = tx
            .query_one(
                "SELECT objects FROM cdcflow.batches
                 WHERE pipeline = $1 AND tbl = $2 AND batch_no = $3 AND status = 'planned'
                 FOR UPDATE",
                &[p, &table, &number],
            )?
            .try_get::<_, Json<Vec<ObjectRef>>>(0)?
            .0;
        let processed = tx.prepare(PROCESSED)?;
        for object in &objects {
            tx.execute(
                &processed,
                &[
                    p,
                    &table,
                    &object.key,
                    &object.etag,
                    &(object.size as i64),
                    &number,
                ],
            )?;
        }
        tx.execute(
            "UPDATE cdcflow.batches SET status = 'committed', rows = $4, inserts = $5,
               updates = $6, deletes = $7, max_seq = $8, committed_at = now(),
               max_commit_ts = $9, bytes_processed = $10, bytes_billed = $11
             WHERE pipeline = $1 AND tbl = $2 AND batch_no = $3",
            &[
                p,
                &table,
                &number,
                &(stats.rows as i64),
                &(stats.inserts as i64),
                &(stats.updates as i64),
                &(stats.deletes as i64),
                &stats.max_seq,
                &stats.max_commit_ts,
                &stats.bytes_processed.map(|b| b as i64),
                &stats.bytes_billed.map(|b| b as i64),
            ],
        )?;
        Ok(())
    }

    fn set_status(
        &self,
        table: &str,
        object: &ObjectRef,
        status: &str,
        error: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        self.write(table, "recording an object", |c| {
            c.execute(
                "INSERT INTO cdcflow.objects
                   (pipeline, tbl, key, etag, size, status, error, reason, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
                 ON CONFLICT (pipeline, tbl, key) DO UPDATE SET
                   etag = excluded.etag, size = excluded.size, status = excluded.status,
                   error = excluded.error, reason = excluded.reason,
                   updated_at = excluded.updated_at
                 WHERE cdcflow.objects.status <> 'processed'",
                &[
                    &self.pipeline,
                    &table,
                    &object.key,
                    &object.etag,
                    &(object.size as i64),
                    &status,
                    &error,
                    &reason,
                ],
            )
            .map(drop)
        })
    }
}
