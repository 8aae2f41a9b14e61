//! A batch's objects decoded into one stream of history rows, in change
//! order: small objects read whole and decoded one per thread, large ones
//! streamed and cut into pieces decoded several at once; the stream ends in
//! an error unless every planned object was decoded (nothing of a batch is
//! loaded silently short).

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use super::Runner;
use crate::decode::{self, DecodeSpec, Piece};
use crate::error::{Error, Result};
use crate::merge::Merger;
use crate::source::{SourceObject, StreamReader};

/// Objects up to this size are read whole and decoded several at a time;
/// larger ones are streamed, one at a time.
const WHOLE_OBJECT_BYTES: u64 = 8 << 20;
/// Small objects decoded at once: one per thread, and at least two, so one
/// object is fetched while another decodes.
fn decode_parallelism() -> usize {
    crate::threads::count().max(2)
}

type RowSender = tokio::sync::mpsc::Sender<datafusion::error::Result<RecordBatch>>;

/// Streams the history rows of `objects`, in order. Runs of small objects
/// are read whole and decoded in parallel (DMS writes many small CDC files);
/// a large object is read as a byte stream and decoded piece by piece,
/// several pieces at once, so memory holds a few pieces, not the object. The
/// first failure (with the index of its object) is left in `failure` and
/// ends the stream.
pub(super) fn produce_history(
    runner: &Runner,
    objects: Vec<SourceObject>,
    merger: Merger,
    spec: DecodeSpec,
    batch_number: i64,
    failure: Arc<std::sync::Mutex<Option<(usize, Error)>>>,
) -> SendableRecordBatchStream {
    let schema = merger.history_schema();
    let (tx, rx) = tokio::sync::mpsc::channel::<datafusion::error::Result<RecordBatch>>(2);
    let source = runner.source.clone();
    // The end-of-batch account: the stream ends well only once every planned
    // object was decoded to its end. A producer that stopped any other way
    // (a panic, a bug) must fail the load, not commit a truncated batch.
    let planned = objects.len();
    let decoded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = decoded.clone();
    let done = move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    };
    let job = Decoding {
        source,
        merger,
        spec,
        batch_number,
        ingested_at: chrono::Utc::now(),
    };
    tokio::spawn(async move {
        let objects: Vec<(usize, SourceObject)> = objects.into_iter().enumerate().collect();
        let mut rest = objects.as_slice();
        while let Some((i, first)) = rest.first() {
            if first.size > WHOLE_OBJECT_BYTES {
                if let Err(err) = job.stream(first.clone(), &tx).await {
                    return report_failure(&tx, &failure, *i, err).await;
                }
                done();
                rest = &rest[1..];
                continue;
            }
            let small = rest
                .iter()
                .take_while(|(_, o)| o.size <= WHOLE_OBJECT_BYTES)
                .count();
            let mut decoded = futures::stream::iter(rest[..small].to_vec())
                .map(|(i, object)| {
                    let job = job.clone();
                    async move { (i, job.whole(object).await) }
                })
                .buffered(decode_parallelism());
            while let Some((i, result)) = decoded.next().await {
                match result {
                    Ok(batches) => {
                        for batch in batches {
                            if tx.send(Ok(batch)).await.is_err() {
                                return;
                            }
                        }
                        done();
                    }
                    Err(err) => return report_failure(&tx, &failure, i, err).await,
                }
            }
            rest = &rest[small..];
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        accounted(rx, decoded, planned, batch_number),
    ))
}

/// The rows received on `rx`, ending with an error unless `decoded` counts
/// all `planned` objects when the producer hangs up: a producer that stopped
/// early without saying why must fail the load, not end the batch.
fn accounted(
    rx: tokio::sync::mpsc::Receiver<datafusion::error::Result<RecordBatch>>,
    decoded: Arc<std::sync::atomic::AtomicUsize>,
    planned: usize,
    batch_number: i64,
) -> impl futures::Stream<Item = datafusion::error::Result<RecordBatch>> {
    futures::stream::unfold(Some(rx), move |rx| {
        let decoded = decoded.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(item) => Some((item, Some(rx))),
                None => {
                    let decoded = decoded.load(std::sync::atomic::Ordering::SeqCst);
                    (decoded != planned).then(|| {
                        let message = format!(
                            "batch {batch_number}: the decoder stopped after {decoded} of {planned} \
                             objects without an error; nothing of the batch is committed"
                        );
                        (Err(datafusion::error::DataFusionError::Execution(message)), None)
                    })
                }
            }
        }
    })
}

/// A decode task that panicked (or was cancelled), as a decode error of its object.
fn panicked(key: &str, join: tokio::task::JoinError) -> Error {
    if join.is_panic() {
        decode::panicked(key, join.into_panic().as_ref())
    } else {
        Error::decode(key, Default::default(), "the decoder was cancelled")
    }
}

/// Leaves the first failure (and its object's index) for the task and ends the stream.
async fn report_failure(
    tx: &RowSender,
    failure: &std::sync::Mutex<Option<(usize, Error)>>,
    i: usize,
    err: Error,
) {
    if tx.is_closed() {
        return; // the warehouse stopped reading (the history step was done before)
    }
    let message = err.to_string();
    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some((i, err));
    let _ = tx
        .send(Err(datafusion::error::DataFusionError::Execution(message)))
        .await;
}

/// Everything needed to turn objects into history rows.
#[derive(Clone)]
struct Decoding {
    source: Arc<dyn crate::source::ObjectSource>,
    merger: Merger,
    spec: DecodeSpec,
    batch_number: i64,
    ingested_at: chrono::DateTime<chrono::Utc>,
}

impl Decoding {
    fn check_etag(&self, object: &SourceObject, etag: &str) -> Result<()> {
        if !object.etag.is_empty() && !etag.is_empty() && etag != object.etag {
            return Err(Error::ObjectChanged {
                object: object.key.clone(),
                batch: self.batch_number,
                old_etag: object.etag.clone(),
                new_etag: etag.to_string(),
            });
        }
        Ok(())
    }

    /// Decodes on a blocking thread, handing each chunk's history rows to `emit`.
    async fn decode(
        &self,
        object: SourceObject,
        reader: Box<dyn std::io::Read + Send>,
        mut emit: impl FnMut(RecordBatch) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let job = self.clone();
        let key = object.key.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let mut first_row = 0;
            decode::decode_stream(&object, reader, &job.spec, &mut |chunk| {
                let rows = chunk.num_rows();
                let history =
                    job.merger
                        .history_chunk(&object, &chunk, first_row, job.ingested_at)?;
                first_row += rows;
                emit(history)
            })
        })
        .await;
        // A decoder (arrow, parquet) that panics on a malformed object is a
        // bad object, not the end of the batch's rows.
        decoded.unwrap_or_else(|join| Err(panicked(&key, join)))
    }

    /// A small object: read whole, its history rows returned.
    async fn whole(self, object: SourceObject) -> Result<Vec<RecordBatch>> {
        let fetched = self.source.get(&object.key).await?;
        self.check_etag(&object, &fetched.etag)?;
        let rows = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = rows.clone();
        self.decode(
            object,
            Box::new(std::io::Cursor::new(fetched.bytes)),
            move |batch| {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(batch);
                Ok(())
            },
        )
        .await?;
        let rows = std::mem::take(&mut *rows.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(rows)
    }

    /// A large object: read as a stream and cut into pieces (whole CSV
    /// records, ranges of Parquet rows), each decoded into history rows on a
    /// thread of its own, several at once, and handed on in order. Memory
    /// holds a few pieces per thread.
    async fn stream(&self, object: SourceObject, tx: &RowSender) -> Result<()> {
        let opened = self.source.open(&object.key).await?;
        self.check_etag(&object, &opened.etag)?;
        let reader = Box::new(StreamReader::new(opened.stream));
        let threads = decode_parallelism();
        let (pieces, mut received) = tokio::sync::mpsc::channel::<Piece>(threads);
        let split = {
            let (object, spec) = (object.clone(), Arc::new(self.spec.clone()));
            tokio::task::spawn_blocking(move || {
                decode::split_stream(&object, reader, &spec, &mut |piece| {
                    pieces.blocking_send(piece).map_err(|_| stopped_reading())
                })
            })
        };
        let pieces = futures::stream::poll_fn(move |cx| received.poll_recv(cx));
        let mut rows = pieces
            .map(|piece| {
                let (job, object) = (self.clone(), object.clone());
                async move {
                    let key = object.key.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut first_row = piece.first_row() as usize;
                        let mut history = Vec::new();
                        for batch in piece.decode()? {
                            history.push(job.merger.history_chunk(
                                &object,
                                &batch,
                                first_row,
                                job.ingested_at,
                            )?);
                            first_row += batch.num_rows();
                        }
                        Ok(history)
                    })
                    .await
                    .unwrap_or_else(|join| Err(panicked(&key, join)))
                }
            })
            .buffered(threads);
        while let Some(history) = rows.next().await {
            for batch in history? {
                if tx.send(Ok(batch)).await.is_err() {
                    return Err(stopped_reading());
                }
            }
        }
        // Every piece was decoded: the object ended, or the split failed after them.
        split
            .await
            .unwrap_or_else(|join| Err(panicked(&object.key, join)))
    }
}

fn stopped_reading() -> Error {
    Error::Usage("the warehouse stopped reading the batch".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_end_in_an_error_unless_every_planned_object_was_decoded() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![Arc::new(arrow::array::Int64Array::from(vec![1, 2]))],
        )
        .unwrap();
        for (decoded, planned) in [(2, 2), (1, 2), (0, 3)] {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(Ok(rows.clone())).await.unwrap();
            drop(tx); // the producer is gone
            let count = Arc::new(AtomicUsize::new(0));
            count.store(decoded, Ordering::SeqCst);
            let items: Vec<_> = accounted(rx, count, planned, 7).collect().await;
            assert!(items[0].is_ok());
            if decoded == planned {
                assert_eq!(items.len(), 1, "a complete batch ends cleanly");
            } else {
                assert_eq!(items.len(), 2);
                let err = items[1].as_ref().unwrap_err().to_string();
                assert!(
                    err.contains(&format!("after {decoded} of {planned} objects")),
                    "{err}"
                );
            }
        }
    }
}
