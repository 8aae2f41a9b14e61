//! The capture sink: rows in, durable objects and a checkpoint out.
//!
//! Contract with a change source (PostgreSQL, and later MySQL):
//! 1. the source feeds a chunk of whole transactions ([`Sink::table`],
//!    [`Sink::row`]), in commit order, each row with its change sequence;
//! 2. [`Sink::commit`] writes the checkpoint naming the objects it is about
//!    to write (with each object's last sequence), then the objects;
//! 3. only then is the chunk's end position confirmed: to the server (a
//!    PostgreSQL slot), and by [`Sink::confirm`] in the checkpoint (where a
//!    MySQL binlog reader resumes).
//!
//! After a crash the server sends the unconfirmed chunk again. Objects of the
//! checkpoint's pending list that exist hold rows up to their last sequence;
//! those rows are dropped on the second pass, the others are written. So every
//! change lands in exactly one object, whatever the moment of the crash. The
//! pending list only grows until the position is confirmed: a chunk may
//! commit several times (a transaction larger than memory, see
//! [`Sink::spill_if_full`]) and a replay may crash again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::mapping::{Mapping, OutputTable, SourceTable};
use super::source::Value;
use super::writer::{Buffer, Kind, Layout, SchemaFile, Target, cdc_key, load_key};
use crate::decode::Op;
use crate::error::{Error, Result};

/// What capture remembers between runs, stored beside the objects
/// (`_cdcflow/capture-<name>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Source position confirmed last (LSN), for `status`.
    #[serde(default)]
    pub position: Option<String>,
    /// Source-specific state of the full load (e.g. the snapshot's visibility).
    #[serde(default)]
    pub full_load: Option<serde_json::Value>,
    /// Per source table (`schema.table`): its version and last object.
    #[serde(default)]
    pub tables: BTreeMap<String, TableCheckpoint>,
    /// Objects being written by the last chunk, with their last sequence.
    #[serde(default)]
    pub pending: Vec<PendingObject>,
    /// When this checkpoint was written.
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
}

/// A table's state in the [`Checkpoint`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TableCheckpoint {
    /// Schema version (1, 2, …): one schema file each.
    pub version: u32,
    /// Source columns as `name type [key]`, to notice a change.
    pub columns: Vec<String>,
    /// Key of the last object written.
    pub last_object: Option<String>,
    /// Sequence of the last change confirmed: every later change must sort
    /// after it (a source that went backwards is refused).
    #[serde(default)]
    pub confirmed_seq: Option<String>,
    /// Changes written in confirmed CDC objects (full load rows not counted).
    #[serde(default)]
    pub changes: u64,
    /// Confirmed CDC objects written.
    #[serde(default)]
    pub objects: u64,
}

/// An object a chunk writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingObject {
    /// Source table (`schema.table`).
    pub table: String,
    /// Object key.
    pub key: String,
    /// Sequence of its last row.
    pub last_seq: String,
    /// Its rows, counted into the table's `changes` when confirmed.
    #[serde(default)]
    pub rows: u64,
}

fn signature(table: &SourceTable) -> Vec<String> {
    table
        .columns
        .iter()
        .map(|c| {
            format!(
                "{} {}{}",
                c.name,
                c.sql_type,
                if c.key { " key" } else { "" }
            )
        })
        .collect()
}

/// Per table (`schema.table`), looked up for every change: a fast hasher
/// (the names come from the capture's own config and server, not from
/// anyone who could aim collisions at it). SipHash was ~10 % of binlog
/// capture's reading thread.
type ByTable<V> = HashMap<String, V, foldhash::fast::RandomState>;

struct TableState {
    output: Arc<OutputTable>,
    buffer: Option<Buffer>,
}

/// Rows waiting to be written, by table.
pub struct Sink {
    target: Target,
    layout: Layout,
    mapping: Mapping,
    checkpoint_key: String,
    /// The state saved at the last commit.
    pub checkpoint: Checkpoint,
    tables: ByTable<TableState>,
    /// Per table: rows up to this sequence are already in an object (crash recovery).
    skips: ByTable<String>,
    /// Per table: the sequence of its last change, confirmed or taken since.
    last_seq: ByTable<String>,
    ready: Vec<(String, Buffer)>,
    /// Bytes of values in the buffers and `ready`.
    held: usize,
    schema_files: Vec<SchemaFile>,
    rows: u64,
}

impl Sink {
    /// Opens the sink: reads the checkpoint and finds which pending objects
    /// of an interrupted chunk were written.
    pub async fn open(
        target: Target,
        layout: Layout,
        mapping: Mapping,
        name: &str,
    ) -> Result<Sink> {
        let checkpoint_key = format!("_cdcflow/capture-{name}.json");
        let checkpoint: Checkpoint = match target.get(&checkpoint_key).await? {
            None => Checkpoint::default(),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::capture(format!("reading the checkpoint {checkpoint_key}"), e)
            })?,
        };
        let mut sink = Sink {
            target,
            layout,
            mapping,
            checkpoint_key,
            checkpoint,
            tables: ByTable::default(),
            skips: ByTable::default(),
            last_seq: ByTable::default(),
            ready: Vec::new(),
            held: 0,
            schema_files: Vec::new(),
            rows: 0,
        };
        sink.recover().await?;
        Ok(sink)
    }

    async fn recover(&mut self) -> Result<()> {
        let mut skips: ByTable<String> = ByTable::default();
        let mut written = Vec::new();
        for p in std::mem::take(&mut self.checkpoint.pending) {
            if self.target.exists(&p.key).await? {
                tracing::info!(object = %p.key, "found an object written before a crash; its rows are not written again");
                let skip = skips.entry(p.table.clone()).or_default();
                if p.last_seq > *skip {
                    *skip = p.last_seq.clone();
                }
                let t = self.checkpoint.tables.get_mut(&p.table);
                if let Some(t) = t
                    && t.last_object.as_deref() < Some(p.key.as_str())
                {
                    t.last_object = Some(p.key.clone());
                }
                written.push(p);
            }
        }
        // The written objects stay pending until the chunk is confirmed: a
        // second crash during the replay must still skip their rows.
        self.checkpoint.pending = written;
        self.skips = skips;
        self.last_seq = self
            .checkpoint
            .tables
            .iter()
            .filter_map(|(id, t)| Some((id.clone(), t.confirmed_seq.clone()?)))
            .collect();
        Ok(())
    }

    /// The target the objects go to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The mapping rules.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Rows accepted so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Declares a selected source table's current columns (before its rows,
    /// and again after a schema change). A changed column list starts a new
    /// version with its own schema file.
    pub fn table(&mut self, table: &SourceTable) {
        debug_assert!(self.mapping.selects(&table.schema, &table.name));
        let id = format!("{}.{}", table.schema, table.name);
        let output = Arc::new(self.mapping.output(table));
        let columns = signature(table);
        let version = match self.checkpoint.tables.get(&id) {
            Some(t) if t.columns == columns => t.version,
            found => {
                let version = found.map_or(1, |t| t.version + 1);
                let first = self.next_name(&id, &output);
                self.schema_files
                    .push(SchemaFile::new(&output, version, first));
                let last_object = found.and_then(|t| t.last_object.clone());
                self.checkpoint.tables.insert(
                    id.clone(),
                    TableCheckpoint {
                        version,
                        columns,
                        last_object,
                        confirmed_seq: found.and_then(|t| t.confirmed_seq.clone()),
                        changes: found.map_or(0, |t| t.changes),
                        objects: found.map_or(0, |t| t.objects),
                    },
                );
                version
            }
        };
        tracing::debug!(table = %id, version, "table");
        let state = self.tables.entry(id.clone()).or_insert_with(|| TableState {
            output: output.clone(),
            buffer: None,
        });
        if state.output != output {
            // Rows of the old version go to their own object.
            if let Some(buf) = state.buffer.take()
                && !buf.is_empty()
            {
                self.ready.push((id, buf));
            }
            state.output = output;
        }
    }

    /// Declares a table for its full load: version 1 starts at `LOAD00000001`.
    pub fn load_table(&mut self, table: &SourceTable) -> Arc<OutputTable> {
        self.table(table);
        let id = format!("{}.{}", table.schema, table.name);
        let output = self.tables[&id].output.clone();
        if let Some(file) = self
            .schema_files
            .iter_mut()
            .find(|f| f.schema == output.schema && f.table == output.name)
        {
            file.first_object = load_key(&output, 1, &self.layout);
        }
        output
    }

    /// Writes the schema files of tables declared since the last commit.
    pub async fn write_schema_files(&mut self) -> Result<()> {
        for file in std::mem::take(&mut self.schema_files) {
            let json = serde_json::to_vec_pretty(&file).expect("schema file serializes");
            self.target.put(&file.key(), json.into()).await?;
        }
        Ok(())
    }

    /// The name the next CDC object of a table gets.
    fn next_name(&self, id: &str, output: &OutputTable) -> String {
        let mut at = Utc::now();
        let mut key = cdc_key(output, at, &self.layout);
        let floor = self
            .checkpoint
            .tables
            .get(id)
            .and_then(|t| t.last_object.clone());
        while floor.as_ref().is_some_and(|f| key <= *f) {
            at += Duration::milliseconds(1);
            key = cdc_key(output, at, &self.layout);
        }
        key
    }

    /// Appends one change of `table` (declared by [`Sink::table`]).
    pub fn row(
        &mut self,
        table: &str,
        op: Op,
        commit_micros: i64,
        seq: &str,
        values: &[Value<'_>],
    ) -> Result<()> {
        if self.skips.get(table).is_some_and(|s| seq <= s.as_str()) {
            return Ok(());
        }
        // Changes come in source order: a sequence not above the last one
        // means the source went backwards (a server restored from a backup,
        // a failover to a replica behind, a slot or binlog reset). Writing it
        // would order it before changes already loaded.
        if let Some(last) = self.last_seq.get(table)
            && seq <= last.as_str()
        {
            return Err(Error::capture(
                format!("{table}, change {seq}"),
                format!(
                    "its sequence is not above the last one taken, {last}: the source went \
                     backwards (restored from a backup, failed over to a replica behind, or its \
                     slot or binlog was reset). Nothing of it is written. Start the capture afresh \
                     (a new target prefix and a full load), or restore the source"
                ),
            ));
        }
        match self.last_seq.get_mut(table) {
            Some(last) => {
                last.clear();
                last.push_str(seq);
            }
            None => {
                self.last_seq.insert(table.to_string(), seq.to_string());
            }
        }
        let state = self
            .tables
            .get_mut(table)
            .expect("the source declares a table before its rows");
        let layout = &self.layout;
        let buffer = state
            .buffer
            .get_or_insert_with(|| Buffer::new(state.output.clone(), Kind::Cdc, layout));
        let before = buffer.bytes();
        buffer
            .append(op, commit_micros, seq, values)
            .map_err(|bad| bad.at(format!("{table}, change {seq}")))?;
        self.held += buffer.bytes() - before;
        self.rows += 1;
        if buffer.full(layout) {
            let full = state.buffer.take().expect("just filled");
            self.ready.push((table.to_string(), full));
        }
        Ok(())
    }

    /// Whether any row waits to be written.
    pub fn has_rows(&self) -> bool {
        !self.ready.is_empty() || self.tables.values().any(|t| t.buffer.is_some())
    }

    /// Writes what is buffered (as [`Sink::commit`]) once it holds more than
    /// the layout's `max_held_bytes`, even in the middle of a transaction, so
    /// that a transaction larger than memory is never held whole. Sources
    /// call it after each change (or row event).
    ///
    /// Safe at any moment because the position is not confirmed: the
    /// objects stay in the checkpoint's pending list until
    /// [`Sink::confirm`], and a restart that reads the transaction again
    /// drops the rows they hold.
    pub async fn spill_if_full(&mut self) -> Result<()> {
        if self.held < self.layout.max_held_bytes {
            return Ok(());
        }
        let objects = self.commit().await?;
        tracing::info!(
            objects,
            "spilled a large transaction's rows to objects before its end"
        );
        Ok(())
    }

    /// Writes the checkpoint naming the objects, then every buffered row as
    /// objects (see the module contract). Returns the objects written.
    pub async fn commit(&mut self) -> Result<usize> {
        self.held = 0;
        for (id, state) in &mut self.tables {
            if let Some(buf) = state.buffer.take() {
                self.ready.push((id.clone(), buf));
            }
        }
        let mut objects = Vec::new();
        for (id, buffer) in std::mem::take(&mut self.ready) {
            let key = self.next_name(&id, buffer.table());
            let entry = self
                .checkpoint
                .tables
                .get_mut(&id)
                .expect("declared tables are in the checkpoint");
            entry.last_object = Some(key.clone());
            objects.push((
                PendingObject {
                    table: id,
                    key,
                    last_seq: buffer.last_seq.clone(),
                    rows: buffer.len() as u64,
                },
                buffer,
            ));
        }
        self.write_schema_files().await?;
        // Added to the pending list, not replacing it: objects of this
        // chunk's earlier commits (a spilled transaction) or of an
        // interrupted run stay known until the position is confirmed.
        self.checkpoint
            .pending
            .extend(objects.iter().map(|(p, _)| p.clone()));
        self.save().await?;
        crate::failpoint::hit("capture.after_checkpoint");
        let written = objects.len();
        for (pending, buffer) in objects {
            // Mostly encoded already, by the buffer's encoder thread (see `Buffer`).
            let bytes = tokio::task::spawn_blocking(move || buffer.encode())
                .await
                .expect("encoding task")?;
            self.target.put(&pending.key, bytes).await?;
            crate::failpoint::hit("capture.after_first_object");
        }
        Ok(written)
    }

    /// Records that the source has everything before `position` in objects:
    /// where the next run resumes.
    pub async fn confirm(&mut self, position: String) -> Result<()> {
        self.checkpoint.position = Some(position);
        // Each pending object is counted once: a replay after a crash keeps
        // only the objects that exist, and writes the others' rows anew.
        for p in std::mem::take(&mut self.checkpoint.pending) {
            if let Some(t) = self.checkpoint.tables.get_mut(&p.table) {
                t.changes += p.rows;
                t.objects += 1;
            }
        }
        for (id, seq) in &self.last_seq {
            if let Some(t) = self.checkpoint.tables.get_mut(id) {
                t.confirmed_seq = Some(seq.clone());
            }
        }
        self.save().await
    }

    /// Writes the checkpoint.
    pub async fn save(&mut self) -> Result<()> {
        self.checkpoint.updated_at = Some(Utc::now());
        let json = serde_json::to_vec_pretty(&self.checkpoint).expect("checkpoint serializes");
        self.target.put(&self.checkpoint_key, json.into()).await
    }
}
