//! Relay benchmark: backlog throughput and idle commit-to-log latency, each
//! next to the Postgres ceiling measured in the same run.
//!
//! ```sh
//! cargo run --release --example relay_bench -- postgres://postgres@127.0.0.1:5432/postgres [rows]
//! ```
//!
//! The URL is an admin URL; the benchmark creates (and drops) its own
//! databases there. `RELAY_BENCH_DROP_INDEXES=name,…` drops those indexes
//! after migrating (what an index costs the append, measured in one run). Use a server with durable commits (fsync on) to measure
//! what production would see.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outbox_relay::log::notify::APPENDED_CHANNEL as LOG_NOTIFY_CHANNEL;
use outbox_relay::relay::{Relay, RelayConfig, StepOutcome};
use tokio_postgres::{AsyncMessage, NoTls};

const PAYLOAD_SQL: &str =
    "jsonb_build_object('order_id', n, 'user_id', n % 1000 + 1, 'amount', 1000 + n % 5000,
                                               'email', 'customer' || n || '@example.com')";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let admin = args
        .get(1)
        .cloned()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .ok_or_else(|| anyhow::anyhow!("usage: relay_bench <admin postgres url> [rows]"))?;
    let rows: i64 = args
        .get(2)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.clone());
    let admin_client = outbox_relay::db::connect(&admin).await?;
    let settings = admin_client
        .query_one(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit'), version()",
            &[],
        )
        .await?;
    println!(
        "server: fsync={} synchronous_commit={} ({})",
        settings.get::<_, String>(0),
        settings.get::<_, String>(1),
        settings
            .get::<_, String>(2)
            .split(',')
            .next()
            .unwrap_or_default()
    );

    // ── Backlog throughput ──────────────────────────────────────────────
    // Names unique to this run: two runs never drop each other's databases.
    let run = format!("{:08x}", rand::random::<u32>());
    let names = [
        format!("bench_relay_{run}"),
        format!("bench_ceiling_{run}"),
        format!("bench_batched_{run}"),
    ];
    let mut urls = Vec::new();
    for name in &names {
        let url = fresh_db(&admin_client, &base, name).await?;
        preload(&url, rows).await?;
        urls.push(url);
    }
    let [relay_db, ceiling_db, batched_db] = [&urls[0], &urls[1], &urls[2]];
    // The load's dirty pages written out now, not during the first timing.
    admin_client.batch_execute("CHECKPOINT").await?;

    // Ceiling 1: the whole backlog in one statement.
    let client = outbox_relay::db::connect(ceiling_db).await?;
    let started = Instant::now();
    let moved = client
        .execute(
            "INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
             SELECT topic, p, row_number() OVER (PARTITION BY p ORDER BY txid, id) - 1,
                    key, headers, payload, created_at, now(), id
               FROM (SELECT *, (hashtext(key) & 2147483647) % 8 AS p FROM outbox) o",
            &[],
        )
        .await?;
    let ceiling_secs = started.elapsed().as_secs_f64();
    let ceiling_rate = moved as f64 / ceiling_secs;

    // Ceiling 2: one statement per batch of the relay's largest size, each
    // its own transaction, offsets continuing from the log's end.
    let batch = RelayConfig::default().max_batch;
    let client = outbox_relay::db::connect(batched_db).await?;
    let started = Instant::now();
    let mut after = 0i64;
    let mut batched_moved = 0u64;
    loop {
        let row = client
            .query_one(
                "WITH batch AS (
                     SELECT *, (hashtext(key) & 2147483647) % 8 AS p FROM outbox
                      WHERE id > $1 ORDER BY id LIMIT $2),
                 heads AS MATERIALIZED (
                     SELECT p, coalesce((SELECT max(\"offset\") + 1 FROM event_log e
                                          WHERE e.topic = 'order-created' AND e.partition = p), 0) AS next
                       FROM generate_series(0, 7) p),
                 appended AS (
                     INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
                     SELECT b.topic, b.p, h.next + row_number() OVER (PARTITION BY b.p ORDER BY b.id) - 1,
                            b.key, b.headers, b.payload, b.created_at, now(), b.id
                       FROM batch b JOIN heads h USING (p)
                     RETURNING outbox_id)
                 SELECT count(*), coalesce(max(outbox_id), 0) FROM appended",
                &[&after, &batch],
            )
            .await?;
        let moved: i64 = row.get(0);
        if moved == 0 {
            break;
        }
        batched_moved += moved as u64;
        after = row.get(1);
    }
    let batched_secs = started.elapsed().as_secs_f64();
    let batched_rate = batched_moved as f64 / batched_secs;

    let mut relay = Relay::new(relay_db, RelayConfig::default());
    let started = Instant::now();
    let mut batches = 0u64;
    loop {
        match relay.step().await? {
            StepOutcome::Idle => break,
            StepOutcome::Moved { .. } => batches += 1,
            _ => {}
        }
    }
    let relay_secs = started.elapsed().as_secs_f64();
    relay.release().await?;
    let client = outbox_relay::db::connect(relay_db).await?;
    let appended: i64 = client
        .query_one("SELECT count(*) FROM event_log", &[])
        .await?
        .get(0);
    anyhow::ensure!(appended == rows, "relay appended {appended} of {rows}");
    let relay_rate = rows as f64 / relay_secs;
    println!("\nbacklog of {rows} outbox rows:");
    println!(
        "  ceiling (one INSERT ... SELECT):  {ceiling_secs:7.2} s  {ceiling_rate:>10.0} rows/s"
    );
    println!(
        "  one INSERT ... SELECT per {batch} rows: {batched_secs:7.2} s  {batched_rate:>10.0} rows/s"
    );
    println!(
        "  relay ({batches} batches):          {relay_secs:7.2} s  {relay_rate:>10.0} events/s  = {:.2} of one statement, {:.2} of one per batch",
        relay_rate / ceiling_rate,
        relay_rate / batched_rate
    );

    // ── Idle latency: commit → appended (notification received) ─────────
    let (trigger, shutdown) = outbox_relay::shutdown::channel();
    let relay_task = tokio::spawn(Relay::new(relay_db, RelayConfig::default()).run(shutdown));
    let (listener, mut connection) = outbox_relay::db::parse_url(relay_db)?
        .connect(NoTls)
        .await?;
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                let _ = notify_tx.send(Instant::now());
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {LOG_NOTIFY_CHANNEL}"))
        .await?;
    let writer = outbox_relay::db::connect(relay_db).await?;
    // Same-run ceiling for latency: a bare commit of the same INSERT.
    let mut commit_times = Vec::new();
    let mut latencies = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    while notify_rx.try_recv().is_ok() {}
    for i in 0..400 {
        let t0 = Instant::now();
        writer
            .execute(
                "INSERT INTO outbox (topic, key, payload) VALUES ('order-created', $1, '{}')",
                &[&format!("lat-{i}")],
            )
            .await?;
        let committed = Instant::now();
        commit_times.push(committed - t0);
        let appended = tokio::time::timeout(Duration::from_secs(5), notify_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("listener closed"))?;
        latencies.push(appended.saturating_duration_since(committed));
        // Let the relay fall idle again (idle is what is measured), with jitter.
        tokio::time::sleep(Duration::from_millis(20 + rand::random::<u64>() % 30)).await;
    }
    trigger.trigger();
    relay_task.await?;
    println!("\nidle system, {} single-row commits:", latencies.len());
    println!(
        "  commit itself (ceiling for a round trip): {}",
        summary(&mut commit_times)
    );
    println!(
        "  commit -> in the log:                     {}",
        summary(&mut latencies)
    );

    drop(client);
    drop(writer);
    drop(listener);
    for db in &names {
        admin_client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await?;
    }
    Ok(())
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let pct = |p: f64| {
        samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    )
}

async fn fresh_db(
    admin: &tokio_postgres::Client,
    base: &str,
    name: &str,
) -> anyhow::Result<String> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = format!("{base}/{name}");
    outbox_relay::migrate::apply_all(&url).await?;
    // RELAY_BENCH_DROP_INDEXES=a,b: what those indexes cost the append.
    if let Ok(indexes) = std::env::var("RELAY_BENCH_DROP_INDEXES") {
        let client = outbox_relay::db::connect(&url).await?;
        for index in indexes.split(',').filter(|i| !i.is_empty()) {
            client.batch_execute(&format!("DROP INDEX {index}")).await?;
        }
    }
    Ok(url)
}

/// `rows` outbox rows written by many small transactions, as producers would.
async fn preload(url: &str, rows: i64) -> anyhow::Result<()> {
    let client = outbox_relay::db::connect(url).await?;
    let per_tx = 1000;
    let mut n = 0;
    while n < rows {
        let end = (n + per_tx).min(rows);
        client
            .execute(
                &format!(
                    "INSERT INTO outbox (topic, key, payload, headers)
                     SELECT 'order-created', n::text, {PAYLOAD_SQL}, '{{\"event-type\": \"OrderCreated\"}}'
                       FROM generate_series($1::int8, $2::int8) n"
                ),
                &[&(n + 1), &end],
            )
            .await?;
        n = end;
    }
    client.batch_execute("VACUUM ANALYZE outbox").await?;
    Ok(())
}
