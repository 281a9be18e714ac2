//! The delivery policy every consumer with side effects shares, kept by
//! the group layer rather than by each consumer (docs/invariants.md, 9):
//!
//! - a handler says what one attempt came to ([`Attempt`]); [`Delivering`]
//!   does the rest: retries with exponential backoff and jitter within a
//!   time and attempt budget ([`RetryPolicy`]), honouring a delay the
//!   receiver asked for; parks a record that will never go, or whose budget
//!   is spent, as a dead letter of the group, fenced by the partition's
//!   ownership ([`park`]); and runs one attempt per event at a time in the
//!   process ([`InFlight`]), as [`RecordHandler`] asks;
//! - the deliveries are counted by group and outcome, and timed.
//!
//! The mail worker uses the parts (its retries are counted in its ledger,
//! which outlives the process); a consumer without a ledger of its own
//! (the webhook sink) implements [`Deliver`] and is done.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::clip::{clip, clip_error};
use crate::db::Db;
use crate::group::consumer::{
    Consumer, ConsumerConfig, Lease, RecordHandler, Records, MEMBER_OWN_CONNECTIONS,
};
use crate::group::dead_letters::park_dead_letter;
use crate::log::Record;

/// An event: (topic, partition, offset).
pub(crate) type EventKey = (String, i32, i64);

/// Retry schedule for attempts that did not deliver.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts before giving up (None: no limit but `retry_for`).
    pub max_attempts: Option<i32>,
    /// How long after the first attempt to keep trying (an MTA's queue
    /// lifetime: an SMTP outage of minutes or hours loses no mail).
    pub retry_for: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: None,
            retry_for: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff before attempt `attempt + 1`, jittered to
    /// between half and all of the delay.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.clamp(0, 20) as u32))
            .min(self.max_backoff);
        exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// True once `attempts` made over `elapsed` spend the budget.
    pub fn spent(&self, attempts: i32, elapsed: Duration) -> bool {
        self.max_attempts.is_some_and(|max| attempts >= max) || elapsed >= self.retry_for
    }
}

/// One handling of an event at a time in this process.
#[derive(Default)]
pub(crate) struct InFlight {
    events: std::sync::Mutex<InFlightEvents>,
}

#[derive(Default)]
struct InFlightEvents {
    turns: HashMap<EventKey, Weak<tokio::sync::Mutex<()>>>,
    /// Finished entries are swept when the map reaches this size.
    sweep_at: usize,
}

impl InFlight {
    pub(crate) async fn enter(&self, event: EventKey) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = {
            let mut guard = self.events.lock().expect("in-flight lock");
            let InFlightEvents {
                turns: events,
                sweep_at,
            } = &mut *guard;
            if events.len() >= *sweep_at {
                events.retain(|_, turn| turn.strong_count() > 0);
                *sweep_at = (events.len() * 2).max(1024);
            }
            match events.get(&event).and_then(Weak::upgrade) {
                Some(turn) => turn,
                None => {
                    let turn = Arc::new(tokio::sync::Mutex::new(()));
                    events.insert(event, Arc::downgrade(&turn));
                    turn
                }
            }
        };
        turn.lock_owned().await
    }
}

/// What one attempt at delivering a record came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    /// Not delivered, worth trying again: after `after` if the receiver
    /// asked for a delay (capped by the policy's longest backoff), else
    /// after the policy's backoff.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Not delivered, and trying again would not help: parked.
    Park {
        reason: String,
        error: Option<String>,
    },
}

/// A consumer that delivers records somewhere, one attempt at a time; run
/// it with [`Delivering`].
pub trait Deliver: Send + Sync + 'static {
    fn attempt(&self, record: &Record) -> impl Future<Output = Attempt> + Send;
}

/// A [`RecordHandler`] that runs a [`Deliver`] under the group's policy.
pub struct Delivering<D> {
    deliver: D,
    pool: deadpool_postgres::Pool,
    retry: RetryPolicy,
    in_flight: InFlight,
    /// The group's series, looked up on the first record (a member
    /// delivers for one group) rather than per attempt.
    series: std::sync::OnceLock<Series>,
}

/// One group's delivery metrics.
struct Series {
    delivered: prometheus::IntCounter,
    retried: prometheus::IntCounter,
    parked: prometheus::IntCounter,
    duration: prometheus::Histogram,
}

impl Series {
    fn of(group: &str) -> Series {
        let metrics = super::metrics::group_metrics();
        let outcome = |outcome: &str| metrics.deliveries.with_label_values(&[group, outcome]);
        Series {
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            parked: outcome("parked"),
            duration: metrics.delivery_duration.with_label_values(&[group]),
        }
    }
}

impl<D: Deliver> Delivering<D> {
    /// `pool` parks dead letters.
    pub fn new(deliver: D, pool: deadpool_postgres::Pool, retry: RetryPolicy) -> Delivering<D> {
        Delivering {
            deliver,
            pool,
            retry,
            in_flight: InFlight::default(),
            series: std::sync::OnceLock::new(),
        }
    }

    fn series(&self, lease: &Lease) -> &Series {
        self.series.get_or_init(|| Series::of(&lease.group_id))
    }

    /// Attempts `record` until it is delivered or parked (or the partition
    /// is lost: parking is fenced); returns how it ended.
    pub async fn deliver(&self, record: &Record, lease: &Lease) -> Settled {
        let _turn = self
            .in_flight
            .enter((record.topic.clone(), record.partition, record.offset))
            .await;
        let series = self.series(lease);
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            let attempt_started = Instant::now();
            let outcome = self.deliver.attempt(record).await;
            series
                .duration
                .observe(attempt_started.elapsed().as_secs_f64());
            attempts += 1;
            let (reason, error) = match outcome {
                Attempt::Delivered => {
                    series.delivered.inc();
                    return Settled::Delivered { attempts };
                }
                Attempt::Park { reason, error } => (reason, error),
                Attempt::Retry { error, after } => {
                    series.retried.inc();
                    if !self.retry.spent(attempts, started.elapsed()) {
                        // A delay the receiver asked for, if longer than
                        // the backoff (`Retry-After: 0` is no reason to
                        // hammer it), capped by the longest backoff.
                        let backoff = self.retry.backoff(attempts - 1);
                        let pause = after.map_or(backoff, |after| {
                            after.min(self.retry.max_backoff).max(backoff)
                        });
                        tracing::info!(group = %lease.group_id, partition = record.partition,
                            offset = record.offset, attempts, error = %clip(&error),
                            retry_in_ms = pause.as_millis() as u64, "delivery failed; will retry");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    ("retry budget spent".to_string(), Some(error))
                }
            };
            return self
                .park_until_done(record, lease, &reason, attempts, error.as_deref())
                .await;
        }
    }

    /// Parks, retrying while the database fails transiently.
    async fn park_until_done(
        &self,
        record: &Record,
        lease: &Lease,
        reason: &str,
        attempts: i32,
        error: Option<&str>,
    ) -> Settled {
        let mut failures = 0;
        loop {
            match park(&self.pool, lease, record, reason, attempts, error, None).await {
                Ok(Parked::Parked) => {
                    self.series(lease).parked.inc();
                    return Settled::Parked {
                        reason: reason.to_string(),
                    };
                }
                Ok(Parked::Fenced) => return Settled::Fenced,
                Err(e) => {
                    tracing::warn!(group = %lease.group_id, partition = record.partition,
                        offset = record.offset, error = %clip_error(&e),
                        "could not park a dead letter; retrying");
                    tokio::time::sleep(self.retry.backoff(failures)).await;
                    failures += 1;
                }
            }
        }
    }
}

/// How a record delivered by [`Delivering`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Delivered {
        attempts: i32,
    },
    Parked {
        reason: String,
    },
    /// The partition was lost meanwhile: its new owner decides.
    Fenced,
}

/// A group member delivering each record of its partitions with `deliver`
/// under `retry`: what a consumer without a ledger of its own runs.
pub type DeliveringConsumer<D> = Consumer<Records<Delivering<D>>>;

/// Connections a [`DeliveringConsumer`] parks dead letters on.
pub const PARKING_CONNECTIONS: usize = 2;

/// Every connection a [`consumer`] with `config` takes from the budget.
pub fn consumer_connections(config: &ConsumerConfig) -> usize {
    config.read_connections + PARKING_CONNECTIONS + MEMBER_OWN_CONNECTIONS
}

/// Builds a member of `config`'s group that delivers with `deliver` under
/// `retry`, its connections reserved from `db`'s budget. `name` is the
/// role's name in logs.
pub fn consumer<D: Deliver>(
    name: &'static str,
    db: &Db,
    config: ConsumerConfig,
    deliver: D,
    retry: RetryPolicy,
) -> anyhow::Result<DeliveringConsumer<D>> {
    // Exported from the start (at 0), so an alert on an increase sees the
    // first parked record.
    for outcome in ["delivered", "retried", "parked"] {
        super::metrics::group_metrics()
            .deliveries
            .with_label_values(&[&config.group.group_id, outcome]);
    }
    let parking = db.bounded_pool(
        "dead letters",
        PARKING_CONNECTIONS,
        config.group.session_bounds(),
    )?;
    let delivering = Delivering::new(deliver, parking, retry);
    Consumer::new(name, db, config, Arc::new(delivering))
}

impl<D: Deliver> RecordHandler for Delivering<D> {
    async fn handle(&self, record: Record, lease: Arc<Lease>) {
        self.deliver(&record, &lease).await;
    }
}

/// Whether [`park`] parked the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    Parked,
    /// The partition is no longer `lease`'s: nothing was written.
    Fenced,
}

/// What a consumer writes in the transaction that parks one of its records
/// (the mail ledger's `failed`).
pub trait OnPark: Send + Sync {
    fn on_park<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'_>,
        record: &'a Record,
        attempts: i32,
        last_error: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;
}

/// Parks `record` as a dead letter of `lease`'s group in one transaction
/// that holds the partition's ownership (fenced like a commit), with
/// `also`'s writes. A record the database refuses to store (not a transient
/// error, [`crate::db::is_transient`]) is parked without what came from its
/// writer (key, headers, payload; the log keeps them at its offset), the
/// error in its reason.
pub async fn park(
    pool: &deadpool_postgres::Pool,
    lease: &Lease,
    record: &Record,
    reason: &str,
    attempts: i32,
    last_error: Option<&str>,
    also: Option<&dyn OnPark>,
) -> anyhow::Result<Parked> {
    match park_as(pool, lease, record, reason, attempts, last_error, also).await {
        Err(e) if !crate::db::is_transient(&e) => {
            let bare = Record {
                key: None,
                headers: serde_json::json!({}),
                payload: serde_json::Value::Null,
                ..record.clone()
            };
            let reason = format!(
                "{reason}; the record could not be stored with it ({}): it is in the log at its offset",
                clip_error(&e)
            );
            park_as(pool, lease, &bare, &reason, attempts, last_error, also).await
        }
        parked => parked,
    }
}

async fn park_as(
    pool: &deadpool_postgres::Pool,
    lease: &Lease,
    record: &Record,
    reason: &str,
    attempts: i32,
    last_error: Option<&str>,
    also: Option<&dyn OnPark>,
) -> anyhow::Result<Parked> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if !crate::group::membership::hold_ownership(&tx, lease).await? {
        tracing::info!(group = %lease.group_id, topic = %record.topic, partition = record.partition,
            offset = record.offset, "partition lost; leaving the record to its new owner");
        return Ok(Parked::Fenced);
    }
    park_dead_letter(&*tx, &lease.group_id, record, reason, attempts, last_error).await?;
    if let Some(also) = also {
        also.on_park(&tx, record, attempts, last_error).await?;
    }
    tx.commit().await?;
    tracing::warn!(group = %lease.group_id, topic = %record.topic, partition = record.partition,
        offset = record.offset, reason = %clip(reason), "parked as a dead letter");
    Ok(Parked::Parked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: Some(5),
            retry_for: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert!(!policy.spent(4, Duration::from_secs(59)));
        assert!(policy.spent(5, Duration::ZERO));
        assert!(policy.spent(1, Duration::from_secs(60)));
        assert!(policy.backoff(0) <= Duration::from_millis(100));
        assert!(policy.backoff(0) >= Duration::from_millis(50));
        assert!(policy.backoff(3) >= Duration::from_millis(400));
        assert!(policy.backoff(30) <= Duration::from_secs(1));
    }
}
