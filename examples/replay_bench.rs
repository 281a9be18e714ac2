//! Replay benchmark: planning over a large log, replay throughput into an
//! SMTP sink, and what a resumed run reads again.
//!
//! ```sh
//! smtp-sink -u nobody 127.0.0.1:2525 256 &          # Debian package postfix
//! cargo run --release --example replay_bench -- \
//!     postgres://postgres@127.0.0.1:5432/postgres smtp://127.0.0.1:2525 [log records] [replayed records]
//! ```
//!
//! It creates its own database (a random name, dropped at the end), fills
//! the log of `order-created` (8 partitions) with `log records` (default
//! 10,000,000) created over 60 days in time order, with the sparse time
//! index the relay would have written (one entry per 1,000 records per
//! partition), then:
//!
//! * **plan**: the times → offsets plan of a replay of the last 30 days,
//!   for every partition (median of 20);
//! * **replay**: the first `replayed records` (default 1,000,000) replayed
//!   into the SMTP server, one process, SMTP pool 32: mails/s;
//! * **resume**: a replay stopped mid-run (its task dropped, as a kill would)
//!   and resumed: how many settled records the resumed run read again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::app::mail::{Limits, MailReplay, RetryPolicy, SmtpTarget};
use outbox_relay::app::replay::{self, Progress, ReplaySettings};
use outbox_relay::log::ranges::{Bound, Bounds, PartitionRange};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: replay_bench <admin postgres url> <smtp url> [log records] [replayed records]";
    let admin = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let smtp_url = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let log_records: i64 = args
        .get(3)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let replayed: i64 = args
        .get(4)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let name = format!("bench_replay_{:08x}", rand::random::<u32>());
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.clone());
    let admin_client = outbox_relay::db::connect(&admin).await?;
    admin_client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = format!("{base}/{name}");
    let result = bench(&url, &smtp_url, log_records, replayed).await;
    admin_client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await?;
    result
}

async fn bench(url: &str, smtp_url: &str, log_records: i64, replayed: i64) -> anyhow::Result<()> {
    outbox_relay::migrate::apply_all(url).await?;
    let mut client = outbox_relay::db::connect(url).await?;

    // The log, as the relay would have left it: offsets by partition in
    // time order over 60 days, heads and a sparse time index.
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
             SELECT 'order-created', n % 8, n / 8, n::text, '{{}}',
                    jsonb_build_object('order_id', n, 'user_id', n % 1000 + 1, 'amount', 1000 + n % 5000,
                                       'email', 'customer' || n || '@example.com'),
                    now() - interval '60 days' + (n::float8 / {log_records} * interval '60 days'), now(), n
               FROM generate_series(0, {log_records} - 1) AS n;
             UPDATE partition_heads h SET log_end_offset = c.n, max_created_at = now()
               FROM (SELECT partition, count(*) AS n FROM event_log GROUP BY partition) c
              WHERE h.topic = 'order-created' AND h.partition = c.partition;
             INSERT INTO event_log_time_index (topic, partition, base_offset, last_offset, max_created_at)
             SELECT 'order-created', partition, \"offset\", least(\"offset\" + 999, h.log_end_offset - 1), e.created_at
               FROM event_log e JOIN partition_heads h USING (topic, partition)
              WHERE \"offset\" % 1000 = 0
             ON CONFLICT DO NOTHING;
             UPDATE event_log_time_index i SET max_created_at = e.created_at
               FROM event_log e
              WHERE e.topic = i.topic AND e.partition = i.partition AND e.\"offset\" = i.last_offset;"
        ))
        .await?;
    // One at a time: VACUUM cannot run inside the implicit transaction of a batch.
    for upkeep in [
        "VACUUM ANALYZE event_log_time_index",
        "ANALYZE event_log",
        "CHECKPOINT",
    ] {
        client.batch_execute(upkeep).await?;
    }
    println!(
        "log: {log_records} records over 60 days in 8 partitions, loaded in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // Planning: times -> offsets for every partition.
    let since = chrono::Utc::now() - chrono::Duration::days(30);
    let mut timings = Vec::new();
    let mut total = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let ranges = outbox_relay::log::ranges::plan(
            &client,
            "order-created",
            None,
            &Bounds::All(Bound::Time(since)),
            &Bounds::All(Bound::Latest),
        )
        .await?;
        timings.push(started.elapsed());
        total = ranges.iter().map(PartitionRange::count).sum::<i64>();
    }
    timings.sort();
    println!(
        "plan: the last 30 days ({total} records, 8 partitions) planned in {:.1} ms (median of 20; max {:.1} ms)",
        timings[10].as_secs_f64() * 1e3,
        timings[19].as_secs_f64() * 1e3
    );

    // Throughput: the first `replayed` records, 8 partitions.
    let per_partition = replayed / 8;
    let ranges: Vec<PartitionRange> = (0..8)
        .map(|p| PartitionRange {
            partition: p,
            from: 0,
            to: per_partition,
            log_start_offset: 0,
            log_end_offset: per_partition,
        })
        .collect();
    let mail = Arc::new(MailReplay {
        transport: SmtpTarget::parse(smtp_url)?
            .transport(32, Limits::new(Duration::from_secs(15)))?,
        letterhead: outbox_relay::app::mail::Letterhead {
            from: "shop@example.com".parse()?,
            currency: Default::default(),
        },
    });
    let settings = ReplaySettings {
        retry: RetryPolicy::default(),
        max_rate: None,
        resend_in_doubt: false,
        window: 128,
    };
    let run_id = replay::create_run(
        &mut client,
        "order-created",
        &serde_json::json!({"bench": "throughput"}),
        &ranges,
    )
    .await?;
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    replay::run(
        url,
        run_id,
        mail.clone(),
        settings.clone(),
        progress.clone(),
        outbox_relay::shutdown::Shutdown::never(),
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let sent = progress.sent.load(Ordering::Relaxed);
    println!(
        "replay: {sent} mails in {secs:.1} s = {:.0} mails/s (one process, SMTP pool 32, 8 partitions)",
        sent as f64 / secs
    );

    // Resume: stop a run a few seconds in (its task dropped, like a kill),
    // resume it, count what it reads again.
    let small: Vec<PartitionRange> = ranges
        .iter()
        .map(|r| PartitionRange {
            to: r.to.min(5_000),
            ..r.clone()
        })
        .collect();
    let run_id = replay::create_run(
        &mut client,
        "order-created",
        &serde_json::json!({"bench": "resume"}),
        &small,
    )
    .await?;
    let progress = Arc::new(Progress::default());
    let owned_url = url.to_string();
    let (settings_for_kill, progress_for_kill) = (settings.clone(), progress.clone());
    let mail_for_kill = mail.clone();
    let killed = tokio::spawn(async move {
        replay::run(
            &owned_url,
            run_id,
            mail_for_kill,
            settings_for_kill,
            progress_for_kill,
            outbox_relay::shutdown::Shutdown::never(),
        )
        .await
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    killed.abort();
    let _ = killed.await;
    let before = progress.sent.load(Ordering::Relaxed);
    // The claim's connection closes with the dropped task; give the server a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resumed = Arc::new(Progress::default());
    replay::run(
        url,
        run_id,
        mail,
        settings,
        resumed.clone(),
        outbox_relay::shutdown::Shutdown::never(),
    )
    .await?;
    println!(
        "resume: stopped after {before} mails; the resumed run read {} settled records again, sent {}, skipped {} in doubt; a read-ahead batch is 128 records per partition, 1,024 in all",
        resumed.reread.load(Ordering::Relaxed),
        resumed.sent.load(Ordering::Relaxed),
        resumed.in_doubt.load(Ordering::Relaxed),
    );
    Ok(())
}
