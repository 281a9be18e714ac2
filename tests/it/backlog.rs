//! Draining a backlog (docs/benchmarks.md, "Draining a backlog"): the mail
//! role, alone, on a log that already holds a large backlog written a
//! moment ago (no ANALYZE since: the ledger's statistics say empty), with
//! a small connection budget. It must start mailing at once, drain with
//! bounded memory, never starve its pool, and mail every event once.

use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;

const EVENTS: i64 = 200_000;
/// The mail process's peak RSS must stay below this (`VmHWM`): memory is a
/// function of the settings (read-ahead × partitions, the pool), not of
/// the backlog. Measured: about 40 MiB.
const PEAK_RSS_KIB: u64 = 100 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_at_once_with_bounded_memory_on_a_small_pool() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             SELECT 'order-created', 'u' || g, jsonb_build_object('order_id', g, 'user_id', 1 + g % 5000,
                    'amount', 100 + g, 'email', 'c' || g || '@example.com')
               FROM generate_series(1, $1::int8) g",
            &[&EVENTS],
        )
        .await
        .unwrap();
    drain(&mut db.relay()).await;

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("backlog-{:x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("mail.log");
    let mail_dir = dir.join("mail");
    let log = std::fs::File::create(&log_path).unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // 10 connections: /metrics 2, the member's own 3, 2 for reads and
    // commits, 3 for the delivery ledger.
    let mut child = binary(&db)
        .args([
            "serve",
            "--roles",
            "mail",
            "--no-migrate",
            "--max-db-connections",
            "10",
        ])
        .args(["--metrics-addr", &metrics_addr])
        .env("SMTP_URL", format!("file://{}", mail_dir.display()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();

    eventually("every event mailed", Duration::from_secs(600), || async {
        // A process that exited has no VmHWM (a zombie until waited for).
        assert!(
            peak_rss_kib(pid) > 0,
            "the mail process exited: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        let sent = count(
            &client,
            "SELECT count(*) FROM mail_deliveries WHERE status = 'sent'",
        )
        .await;
        (sent == EVENTS).then_some(())
    })
    .await;
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The high-water mark of the whole run, read while it still runs.
    let peak_kib = peak_rss_kib(pid);
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("serve stops within 30 s of SIGTERM")
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();

    // Every event mailed once: as many sends as events, and a file each.
    let sends = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outbox_relay_mail_sent_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(sends, Some(EVENTS as f64), "sends counted by the process");
    let files = std::fs::read_dir(&mail_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        .count();
    assert_eq!(files as i64, EVENTS);
    // The pool was never starved, and nothing failed.
    for bad in [
        "bookkeeping failed",
        "waiting for a slot",
        " WARN ",
        " ERROR ",
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(bad)).take(3).collect();
        assert!(lines.is_empty(), "{bad:?} in the log: {lines:?}");
    }
    // Mails flowed at once: the first within 2 s of the assignment.
    let assigned = log
        .lines()
        .find(|l| l.contains("assignment changed"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("an assignment line")
        .with_timezone(&chrono::Utc);
    let first: chrono::DateTime<chrono::Utc> = client
        .query_one("SELECT min(sent_at) FROM mail_deliveries", &[])
        .await
        .unwrap()
        .get(0);
    let waited = (first - assigned).to_std().unwrap_or_default();
    assert!(
        waited <= Duration::from_secs(2),
        "first mail {waited:?} after the assignment"
    );
    assert!(
        log.contains("draining a backlog"),
        "a progress line while draining"
    );
    assert!(
        peak_kib <= PEAK_RSS_KIB,
        "peak RSS {} MiB, more than {} MiB",
        peak_kib / 1024,
        PEAK_RSS_KIB / 1024
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `VmHWM` of a process, in KiB (0 once it is gone).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
