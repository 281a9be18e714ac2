//! The Kafka mirror's metrics: records the brokers acknowledged, and
//! records they refused.

use std::sync::OnceLock;

use prometheus::IntCounterVec;

use crate::metrics;

pub(crate) struct MirrorMetrics {
    pub mirrored: IntCounterVec,
    pub produce_errors: IntCounterVec,
}

/// The mirror's collectors, registered on first use.
pub(crate) fn mirror_metrics() -> &'static MirrorMetrics {
    static METRICS: OnceLock<MirrorMetrics> = OnceLock::new();
    METRICS.get_or_init(|| MirrorMetrics {
        mirrored: metrics::counter_vec(
            "outbox_relay_kafka_mirrored_total",
            "Records the Kafka brokers acknowledged from this process's mirror, by log topic",
            &["topic"],
        ),
        produce_errors: metrics::counter_vec(
            "outbox_relay_kafka_produce_errors_total",
            "Records the Kafka brokers refused (produced again after a backoff), \
             by librdkafka error code",
            &["class"],
        ),
    })
}
