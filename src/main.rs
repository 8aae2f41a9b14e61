//! The `cdcflow` binary: parse arguments, run, exit with the command's code.

fn main() -> std::process::ExitCode {
    tune_allocator();
    // deltalake enables two rustls crypto providers; pick one before any TLS client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cdcflow::cli::main()
}

/// glibc's allocator, tuned for Arrow's buffers (env variables take precedence):
/// - Allocations of 512 KiB and more (Arrow buffers, Parquet pages) are
///   mapped and unmapped by themselves. glibc's default raises that threshold
///   as big blocks are freed, after which they come from the heap and stay
///   resident once freed: the 10M-change benchmark peaked at 2.6 GB of RSS
///   instead of 1.7 GB, for 5 % less time (see BENCH.md).
/// - One arena per core the process may use, not glibc's eight. Decoded
///   chunks are freed on other threads than those that made them, and each
///   further arena kept its freed pieces resident: synth Parquet at 2 cores
///   peaked at 1.85 GB with glibc's default and 1.3 GB with two arenas, in the
///   same time.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    let set = |variable: &str, parameter: libc::c_int, value: usize| {
        if std::env::var_os(variable).is_none() {
            let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt only sets a malloc parameter; no thread is running yet.
            unsafe {
                libc::mallopt(parameter, value);
            }
        }
    };
    set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 512 * 1024);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    set("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, cores);
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
