//! The gauges read from the database when Prometheus scrapes: they
//! describe the pipeline as the database holds it (outbox backlog, relay
//! leadership, log offsets, consumer lag, members, dead letters), so any
//! process serving `/metrics` reports them, whichever process does the
//! work. One collector, registered by the builder.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use prometheus::{Gauge, GaugeVec, IntGauge, IntGaugeVec};

use crate::metrics;

/// The database gauges; see the module's documentation.
pub struct DatabaseGauges;

impl DatabaseGauges {
    /// Registers the gauges (exported from the first scrape on, even one
    /// that cannot reach the database) and their refresh.
    pub fn register() {
        gauges();
        metrics::read_at_scrape(std::sync::Arc::new(DatabaseGauges));
    }
}

struct Gauges {
    outbox_backlog: IntGauge,
    outbox_oldest_age: Gauge,
    relay_leader_alive: IntGauge,
    log_start_offset: IntGaugeVec,
    log_end_offset: IntGaugeVec,
    group_lag: IntGaugeVec,
    group_lag_seconds: GaugeVec,
    committed_offset: IntGaugeVec,
    group_members: IntGaugeVec,
    dead_letters: IntGauge,
    group_dead_letters: IntGaugeVec,
}

fn gauges() -> &'static Gauges {
    static GAUGES: OnceLock<Gauges> = OnceLock::new();
    const PARTITION: [&str; 2] = ["topic", "partition"];
    const GROUP_PARTITION: [&str; 3] = ["group", "topic", "partition"];
    GAUGES.get_or_init(|| Gauges {
        outbox_backlog: metrics::int_gauge(
            "outbox_relay_outbox_backlog",
            "Outbox rows not yet in the log (estimate)",
        ),
        outbox_oldest_age: metrics::gauge(
            "outbox_relay_outbox_oldest_age_seconds",
            "Age of the oldest committed outbox row not yet in the log (0 when none)",
        ),
        relay_leader_alive: metrics::int_gauge(
            "outbox_relay_relay_leader_alive",
            "1 while some process holds an unexpired relay lease (from the database)",
        ),
        log_start_offset: metrics::int_gauge_vec(
            "outbox_relay_log_start_offset",
            "First offset retention keeps, per partition",
            &PARTITION,
        ),
        log_end_offset: metrics::int_gauge_vec(
            "outbox_relay_log_end_offset",
            "Next offset to be assigned, per partition",
            &PARTITION,
        ),
        group_lag: metrics::int_gauge_vec(
            "outbox_relay_consumer_group_lag",
            "Log end offset minus committed offset",
            &GROUP_PARTITION,
        ),
        group_lag_seconds: metrics::gauge_vec(
            "outbox_relay_consumer_group_lag_seconds",
            "Age (by appended_at) of the oldest record past the committed offset, 0 when caught up",
            &GROUP_PARTITION,
        ),
        committed_offset: metrics::int_gauge_vec(
            "outbox_relay_consumer_committed_offset",
            "The group's committed offset (the next offset it reads)",
            &GROUP_PARTITION,
        ),
        group_members: metrics::int_gauge_vec(
            "outbox_relay_consumer_group_members",
            "Members with a live session, by group",
            &["group"],
        ),
        dead_letters: metrics::int_gauge("outbox_relay_dead_letters", "Parked dead letters"),
        group_dead_letters: metrics::int_gauge_vec(
            "outbox_relay_consumer_group_dead_letters",
            "Parked dead letters, by group",
            &["group"],
        ),
    })
}

impl metrics::ScrapeGauges for DatabaseGauges {
    fn refresh<'a>(
        &'a self,
        client: &'a mut tokio_postgres::Client,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>> {
        Box::pin(refresh(client))
    }
}

/// Reads everything in one transaction bounded to two seconds, then sets
/// the gauges (series of partitions and groups that are gone are dropped).
async fn refresh(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL statement_timeout = '2s'")
        .await?;
    let relay = crate::relay::status(&tx, crate::relay::DEFAULT_RELAY_NAME).await?;
    let heads = crate::log::topics::all_partition_offsets(&tx).await?;
    let lags = crate::group::admin::partition_lags(&tx).await?;
    let members = crate::group::admin::live_member_counts(&tx).await?;
    let parked = crate::group::dead_letters::parked_count(&tx).await?;
    tx.commit().await?;

    let g = gauges();
    g.outbox_backlog.set(relay.backlog);
    g.outbox_oldest_age.set(relay.oldest_age_seconds);
    g.relay_leader_alive.set(i64::from(relay.leader_alive));
    g.log_start_offset.reset();
    g.log_end_offset.reset();
    for head in heads {
        let labels = [head.topic.as_str(), &head.partition.to_string()];
        g.log_start_offset
            .with_label_values(&labels)
            .set(head.log_start_offset);
        g.log_end_offset
            .with_label_values(&labels)
            .set(head.log_end_offset);
    }
    g.group_lag.reset();
    g.group_lag_seconds.reset();
    g.committed_offset.reset();
    for lag in lags {
        let labels = [
            lag.group.as_str(),
            lag.topic.as_str(),
            &lag.partition.to_string(),
        ];
        g.group_lag.with_label_values(&labels).set(lag.lag);
        g.group_lag_seconds
            .with_label_values(&labels)
            .set(lag.lag_seconds);
        if let Some(offset) = lag.committed_offset {
            g.committed_offset.with_label_values(&labels).set(offset);
        }
    }
    g.group_members.reset();
    for (group, count) in members {
        g.group_members.with_label_values(&[&group]).set(count);
    }
    g.dead_letters.set(parked.iter().map(|(_, n)| n).sum());
    g.group_dead_letters.reset();
    for (group, count) in parked {
        g.group_dead_letters.with_label_values(&[&group]).set(count);
    }
    Ok(())
}
