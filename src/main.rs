//! `outbox-relay` binary: parses the command line and runs it.
//!
//! A usage error (a missing argument, an unknown value) is clap's full
//! message with the usage line, exit code 2; a runtime error is one line on
//! stderr, exit code 1.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Without `RUST_LOG`: our own logs at INFO; Postgres' notices (which
/// tokio-postgres logs at INFO) only at WARN and above.
const DEFAULT_LOG_FILTER: &str = "info,tokio_postgres=warn";

fn main() -> std::process::ExitCode {
    let cli = match outbox_relay::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed; usage errors
        // print in full (what is wrong, the usage, a hint) and exit 2.
        Err(e) => e.exit(),
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(outbox_relay::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", outbox_relay::cli::one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr: `LOG_FORMAT=json` for JSON lines, otherwise text,
/// coloured only when stderr is a terminal.
fn init_logging() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// `outbox-relay tail … | head` closing the pipe is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
