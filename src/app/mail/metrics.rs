//! The mail worker's metrics: mails accepted and failed, one SMTP
//! exchange's duration, and order → mail latency.

use std::sync::OnceLock;

use prometheus::{Histogram, IntCounter, IntCounterVec};

use crate::metrics;

/// The kinds `outbox_relay_mail_failed_total` counts, each exported from
/// the start (at 0) so that a panel or an alert sees a series.
const MAIL_FAILURE_KINDS: [&str; 4] = ["transient", "unknown_attempt", "parked", "unknown"];

pub(crate) struct MailMetrics {
    pub sent: IntCounter,
    pub failed: IntCounterVec,
    pub send_duration: Histogram,
    pub order_to_mail_seconds: Histogram,
}

/// The mail worker's collectors, registered on first use.
pub(crate) fn mail_metrics() -> &'static MailMetrics {
    static METRICS: OnceLock<MailMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = MailMetrics {
            sent: metrics::counter(
                "outbox_relay_mail_sent_total",
                "Confirmation mails accepted by the SMTP server",
            ),
            failed: metrics::counter_vec(
                "outbox_relay_mail_failed_total",
                "Mail attempts that failed, by kind",
                &["kind"],
            ),
            send_duration: metrics::histogram(
                "outbox_relay_mail_send_duration_seconds",
                "One SMTP exchange, from taking a connection to the final answer",
                0.0005,
                2.0,
                16,
            ),
            order_to_mail_seconds: metrics::histogram(
                "outbox_relay_order_to_mail_seconds",
                "From the outbox row's created_at to the SMTP server accepting the mail",
                0.001,
                2.0,
                18,
            ),
        };
        for kind in MAIL_FAILURE_KINDS {
            metrics.failed.with_label_values(&[kind]);
        }
        metrics
    })
}
