//! A newcomer's first hour: the embedded default found from any working
//! directory, a closed pipe, usage errors, what `demo --no-wait` promises,
//! and a mail directory that does not exist.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::cli::{assert_one_line_failure, stderr};
use crate::harness::*;

/// A fresh `XDG_DATA_HOME` and two unrelated working directories.
struct Home {
    root: PathBuf,
}

impl Home {
    fn new() -> Home {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("home-{:x}", rand::random::<u64>()));
        for dir in ["data", "a", "b"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        Home { root }
    }

    /// `outbox-relay args…` on the embedded default, run from `cwd`.
    fn command(&self, cwd: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        command
            .args(args)
            .current_dir(self.root.join(cwd))
            .env("XDG_DATA_HOME", self.root.join("data"))
            .env("RUST_LOG", "info")
            .env_remove("DATABASE_URL")
            .env_remove("OUTBOX_RELAY_DATA_DIR")
            .env_remove("SMTP_URL")
            .env_remove("HTTP_ADDR");
        command
    }

    fn run(&self, cwd: &str, args: &[&str]) -> Output {
        self.command(cwd, args).output().unwrap()
    }

    /// The embedded cluster's data directory.
    fn cluster(&self) -> PathBuf {
        self.root.join("data/outbox-relay/postgres")
    }

    /// True while a postmaster runs on the cluster (its pid file exists).
    fn postgres_running(&self) -> bool {
        self.cluster().join("postmaster.pid").exists()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if self.cluster().exists() {
            let _ = outbox_relay::embedded::EmbeddedPostgres::discard_stale(&self.cluster());
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// The default data directory does not depend on where a command runs:
/// `demo` run in one directory, `topics describe` in another finds the
/// same cluster, and neither directory gets a `.outbox-relay`.
#[tokio::test]
async fn the_embedded_default_is_the_same_from_any_working_directory() {
    let home = std::sync::Arc::new(Home::new());
    let h = home.clone();
    let demo = blocking(move || {
        h.run(
            "a",
            &[
                "demo",
                "--no-wait",
                "--orders",
                "2",
                "--http-addr",
                "127.0.0.1:0",
            ],
        )
    })
    .await;
    assert!(demo.status.success(), "{}", stderr(&demo));
    let announced = stderr(&demo);
    assert!(
        announced.contains(&home.cluster().display().to_string()),
        "names the data directory: {announced}"
    );
    // --no-wait: only what works once the demo has exited.
    let shown = String::from_utf8_lossy(&demo.stdout);
    assert!(!shown.contains("curl"), "{shown}");
    assert!(!shown.contains("while the demo runs"), "{shown}");
    assert!(shown.contains("topics describe order-created"), "{shown}");

    let h = home.clone();
    let described = blocking(move || h.run("b", &["topics", "describe", "order-created"])).await;
    assert!(described.status.success(), "{}", stderr(&described));
    assert!(String::from_utf8_lossy(&described.stdout).contains("order-created"));
    for cwd in ["a", "b"] {
        assert!(!home.root.join(cwd).join(".outbox-relay").exists());
    }
    assert!(
        !home.postgres_running(),
        "each command stopped what it started"
    );
}

/// "No schema" names the database it looked at, never its password.
#[tokio::test]
async fn a_database_without_the_schema_is_named_in_the_error() {
    let db = TestDb::empty().await;
    let url = db.url.replacen("postgres@", "postgres:secret@", 1);
    let out = blocking(move || crate::cli::outbox_relay(Some(&url), &["topics", "list"])).await;
    assert_one_line_failure(&out, "has no outbox-relay schema");
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let message = stderr(&out);
    assert!(message.contains(&format!("/{name}")), "{message}");
    assert!(!message.contains("secret"), "{message}");
}

/// `serve 2>&1 | head -3`: once the reader is gone the process stops
/// quietly at its next log line (no panic), and the embedded Postgres it
/// started stops too.
#[tokio::test]
async fn a_closed_pipe_stops_serve_quietly_and_its_postgres_with_it() {
    let home = std::sync::Arc::new(Home::new());
    let h = home.clone();
    let addr = format!("127.0.0.1:{}", free_port());
    let status = blocking(move || {
        let mut child = h
            .command("a", &["serve", "--verbose", "--http-addr", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut listening = false;
        for _ in 0..3 {
            listening |= lines
                .next()
                .unwrap()
                .unwrap()
                .contains("order API listening");
        }
        while !listening {
            listening = lines
                .next()
                .unwrap()
                .unwrap()
                .contains("order API listening");
        }
        drop(lines); // `head` exits
                     // An order makes the process log again (at DEBUG: "order placed").
        let order = r#"{"user_id": 1, "email": "a@example.com", "amount": 5}"#;
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        use std::io::Write;
        write!(
            stream,
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{order}",
            order.len()
        )
        .unwrap();
        wait_with_deadline(&mut child, Duration::from_secs(30))
    })
    .await;
    assert_eq!(
        status.code(),
        Some(141),
        "no panic, as a tool killed by SIGPIPE: {status:?}"
    );
    assert!(
        !home.postgres_running(),
        "the embedded Postgres was stopped"
    );
}

/// kill -9 leaves no Postgres behind either: a watcher stops it.
#[tokio::test]
async fn a_killed_serve_leaves_no_postgres_running() {
    let home = std::sync::Arc::new(Home::new());
    let h = home.clone();
    let mut child = blocking(move || {
        let mut child = h
            .command("a", &["serve", "--roles", "relay"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        for line in lines {
            if line.unwrap().contains("relay became leader") {
                break;
            }
        }
        child
    })
    .await;
    assert!(home.postgres_running());
    child.kill().unwrap();
    child.wait().unwrap();
    eventually(
        "the embedded Postgres to stop",
        Duration::from_secs(30),
        || async { (!home.postgres_running()).then_some(()) },
    )
    .await;
}

/// Usage errors are clap's: exit 2 and the usage.
#[tokio::test]
async fn usage_errors_exit_2_with_the_usage() {
    for args in [
        &["replay", "--dry-run"][..],
        &["--verbose"][..],
        &["--bogus"][..],
    ] {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::cli::outbox_relay(None, &args)
        })
        .await;
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let message = stderr(&out);
        assert!(message.contains("Usage: outbox-relay"), "{message}");
        assert!(!message.contains("--version <COMMAND>"), "{message}");
    }
}

/// A mail directory whose parent does not exist is refused at start, in
/// one line, and nothing is created.
#[tokio::test]
async fn a_mail_directory_without_its_parent_is_refused() {
    let db = TestDb::migrated().await;
    let missing = format!("/nonexistent-{:x}", rand::random::<u32>());
    let url = db.url.clone();
    let target = format!("file://{missing}/mail");
    let out = blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["serve", "--roles", "mail", "--smtp-url", &target])
            .env("DATABASE_URL", &url)
            .output()
            .unwrap()
    })
    .await;
    assert_one_line_failure(&out, "does not exist");
    assert!(!Path::new(&missing).exists());
}

/// Waits for `child` to exit, killing it (and failing) after `limit`.
fn wait_with_deadline(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
