//! The console's pages on a big log: each page's server time (p50, p95)
//! with 10,000,000 records in `order-created`, as many orders and ledger
//! rows, 50 consumer groups and 1,000 dead letters; and what the
//! overview's live stream costs the database with 1 and with 25 browsers
//! watching (transactions per second, from `pg_stat_database`).
//!
//!   cargo run --release --example console_bench                  # 10M records
//!   RECORDS=1000000 cargo run --release --example console_bench  # smaller
//!
//! DATABASE_URL names an admin connection (default the local server); a
//! scratch database is made and dropped. Filling 10M records takes a few
//! minutes; the pages are then measured one request at a time from
//! loopback (30 requests each after 3 to warm up).

#[path = "support/kafka_api.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use outbox_relay::builder::{bind, Application, Settings};

const GROUPS: i64 = 50;
const DEAD_LETTERS: i64 = 1_000;
const RUNS: usize = 30;
const WARM_UP: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let records: i64 = std::env::var("RECORDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10_000_000);
    support::in_scratch_database(&admin, "console_bench", |url| async move {
        outbox_relay::migrate::apply_all(&url).await?;
        let started = Instant::now();
        fill(&url, records).await?;
        println!(
            "filled {records} records, orders and ledger rows, {GROUPS} groups, {DEAD_LETTERS} dead letters in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        measure(&url, records).await
    })
    .await
}

/// The log, orders, ledger, groups and dead letters, written by SQL in
/// batches of a million (what the relay and the mail worker would have
/// written, without waiting for them).
async fn fill(url: &str, records: i64) -> anyhow::Result<()> {
    let mut client = outbox_relay::db::connect(url).await?;
    let tx = client.transaction().await?;
    outbox_relay::log::storage::ensure_day_partitions(&tx).await?;
    tx.commit().await?;
    let batch = 1_000_000;
    let mut from = 0;
    while from < records {
        let to = (from + batch).min(records) - 1;
        client
            .execute(
                "INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
                 SELECT 'order-created', (n % 8)::int, n / 8, (n + 1)::text,
                        jsonb_build_object('event-type', 'OrderCreated'),
                        jsonb_build_object('order_id', n + 1, 'user_id', n % 1000 + 1, 'amount', 1000 + n % 5000,
                                           'email', 'customer' || (n + 1) || '@example.com'),
                        now() - make_interval(secs => ($3 - n) * 0.25), now(), n + 1
                   FROM generate_series($1::int8, $2::int8) n",
                &[&from, &to, &records],
            )
            .await?;
        client
            .execute(
                "INSERT INTO orders (id, user_id, email, amount, created_at) OVERRIDING SYSTEM VALUE
                 SELECT n + 1, n % 1000 + 1, 'customer' || (n + 1) || '@example.com', 1000 + n % 5000,
                        now() - make_interval(secs => ($3 - n) * 0.25)
                   FROM generate_series($1::int8, $2::int8) n",
                &[&from, &to, &records],
            )
            .await?;
        client
            .execute(
                "INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", key, message_id, recipient, status, attempts, sent_at)
                 SELECT 'mail-service', 'order-created', (n % 8)::int, n / 8, (n + 1)::text,
                        '<order-created.' || (n % 8) || '.' || (n / 8) || '@outbox-relay>',
                        'customer' || (n + 1) || '@example.com', 'sent', 1, now()
                   FROM generate_series($1::int8, $2::int8) n",
                &[&from, &to],
            )
            .await?;
        from = to + 1;
        eprintln!("  {from} of {records}");
    }
    client
        .batch_execute(&format!(
            "SELECT setval(pg_get_serial_sequence('orders', 'id'), {records});
             UPDATE partition_heads h SET log_end_offset = coalesce(
                 (SELECT max(e.\"offset\") + 1 FROM event_log e WHERE e.topic = h.topic AND e.partition = h.partition), 0)
              WHERE h.topic = 'order-created';
             INSERT INTO event_log_time_index (topic, partition, base_offset, last_offset, max_created_at)
             SELECT topic, partition, min(\"offset\"), max(\"offset\"), max(created_at)
               FROM event_log GROUP BY topic, partition, \"offset\" / 5000;
             INSERT INTO group_partitions (group_id, topic, partition, committed_offset, committed_at)
             SELECT 'group-' || lpad(g::text, 2, '0'), h.topic, h.partition,
                    CASE WHEN g % 10 = 9 THEN NULL ELSE greatest(h.log_end_offset - g * 1000, 0) END, now()
               FROM generate_series(0, {groups} - 1) g, partition_heads h WHERE h.topic = 'order-created';
             INSERT INTO group_partitions (group_id, topic, partition, committed_offset, committed_at)
             SELECT 'mail-service', topic, partition, log_end_offset, now() FROM partition_heads WHERE topic = 'order-created';
             INSERT INTO dead_letters (group_id, topic, partition, \"offset\", key, headers, payload, reason, attempts, last_error)
             SELECT 'mail-service', topic, partition, \"offset\", key, headers, payload, 'permanent_failure', 1,
                    '550 5.1.1 mailbox unavailable'
               FROM event_log WHERE topic = 'order-created' AND partition = 0 AND \"offset\" < {dead};",
            groups = GROUPS,
            dead = DEAD_LETTERS,
        ))
        .await?;
    client.batch_execute("VACUUM ANALYZE").await?;
    Ok(())
}

/// The console in this process, on a loopback port of its own.
async fn start(url: &str) -> anyhow::Result<(Application, String)> {
    let listener = bind("127.0.0.1:0".parse()?)?;
    let base = format!("http://{}/console", listener.local_addr()?);
    let settings = Settings {
        console: Some(outbox_relay::console::ConsoleSettings {
            listener: Some(listener),
            access: Default::default(),
            read_only: false,
            browse_url: None,
            replay_mail_args: vec!["--mail-from".into(), "shop@example.com".into()],
            data_dir: std::env::temp_dir(),
        }),
        migrate: false,
        ..Settings::default()
    };
    Ok((Application::start(settings, url).await?, base))
}

/// A page's path for its i-th request (each request asks for another order,
/// offset or time).
type PathOf = Box<dyn Fn(usize) -> String + 'static>;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn measure(url: &str, records: i64) -> anyhow::Result<()> {
    let (application, base) = start(url).await?;
    let http = reqwest::Client::new();
    // A session and its CSRF token, for the reset's preview (a POST).
    let page = http
        .get(format!("{base}/dead-letters"))
        .header("accept", "text/html")
        .send()
        .await?;
    let cookie = page
        .headers()
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_string();
    let text = page.text().await?;
    let csrf = text
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();

    let any_id = move |i: usize| ((i as i64 * 7_919_113) % records) + 1;
    let per_partition = records / 8;
    let pages: Vec<(&str, PathOf)> = vec![
        ("overview", Box::new(|_| "/".into())),
        (
            "order by id",
            Box::new(move |i| format!("/orders?q={}", any_id(i))),
        ),
        (
            "order by email",
            Box::new(move |i| format!("/orders?q=customer{}@example.com", any_id(i))),
        ),
        ("topics", Box::new(|_| "/topics".into())),
        ("topic", Box::new(|_| "/topics/order-created".into())),
        (
            "records: newest",
            Box::new(|i| format!("/topics/order-created/{}?newest=1", i % 8)),
        ),
        (
            "records: from an offset",
            Box::new(move |i| {
                format!(
                    "/topics/order-created/{}?from={}",
                    i % 8,
                    (i as i64 * 104_729) % per_partition
                )
            }),
        ),
        (
            "records: from a time",
            Box::new(move |i| {
                let back = (i as i64 * 3_600 * 7) % (records / 4);
                format!(
                    "/topics/order-created/{}?time={}",
                    i % 8,
                    (chrono::Utc::now() - chrono::Duration::seconds(back))
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            }),
        ),
        (
            "records: by key",
            Box::new(move |i| format!("/topics/order-created?key={}", any_id(i))),
        ),
        ("groups", Box::new(|_| "/groups".into())),
        (
            "group",
            Box::new(|i| format!("/groups/group-{:02}", i % 50)),
        ),
        ("dead letters", Box::new(|_| "/dead-letters".into())),
        ("replays", Box::new(|_| "/replays".into())),
        ("audit", Box::new(|_| "/audit".into())),
    ];
    println!("\n{records} records, {GROUPS} groups; {RUNS} requests per page after {WARM_UP} to warm up\n");
    println!("| page | p50 ms | p95 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, path) in &pages {
        let mut times = Vec::new();
        for i in 0..WARM_UP + RUNS {
            let started = Instant::now();
            let response = http
                .get(format!("{base}{}", path(i)))
                .header("accept", "text/html")
                .header("cookie", &cookie)
                .send()
                .await?;
            let status = response.status();
            response.bytes().await?;
            anyhow::ensure!(status.is_success(), "{name}: {status}");
            if i >= WARM_UP {
                times.push(started.elapsed());
            }
        }
        times.sort();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            percentile(&times, 0.5),
            percentile(&times, 0.95),
            percentile(&times, 1.0)
        );
    }
    let mut times = Vec::new();
    for i in 0..WARM_UP + RUNS {
        let started = Instant::now();
        let response = http
            .post(format!("{base}/groups/group-{:02}/reset", i % 50))
            .header("cookie", &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("step", "preview"),
                ("to", "duration"),
                ("value", "P1D"),
            ])
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        anyhow::ensure!(status.is_success(), "reset preview: {status}");
        if i >= WARM_UP {
            times.push(started.elapsed());
        }
    }
    times.sort();
    println!(
        "| reset preview (back 1 day, 8 partitions) | {:.1} | {:.1} | {:.1} |",
        percentile(&times, 0.5),
        percentile(&times, 0.95),
        percentile(&times, 1.0)
    );

    // The live stream: transactions per second the database sees with
    // 1 and 25 browsers watching the overview (nothing else runs here).
    let stats = outbox_relay::db::connect(url).await?;
    let transactions = || async {
        let row = stats
            .query_one(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?;
        anyhow::Ok(row.get::<_, i64>(0))
    };
    println!("\n| overview watchers | database transactions per second (incl. this probe's 1) |");
    println!("|---:|---:|");
    // Statistics reach pg_stat_database a while after a backend's work:
    // let the pages' requests settle first.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for watchers in [1usize, 25, 0] {
        let mut streams = Vec::new();
        for _ in 0..watchers {
            let response = http
                .get(format!("{base}/events"))
                .header("cookie", &cookie)
                .send()
                .await?;
            streams.push(tokio::spawn(async move {
                let mut response = response;
                while let Ok(Some(_)) = response.chunk().await {}
            }));
        }
        tokio::time::sleep(Duration::from_secs(12)).await;
        let before = transactions().await?;
        let window = Duration::from_secs(20);
        tokio::time::sleep(window).await;
        let after = transactions().await?;
        println!(
            "| {watchers} | {:.2} |",
            (after - before) as f64 / window.as_secs_f64()
        );
        for s in streams {
            s.abort();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    application.stop().await
}
