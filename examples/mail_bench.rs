//! Mail worker benchmark: delivery throughput from a preloaded log (8
//! partitions, one process) and idle commit-to-SMTP-accept latency.
//!
//! ```sh
//! smtp-sink -u nobody 127.0.0.1:2525 256 &          # Debian package postfix
//! cargo run --release --example mail_bench -- \
//!     postgres://postgres@127.0.0.1:5432/postgres smtp://127.0.0.1:2525 [orders] [pool size] [latency samples]
//! ```
//!
//! Compare with the SMTP server's own ceiling, measured in the same run:
//! `time smtp-source -s <pool size> -m <orders> -l 1200 127.0.0.1:2525`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::app::mail::{MailWorker, RetryPolicy, SmtpTarget, MAIL_GROUP};
use outbox_relay::group::consumer::ConsumerConfig;
use outbox_relay::group::GroupConfig;
use outbox_relay::relay::{Relay, RelayConfig, StepOutcome};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: mail_bench <admin postgres url> <smtp url> [orders] [pool size] [latency samples]";
    let admin = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let smtp_url = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.clone();
    let orders: i64 = args
        .get(3)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(20_000);
    let pool_size: u32 = args.get(4).map(|v| v.parse()).transpose()?.unwrap_or(32);
    let samples: usize = args.get(5).map(|v| v.parse()).transpose()?.unwrap_or(200);
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin.clone());
    let admin_client = outbox_relay::db::connect(&admin).await?;
    admin_client
        .batch_execute("DROP DATABASE IF EXISTS bench_mail WITH (FORCE)")
        .await?;
    admin_client
        .batch_execute("CREATE DATABASE bench_mail")
        .await?;
    let url = format!("{base}/bench_mail");
    outbox_relay::migrate::apply_all(&url).await?;

    // Preload: orders in the outbox, relayed into the log (8 partitions).
    let client = outbox_relay::db::connect(&url).await?;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             SELECT 'order-created', 'bench-' || n,
                    jsonb_build_object('order_id', n, 'user_id', n % 100 + 1, 'amount', 1000 + n,
                                       'email', 'customer' || n || '@example.com')
               FROM generate_series(1, $1::int8) n",
            &[&orders],
        )
        .await?;
    let mut relay = Relay::new(&url, RelayConfig::default());
    while relay.step().await? != StepOutcome::Idle {}
    relay.release().await?;

    let (trigger, shutdown) = outbox_relay::shutdown::channel();
    let worker = MailWorker::new(
        outbox_relay::db::pool(&url, 16)?,
        SmtpTarget::parse(&smtp_url)?.transport(
            pool_size,
            outbox_relay::app::mail::Limits::new(Duration::from_secs(15)),
        )?,
        "shop@example.com".parse()?,
        RetryPolicy::default(),
    );
    let mut group = GroupConfig::new(MAIL_GROUP, &["order-created"]);
    group.heartbeat_interval = Duration::from_millis(200);
    let config = ConsumerConfig::new(group);
    let started = Instant::now();
    let consumer_url = url.clone();
    let consumer = tokio::spawn(async move {
        outbox_relay::group::consumer::run(&consumer_url, config, Arc::new(worker), shutdown).await
    });
    let finished = "SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FROM mail_deliveries WHERE status <> 'pending'";
    loop {
        let row = client.query_one(finished, &[]).await?;
        let (sent, done): (i64, i64) = (row.get(0), row.get(1));
        anyhow::ensure!(
            sent == done,
            "{} mails failed: see dead_letters in bench_mail",
            done - sent
        );
        if sent >= orders {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {sent} of {orders} sent in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("throughput: {orders} mails in {secs:.2} s = {:.0} mails/s (SMTP pool {pool_size}, 8 partitions, one process)", orders as f64 / secs);

    // Idle latency: order commit -> mail accepted (ledger `sent`, written
    // right after the server's 250), both on the database clock. The
    // relay polls (nothing wakes it here), as for a writer in another
    // language.
    let (relay_trigger, relay_shutdown) = outbox_relay::shutdown::channel();
    let relay_task = tokio::spawn(Relay::new(&url, RelayConfig::default()).run(relay_shutdown));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut writer = outbox_relay::db::connect(&url).await?;
    let mut latencies = Vec::new();
    for i in 0..samples {
        let order = outbox_relay::app::order::NewOrder {
            user_id: 1,
            email: outbox_relay::app::order::EmailAddress::parse(&format!(
                "latency{i}@example.com"
            ))
            .unwrap(),
            amount: 100,
        };
        let tx = writer.transaction().await?;
        let id = outbox_relay::app::order::insert(&tx, &order).await?;
        // Read just before the commit, so the figure includes the commit's
        // own flush: read after it, the mail may already be out (the relay
        // and the worker run in this process and may beat the next query).
        let committed: chrono::DateTime<chrono::Utc> =
            tx.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
        tx.commit().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let sent_at: chrono::DateTime<chrono::Utc> = loop {
            let row = writer
                .query_opt(
                    "SELECT d.sent_at FROM mail_deliveries d JOIN event_log e
                       ON e.topic = d.topic AND e.partition = d.partition AND e.\"offset\" = d.\"offset\"
                      WHERE e.key = $1 AND d.status = 'sent'",
                    &[&id.to_string()],
                )
                .await?;
            if let Some(row) = row {
                break row.get(0);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "order {id} not mailed within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        latencies.push(
            (sent_at - committed)
                .to_std()
                .map_err(|_| anyhow::anyhow!("mail before its commit?"))?,
        );
        tokio::time::sleep(Duration::from_millis(30 + rand::random::<u64>() % 40)).await;
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "idle latency, order commit -> SMTP accepted ({samples} orders): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    trigger.trigger();
    relay_trigger.trigger();
    consumer.await??;
    relay_task.await?;
    drop(client);
    drop(writer);
    admin_client
        .batch_execute("DROP DATABASE IF EXISTS bench_mail WITH (FORCE)")
        .await?;
    Ok(())
}
