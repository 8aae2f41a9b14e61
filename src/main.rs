//! The `cdcflow` binary: parse arguments, run, exit with the command's code.

fn main() -> std::process::ExitCode {
    tune_allocator();
    // deltalake enables two rustls crypto providers; pick one before any TLS client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cdcflow::cli::main()
}

/// Allocations of 512 KiB and more (Arrow buffers, Parquet pages) are
/// mapped and unmapped by themselves. glibc's default raises that threshold
/// as big blocks are freed, after which they come from the heap and stay
/// resident once freed: the 10M-change benchmark peaked at 2.6 GB of RSS
/// instead of 1.7 GB, for 5 % less time (see BENCH.md).
/// `MALLOC_MMAP_THRESHOLD_` in the environment takes precedence.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; no thread is running yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
