//! Rows written to a local file and read back in order: the latest changes
//! of a batch once they outgrow their memory budget (`batch.latest_memory_mib`).
//!
//! The file is Arrow IPC (stream format) in the system's temporary directory
//! (`TMPDIR`), removed when the last [`SpillFile`] handle is dropped: a spill
//! lives as long as the batch's load, and a crash leaves nothing a rerun
//! reads (the batch is decoded again).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use tempfile::TempPath;

use crate::error::{Error, Result};

fn failed(
    context: &str,
    path: &TempPath,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::io(
        format!(
            "{context} (the latest changes of a batch, spilled past batch.latest_memory_mib; is the temporary directory full? set TMPDIR)"
        ),
        path.display(),
        std::io::Error::other(err),
    )
}

/// Appends batches of one schema to a new spill file.
pub(super) struct SpillWriter {
    writer: StreamWriter<BufWriter<File>>,
    path: TempPath,
}

impl SpillWriter {
    /// A new, empty spill file for rows of `schema`.
    pub(super) fn new(schema: &SchemaRef) -> Result<Self> {
        let (file, path) = tempfile::Builder::new()
            .prefix("cdcflow-latest-")
            .suffix(".arrows")
            .tempfile()
            .map_err(|e| Error::io("creating a spill file", std::env::temp_dir().display(), e))?
            .into_parts();
        let writer = StreamWriter::try_new(BufWriter::with_capacity(1 << 20, file), schema)
            .map_err(|e| failed("starting a spill file", &path, e))?;
        Ok(SpillWriter { writer, path })
    }

    /// Appends `batch`.
    pub(super) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .map_err(|e| failed("writing a spill file", &self.path, e))
    }

    /// Ends the file; it can then be read (any number of times).
    pub(super) fn finish(mut self) -> Result<SpillFile> {
        self.writer
            .finish()
            .map_err(|e| failed("ending a spill file", &self.path, e))?;
        Ok(SpillFile {
            path: Arc::new(self.path),
        })
    }
}

/// A finished spill file: its batches, in the order they were written.
pub(super) struct SpillFile {
    path: Arc<TempPath>,
}

impl SpillFile {
    /// Reads the batches back one at a time, in order.
    pub(super) fn read(
        &self,
    ) -> Result<impl Iterator<Item = Result<RecordBatch>> + Send + 'static> {
        let file = File::open(&*self.path)
            .map_err(|e| Error::io("reading a spill file", self.path.display(), e))?;
        let reader = StreamReader::try_new(BufReader::with_capacity(1 << 20, file), None)
            .map_err(|e| failed("reading a spill file", &self.path, e))?;
        let path = self.path.clone();
        Ok(reader.map(move |batch| batch.map_err(|e| failed("reading a spill file", &path, e))))
    }
}
