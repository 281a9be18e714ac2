//! The Kafka front end read from the start: one librdkafka consumer reads
//! every record of `order-created` through the `kafka-api` role, next to a
//! same-run ceiling: the same rows read with one streaming `COPY … TO
//! STDOUT (FORMAT binary)` of the log table into memory. Then live: orders
//! written at 200/s (each its own transaction, then `NOTIFY
//! outbox_written`, as a writer elsewhere does), relayed, and read by a
//! consumer group member waiting at the log end: order commit → `poll()`
//! returns it.
//!
//! ```sh
//! cargo run --release --example kafka_api_bench -- postgres://postgres@127.0.0.1:5432/postgres [records]
//! ```
//!
//! The URL is an admin URL (the benchmark creates and drops its own
//! database). The role listens on a free loopback port in this process.

use std::time::{Duration, Instant};

use futures_util::{pin_mut, TryStreamExt};
use outbox_relay::relay::{Relay, RelayConfig, StepOutcome};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

#[path = "support/kafka_api.rs"]
mod support;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: kafka_api_bench <admin postgres url> [records]";
    let admin = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let records: i64 = args
        .get(2)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    support::in_scratch_database(&admin, "kafka_api_bench", |url| async move {
        run(&url, records).await
    })
    .await
}

async fn run(url: &str, records: i64) -> anyhow::Result<()> {
    outbox_relay::migrate::apply_all(url).await?;
    let client = outbox_relay::db::connect(url).await?;
    let mut n = 0;
    while n < records {
        let end = (n + 50_000).min(records);
        client
            .execute(
                "INSERT INTO outbox (topic, key, payload, headers)
                 SELECT 'order-created', n::text,
                        jsonb_build_object('order_id', n, 'user_id', n % 1000 + 1, 'amount', 1000 + n % 5000,
                                           'email', 'customer' || n || '@example.com'),
                        jsonb_build_object('traceparent', '00-' || lpad(to_hex(n), 32, '0') || '-00f067aa0ba902b7-01')
                   FROM generate_series($1::int8, $2::int8) n",
                &[&(n + 1), &end],
            )
            .await?;
        n = end;
    }
    let mut relay = Relay::new(url, RelayConfig::default());
    while !matches!(relay.step().await?, StepOutcome::Idle) {}
    relay.release().await?;
    // Both tables settled, so that autovacuum on them does not run during
    // the measured phases (it did, on two cores: a tail in the live phase).
    for table in ["event_log", "outbox"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    println!("log: {records} records in order-created (8 partitions)");

    // The ceiling: every record's columns streamed out of Postgres.
    let started = Instant::now();
    let copy = client
        .copy_out(
            "COPY (SELECT partition, \"offset\", key, created_at, headers, payload FROM event_log
                    WHERE topic = 'order-created' ORDER BY partition, \"offset\")
             TO STDOUT (FORMAT binary)",
        )
        .await?;
    pin_mut!(copy);
    let mut bytes = 0usize;
    while let Some(chunk) = copy.try_next().await? {
        bytes += chunk.len();
    }
    let ceiling = started.elapsed();

    // The consumer, through the kafka-api role.
    let (application, bootstrap) = support::start(url, None).await?;
    let elapsed = support::read_all(&bootstrap, records).await?;
    application.stop().await?;
    let (p50, p99, max) = live_latency(url, 2_000, 200.0).await?;

    let ceiling_rate = records as f64 / ceiling.as_secs_f64();
    let rate = records as f64 / elapsed.as_secs_f64();
    println!(
        "ceiling (COPY … TO STDOUT binary, {} MiB): {:.2} s = {:.0} records/s",
        bytes / (1 << 20),
        ceiling.as_secs_f64(),
        ceiling_rate
    );
    println!(
        "librdkafka through kafka-api: {:.2} s = {:.0} records/s = {:.2} of the ceiling",
        elapsed.as_secs_f64(),
        rate,
        rate / ceiling_rate
    );
    println!(
        "live, 2,000 orders at 200/s, order commit -> poll(): p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms"
    );
    Ok(())
}

/// Orders written at `rate` per second while a consumer waits at the log
/// end; the latency of each from its commit (its `created_at`, the
/// writer's transaction time, read back after the commit) to `poll()`.
async fn live_latency(url: &str, orders: usize, rate: f64) -> anyhow::Result<(f64, f64, f64)> {
    let (application, bootstrap) = support::start(url, Some(Duration::from_secs(3))).await?;
    // A member of a consumer group, as services read, starting at the log
    // end (a new group, auto.offset.reset=latest).
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "kafka-api-latency")
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "500")
        .create()?;
    let client = outbox_relay::db::connect(url).await?;
    consumer.subscribe(&["order-created"])?;
    // Each record's arrival time, by key.
    let reader = tokio::task::spawn_blocking(move || {
        let mut arrived = std::collections::HashMap::new();
        let started = Instant::now();
        while arrived.len() < orders && started.elapsed() < Duration::from_secs(120) {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.expect("a record");
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).to_string();
                arrived.insert(key, chrono::Utc::now());
            }
        }
        arrived
    });
    // Let the consumer join its group and its first fetches reach the
    // log end.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut committed = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    for n in 0..orders {
        tick.tick().await;
        let key = format!("live-{n}");
        let row = client
            .query_one(
                "INSERT INTO outbox (topic, key, payload) VALUES ('order-created', $1,
                   jsonb_build_object('order_id', $2::int8, 'email', 'live@example.com'))
                 RETURNING created_at",
                &[&key, &(n as i64)],
            )
            .await?;
        let created: chrono::DateTime<chrono::Utc> = row.get(0);
        client.batch_execute("NOTIFY outbox_written").await?;
        committed.insert(key, created);
    }
    let arrived = reader.await?;
    application.stop().await?;
    anyhow::ensure!(
        arrived.len() == orders,
        "read {} of {orders} live orders",
        arrived.len()
    );
    let mut latencies: Vec<f64> = committed
        .iter()
        .map(|(key, created)| {
            (arrived[key] - *created).num_microseconds().unwrap_or(0) as f64 / 1000.0
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok((at(0.5), at(0.99), latencies[latencies.len() - 1]))
}
