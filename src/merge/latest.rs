//! The latest change per primary key, and the batch's figures, taken from
//! history rows as they stream past on their way into history (or from a
//! scan of history, for a retried batch, a late batch and a backfill).
//!
//! It replaced SQL that read the freshly written batch back three times
//! (figures, the per-key maximum of change_seq, and a join back to the rows)
//! and held a hash join's build side: a hash table over the key's row-format
//! bytes keeps each key's newest row.
//! Memory holds the latest row of each key seen (plus, between compactions,
//! superseded rows up to a quarter of them), not the batch, and no more
//! than a budget of it ([`LatestChanges::spill_past`]): past the budget the
//! rows held go to a spill file and only their keys, locations and
//! `change_seq` values stay (a batch whose one large object changes a million
//! wide rows keeps its memory). A chunk's `change_seq` values of the usual
//! form (one object's prefix and row numbers) are held as 4-byte row
//! offsets, not as text of 30-odd bytes.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{filter_record_batch, max, max_string, min_string};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use arrow::row::{RowConverter, SortField};
use chrono::DateTime;

use super::spill::{SpillFile, SpillWriter};
use super::{BatchOrder, Merger, ROW_DIGITS, row_seqs};
use crate::error::{Error, Result};
use crate::source::push_padded;
use crate::state::BatchStats;

/// Superseded rows are dropped once this many are held, or a quarter as many
/// as there are keys if that is more: memory holds at most 1.25 times the
/// latest rows plus this, and each row is filtered a few times at most.
const COMPACT_AFTER_ROWS: usize = 1 << 19;

/// Where a key's latest row is: (kept batch, row).
pub type Loc = (u32, u32);

/// A batch of rows taken in: in memory, or written to the spill file
/// (in order: the file holds the spilled batches in the order they were kept).
enum Kept {
    Held(RecordBatch),
    Spilled { rows: usize },
}

/// The latest change of every key of a batch, as [`LatestChanges::finish`]
/// gives it: in memory, or partly in a spill file when the rows outgrew
/// their budget.
pub enum Latest {
    /// Batches in memory, of `schema`.
    Held {
        /// The rows' schema.
        schema: SchemaRef,
        /// The rows.
        rows: Vec<RecordBatch>,
    },
    /// Batches in the spill file (read through their winners), then held ones.
    Spilled(Spilled),
}

/// The spilled form of [`Latest`]: the kept batches as they were written to
/// the spill file, each with the rows that are its keys' latest, then the
/// batches still held. Nothing is copied at the end of a batch: each read
/// filters the file's batches and appends their `change_seq`.
pub struct Spilled {
    file: SpillFile,
    parts: Arc<Vec<Part>>,
    finishing: Arc<Finishing>,
    held: Vec<RecordBatch>,
}

/// One spilled batch: which of its rows are read, and their change_seq.
struct Part {
    keep: BooleanArray,
    seqs: Seqs,
}

/// How a kept batch becomes a finished one.
struct Finishing {
    schema: SchemaRef,
    /// Position of the op column.
    op: usize,
    /// The batch's latest truncate: older changes become deletes.
    truncated: Option<String>,
}

impl Finishing {
    /// `batch` (kept columns) with `seqs` appended (and, after a truncate,
    /// the ops of older changes made deletes).
    fn apply(&self, batch: RecordBatch, seqs: &Seqs) -> Result<RecordBatch> {
        let seqs = seqs.to_array();
        let mut columns = batch.columns().to_vec();
        if let Some(truncated) = self.truncated.as_deref() {
            let ops: StringArray = columns[self.op]
                .as_string::<i32>()
                .iter()
                .zip(seqs.iter())
                .map(|(op, seq)| match seq {
                    Some(seq) if seq < truncated => Some("D"),
                    _ => op,
                })
                .collect();
            columns[self.op] = Arc::new(ops);
        }
        columns.push(Arc::new(seqs));
        RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| internal(e.to_string()))
    }
}

/// Batches read one at a time.
pub type Batches = Box<dyn Iterator<Item = Result<RecordBatch>> + Send>;

impl Latest {
    /// The rows' schema.
    pub fn schema(&self) -> SchemaRef {
        match self {
            Latest::Held { schema, .. } => schema.clone(),
            Latest::Spilled(spilled) => spilled.finishing.schema.clone(),
        }
    }

    /// Whether some rows are in a spill file.
    pub fn spilled(&self) -> bool {
        matches!(self, Latest::Spilled(_))
    }

    /// Rows in all.
    pub fn num_rows(&self) -> usize {
        let held = |rows: &[RecordBatch]| rows.iter().map(RecordBatch::num_rows).sum::<usize>();
        match self {
            Latest::Held { rows, .. } => held(rows),
            Latest::Spilled(spilled) => {
                spilled
                    .parts
                    .iter()
                    .map(|p| p.keep.true_count())
                    .sum::<usize>()
                    + held(&spilled.held)
            }
        }
    }

    /// The batches, in order, one at a time (a spill file is read again at
    /// each call): memory holds one spilled batch at a time.
    pub fn batches(&self) -> Result<Batches> {
        Ok(match self {
            Latest::Held { rows, .. } => Box::new(rows.clone().into_iter().map(Ok)),
            Latest::Spilled(spilled) => {
                let (parts, finishing) = (spilled.parts.clone(), spilled.finishing.clone());
                let read = spilled.file.read()?.zip(0..).map(move |(batch, i)| {
                    let part: &Part = parts
                        .get(i)
                        .ok_or_else(|| internal("the spill file holds more batches than kept"))?;
                    let batch = filter_record_batch(&batch?, &part.keep)
                        .map_err(|e| internal(e.to_string()))?;
                    finishing.apply(batch, &part.seqs)
                });
                Box::new(read.chain(spilled.held.clone().into_iter().map(Ok)))
            }
        })
    }

    /// These rows but those at `dropped` (batches and rows numbered as
    /// [`Latest::batches`] yields them).
    pub fn without(self, dropped: &HashSet<Loc>) -> Result<Latest> {
        if dropped.is_empty() {
            return Ok(self);
        }
        let drop_rows = |batch: &RecordBatch, b: usize| -> Result<RecordBatch> {
            let b = u32::try_from(b).map_err(internal)?;
            let keep: BooleanArray = (0..batch.num_rows() as u32)
                .map(|r| Some(!dropped.contains(&(b, r))))
                .collect();
            filter_record_batch(batch, &keep).map_err(|e| internal(e.to_string()))
        };
        match self {
            Latest::Held { schema, rows } => Ok(Latest::Held {
                schema,
                rows: rows
                    .iter()
                    .enumerate()
                    .map(|(b, batch)| drop_rows(batch, b))
                    .collect::<Result<_>>()?,
            }),
            Latest::Spilled(spilled) => {
                // A spilled batch's read rows are its set bits, in order.
                let mut parts = Vec::with_capacity(spilled.parts.len());
                for (b, part) in spilled.parts.iter().enumerate() {
                    let b = u32::try_from(b).map_err(internal)?;
                    let mut read = 0u32;
                    let keep: BooleanArray = part
                        .keep
                        .values()
                        .iter()
                        .map(|kept| {
                            let r = read;
                            read += u32::from(kept);
                            Some(kept && !dropped.contains(&(b, r)))
                        })
                        .collect();
                    let seqs = part.seqs.filter(&filter_keep(&part.keep, &keep))?;
                    parts.push(Part { keep, seqs });
                }
                let first_held = spilled.parts.len();
                let held = spilled
                    .held
                    .iter()
                    .enumerate()
                    .map(|(b, batch)| drop_rows(batch, first_held + b))
                    .collect::<Result<_>>()?;
                Ok(Latest::Spilled(Spilled {
                    file: spilled.file,
                    parts: Arc::new(parts),
                    finishing: spilled.finishing,
                    held,
                }))
            }
        }
    }

    /// Every row in memory (a spill file read back whole).
    pub fn into_held(self) -> Result<Vec<RecordBatch>> {
        match self {
            Latest::Held { rows, .. } => Ok(rows),
            spilled => spilled.batches()?.collect(),
        }
    }
}

/// Of the rows `before` selects (in order), those `after` selects too: a
/// mask over the selected rows.
fn filter_keep(before: &BooleanArray, after: &BooleanArray) -> BooleanArray {
    before
        .values()
        .iter()
        .zip(after.values().iter())
        .filter(|(b, _)| *b)
        .map(|(_, a)| Some(a))
        .collect()
}

/// Collects the latest change per key and the figures of a batch's history rows.
pub struct LatestChanges {
    /// History columns kept: the data columns, op and commit_ts (change_seq
    /// is kept apart, in `kept_seq`, and appended by `finish`).
    projection: Vec<usize>,
    /// The rows `finish` returns: the kept columns and change_seq.
    schema: SchemaRef,
    /// Positions in the kept rows.
    key: Vec<usize>,
    op: usize,
    /// Positions in history rows.
    history_op: usize,
    history_seq: usize,
    history_commit_ts: usize,
    converter: RowConverter,
    kept: Vec<Kept>,
    /// The change_seq values of each kept batch (held or spilled).
    kept_seq: Vec<Seqs>,
    /// Rows kept, held or spilled.
    kept_rows: usize,
    /// Superseded rows in the spill file (compaction cannot drop them).
    stuck: usize,
    /// Compact once this many superseded rows are held (or a quarter of the keys).
    compact_after: usize,
    /// Bytes of the held batches, and the most they may take before they are spilled.
    held_bytes: usize,
    budget: usize,
    spill: Option<SpillWriter>,
    index: KeyIndex,
    /// The largest change_seq pushed so far.
    stream_max: Option<String>,
    stats: BatchStats,
    order: BatchOrder,
}

fn internal(message: impl std::fmt::Display) -> Error {
    Error::Internal(format!("taking the latest change per key: {message}"))
}

impl LatestChanges {
    /// A collector for history rows of `merger`'s history schema.
    pub fn new(merger: &Merger) -> Result<Self> {
        let history = merger.history_schema();
        let position = |name: &str| {
            history
                .index_of(name)
                .map_err(|_| internal(format!("no column {name:?} in history")))
        };
        let m = &merger.meta;
        let mut projection = merger
            .columns
            .iter()
            .map(|c| position(&c.name))
            .collect::<Result<Vec<_>>>()?;
        let (history_op, history_commit_ts, history_seq) = (
            position(&m.op)?,
            position(&m.commit_ts)?,
            position(&m.change_seq)?,
        );
        projection.extend([history_op, history_commit_ts]);
        let schema = Arc::new(
            history
                .project(&[projection.as_slice(), &[history_seq]].concat())
                .map_err(|e| internal(e.to_string()))?,
        );
        let kept_position = |name: &str| schema.index_of(name).map_err(|e| internal(e.to_string()));
        let key = merger
            .key
            .iter()
            .map(|k| kept_position(k))
            .collect::<Result<Vec<_>>>()?;
        let converter = RowConverter::new(
            key.iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )
        .map_err(|e| internal(e.to_string()))?;
        Ok(LatestChanges {
            op: kept_position(&m.op)?,
            projection,
            schema,
            key,
            history_op,
            history_seq,
            history_commit_ts,
            converter,
            kept: Vec::new(),
            kept_seq: Vec::new(),
            kept_rows: 0,
            stuck: 0,
            compact_after: COMPACT_AFTER_ROWS,
            held_bytes: 0,
            budget: usize::MAX,
            spill: None,
            index: KeyIndex::default(),
            stream_max: None,
            stats: BatchStats::default(),
            order: BatchOrder::default(),
        })
    }

    /// Holds at most `bytes` of rows in memory: past that, the rows held
    /// (after a compaction) are written to a spill file. Unlimited by default.
    pub fn spill_past(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self
    }

    /// The schema of the rows [`LatestChanges::finish`] returns.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Takes in one chunk of history rows.
    pub fn push(&mut self, chunk: &RecordBatch) -> Result<()> {
        if chunk.num_rows() == 0 {
            return Ok(());
        }
        self.count(chunk);
        let rows = chunk
            .project(&self.projection)
            .map_err(|e| internal(e.to_string()))?;
        let keys: Vec<ArrayRef> = self.key.iter().map(|&i| rows.column(i).clone()).collect();
        let keys = self
            .converter
            .convert_columns(&keys)
            .map_err(|e| internal(e.to_string()))?;
        let ops = rows.column(self.op).as_string::<i32>().clone();
        let seqs = chunk.column(self.history_seq).as_string::<i32>();
        // Rows usually stream in change order (objects in order, rows in
        // order): then each row supersedes what its key held, unseen.
        let in_order = self
            .stream_max
            .as_deref()
            .is_none_or(|max| seqs.value(0) > max)
            && (1..seqs.len()).all(|i| seqs.value(i - 1) < seqs.value(i));
        if let Some(max) = max_string(seqs)
            && self.stream_max.as_deref().is_none_or(|m| max > m)
        {
            self.stream_max = Some(max.to_string());
        }
        let batch = u32::try_from(self.kept.len()).map_err(internal)?;
        self.kept_rows += rows.num_rows();
        self.held_bytes += rows.get_array_memory_size();
        self.kept.push(Kept::Held(rows));
        self.kept_seq.push(Seqs::new(seqs));
        let kept_seq = &self.kept_seq;
        for (i, key) in keys.iter().enumerate() {
            if ops.value(i) == "T" {
                continue; // a truncate is no key's change
            }
            let here = (batch, i as u32);
            let loc = self.index.entry(key.as_ref(), here)?;
            if in_order
                || kept_seq[loc.0 as usize].cmp_row(loc.1 as usize, seqs.value(i)) == Ordering::Less
            {
                *loc = here;
            }
        }
        if self.superseded_held() >= self.compact_after.max(self.index.len() / 4) {
            self.compact()?;
        }
        if self.held_bytes > self.budget {
            if self.superseded_held() > 0 {
                self.compact()?;
            }
            // Spilled in runs of at least half the budget.
            if self.held_bytes > self.budget / 2 {
                self.spill()?;
            }
        }
        Ok(())
    }

    /// Superseded rows held in memory (those a compaction drops).
    fn superseded_held(&self) -> usize {
        self.kept_rows.saturating_sub(self.index.len() + self.stuck)
    }

    /// Writes held batches to the spill file, oldest first, until at most
    /// half the budget is held.
    fn spill(&mut self) -> Result<()> {
        if self.spill.is_none() {
            let Some(schema) = self.kept.iter().find_map(|k| match k {
                Kept::Held(batch) => Some(batch.schema()),
                Kept::Spilled { .. } => None,
            }) else {
                return Ok(());
            };
            tracing::info!(
                budget_mib = self.budget >> 20,
                "the batch's latest changes outgrew batch.latest_memory_mib: spilling them to a \
                 file in the temporary directory (TMPDIR)"
            );
            self.spill = Some(SpillWriter::new(&schema)?);
        }
        let Some(writer) = self.spill.as_mut() else {
            return Ok(());
        };
        // The oldest held batches, until half the budget is held: spilled
        // batches stay a prefix of the kept ones, in the file's order.
        for kept in &mut self.kept {
            if self.held_bytes <= self.budget / 2 {
                break;
            }
            if let Kept::Held(batch) = kept {
                writer.write(batch)?;
                self.held_bytes = self
                    .held_bytes
                    .saturating_sub(batch.get_array_memory_size());
                *kept = Kept::Spilled {
                    rows: batch.num_rows(),
                };
            }
        }
        Ok(())
    }

    /// The batch's figures from one chunk: changes per op, change_seq range,
    /// newest commit time and latest truncate.
    fn count(&mut self, rows: &RecordBatch) {
        let ops = rows.column(self.history_op).as_string::<i32>();
        let seqs = rows.column(self.history_seq).as_string::<i32>();
        for (i, op) in ops.iter().enumerate() {
            match op.unwrap_or_default() {
                "I" => self.stats.inserts += 1,
                "U" => self.stats.updates += 1,
                "T" => {
                    self.stats.deletes += 1;
                    self.truncated_at(Some(seqs.value(i)));
                }
                _ => self.stats.deletes += 1,
            }
        }
        let stats = &mut self.stats;
        stats.rows += rows.num_rows() as u64;
        if let Some(seq) = max_string(seqs)
            && stats.max_seq.as_deref().is_none_or(|m| seq > m)
        {
            stats.max_seq = Some(seq.to_string());
        }
        if let Some(seq) = min_string(seqs)
            && self.order.min_seq.as_deref().is_none_or(|m| seq < m)
        {
            self.order.min_seq = Some(seq.to_string());
        }
        let newest = max(rows
            .column(self.history_commit_ts)
            .as_primitive::<TimestampMicrosecondType>())
        .and_then(DateTime::from_timestamp_micros);
        stats.max_commit_ts = stats.max_commit_ts.max(newest);
    }

    /// Takes a truncate at `seq` (from elsewhere) into account too.
    pub fn truncated_at(&mut self, seq: Option<&str>) {
        if let Some(seq) = seq
            && self.order.truncated.as_deref().is_none_or(|t| seq > t)
        {
            self.order.truncated = Some(seq.to_string());
        }
    }

    /// Each kept batch's winners: which of its rows is its key's latest.
    fn winners(&self) -> Vec<Vec<bool>> {
        let mut winners: Vec<Vec<bool>> = self
            .kept
            .iter()
            .map(|k| match k {
                Kept::Held(b) => vec![false; b.num_rows()],
                Kept::Spilled { rows } => vec![false; *rows],
            })
            .collect();
        for &(b, r) in self.index.locs() {
            winners[b as usize][r as usize] = true;
        }
        winners
    }

    /// Keeps only each key's latest row of the held batches (filtered, in
    /// order); spilled batches stay as written.
    fn compact(&mut self) -> Result<()> {
        let winners = self.winners();
        // Batch by batch, each old batch freed once filtered: memory peaks at
        // the kept rows plus one batch, not twice the kept rows.
        let kept = std::mem::take(&mut self.kept);
        let kept_seq = std::mem::take(&mut self.kept_seq);
        // Where each held row lands: its new row number, for the winners.
        let mut moved: Vec<Option<Vec<u32>>> = Vec::with_capacity(winners.len());
        self.held_bytes = 0;
        self.stuck = 0;
        for ((kept, seqs), winners) in kept.into_iter().zip(kept_seq).zip(winners) {
            let batch = match kept {
                Kept::Held(batch) => batch,
                Kept::Spilled { rows } => {
                    self.stuck += rows - winners.iter().filter(|&&w| w).count();
                    moved.push(None);
                    self.kept.push(Kept::Spilled { rows });
                    self.kept_seq.push(seqs);
                    continue;
                }
            };
            let mask = BooleanArray::from(winners);
            let mut next = 0;
            moved.push(Some(
                mask.values()
                    .iter()
                    .map(|w| {
                        next += u32::from(w);
                        next.saturating_sub(1)
                    })
                    .collect(),
            ));
            let filtered =
                filter_record_batch(&batch, &mask).map_err(|e| internal(e.to_string()))?;
            drop(batch);
            self.held_bytes += filtered.get_array_memory_size();
            self.kept_seq.push(seqs.filter(&mask)?);
            self.kept.push(Kept::Held(filtered));
        }
        for loc in self.index.locs_mut() {
            if let Some(moved) = &moved[loc.0 as usize] {
                loc.1 = moved[loc.1 as usize];
            }
        }
        self.kept_rows = self.index.len() + self.stuck;
        Ok(())
    }

    /// The latest change of every key (a change older than the batch's latest
    /// truncate becomes a delete), with the batch's figures and order. Rows
    /// that were spilled stay in the spill file, read through their winners.
    pub fn finish(mut self) -> Result<(Latest, BatchStats, BatchOrder)> {
        self.compact()?;
        let winners = self.winners();
        let kept = std::mem::take(&mut self.kept);
        let kept_seq = std::mem::take(&mut self.kept_seq);
        let finishing = Finishing {
            schema: self.schema.clone(),
            op: self.op,
            truncated: self.order.truncated.clone(),
        };
        let mut parts = Vec::new();
        let mut held = Vec::new();
        for ((kept, seqs), winners) in kept.into_iter().zip(kept_seq).zip(winners) {
            match kept {
                // Compacted: every held row is its key's latest.
                Kept::Held(batch) => held.push(finishing.apply(batch, &seqs)?),
                Kept::Spilled { .. } => {
                    let keep = BooleanArray::from(winners);
                    let seqs = seqs.filter(&keep)?;
                    parts.push(Part { keep, seqs });
                }
            }
        }
        let latest = match self.spill.take() {
            None => Latest::Held {
                schema: self.schema.clone(),
                rows: held,
            },
            Some(writer) => Latest::Spilled(Spilled {
                file: writer.finish()?,
                parts: Arc::new(parts),
                finishing: Arc::new(finishing),
                held,
            }),
        };
        Ok((latest, self.stats, self.order))
    }
}

/// The change_seq values of one kept batch. The usual values (one object's
/// prefix and its zero-padded row numbers, as [`Merger`] makes them) are
/// held as the prefix and a 4-byte offset per row; any other values as text.
enum Seqs {
    Rows {
        prefix: Box<str>,
        first: u64,
        offsets: Vec<u32>,
    },
    Text(StringArray),
}

impl Seqs {
    fn new(values: &StringArray) -> Seqs {
        Seqs::rows(values).unwrap_or_else(|| Seqs::Text(values.clone()))
    }

    /// `values` as a prefix and row offsets, if each is the prefix of the
    /// first, then ROW_DIGITS digits (no NULL).
    fn rows(values: &StringArray) -> Option<Seqs> {
        if values.null_count() > 0 || values.is_empty() {
            return None;
        }
        fn split(value: &str) -> Option<(&str, u64)> {
            let at = value.len().checked_sub(ROW_DIGITS)?;
            let digits = value.as_bytes()[at..].iter().try_fold(0u64, |n, &d| {
                d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
            })?;
            Some((value.get(..at)?, digits))
        }
        let (prefix, _) = split(values.value(0))?;
        let (mut first, mut last) = (u64::MAX, 0);
        for value in values.iter().flatten() {
            let (own, row) = split(value)?;
            if own != prefix {
                return None;
            }
            (first, last) = (first.min(row), last.max(row));
        }
        u32::try_from(last - first).ok()?;
        // Allocated once, at its size (kept to the end of the batch).
        let mut offsets = Vec::with_capacity(values.len());
        offsets.extend(
            values
                .iter()
                .flatten()
                .filter_map(split)
                .map(|(_, row)| (row - first) as u32),
        );
        Some(Seqs::Rows {
            prefix: prefix.into(),
            first,
            offsets,
        })
    }

    /// How row `row`'s value compares with `other`.
    fn cmp_row(&self, row: usize, other: &str) -> Ordering {
        match self {
            Seqs::Text(values) => values.value(row).cmp(other),
            Seqs::Rows {
                prefix,
                first,
                offsets,
            } => {
                let mut value = String::with_capacity(prefix.len() + ROW_DIGITS);
                value.push_str(prefix);
                push_padded(&mut value, first + u64::from(offsets[row]), ROW_DIGITS);
                value.as_str().cmp(other)
            }
        }
    }

    /// The values of the rows `mask` selects.
    fn filter(&self, mask: &BooleanArray) -> Result<Seqs> {
        Ok(match self {
            Seqs::Text(values) => Seqs::Text(
                arrow::compute::filter(values, mask)
                    .map_err(|e| internal(e.to_string()))?
                    .as_string::<i32>()
                    .clone(),
            ),
            Seqs::Rows {
                prefix,
                first,
                offsets,
            } => {
                // A new Vec of the kept size (collecting in place would keep
                // the old one's).
                let mut kept = Vec::with_capacity(mask.true_count());
                kept.extend(
                    offsets
                        .iter()
                        .zip(mask.values())
                        .filter_map(|(&offset, keep)| keep.then_some(offset)),
                );
                Seqs::Rows {
                    prefix: prefix.clone(),
                    first: *first,
                    offsets: kept,
                }
            }
        })
    }

    /// The values as text.
    fn to_array(&self) -> StringArray {
        match self {
            Seqs::Text(values) => values.clone(),
            Seqs::Rows {
                prefix,
                first,
                offsets,
            } => row_seqs(prefix, offsets.iter().map(|&o| first + u64::from(o))),
        }
    }
}

/// The finished latest changes by key: which of them a row of another
/// table (the current-state table) has the key of. It holds the keys (and,
/// when asked, each key's change_seq), not the rows.
pub struct KeyLookup {
    converter: RowConverter,
    types: Vec<arrow::datatypes::DataType>,
    index: KeyIndex,
    /// The change_seq column of each batch, if kept.
    seqs: Vec<StringArray>,
}

impl KeyLookup {
    /// Indexes `latest`, as [`LatestChanges::finish`] returned them (one row
    /// per key), reading a spilled set one batch at a time; `with_seq` keeps
    /// each key's change_seq for [`KeyLookup::seq`].
    pub fn new(merger: &Merger, latest: &Latest, with_seq: bool) -> Result<Self> {
        let collector = LatestChanges::new(merger)?;
        let types: Vec<_> = collector
            .key
            .iter()
            .map(|&i| collector.schema.field(i).data_type().clone())
            .collect();
        let seq_at = collector.schema.fields().len() - 1;
        let mut lookup = KeyLookup {
            converter: collector.converter,
            types,
            index: KeyIndex::default(),
            seqs: Vec::new(),
        };
        for (batch, rows) in latest.batches()?.enumerate() {
            let rows = rows?;
            let keys: Vec<ArrayRef> = collector
                .key
                .iter()
                .map(|&i| rows.column(i).clone())
                .collect();
            let batch = u32::try_from(batch).map_err(internal)?;
            for (row, key) in lookup.rows(&keys)?.iter().enumerate() {
                *lookup.index.entry(key.as_ref(), (batch, row as u32))? = (batch, row as u32);
            }
            if with_seq {
                lookup
                    .seqs
                    .push(rows.column(seq_at).as_string::<i32>().clone());
            }
        }
        Ok(lookup)
    }

    /// The change_seq of the latest change at `loc`, if the lookup kept them.
    pub fn seq(&self, (batch, row): Loc) -> Option<&str> {
        let seqs = self.seqs.get(batch as usize)?;
        (row < seqs.len() as u32).then(|| seqs.value(row as usize))
    }

    /// For each row of `keys` (the key columns in key order, of any types
    /// that cast to the history's), where the latest change of its key is:
    /// (batch, row) in the rows given to [`KeyLookup::new`].
    pub fn find(&self, keys: &[ArrayRef]) -> Result<Vec<Option<Loc>>> {
        let keys = keys
            .iter()
            .zip(&self.types)
            .map(|(k, t)| arrow::compute::cast(k, t))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| internal(e.to_string()))?;
        Ok(self
            .rows(&keys)?
            .iter()
            .map(|key| self.index.get(key.as_ref()))
            .collect())
    }

    fn rows(&self, keys: &[ArrayRef]) -> Result<arrow::row::Rows> {
        self.converter
            .convert_columns(keys)
            .map_err(|e| internal(e.to_string()))
    }
}

/// Each key's latest row, by the key's row-format bytes. The bytes live in
/// one arena, entry after entry (no allocation per key; a key ends where the
/// next entry's starts), and the hash table holds entry numbers: 12 bytes per
/// key besides its bytes and the table's 5 (a map from hashes to chains took
/// 40). A row costs one probe of the table, inserting where the lookup ended.
#[derive(Default)]
struct KeyIndex {
    hasher: foldhash::fast::RandomState,
    table: hashbrown::HashTable<u32>,
    entries: Vec<KeyEntry>,
    arena: Vec<u8>,
}

struct KeyEntry {
    /// Where the key's bytes start in the arena.
    start: u32,
    loc: Loc,
}

/// The key bytes of entry `at`.
fn key_of<'a>(entries: &'a [KeyEntry], arena: &'a [u8], at: u32) -> &'a [u8] {
    let at = at as usize;
    let end = entries
        .get(at + 1)
        .map_or(arena.len(), |next| next.start as usize);
    &arena[entries[at].start as usize..end]
}

impl KeyIndex {
    /// The location of `key`'s latest row; a new key gets `fresh`. An error
    /// past 2^32 keys or 4 GiB of key bytes.
    fn entry(&mut self, key: &[u8], fresh: Loc) -> Result<&mut Loc> {
        let hash = self.hasher.hash_one(key);
        let (entries, arena, hasher) = (&self.entries, &self.arena, &self.hasher);
        let at = match self.table.entry(
            hash,
            |&at| key_of(entries, arena, at) == key,
            |&at| hasher.hash_one(key_of(entries, arena, at)),
        ) {
            hashbrown::hash_table::Entry::Occupied(found) => *found.get(),
            hashbrown::hash_table::Entry::Vacant(place) => {
                let (Ok(new), Ok(start)) = (
                    u32::try_from(self.entries.len()),
                    u32::try_from(self.arena.len()),
                ) else {
                    return Err(internal(
                        "a batch has more than 2^32 keys or 4 GiB of key bytes; \
                         lower batch.max_objects or batch.max_bytes",
                    ));
                };
                place.insert(new);
                self.entries.push(KeyEntry { start, loc: fresh });
                self.arena.extend_from_slice(key);
                new
            }
        };
        Ok(&mut self.entries[at as usize].loc)
    }

    /// The location of `key`'s latest row, if it has one.
    fn get(&self, key: &[u8]) -> Option<Loc> {
        let (entries, arena) = (&self.entries, &self.arena);
        self.table
            .find(self.hasher.hash_one(key), |&at| {
                key_of(entries, arena, at) == key
            })
            .map(|&at| entries[at as usize].loc)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn locs(&self) -> impl Iterator<Item = &Loc> {
        self.entries.iter().map(|e| &e.loc)
    }

    fn locs_mut(&mut self) -> impl Iterator<Item = &mut Loc> {
        self.entries.iter_mut().map(|e| &mut e.loc)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};

    use super::*;
    use crate::config::{Column, MetadataColumns, SqlType};

    fn merger() -> Merger {
        let column = |name: &str, sql_type| Column {
            name: name.into(),
            sql_type,
            existing: None,
        };
        Merger {
            key: vec!["a".into(), "b".into()],
            columns: vec![
                column("a", SqlType::BigInt),
                column("b", SqlType::Text),
                column("v", SqlType::BigInt),
            ],
            extra_columns: Vec::new(),
            sequence_column: None,
            meta: MetadataColumns::default(),
            soft_delete: false,
        }
    }

    /// One change: key (a, b), value, op, change_seq.
    type Change = (Option<i64>, Option<String>, i64, &'static str, String);
    type Key = (Option<i64>, Option<String>);
    /// A key's latest change: change_seq, value, op.
    type Row = (String, i64, String);

    fn history(merger: &Merger, changes: &[Change]) -> RecordBatch {
        let n = changes.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(changes.iter().map(|c| c.0).collect::<Int64Array>()),
            Arc::new(changes.iter().map(|c| c.1.clone()).collect::<StringArray>()),
            Arc::new(changes.iter().map(|c| Some(c.2)).collect::<Int64Array>()),
            Arc::new(changes.iter().map(|c| Some(c.3)).collect::<StringArray>()),
            Arc::new(
                TimestampMicrosecondArray::from(changes.iter().map(|c| c.2).collect::<Vec<_>>())
                    .with_timezone(crate::config::UTC),
            ),
            Arc::new(
                changes
                    .iter()
                    .map(|c| Some(c.4.clone()))
                    .collect::<StringArray>(),
            ),
            Arc::new(StringArray::from(vec!["f"; n])),
            Arc::new(TimestampMicrosecondArray::from(vec![0; n]).with_timezone(crate::config::UTC)),
        ];
        RecordBatch::try_new(merger.history_schema(), columns).unwrap()
    }

    /// Random changes over few keys (NULL key parts included) and one
    /// truncate; `shuffled`: change_seq does not follow the stream.
    fn changes(count: usize, seed: u64, shuffled: bool) -> Vec<Change> {
        let mut state = seed;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut seqs: Vec<usize> = (0..count).collect();
        for i in (1..count).rev().filter(|_| shuffled) {
            seqs.swap(i, next(i as u64 + 1) as usize);
        }
        (0..count)
            .map(|i| {
                // Most chunks hold change_seq's usual form (one prefix, row
                // digits); some mix prefixes, lengths or far-apart rows.
                let seq = match i {
                    1000..1300 if i % 3 == 0 => format!("1{:012}x", seqs[i]),
                    2000..2100 if i % 2 == 0 => format!("2{:012}", seqs[i]),
                    2500..2600 => format!("1{:012}", seqs[i] as u64 * 100_000_000),
                    _ => format!("1{:012}", seqs[i]),
                };
                if i == count / 2 {
                    return (None, None, i as i64, "T", seq);
                }
                let a = (next(7) != 0).then(|| next(40) as i64);
                let b = (next(9) != 0).then(|| format!("k{}", next(3)));
                let op = ["I", "U", "D"][next(3) as usize];
                (a, b, i as i64, op, seq)
            })
            .collect()
    }

    #[test]
    fn latest_change_per_key_matches_a_naive_scan() {
        let merger = merger();
        // Budgets: none; a few chunks' worth (spills now and then, superseded
        // rows left in the file); nothing (every chunk spilled).
        for (seed, compact_after, shuffled, budget) in [
            (1, usize::MAX, true, usize::MAX),
            (2, 50, true, usize::MAX),
            (3, 1, true, usize::MAX),
            (4, 50, false, usize::MAX),
            (5, usize::MAX, false, usize::MAX),
            (6, usize::MAX, true, 20_000),
            (7, 50, true, 20_000),
            (8, 50, false, 0),
            (9, usize::MAX, true, 0),
        ] {
            let mut all = changes(3000, seed, shuffled);
            if !shuffled {
                // In order, but for one late chunk.
                all[500..600].reverse();
            }
            let mut latest = LatestChanges::new(&merger).unwrap().spill_past(budget);
            latest.compact_after = compact_after;
            let mut most_held = 0;
            for chunk in all.chunks(97) {
                latest.push(&history(&merger, chunk)).unwrap();
                most_held = most_held.max(latest.held_bytes);
            }
            let (rows, stats, order) = latest.finish().unwrap();
            assert_eq!(rows.spilled(), budget != usize::MAX, "seed {seed}");
            if budget != usize::MAX {
                assert!(most_held <= budget, "seed {seed}: held {most_held}");
            }
            let rows = rows.into_held().unwrap();

            // Expected, computed naively: the largest change_seq of each key.
            let truncate = all.iter().find(|c| c.3 == "T").map(|c| c.4.clone());
            let mut expected: BTreeMap<Key, Row> = BTreeMap::new();
            for c in all.iter().filter(|c| c.3 != "T") {
                let entry = expected.entry((c.0, c.1.clone())).or_insert((
                    c.4.clone(),
                    c.2,
                    c.3.to_string(),
                ));
                if c.4 > entry.0 {
                    *entry = (c.4.clone(), c.2, c.3.to_string());
                }
            }
            for value in expected.values_mut() {
                if Some(&value.0) < truncate.as_ref() {
                    value.2 = "D".into();
                }
            }
            let mut got = BTreeMap::new();
            for batch in &rows {
                let a = batch
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let b = batch.column(1).as_string::<i32>();
                let v = batch
                    .column(2)
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let op = batch.column(3).as_string::<i32>();
                let seq = batch.column(5).as_string::<i32>();
                for i in 0..batch.num_rows() {
                    let key = (
                        a.is_valid(i).then(|| a.value(i)),
                        b.is_valid(i).then(|| b.value(i).to_string()),
                    );
                    let row = (
                        seq.value(i).to_string(),
                        v.value(i),
                        op.value(i).to_string(),
                    );
                    assert!(got.insert(key, row).is_none(), "one row per key");
                }
            }
            assert_eq!(got, expected, "seed {seed}");

            let count = |op: &str| all.iter().filter(|c| c.3 == op).count() as u64;
            assert_eq!(stats.rows, all.len() as u64);
            assert_eq!(stats.inserts, count("I"));
            assert_eq!(stats.updates, count("U"));
            assert_eq!(stats.deletes, count("D") + count("T"));
            assert_eq!(stats.max_seq, all.iter().map(|c| c.4.clone()).max());
            assert_eq!(order.min_seq, all.iter().map(|c| c.4.clone()).min());
            assert_eq!(order.truncated, truncate);
            assert_eq!(
                stats.max_commit_ts,
                DateTime::from_timestamp_micros(all.len() as i64 - 1)
            );
        }
    }

    #[test]
    fn seqs_keep_each_value_and_its_order() {
        // Values, and whether they are held as row offsets (the usual form).
        let cases: Vec<(Vec<Option<&str>>, bool)> = vec![
            (
                vec![
                    Some("1000000000000007"),
                    Some("1000000000000003"),
                    Some("1000000000000100"),
                ],
                true,
            ),
            (vec![Some("0000000000000"), Some("0999999999999")], false), // 4 billion rows apart
            (
                vec![Some("1000000000000001"), Some("2000000000000002")],
                false,
            ),
            (vec![Some("1000000000001"), Some("1000000000001x")], false),
            (vec![Some("1000000000001"), None], false),
            (vec![Some("short"), Some("")], false),
        ];
        for (values, as_rows) in cases {
            let array = StringArray::from(values.clone());
            let seqs = Seqs::new(&array);
            assert_eq!(matches!(seqs, Seqs::Rows { .. }), as_rows, "{values:?}");
            if let Seqs::Rows { offsets, .. } = &seqs {
                assert_eq!(offsets.capacity(), offsets.len(), "{values:?}");
            }
            for (row, value) in values.iter().enumerate().filter(|(_, v)| v.is_some()) {
                for other in ["", "1000000000000004", "2", "1000000000001x"] {
                    assert_eq!(
                        seqs.cmp_row(row, other),
                        value.unwrap().cmp(other),
                        "{values:?} row {row} against {other:?}"
                    );
                }
            }
            let mask = BooleanArray::from((0..values.len()).map(|i| i != 1).collect::<Vec<_>>());
            let kept: Vec<Option<&str>> = values
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 1)
                .map(|(_, v)| *v)
                .collect();
            let filtered = seqs.filter(&mask).unwrap();
            if let Seqs::Rows { offsets, .. } = &filtered {
                // Held at their size: kept to the end of the batch.
                assert_eq!(offsets.capacity(), offsets.len(), "{values:?}");
            }
            let filtered = filtered.to_array();
            assert_eq!(filtered, StringArray::from(kept), "{values:?}");
            assert_eq!(Seqs::new(&array).to_array(), array);
        }
    }

    #[test]
    fn spilled_and_held_latest_changes_read_and_drop_rows_alike() {
        let merger = merger();
        let all = changes(3000, 11, true);
        let finish = |budget: usize| {
            let mut latest = LatestChanges::new(&merger).unwrap().spill_past(budget);
            for chunk in all.chunks(89) {
                latest.push(&history(&merger, chunk)).unwrap();
            }
            latest.finish().unwrap().0
        };
        let held = finish(usize::MAX);
        let partly = finish(20_000);
        assert!(!held.spilled() && partly.spilled());
        // Every third row of the spilled set, by the numbering of its batches.
        let mut dropped = HashSet::new();
        let mut n = 0;
        for (b, batch) in partly.batches().unwrap().enumerate() {
            for r in 0..batch.unwrap().num_rows() {
                if n % 3 == 0 {
                    dropped.insert((b as u32, r as u32));
                }
                n += 1;
            }
        }
        assert!(!dropped.is_empty());
        let by_seq = |latest: Latest| {
            let mut rows: Vec<String> = Vec::new();
            for batch in latest.into_held().unwrap() {
                let seq = batch.column(5).as_string::<i32>();
                let op = batch.column(3).as_string::<i32>();
                rows.extend(
                    (0..batch.num_rows()).map(|i| format!("{} {}", seq.value(i), op.value(i))),
                );
            }
            rows.sort();
            rows
        };
        let all_rows = by_seq(finish(usize::MAX));
        let read: Vec<String> = partly
            .batches()
            .unwrap()
            .flat_map(|b| {
                let b = b.unwrap();
                let seq = b.column(5).as_string::<i32>().clone();
                (0..b.num_rows())
                    .map(move |i| seq.value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        let expected: Vec<String> = {
            let dropped_seqs: HashSet<&String> = read
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 3 == 0)
                .map(|(_, s)| s)
                .collect();
            all_rows
                .iter()
                .filter(|r| !dropped_seqs.contains(&r.split(' ').next().unwrap().to_string()))
                .cloned()
                .collect()
        };
        assert_eq!(by_seq(held), all_rows, "the held set reads whole");
        let kept = partly.without(&dropped).unwrap();
        assert_eq!(kept.num_rows(), expected.len());
        assert_eq!(by_seq(kept), expected);
    }

    #[test]
    fn key_lookup_finds_each_key_of_another_table() {
        let merger = merger();
        let all = changes(2000, 7, true);
        let mut latest = LatestChanges::new(&merger).unwrap().spill_past(0);
        for chunk in all.chunks(101) {
            latest.push(&history(&merger, chunk)).unwrap();
        }
        let (latest, ..) = latest.finish().unwrap();
        assert!(latest.spilled());
        let lookup = KeyLookup::new(&merger, &latest, true).unwrap();
        let rows = latest.into_held().unwrap();
        // Where each key is, independently: a scan of the rows.
        let mut at: BTreeMap<Key, Loc> = BTreeMap::new();
        for (b, batch) in rows.iter().enumerate() {
            let a = batch
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>();
            let k = batch.column(1).as_string::<i32>();
            for r in 0..batch.num_rows() {
                let key = (
                    a.is_valid(r).then(|| a.value(r)),
                    k.is_valid(r).then(|| k.value(r).to_string()),
                );
                at.insert(key, (b as u32, r as u32));
            }
        }
        // A target table's keys: every key seen, and keys never seen, with
        // the integer part as Int32 (cast to the history's Int64).
        let mut keys: Vec<Key> = at.keys().cloned().collect();
        keys.extend([
            (Some(1000), Some("k0".into())),
            (Some(1), Some("zz".into())),
        ]);
        let a: ArrayRef = Arc::new(
            keys.iter()
                .map(|k| k.0.map(|v| v as i32))
                .collect::<arrow::array::Int32Array>(),
        );
        let b: ArrayRef = Arc::new(keys.iter().map(|k| k.1.clone()).collect::<StringArray>());
        let found = lookup.find(&[a, b]).unwrap();
        for (key, found) in keys.iter().zip(found) {
            assert_eq!(found, at.get(key).copied(), "key {key:?}");
        }
        for &(b, r) in at.values() {
            let seq = rows[b as usize]
                .column(5)
                .as_string::<i32>()
                .value(r as usize);
            assert_eq!(lookup.seq((b, r)), Some(seq));
        }
    }
}
