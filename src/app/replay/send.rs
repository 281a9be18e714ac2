//! Settling one event of a run: skipped when the run's ledger says it is
//! done (or in doubt), else written `sending` once its target has room for
//! it, sent with retries, and settled `sent`, `failed` or `unknown`. What
//! the event becomes and where it goes is the [`ReplayTarget`]'s: the
//! confirmation mail over SMTP, or a webhook sink's signed request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::ledger::{RunLedger, Settle};
use super::rate::RateLimit;
use super::{Progress, ReplaySettings};
use crate::log::Record;
use crate::shutdown::Shutdown;

/// What one attempt at sending an event came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Refused for good: settled `failed` with `reason`.
    Permanent {
        reason: String,
        error: String,
    },
    /// It may have gone out (no final answer after the whole event was
    /// handed over): settled `unknown`, never sent again by the run.
    Unknown(String),
    /// Not sent; worth trying again within the retry budget.
    Transient(String),
}

/// Where a replay sends its events.
pub trait ReplayTarget: Send + Sync + 'static {
    /// The event made ready to send (a rendered mail, a request body).
    type Ready: Send + Sync;
    /// Room for one exchange (a connection of the target's pool): the event
    /// is written `sending` only once it has one, so what a crash leaves in
    /// doubt is at most the exchanges in flight.
    type Slot<'a>: Send
    where
        Self: 'a;

    /// The event's id in run `run_id`, the same for each of its attempts
    /// (kept in the run's ledger).
    fn event_id(&self, run_id: i64, record: &Record) -> String;

    /// Makes `record` ready to send; `Err(reason)`: it never can be (it is
    /// settled `failed` without an attempt).
    fn prepare(&self, run_id: i64, record: &Record, event_id: &str) -> Result<Self::Ready, String>;

    fn slot(&self) -> impl Future<Output = Self::Slot<'_>> + Send;

    /// One attempt, in `slot` when given (the first attempt), else in a
    /// slot it waits for.
    fn attempt<'a>(
        &'a self,
        ready: &'a Self::Ready,
        slot: Option<Self::Slot<'a>>,
    ) -> impl Future<Output = Outcome> + Send + 'a;
}

/// The created-at range of a run bounded by time: `[from, to)`.
///
/// Its offsets start at the first record created at or after `from` (Kafka's
/// offsetsForTimes) and end at the log end captured when it started; records
/// in between that were created outside the range (CreateTime need not grow
/// with the offset) are skipped, so the run mails exactly the range.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TimeRange {
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
}

impl TimeRange {
    pub fn of(request: &serde_json::Value) -> TimeRange {
        let time = |field: &str| {
            request[field]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
        };
        TimeRange {
            from: time("from"),
            to: time("to"),
        }
    }

    pub fn contains(&self, created_at: chrono::DateTime<chrono::Utc>) -> bool {
        self.from.is_none_or(|from| created_at >= from) && self.to.is_none_or(|to| created_at < to)
    }
}

/// What every event of a run needs: one per run, shared by its partitions.
pub(super) struct SendContext<T> {
    pub run_id: i64,
    pub target: Arc<T>,
    pub time_range: TimeRange,
    pub settings: ReplaySettings,
    pub ledger: RunLedger,
    pub limiter: Option<Arc<RateLimit>>,
    pub settled: Arc<HashMap<(i32, i64), String>>,
    pub progress: Arc<Progress>,
    pub shutdown: Shutdown,
}

impl<T: ReplayTarget> SendContext<T> {
    /// Settles one record of the run: skipped when the run's ledger says
    /// it is done (or in doubt), else sent and recorded. False when the
    /// run stopped before its exchange began (nothing was done).
    pub async fn replay_one(&self, record: Record) -> bool {
        if !self.time_range.contains(record.created_at) {
            self.progress.outside.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let event = (record.partition, record.offset);
        match self.settled.get(&event).map(String::as_str) {
            Some("sending") if !self.settings.resend_in_doubt => {
                self.progress.in_doubt.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Some("sent") | Some("failed") | Some("unknown") => {
                self.progress.reread.fetch_add(1, Ordering::Relaxed);
                self.progress.already.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            _ => {}
        }
        let event_id = self.target.event_id(self.run_id, &record);
        let settle = |status: &'static str,
                      attempts: i32,
                      reason: Option<String>,
                      error: Option<String>| Settle {
            partition: record.partition,
            offset: record.offset,
            status,
            message_id: event_id.clone(),
            attempts,
            reason,
            last_error: error,
        };
        let ready = match self.target.prepare(self.run_id, &record, &event_id) {
            Ok(ready) => ready,
            Err(reason) => {
                self.ledger
                    .settle(settle("failed", 0, Some(reason), None))
                    .await;
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        };
        if let Some(limiter) = &self.limiter {
            let mut stop = self.shutdown.clone();
            tokio::select! {
                _ = limiter.wait() => {}
                _ = stop.recv() => {}
            }
        }
        // The exchange begins once the target has a slot for it: only then
        // is the event written `sending`, so what a crash leaves in doubt is
        // at most the exchanges in flight, not every record read ahead.
        let mut slot = Some(self.target.slot().await);
        // A stopping run starts no new exchange: the record stays unsettled
        // (below the cursor) for the resumed run.
        if self.shutdown.is_triggered() {
            return false;
        }
        // In the run's ledger before the exchange: after a crash it is in
        // doubt. A row the ledger refuses is not sent: it is settled failed.
        match self
            .ledger
            .sending(record.partition, record.offset, &event_id)
            .await
        {
            Ok(()) => {}
            Err(crate::db::batch::ItemError::Refused(error)) => {
                let reason = Some("the run's ledger refused its row".into());
                self.ledger
                    .settle(settle("failed", 0, reason, Some(error)))
                    .await;
                self.count_unsettled("failed");
                return true;
            }
            Err(crate::db::batch::ItemError::Stopped(_)) => return false,
        }
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.target.attempt(&ready, slot.take()).await {
                Outcome::Sent => {
                    self.ledger
                        .settle(settle("sent", attempts, None, None))
                        .await;
                    self.progress.sent.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Outcome::Permanent { reason, error } => {
                    self.ledger
                        .settle(settle("failed", attempts, Some(reason), Some(error)))
                        .await;
                    self.count_unsettled("failed");
                    return true;
                }
                // It may have gone out. Like an event in doubt, it is not
                // sent again by this run (never twice).
                Outcome::Unknown(error) => {
                    let reason = Some("no final answer: it may have gone out".into());
                    self.ledger
                        .settle(settle("unknown", attempts, reason, Some(error)))
                        .await;
                    self.count_unsettled("unknown");
                    return true;
                }
                Outcome::Transient(error) => error,
            };
            if self.settings.retry.spent(attempts, started.elapsed()) {
                self.ledger
                    .settle(settle(
                        "failed",
                        attempts,
                        Some("retry budget spent".into()),
                        Some(error),
                    ))
                    .await;
                self.count_unsettled("failed");
                return true;
            }
            tokio::time::sleep(self.settings.retry.backoff(attempts - 1)).await;
        }
    }

    fn count_unsettled(&self, status: &str) {
        let counter = if status == "unknown" {
            &self.progress.unknown
        } else {
            &self.progress.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
