//! Prometheus metrics, served at `GET /metrics` by every process with an
//! HTTP listener (the API role's, or `--metrics-addr` without it).
//!
//! Counters and histograms are recorded where the work happens (relay
//! batches, mail outcomes, HTTP requests); gauges that describe the database
//! (outbox backlog, consumer lag, parked dead letters, log end offsets) are
//! read from Postgres when Prometheus scrapes, so any process serving
//! `/metrics` reports them, whichever process does the work.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The kinds `outbox_relay_mail_failed_total` counts, each exported from
/// the start (at 0) so that a panel or an alert sees a series.
pub const MAIL_FAILURE_KINDS: [&str; 4] = ["transient", "unknown_attempt", "parked", "unknown"];

pub struct Metrics {
    registry: Registry,
    pub relay_appended: IntCounterVec,
    pub relay_batch_size: Histogram,
    pub commit_to_log_seconds: Histogram,
    pub relay_is_leader: IntGauge,
    pub mail_sent: IntCounter,
    pub mail_failed: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub mail_send_duration: Histogram,
    pub order_to_mail_seconds: Histogram,
    pub group_rebalances: IntCounterVec,
    pub kafka_mirrored: IntCounterVec,
    pub kafka_produce_errors: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub webhook_responses: IntCounterVec,
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
    database_up: IntGauge,
    /// One scrape at a time: the database gauges are reset and refilled.
    scrape: tokio::sync::Mutex<()>,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new().expect("metric definitions are valid"))
}

impl Metrics {
    async fn read_database_gauges(
        &self,
        client: &mut tokio_postgres::Client,
    ) -> anyhow::Result<()> {
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = '2s'")
            .await?;
        let relay = crate::relay::status(&tx, crate::relay::DEFAULT_RELAY_NAME).await?;
        let heads = crate::log::topics::all_partition_offsets(&tx).await?;
        let lags = crate::group::admin::partition_lags(&tx).await?;
        let members = crate::group::admin::live_member_counts(&tx).await?;
        let parked = crate::group::dead_letters::parked_count(&tx).await?;
        tx.commit().await?;

        self.outbox_backlog.set(relay.backlog);
        self.outbox_oldest_age.set(relay.oldest_age_seconds);
        self.relay_leader_alive.set(i64::from(relay.leader_alive));
        self.log_start_offset.reset();
        self.log_end_offset.reset();
        for head in heads {
            let labels = [head.topic.as_str(), &head.partition.to_string()];
            self.log_start_offset
                .with_label_values(&labels)
                .set(head.log_start_offset);
            self.log_end_offset
                .with_label_values(&labels)
                .set(head.log_end_offset);
        }
        self.group_lag.reset();
        self.group_lag_seconds.reset();
        self.committed_offset.reset();
        for lag in lags {
            let labels = [
                lag.group.as_str(),
                lag.topic.as_str(),
                &lag.partition.to_string(),
            ];
            self.group_lag.with_label_values(&labels).set(lag.lag);
            self.group_lag_seconds
                .with_label_values(&labels)
                .set(lag.lag_seconds);
            if let Some(offset) = lag.committed_offset {
                self.committed_offset.with_label_values(&labels).set(offset);
            }
        }
        self.group_members.reset();
        for (group, count) in members {
            self.group_members.with_label_values(&[&group]).set(count);
        }
        self.dead_letters.set(parked.iter().map(|(_, n)| n).sum());
        self.group_dead_letters.reset();
        for (group, count) in parked {
            self.group_dead_letters
                .with_label_values(&[&group])
                .set(count);
        }
        Ok(())
    }

    fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let m = Metrics {
            relay_appended: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_appended_total",
                    "Records the relay appended to the event log",
                ),
                &["topic"],
            )?,
            relay_batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_batch_size",
                    "Outbox rows moved per relay batch",
                )
                .buckets(prometheus::exponential_buckets(1.0, 4.0, 9)?),
            )?,
            commit_to_log_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_commit_to_log_seconds",
                    "From an outbox row's created_at to its append to the log",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
            )?,
            relay_is_leader: IntGauge::new(
                "outbox_relay_is_leader",
                "1 while this process holds the relay lease",
            )?,
            mail_sent: IntCounter::new(
                "outbox_relay_mail_sent_total",
                "Confirmation mails accepted by the SMTP server",
            )?,
            mail_failed: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_mail_failed_total",
                    "Mail attempts that failed, by kind",
                ),
                &["kind"],
            )?,
            http_requests: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_http_requests_total",
                    "HTTP requests answered, by route and status",
                ),
                &["route", "status"],
            )?,
            http_request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "outbox_relay_http_request_duration_seconds",
                    "HTTP requests from routing to the response, by route template and method",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
                &["route", "method"],
            )?,
            mail_send_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_mail_send_duration_seconds",
                    "One SMTP exchange, from taking a connection to the final answer",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            )?,
            order_to_mail_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "outbox_relay_order_to_mail_seconds",
                    "From the outbox row's created_at to the SMTP server accepting the mail",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 18)?),
            )?,
            group_rebalances: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_consumer_group_rebalances_total",
                    "Changes of this process's partition assignment, by group",
                ),
                &["group"],
            )?,
            kafka_mirrored: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_kafka_mirrored_total",
                    "Records the Kafka brokers acknowledged from this process's mirror, by log topic",
                ),
                &["topic"],
            )?,
            kafka_produce_errors: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_kafka_produce_errors_total",
                    "Records the Kafka brokers refused (produced again after a backoff), by librdkafka error code",
                ),
                &["class"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_deliveries_total",
                    "Attempts of consumers under the group delivery policy (group::delivery), by group and outcome: delivered, retried, parked",
                ),
                &["group", "outcome"],
            )?,
            delivery_duration: HistogramVec::new(
                HistogramOpts::new(
                    "outbox_relay_delivery_duration_seconds",
                    "One delivery attempt, by group",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
                &["group"],
            )?,
            webhook_responses: IntCounterVec::new(
                Opts::new(
                    "outbox_relay_webhook_responses_total",
                    "Webhook requests by sink and answer: 2xx, 3xx, 4xx, 5xx, or timeout and error (no answer)",
                ),
                &["sink", "class"],
            )?,
            outbox_backlog: IntGauge::new(
                "outbox_relay_outbox_backlog",
                "Outbox rows not yet in the log (estimate)",
            )?,
            outbox_oldest_age: Gauge::new(
                "outbox_relay_outbox_oldest_age_seconds",
                "Age of the oldest committed outbox row not yet in the log (0 when none)",
            )?,
            relay_leader_alive: IntGauge::new(
                "outbox_relay_relay_leader_alive",
                "1 while some process holds an unexpired relay lease (from the database)",
            )?,
            log_start_offset: IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_log_start_offset",
                    "First offset retention keeps, per partition",
                ),
                &["topic", "partition"],
            )?,
            log_end_offset: IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_log_end_offset",
                    "Next offset to be assigned, per partition",
                ),
                &["topic", "partition"],
            )?,
            group_lag: IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_consumer_group_lag",
                    "Log end offset minus committed offset",
                ),
                &["group", "topic", "partition"],
            )?,
            group_lag_seconds: GaugeVec::new(
                Opts::new(
                    "outbox_relay_consumer_group_lag_seconds",
                    "Age (by appended_at) of the oldest record past the committed offset, 0 when caught up",
                ),
                &["group", "topic", "partition"],
            )?,
            committed_offset: IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_consumer_committed_offset",
                    "The group's committed offset (the next offset it reads)",
                ),
                &["group", "topic", "partition"],
            )?,
            group_members: IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_consumer_group_members",
                    "Members with a live session, by group",
                ),
                &["group"],
            )?,
            dead_letters: IntGauge::new("outbox_relay_dead_letters", "Parked dead letters")?,
            group_dead_letters: IntGaugeVec::new(
                Opts::new(
                    "outbox_relay_consumer_group_dead_letters",
                    "Parked dead letters, by group",
                ),
                &["group"],
            )?,
            database_up: IntGauge::new(
                "outbox_relay_database_up",
                "1 if the last scrape could read the database gauges",
            )?,
            scrape: tokio::sync::Mutex::new(()),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.relay_appended.clone()),
            Box::new(m.relay_batch_size.clone()),
            Box::new(m.commit_to_log_seconds.clone()),
            Box::new(m.relay_is_leader.clone()),
            Box::new(m.mail_sent.clone()),
            Box::new(m.mail_failed.clone()),
            Box::new(m.http_requests.clone()),
            Box::new(m.http_request_duration.clone()),
            Box::new(m.mail_send_duration.clone()),
            Box::new(m.order_to_mail_seconds.clone()),
            Box::new(m.group_rebalances.clone()),
            Box::new(m.kafka_mirrored.clone()),
            Box::new(m.kafka_produce_errors.clone()),
            Box::new(m.deliveries.clone()),
            Box::new(m.delivery_duration.clone()),
            Box::new(m.webhook_responses.clone()),
            Box::new(m.outbox_backlog.clone()),
            Box::new(m.outbox_oldest_age.clone()),
            Box::new(m.relay_leader_alive.clone()),
            Box::new(m.log_start_offset.clone()),
            Box::new(m.log_end_offset.clone()),
            Box::new(m.group_lag.clone()),
            Box::new(m.group_lag_seconds.clone()),
            Box::new(m.committed_offset.clone()),
            Box::new(m.group_members.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.group_dead_letters.clone()),
            Box::new(m.database_up.clone()),
        ];
        for collector in collectors {
            m.registry.register(collector)?;
        }
        for kind in MAIL_FAILURE_KINDS {
            m.mail_failed.with_label_values(&[kind]);
        }
        Ok(m)
    }

    /// Reads the database gauges (best effort: a database that does not
    /// answer within two seconds leaves them stale and sets
    /// `outbox_relay_database_up` to 0), then renders everything.
    pub async fn render(
        &self,
        client: Option<&mut tokio_postgres::Client>,
    ) -> anyhow::Result<String> {
        let _one_at_a_time = self.scrape.lock().await;
        let read = match client {
            Some(client) => self.read_database_gauges(client).await,
            None => Err(anyhow::anyhow!("no database connection")),
        };
        match read {
            Ok(()) => self.database_up.set(1),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "metrics: could not read the database gauges"
                );
                self.database_up.set(0);
            }
        }
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(String::from_utf8(buffer)?)
    }
}
