//! Prometheus metrics, served at `GET /metrics` by the API role.
//!
//! Counters and histograms are recorded where the work happens (relay
//! batches, mail outcomes, HTTP requests); gauges that describe the database
//! (outbox backlog, consumer lag, parked dead letters, log end offsets) are
//! read from Postgres when Prometheus scrapes, so any process with the API
//! role reports them, whichever process does the work.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub relay_appended: IntCounterVec,
    pub relay_batch_size: Histogram,
    pub commit_to_log_seconds: Histogram,
    pub relay_is_leader: IntGauge,
    pub mail_sent: IntCounter,
    pub mail_failed: IntCounterVec,
    pub http_requests: IntCounterVec,
    outbox_backlog: IntGauge,
    log_end_offset: IntGaugeVec,
    group_lag: IntGaugeVec,
    dead_letters: IntGauge,
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
        let parked = crate::group::dead_letters::parked_count(&tx).await?;
        tx.commit().await?;

        self.outbox_backlog.set(relay.backlog);
        self.log_end_offset.reset();
        for head in heads {
            self.log_end_offset
                .with_label_values(&[head.topic.as_str(), &head.partition.to_string()])
                .set(head.log_end_offset);
        }
        self.group_lag.reset();
        for lag in lags {
            self.group_lag
                .with_label_values(&[
                    lag.group.as_str(),
                    lag.topic.as_str(),
                    &lag.partition.to_string(),
                ])
                .set(lag.lag);
        }
        self.dead_letters.set(parked);
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
            outbox_backlog: IntGauge::new(
                "outbox_relay_outbox_backlog",
                "Outbox rows not yet in the log (estimate)",
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
            dead_letters: IntGauge::new("outbox_relay_dead_letters", "Parked dead letters")?,
            database_up: IntGauge::new(
                "outbox_relay_database_up",
                "1 if the last scrape could read the database gauges",
            )?,
            scrape: tokio::sync::Mutex::new(()),
            registry,
        };
        m.registry.register(Box::new(m.relay_appended.clone()))?;
        m.registry.register(Box::new(m.relay_batch_size.clone()))?;
        m.registry
            .register(Box::new(m.commit_to_log_seconds.clone()))?;
        m.registry.register(Box::new(m.relay_is_leader.clone()))?;
        m.registry.register(Box::new(m.mail_sent.clone()))?;
        m.registry.register(Box::new(m.mail_failed.clone()))?;
        m.registry.register(Box::new(m.http_requests.clone()))?;
        m.registry.register(Box::new(m.outbox_backlog.clone()))?;
        m.registry.register(Box::new(m.log_end_offset.clone()))?;
        m.registry.register(Box::new(m.group_lag.clone()))?;
        m.registry.register(Box::new(m.dead_letters.clone()))?;
        m.registry.register(Box::new(m.database_up.clone()))?;
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
