//! The same records read by the same client from outbox-relay's Kafka
//! front end and from tansu (a Kafka-protocol broker, crates.io; built by
//! `tests/run` into ~/.cache/outbox-relay, or TANSU_BIN): librdkafka (the
//! `rdkafka` crate) reads every record of an 8-partition `order-created`
//! from the start, alternately from each, several rounds.
//!
//! ```sh
//! cargo run --release --example kafka_api_vs_tansu -- postgres://postgres@127.0.0.1:5432/postgres [records] [rounds]
//! ```
//!
//! tansu 0.6.0 is built with its sqlite storage (what `tests/run` builds;
//! its memory storage needs a feature that build lacks), and read by
//! librdkafka it delivers nothing from a partition holding more than about
//! 1 MB (tests/it/kafka.rs): the default, 20,000 records, keeps each
//! partition near 600 KB.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outbox_relay::builder::bind;
use outbox_relay::relay::{Relay, RelayConfig, StepOutcome};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[path = "support/kafka_api.rs"]
mod support;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: kafka_api_vs_tansu <admin postgres url> [records] [rounds]";
    let admin = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let records: i64 = args
        .get(2)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rounds: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let tansu = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outbox-relay/tansu-0.6.0/bin/tansu")
        });
    anyhow::ensure!(
        tansu.exists(),
        "no tansu at {} (tests/run builds it; or TANSU_BIN)",
        tansu.display()
    );
    support::in_scratch_database(&admin, "kafka_api_vs_tansu", |url| async move {
        run(&url, &tansu, records, rounds).await
    })
    .await
}

async fn run(
    url: &str,
    tansu: &std::path::Path,
    records: i64,
    rounds: usize,
) -> anyhow::Result<()> {
    outbox_relay::migrate::apply_all(url).await?;
    let client = outbox_relay::db::connect(url).await?;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload, headers)
             SELECT 'order-created', n::text,
                    jsonb_build_object('order_id', n, 'user_id', n % 1000 + 1, 'amount', 1000 + n % 5000,
                                       'email', 'customer' || n || '@example.com'),
                    jsonb_build_object('traceparent', '00-' || lpad(to_hex(n), 32, '0') || '-00f067aa0ba902b7-01')
               FROM generate_series(1, $1::int8) n",
            &[&records],
        )
        .await?;
    let mut relay = Relay::new(url, RelayConfig::default());
    while !matches!(relay.step().await?, StepOutcome::Idle) {}
    relay.release().await?;

    // tansu, holding the same records at the same partitions.
    let folder = std::env::temp_dir().join(format!("tansu-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&folder)?;
    let port = bind("127.0.0.1:0".parse()?)?.local_addr()?.port();
    let listener = format!("tcp://127.0.0.1:{port}");
    let mut broker = tokio::process::Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &listener,
        ])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(&folder)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let bootstrap = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(&bootstrap).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "tansu did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    for created in admin
        .create_topics(
            [&NewTopic::new(
                "order-created",
                8,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await?
    {
        created.map_err(|(topic, e)| anyhow::anyhow!("creating {topic} in tansu: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "20")
        .set("compression.type", "none")
        .create()?;
    let rows = client
        .query(
            "SELECT partition, key, payload::text, headers, created_at FROM event_log
              WHERE topic = 'order-created' ORDER BY partition, \"offset\"",
            &[],
        )
        .await?;
    let loading = Instant::now();
    let mut sends = Vec::with_capacity(rows.len());
    for row in &rows {
        let (partition, key, payload): (i32, Option<String>, String) =
            (row.get(0), row.get(1), row.get(2));
        let headers: serde_json::Value = row.get(3);
        let created: chrono::DateTime<chrono::Utc> = row.get(4);
        let mut owned = OwnedHeaders::new();
        for (name, value) in headers.as_object().into_iter().flatten() {
            let text = value
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| value.to_string());
            owned = owned.insert(Header {
                key: name,
                value: Some(&text),
            });
        }
        let mut record = FutureRecord::to("order-created")
            .partition(partition)
            .payload(&payload)
            .headers(owned)
            .timestamp(created.timestamp_millis());
        if let Some(key) = &key {
            record = record.key(key);
        }
        sends.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for send in sends {
        send.await?.map_err(|(e, _)| e)?;
    }
    println!(
        "{} records in the log and in tansu (produced in {:.1} s)",
        rows.len(),
        loading.elapsed().as_secs_f64()
    );

    let (application, ours) = support::start(url, None).await?;
    let (mut from_us, mut from_tansu) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        from_us.push(support::read_all(&ours, records).await?.as_secs_f64());
        from_tansu.push(support::read_all(&bootstrap, records).await?.as_secs_f64());
    }
    application.stop().await?;
    broker.kill().await?;
    let _ = std::fs::remove_dir_all(&folder);
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (us, them) = (median(&mut from_us), median(&mut from_tansu));
    println!(
        "librdkafka reading {records} records from the start, median of {rounds}: \
         outbox-relay kafka-api {:.3} s ({:.0} records/s), tansu {:.3} s ({:.0} records/s): {:.2}x tansu's rate",
        us,
        records as f64 / us,
        them,
        records as f64 / them,
        them / us
    );
    Ok(())
}
