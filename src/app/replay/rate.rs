//! `--max-rate`: a replay's pace, so a month of mail does not flood the
//! SMTP server.

use std::time::Duration;

/// At most `rate` starts per second, shared by every task of a run.
pub(super) struct RateLimit {
    period: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    pub(super) fn new(rate: f64) -> RateLimit {
        RateLimit {
            period: Duration::from_secs_f64(1.0 / rate.max(0.001)),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    pub(super) async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.period;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}
