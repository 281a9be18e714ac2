//! Kafka mirror benchmark: records/s from a log backlog into a broker, next
//! to the broker's own produce ceiling in the same run (rdkafka producing
//! the same records, read into memory first, with the same settings).
//!
//! ```sh
//! cargo run --release --example kafka_bench -- postgres://postgres@127.0.0.1:5432/postgres 127.0.0.1:9092 [records]
//! ```
//!
//! The URL is an admin URL (the benchmark creates and drops its own
//! database). The broker must be running; topics are created per run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outbox_relay::kafka::mirror::PreparedMirror;
use outbox_relay::kafka::{KafkaSettings, MIRROR_GROUP};
use outbox_relay::relay::{Relay, RelayConfig, StepOutcome};
use outbox_relay::service::Service;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A log record as the ceiling produces it: partition, offset, key,
/// CreateTime (ms), headers, payload.
type InMemory = (i32, i64, String, i64, BTreeMap<String, String>, Vec<u8>);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: kafka_bench <admin postgres url> <brokers> [records]";
    let admin = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let brokers = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let records: i64 = args
        .get(3)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let run = format!("{:08x}", rand::random::<u32>());
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.clone());
    let admin_client = outbox_relay::db::connect(&admin).await?;
    let name = format!("kafka_bench_{run}");
    admin_client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = format!("{base}/{name}");
    outbox_relay::migrate::apply_all(&url).await?;

    // The log: `records` orders, relayed.
    let client = outbox_relay::db::connect(&url).await?;
    let mut n = 0;
    while n < records {
        let end = (n + 10_000).min(records);
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
    let mut relay = Relay::new(&url, RelayConfig::default());
    while !matches!(relay.step().await?, StepOutcome::Idle) {}
    relay.release().await?;
    println!("log: {records} records in order-created (8 partitions)");

    // The ceiling: the same records from memory, the mirror's settings.
    let mut settings = KafkaSettings::new(&brokers)?;
    let ceiling_topic = format!("ceiling-{run}");
    let mirror_topic = format!("mirror-{run}");
    let admin: AdminClient<DefaultClientContext> = settings.client_config()?.create()?;
    for topic in [&ceiling_topic, &mirror_topic] {
        for result in admin
            .create_topics(
                [&NewTopic::new(topic, 8, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await?
        {
            result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
    }
    let rows = client
        .query(
            "SELECT partition, \"offset\", key, (extract(epoch FROM created_at) * 1000)::int8, headers, payload
               FROM event_log ORDER BY partition, \"offset\"",
            &[],
        )
        .await?;
    let in_memory: Vec<InMemory> = rows
        .iter()
        .map(|r| {
            let headers: serde_json::Value = r.get(4);
            let headers = headers
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let payload: serde_json::Value = r.get(5);
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                headers,
                serde_json::to_vec(&payload).unwrap(),
            )
        })
        .collect();
    drop(rows);
    let producer: FutureProducer = settings.client_config()?.create()?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(in_memory.len());
    for (partition, offset, key, created_ms, headers, payload) in &in_memory {
        let offset = offset.to_string();
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        owned = owned.insert(Header {
            key: "outbox-offset",
            value: Some(offset.as_bytes()),
        });
        let mut record = FutureRecord::to(&ceiling_topic)
            .partition(*partition)
            .key(key.as_bytes())
            .payload(payload)
            .timestamp(*created_ms)
            .headers(owned);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((_, returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    let ceiling_secs = started.elapsed().as_secs_f64();
    let ceiling_rate = records as f64 / ceiling_secs;
    drop(in_memory);

    // The mirror: the role itself, from the log into its own topic.
    settings
        .topic_map
        .insert("order-created".into(), mirror_topic.clone());
    let db = outbox_relay::db::Db::new(&url, None)?;
    let prepared = PreparedMirror::new(settings)?;
    let topics = prepared.topics(&client).await?;
    let mirror = prepared.build(&db, topics)?;
    let (trigger, shutdown) = outbox_relay::shutdown::channel();
    let started = Instant::now();
    let task = tokio::spawn(mirror.run(shutdown));
    loop {
        let done: bool = client
            .query_one(
                "SELECT bool_and(p.committed_offset IS NOT DISTINCT FROM h.log_end_offset)
                   FROM partition_heads h LEFT JOIN group_partitions p
                     ON p.group_id = $1 AND p.topic = h.topic AND p.partition = h.partition
                  WHERE h.topic = 'order-created'",
                &[&MIRROR_GROUP],
            )
            .await?
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mirror_secs = started.elapsed().as_secs_f64();
    trigger.trigger();
    task.await??;
    let mirror_rate = records as f64 / mirror_secs;
    println!(
        "  ceiling (rdkafka from memory): {ceiling_secs:7.2} s  {ceiling_rate:>9.0} records/s"
    );
    println!(
        "  mirror (kafka role):           {mirror_secs:7.2} s  {mirror_rate:>9.0} records/s  = {:.2} of the ceiling",
        mirror_rate / ceiling_rate
    );
    drop(client);
    admin_client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await?;
    Ok(())
}
