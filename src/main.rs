//! `outbox-relay` binary: parses the command line and runs it.
//!
//! A usage error (a missing argument, an unknown value) is clap's full
//! message with the usage line, exit code 2; a runtime error is one line on
//! stderr, exit code 1.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Without `RUST_LOG`: our own logs at INFO; Postgres' notices (which
/// tokio-postgres logs at INFO) only at WARN and above.
const DEFAULT_LOG_FILTER: &str = "info,tokio_postgres=warn";
/// `--verbose`: our own logs at DEBUG.
const VERBOSE_LOG_FILTER: &str = "info,outbox_relay=debug,tokio_postgres=warn";

fn main() -> std::process::ExitCode {
    let cli = match outbox_relay::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed; usage errors
        // print in full (what is wrong, the usage, a hint) and exit 2.
        Err(e) => e.exit(),
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(outbox_relay::cli::run(cli));
    if OUTPUT_CLOSED.load(Ordering::SeqCst) {
        // As a Unix tool killed by SIGPIPE would (128 + 13): a supervisor
        // restarting on failure sees one.
        return std::process::ExitCode::from(141);
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                outbox_relay::cli::one_line(&e)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr: `LOG_FORMAT=json` for JSON lines, otherwise text,
/// coloured only when stderr is a terminal.
fn init_logging(verbose: bool) {
    let default = if verbose {
        VERBOSE_LOG_FILTER
    } else {
        DEFAULT_LOG_FILTER
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter(std::io::stderr()));
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Stderr for the logs. Once a reader closed it (`serve 2>&1 | head`), the
/// process stops as if told to with SIGTERM, as a Unix tool would on
/// SIGPIPE, but through the graceful path (members leave, the embedded
/// Postgres is stopped). Rust ignores SIGPIPE, so the write just fails.
struct LogWriter(std::io::Stderr);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                stop_on_closed_output();
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Set once stderr was found closed: the process stops, and exits 141.
static OUTPUT_CLOSED: AtomicBool = AtomicBool::new(false);

fn stop_on_closed_output() {
    if !OUTPUT_CLOSED.swap(true, Ordering::SeqCst) {
        // SAFETY: kill(2) on our own pid with a valid signal number.
        unsafe {
            kill(std::process::id() as i32, SIGTERM);
        }
    }
}

const SIGTERM: i32 = 15;

extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}

/// `outbox-relay tail … | head` closing the pipe is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
