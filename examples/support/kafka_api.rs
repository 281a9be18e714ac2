//! What the Kafka front end's benchmarks share (included by `#[path]`:
//! `kafka_api_bench`, `kafka_api_vs_tansu`): a scratch database, the role
//! started in process, and one consumer reading a topic from the start.

use std::time::{Duration, Instant};

use outbox_relay::builder::{bind, Application, Settings};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

/// Runs `body` on a database of its own, made next to the one `admin`
/// names and dropped after, whatever `body` returns.
pub async fn in_scratch_database<F, Fut>(admin: &str, prefix: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let name = format!("{prefix}_{:08x}", rand::random::<u32>());
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.to_string());
    let admin_client = outbox_relay::db::connect(admin).await?;
    admin_client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let result = body(format!("{base}/{name}")).await;
    admin_client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await?;
    result
}

/// The kafka-api role on a free loopback port (and the relay role, given
/// its lease), started by the application builder: the application and
/// its bootstrap address.
pub async fn start(url: &str, relay: Option<Duration>) -> anyhow::Result<(Application, String)> {
    let listener = bind("127.0.0.1:0".parse()?)?;
    let port = listener.local_addr()?.port();
    let settings = Settings {
        relay: relay.map(|lease| (lease, outbox_relay::relay::DEFAULT_GATHER)),
        kafka_api: Some(outbox_relay::kafka_api::Listen {
            listener,
            advertised: outbox_relay::kafka_api::Advertised {
                host: "127.0.0.1".into(),
                port,
            },
            security: Default::default(),
        }),
        migrate: false,
        ..Settings::default()
    };
    Ok((
        Application::start(settings, url).await?,
        format!("127.0.0.1:{port}"),
    ))
}

/// The time a fresh librdkafka consumer takes to read the first `records`
/// of `order-created`'s 8 partitions from the start (payloads included).
pub async fn read_all(bootstrap: &str, records: i64) -> anyhow::Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "kafka-api-bench")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..8 {
        list.add_partition_offset("order-created", p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let (read, payload_bytes, elapsed) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let (mut read, mut payload_bytes) = (0i64, 0usize);
        while read < records && started.elapsed() < Duration::from_secs(600) {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.expect("a record");
                payload_bytes += message.payload().map_or(0, <[u8]>::len);
                read += 1;
            }
        }
        (read, payload_bytes, started.elapsed())
    })
    .await?;
    anyhow::ensure!(
        read == records && payload_bytes > 0,
        "read {read} of {records} records from {bootstrap}"
    );
    Ok(elapsed)
}
