//! The process's Prometheus registry and its text rendering, served at
//! `GET /metrics` by every process with an HTTP listener (the API role's,
//! or `--metrics-addr` without it).
//!
//! A leaf: each part defines and registers its own collectors where the
//! work happens (`relay::metrics`, `group::metrics`, `app::mail::metrics`,
//! the Kafka mirror, `http`, the webhook sink), through the constructors
//! here. Gauges that describe the database (outbox backlog, consumer lag,
//! dead letters, log end offsets) are read from Postgres when Prometheus
//! scrapes, by the [`ScrapeGauges`] the application builder registers, so
//! any process serving `/metrics` reports them, whichever process does the
//! work. Adding a metric touches the one file that records it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Gauges refreshed from the database before each scrape is rendered.
pub trait ScrapeGauges: Send + Sync + 'static {
    /// Reads the database and sets the gauges; an error leaves them stale
    /// (and `outbox_relay_database_up` at 0).
    fn refresh<'a>(
        &'a self,
        client: &'a mut tokio_postgres::Client,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;
}

struct Scrape {
    registry: Registry,
    database_up: IntGauge,
    gauges: OnceLock<Arc<dyn ScrapeGauges>>,
    /// One scrape at a time: the database gauges are reset and refilled.
    one_at_a_time: tokio::sync::Mutex<()>,
}

fn scrape() -> &'static Scrape {
    static SCRAPE: OnceLock<Scrape> = OnceLock::new();
    SCRAPE.get_or_init(|| {
        let registry = Registry::new();
        let database_up = IntGauge::new(
            "outbox_relay_database_up",
            "1 if the last scrape could read the database gauges",
        )
        .expect("a valid metric definition");
        registry
            .register(Box::new(database_up.clone()))
            .expect("registered once");
        Scrape {
            registry,
            database_up,
            gauges: OnceLock::new(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    })
}

/// Registers the gauges read at scrape time. The process has one set: the
/// first registration is kept, later ones (a second pipeline built in the
/// same test process) are ignored.
pub fn read_at_scrape(gauges: Arc<dyn ScrapeGauges>) {
    let _ = scrape().gauges.set(gauges);
}

/// Adds `collector` to the process's registry and returns it. Metric
/// definitions are constants of the code, and each part registers its
/// collectors once (behind a `OnceLock`): a failure is a bug, caught by
/// the first test that renders the metrics.
pub fn register<C: Collector + Clone + 'static>(collector: prometheus::Result<C>) -> C {
    let collector = collector.expect("a valid metric definition");
    scrape()
        .registry
        .register(Box::new(collector.clone()))
        .expect("each metric registered once");
    collector
}

pub fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help))
}

pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels))
}

pub fn int_gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help))
}

pub fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels))
}

pub fn gauge(name: &str, help: &str) -> Gauge {
    register(Gauge::new(name, help))
}

pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(GaugeVec::new(Opts::new(name, help), labels))
}

/// A histogram with `count` buckets from `start`, each `factor` times the last.
pub fn histogram(name: &str, help: &str, start: f64, factor: f64, count: usize) -> Histogram {
    register(Histogram::with_opts(
        HistogramOpts::new(name, help).buckets(buckets(start, factor, count)),
    ))
}

/// [`histogram`] with labels.
pub fn histogram_vec(
    name: &str,
    help: &str,
    labels: &[&str],
    start: f64,
    factor: f64,
    count: usize,
) -> HistogramVec {
    register(HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets(start, factor, count)),
        labels,
    ))
}

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).expect("valid bucket constants")
}

/// Reads the database gauges (best effort: a database that does not answer
/// leaves them stale and sets `outbox_relay_database_up` to 0), then renders
/// every registered metric in Prometheus' text format.
pub async fn render(client: Option<&mut tokio_postgres::Client>) -> anyhow::Result<String> {
    let scrape = scrape();
    let _one_at_a_time = scrape.one_at_a_time.lock().await;
    if let Some(gauges) = scrape.gauges.get() {
        let read = match client {
            Some(client) => gauges.refresh(client).await,
            None => Err(anyhow::anyhow!("no database connection")),
        };
        match read {
            Ok(()) => scrape.database_up.set(1),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "metrics: could not read the database gauges"
                );
                scrape.database_up.set(0);
            }
        }
    }
    let mut buffer = Vec::new();
    TextEncoder::new().encode(&scrape.registry.gather(), &mut buffer)?;
    Ok(String::from_utf8(buffer)?)
}
