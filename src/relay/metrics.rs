//! The relay's metrics: what it moved, in what batches, how long after the
//! writer's commit, and whether this process leads.

use std::sync::OnceLock;

use prometheus::{Histogram, IntCounterVec, IntGauge};

use crate::metrics;

pub(crate) struct RelayMetrics {
    pub appended: IntCounterVec,
    pub batch_size: Histogram,
    pub commit_to_log_seconds: Histogram,
    pub is_leader: IntGauge,
}

/// The relay's collectors, registered on first use.
pub(crate) fn relay_metrics() -> &'static RelayMetrics {
    static METRICS: OnceLock<RelayMetrics> = OnceLock::new();
    METRICS.get_or_init(|| RelayMetrics {
        appended: metrics::counter_vec(
            "outbox_relay_appended_total",
            "Records the relay appended to the event log",
            &["topic"],
        ),
        batch_size: metrics::histogram(
            "outbox_relay_batch_size",
            "Outbox rows moved per relay batch",
            1.0,
            4.0,
            9,
        ),
        commit_to_log_seconds: metrics::histogram(
            "outbox_relay_commit_to_log_seconds",
            "From an outbox row's created_at to its append to the log",
            0.001,
            2.0,
            16,
        ),
        is_leader: metrics::int_gauge(
            "outbox_relay_is_leader",
            "1 while this process holds the relay lease",
        ),
    })
}
