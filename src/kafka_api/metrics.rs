//! The Kafka front end's metrics: requests by API and error code, their
//! duration, record bytes fetched, connections open.

use std::sync::OnceLock;

use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge};

use crate::metrics;

pub(super) struct KafkaApiMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub fetched_bytes: IntCounter,
    pub connections: IntGauge,
}

/// The front end's collectors, registered on first use.
pub(super) fn kafka_api_metrics() -> &'static KafkaApiMetrics {
    static METRICS: OnceLock<KafkaApiMetrics> = OnceLock::new();
    METRICS.get_or_init(|| KafkaApiMetrics {
        requests: metrics::counter_vec(
            "outbox_relay_kafka_api_requests_total",
            "Kafka protocol requests, by API and error code (the first \
             partition error of an answer, 0 when none; \"closed\" when the \
             connection was closed instead; API \"refused\" for a request \
             outside the table or one that does not decode)",
            &["api", "error"],
        ),
        duration: metrics::histogram_vec(
            "outbox_relay_kafka_api_request_duration_seconds",
            "From a request's arrival to its answer, long polls included, by API",
            &["api"],
            0.0005,
            2.0,
            18,
        ),
        fetched_bytes: metrics::counter(
            "outbox_relay_kafka_api_fetched_bytes_total",
            "Record batch bytes sent in Fetch answers",
        ),
        connections: metrics::int_gauge(
            "outbox_relay_kafka_api_connections",
            "Kafka protocol connections open",
        ),
    })
}
