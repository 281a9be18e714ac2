//! The group layer's metrics: rebalances of this process's members, the
//! records handed to them by the relay of their process, and the attempts
//! of consumers under the delivery policy. Lag, members and
//! dead letters are read from the database at scrape time.

use std::sync::OnceLock;

use prometheus::{HistogramVec, IntCounterVec};

use crate::metrics;

pub(crate) struct GroupMetrics {
    pub rebalances: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub handed_records: IntCounterVec,
}

/// The group layer's collectors, registered on first use.
pub(crate) fn group_metrics() -> &'static GroupMetrics {
    static METRICS: OnceLock<GroupMetrics> = OnceLock::new();
    METRICS.get_or_init(|| GroupMetrics {
        rebalances: metrics::counter_vec(
            "outbox_relay_consumer_group_rebalances_total",
            "Changes of this process's partition assignment, by group",
            &["group"],
        ),
        deliveries: metrics::counter_vec(
            "outbox_relay_deliveries_total",
            "Attempts of consumers under the group delivery policy (group::delivery), \
             by group and outcome: delivered, retried, parked",
            &["group", "outcome"],
        ),
        delivery_duration: metrics::histogram_vec(
            "outbox_relay_delivery_duration_seconds",
            "One delivery attempt, by group",
            &["group"],
            0.0005,
            2.0,
            16,
        ),
        handed_records: metrics::counter_vec(
            "outbox_relay_consumer_handed_records_total",
            "Records this process's consumers took from the relay of their process as it \
             committed them, without reading them back from the log, by group",
            &["group"],
        ),
    })
}
