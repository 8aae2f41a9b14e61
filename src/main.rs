//! The `cdcflow` binary: parse arguments, run, exit with the command's code.

fn main() -> std::process::ExitCode {
    // deltalake enables two rustls crypto providers; pick one before any TLS client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cdcflow::cli::main()
}
