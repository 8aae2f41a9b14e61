//! How many threads a process works with. One number, set by `--threads`
//! (`CDCFLOW_THREADS`; default: the cores this process may use, which
//! follows `taskset` and a container's CPU quota), sizes the runtime's
//! worker threads, and through them the objects decoded at once, the Parquet
//! writers of a batch and DataFusion's partitions.

/// A multi-threaded runtime with `threads` workers (default: the cores this
/// process may use).
pub fn runtime(threads: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder.enable_all().build().expect("tokio runtime")
}

/// The worker threads of the runtime this runs on (1 outside a runtime, and
/// on a current-thread runtime).
pub fn count() -> usize {
    tokio::runtime::Handle::try_current()
        .map(|runtime| runtime.metrics().num_workers())
        .unwrap_or(1)
        .max(1)
}
