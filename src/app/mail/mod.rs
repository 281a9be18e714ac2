//! The mail worker: consumes `order-created` as group `mail-service` and
//! sends each order's confirmation mail over SMTP (lettre, pooled).
//!
//! Delivery is at-least-once with one documented duplicate window
//! (invariant 8): a ledger row per (group, event) goes `pending` (written
//! once an attempt failed) → `sent` | `failed`, read before and written
//! after (never across) the SMTP exchange. An event
//! redelivered after a crash, rebalance or reset is not mailed again once
//! `sent`. A crash after the server accepted the mail and before the ledger
//! says `sent` sends it again on redelivery; its Message-ID is derived from
//! the event, so the duplicate is recognisable.
//!
//! Failures (invariant 9): transient ones (connection refused, timeouts,
//! 4xx) retry with exponential backoff and jitter, in the record's own
//! task, so other keys and partitions go on; permanent ones (5xx, a bad
//! address, an undecodable payload) or a spent retry budget park the event
//! as a dead letter and the partition moves on.

mod ledger;
mod render;
mod transport;

use std::time::Duration;

use anyhow::Context;
use lettre::message::Mailbox;

use crate::app::order::EmailAddress;
use crate::group::consumer::RecordHandler;
use crate::group::dead_letters::park_dead_letter;
use crate::log::Record;
pub use ledger::{confirmation_mail, sent_count_for_keys, ConfirmationMail};
use ledger::{SentMark, LEDGER_STATUS, MARK_ATTEMPT_FAILED, MARK_FAILED};
pub use render::{message_id, render, OrderCreated};
pub use transport::{MailTransport, PlainSmtpPool, SendOutcome, SmtpTarget};

/// The consumer group the mail worker runs as.
pub const MAIL_GROUP: &str = "mail-service";

/// Every setting of the mail worker role, checked before anything starts.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub target: SmtpTarget,
    pub from: Mailbox,
    /// SMTP connections kept open.
    pub pool_size: u32,
    /// Longest SMTP exchange.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Group session timeout (the heartbeat is a fifth of it, at most 1 s).
    pub session_timeout: Duration,
    pub offset_reset: crate::group::OffsetReset,
}

impl MailSettings {
    /// Checks `SMTP_URL` (unset: `.eml` files in `<data_dir>/mail`) and
    /// `MAIL_FROM`; the rest takes its defaults.
    pub fn new(
        smtp_url: Option<&str>,
        mail_from: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<MailSettings> {
        let target = match smtp_url {
            Some(url) => SmtpTarget::parse(url)?,
            None => SmtpTarget::Files {
                dir: std::path::absolute(data_dir.join("mail"))?,
            },
        };
        let from: Mailbox = EmailAddress::parse(mail_from)
            .map_err(|e| anyhow::anyhow!("MAIL_FROM {mail_from:?} is not usable: {e}"))?
            .as_str()
            .parse()
            .with_context(|| format!("MAIL_FROM {mail_from:?}"))?;
        Ok(MailSettings {
            target,
            from,
            pool_size: 16,
            timeout: Duration::from_secs(15),
            retry: RetryPolicy::default(),
            session_timeout: Duration::from_secs(10),
            offset_reset: crate::group::OffsetReset::Earliest,
        })
    }

    /// The mail group's consumer settings.
    pub fn consumer_config(&self) -> crate::group::consumer::ConsumerConfig {
        let mut group =
            crate::group::GroupConfig::new(MAIL_GROUP, &[crate::app::order::ORDER_CREATED_TOPIC]);
        group.session_timeout = self.session_timeout;
        group.offset_reset = self.offset_reset;
        group.heartbeat_interval = (self.session_timeout / 5).min(Duration::from_secs(1));
        crate::group::consumer::ConsumerConfig::new(group)
    }
}

/// Retry schedule for transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts before the event is parked as a dead letter.
    pub max_attempts: i32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
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
}

/// What the worker did with one record (returned by [`MailWorker::process`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Sent {
        attempts: i32,
    },
    /// The ledger says it was sent already: not mailed again.
    AlreadySent,
    /// The ledger says it failed and was parked already.
    AlreadyParked,
    Parked {
        reason: String,
    },
}

/// The mail worker: a [`RecordHandler`] for `order-created`.
pub struct MailWorker {
    pool: deadpool_postgres::Pool,
    ledger: tokio::sync::mpsc::Sender<SentMark>,
    transport: MailTransport,
    from: Mailbox,
    group: String,
    retry: RetryPolicy,
}

/// The ledger's word on an event (no row: never attempted).
impl MailWorker {
    /// The worker for `settings` (builds its SMTP transport).
    pub fn from_settings(
        pool: deadpool_postgres::Pool,
        settings: &MailSettings,
    ) -> anyhow::Result<MailWorker> {
        let transport = settings
            .target
            .transport(settings.pool_size, settings.timeout)?;
        Ok(MailWorker::new(
            pool,
            transport,
            settings.from.clone(),
            settings.retry.clone(),
        ))
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        transport: MailTransport,
        from: Mailbox,
        retry: RetryPolicy,
    ) -> MailWorker {
        MailWorker {
            ledger: ledger::spawn_ledger_writer(pool.clone(), MAIL_GROUP.to_string()),
            pool,
            transport,
            from,
            group: MAIL_GROUP.to_string(),
            retry,
        }
    }

    /// Handles one record to its end. Database errors are retried here
    /// too: giving up would commit past a record whose mail never went out.
    pub async fn process(&self, record: &Record) -> Delivery {
        let mut db_backoff = 0;
        loop {
            match self.try_process(record).await {
                Ok(delivery) => {
                    let metrics = crate::metrics::metrics();
                    match &delivery {
                        Delivery::Sent { .. } => metrics.mail_sent.inc(),
                        Delivery::Parked { .. } => {
                            metrics.mail_failed.with_label_values(&["parked"]).inc()
                        }
                        Delivery::AlreadySent | Delivery::AlreadyParked => {}
                    }
                    return delivery;
                }
                Err(e) => {
                    tracing::warn!(
                        offset = record.offset,
                        partition = record.partition,
                        error = format!("{e:#}"),
                        "mail delivery bookkeeping failed; retrying"
                    );
                    tokio::time::sleep(self.retry.backoff(db_backoff)).await;
                    db_backoff += 1;
                }
            }
        }
    }

    async fn try_process(&self, record: &Record) -> anyhow::Result<Delivery> {
        let decoded = serde_json::from_value::<OrderCreated>(record.payload.clone())
            .map_err(|e| format!("undecodable payload: {e}"))
            .and_then(|order| {
                let to = EmailAddress::parse(&order.email)
                    .map_err(|e| format!("invalid recipient: {e}"))?;
                Ok((order, to))
            });
        let (order, to) = match decoded {
            Ok(decoded) => decoded,
            Err(reason) => return self.park(record, &reason, 0, None).await,
        };
        let message_id = message_id(record);
        let key = (
            &self.group,
            &record.topic,
            &record.partition,
            &record.offset,
        );
        let client = self.pool.get().await?;
        let ledger = client
            .query_opt(LEDGER_STATUS, &[key.0, key.1, key.2, key.3])
            .await?;
        drop(client);
        let mut attempts: i32 = ledger.as_ref().map_or(0, |row| row.get(1));
        match ledger.as_ref().map(|row| row.get::<_, &str>(0)) {
            Some("sent") => return Ok(Delivery::AlreadySent),
            Some("failed") => return Ok(Delivery::AlreadyParked),
            _ => {}
        }
        let message = match render(record, &order, &to, &self.from) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .park(record, &format!("cannot render: {e:#}"), attempts, None)
                    .await
            }
        };
        loop {
            // No transaction is open here: the SMTP exchange runs on its own.
            let name = format!(
                "order-{}.{}.{}.{}",
                order.order_id, record.topic, record.partition, record.offset
            );
            match self.transport.send(message.clone(), &name).await {
                SendOutcome::Sent => {
                    self.record_sent(record, &message_id, to.as_str()).await;
                    return Ok(Delivery::Sent {
                        attempts: attempts + 1,
                    });
                }
                SendOutcome::Permanent(error) => {
                    return self
                        .park(record, "permanent SMTP failure", attempts + 1, Some(&error))
                        .await;
                }
                SendOutcome::Transient(error) => {
                    crate::metrics::metrics()
                        .mail_failed
                        .with_label_values(&["transient"])
                        .inc();
                    attempts = self
                        .pool
                        .get()
                        .await?
                        .query_one(
                            MARK_ATTEMPT_FAILED,
                            &[
                                key.0,
                                key.1,
                                key.2,
                                key.3,
                                &message_id,
                                &to.as_str(),
                                &error,
                                &record.key,
                            ],
                        )
                        .await?
                        .get(0);
                    if attempts >= self.retry.max_attempts {
                        return self
                            .park(record, "retry budget spent", attempts, Some(&error))
                            .await;
                    }
                    tracing::info!(offset = record.offset, partition = record.partition, attempts, error = %error,
                        "transient SMTP failure; will retry");
                    tokio::time::sleep(self.retry.backoff(attempts - 1)).await;
                }
            }
        }
    }

    /// Records `sent`, retrying until the ledger has it: the mail is out,
    /// so sending it again is never the answer to a database error.
    async fn record_sent(&self, record: &Record, message_id: &str, recipient: &str) {
        let mut attempt = 0;
        loop {
            let (recorded, outcome) = tokio::sync::oneshot::channel();
            let mark = SentMark {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                key: record.key.clone(),
                message_id: message_id.to_string(),
                recipient: recipient.to_string(),
                recorded,
            };
            let error = match self.ledger.send(mark).await {
                Ok(()) => match outcome.await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e,
                    Err(_) => "ledger writer stopped".to_string(),
                },
                Err(_) => "ledger writer stopped".to_string(),
            };
            tracing::warn!(offset = record.offset, error = %error, "could not record a sent mail; retrying");
            tokio::time::sleep(self.retry.backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// Parks the record as a dead letter and marks the ledger `failed`,
    /// in one transaction.
    async fn park(
        &self,
        record: &Record,
        reason: &str,
        attempts: i32,
        last_error: Option<&str>,
    ) -> anyhow::Result<Delivery> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        park_dead_letter(&*tx, &self.group, record, reason, attempts, last_error).await?;
        tx.execute(
            MARK_FAILED,
            &[
                &self.group,
                &record.topic,
                &record.partition,
                &record.offset,
                &message_id(record),
                &attempts,
                &last_error,
                &record.key,
            ],
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason,
            "parked as a dead letter");
        Ok(Delivery::Parked {
            reason: reason.to_string(),
        })
    }
}

impl RecordHandler for MailWorker {
    async fn handle(&self, record: Record) {
        self.process(&record).await;
    }
}

/// The mail worker's SQL by name (all of it is the ledger's): tests/it/sql.rs
/// prepares each statement against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    ledger::statements()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert!(policy.backoff(0) <= Duration::from_millis(100));
        assert!(policy.backoff(0) >= Duration::from_millis(50));
        assert!(policy.backoff(3) >= Duration::from_millis(400));
        assert!(policy.backoff(30) <= Duration::from_secs(1));
    }
}
