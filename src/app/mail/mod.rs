//! The mail worker: consumes `order-created` as group `mail-service` and
//! sends each order's confirmation mail over SMTP (lettre, pooled).
//!
//! Delivery is at-least-once with three documented duplicate windows
//! (invariant 8, and the README's "Not twice"): a ledger row per (group,
//! event) goes `pending` (written once an attempt failed) → `sent` |
//! `failed` | `unknown`, read before and written after (never across) the
//! SMTP exchange. An event redelivered after a crash, rebalance or reset is
//! not mailed again once `sent`. Sent again: a mail whose process died
//! between the server's 250 and the ledger write; one in flight at a member
//! treated as dead (frozen or cut off past its session timeout); one whose
//! attempt had an unknown outcome. Its Message-ID is derived from the
//! event, so the duplicate is recognisable.
//!
//! Failures (invariant 9): transient ones (connection refused, timeouts,
//! 4xx) retry with exponential backoff and jitter, in the record's own
//! task, so other keys and partitions go on; permanent ones (5xx, a bad
//! address, an undecodable payload) or a spent retry budget park the event
//! as a dead letter and the partition moves on.

mod ledger;
mod metrics;
mod render;
mod replay;
mod role;
pub mod smtp;
mod transport;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lettre::message::Mailbox;

use crate::app::order::EmailAddress;
use crate::clip::{clip, clip_error};
use crate::group::consumer::{Lease, RecordHandler};
pub use crate::group::delivery::RetryPolicy;
use crate::group::delivery::{InFlight, OnPark, Parked};
use crate::log::Record;
use crate::trace_context::TraceParent;
pub use ledger::{confirmation_mail, sent_count_for_keys, ConfirmationMail};
use ledger::{
    mark_attempt, LedgerCeiling, LedgerReads, SentLedger, SentMark, MARK_FAILED, MARK_UNKNOWN,
};
pub use render::{
    message_id, render, render_replay, replay_message_id, Currency, Letterhead, OrderCreated,
};
pub use replay::MailReplay;
pub use role::{role, MailConsumer};
pub use smtp::Limits;
use tracing::Instrument;
pub use transport::{MailTransport, PlainSmtpPool, SendOutcome, SendSlot, SmtpTarget};

/// The consumer group the mail worker runs as.
pub const MAIL_GROUP: &str = "mail-service";

/// Every setting of the mail worker role, checked before anything starts.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub target: SmtpTarget,
    /// The sender and the amounts' currency.
    pub letterhead: Letterhead,
    /// SMTP connections kept open.
    pub pool_size: u32,
    /// How long to wait for the SMTP server, per step.
    pub limits: smtp::Limits,
    pub retry: RetryPolicy,
    /// Group session timeout (the heartbeat is a fifth of it, at most 1 s).
    pub session_timeout: Duration,
    pub offset_reset: crate::group::OffsetReset,
    /// Static membership: this member's fixed id in the group, so a restart
    /// takes its partitions back at once.
    pub instance_id: Option<String>,
}

impl MailSettings {
    /// Checks `SMTP_URL` (unset: `.eml` files in `<data_dir>/mail`, the
    /// data directory created if missing) and `MAIL_FROM`; the rest takes
    /// its defaults. A `file://` directory is created at start if missing,
    /// but only it: its parent must exist.
    pub fn new(
        smtp_url: Option<&str>,
        mail_from: &str,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<MailSettings> {
        let target = match smtp_url {
            Some(url) => SmtpTarget::parse(url)?,
            None => {
                std::fs::create_dir_all(data_dir).with_context(|| {
                    format!("creating the data directory {}", data_dir.display())
                })?;
                SmtpTarget::Files {
                    dir: std::path::absolute(data_dir.join("mail"))?,
                }
            }
        };
        if let SmtpTarget::Files { dir } = &target {
            let parent = dir.parent().unwrap_or(dir);
            if !parent.is_dir() {
                anyhow::bail!(
                    "SMTP_URL {target}: the directory {} does not exist (only the last directory is created)",
                    parent.display()
                );
            }
        }
        let from: Mailbox = EmailAddress::parse(mail_from)
            .map_err(|e| anyhow::anyhow!("MAIL_FROM {mail_from:?} is not usable: {e}"))?
            .as_str()
            .parse()
            .with_context(|| format!("MAIL_FROM {mail_from:?}"))?;
        Ok(MailSettings {
            target,
            letterhead: Letterhead {
                from,
                currency: Currency::default(),
            },
            pool_size: 16,
            limits: smtp::Limits::new(Duration::from_secs(15)),
            retry: RetryPolicy::default(),
            session_timeout: Duration::from_secs(10),
            offset_reset: crate::group::OffsetReset::Earliest,
            instance_id: None,
        })
    }

    /// The mail group's consumer settings.
    pub fn consumer_config(&self) -> crate::group::consumer::ConsumerConfig {
        let mut group =
            crate::group::GroupConfig::new(MAIL_GROUP, &[crate::app::order::ORDER_CREATED_TOPIC]);
        if let Some(id) = &self.instance_id {
            group = group.with_instance_id(id);
        }
        group.session_timeout = self.session_timeout;
        group.offset_reset = self.offset_reset;
        group.heartbeat_interval = (self.session_timeout / 5).min(Duration::from_secs(1));
        crate::group::consumer::ConsumerConfig::new(group)
    }
}

/// What the worker did with one record (returned by [`MailWorker::process`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Sent {
        attempts: i32,
    },
    /// The ledger says it was sent already (or this process sent it and is
    /// still recording it): not mailed again.
    AlreadySent,
    /// The ledger says it was parked, or ended with an unknown outcome.
    AlreadySettled,
    Parked {
        reason: String,
    },
    /// Retries ended and some attempt's outcome is unknown: it may have been
    /// delivered, so it is not parked as a failure.
    OutcomeUnknown,
    /// This member no longer owns the partition: it stops here, and the new
    /// owner decides (its writes are not overwritten).
    Fenced,
}

/// The mail worker: a [`RecordHandler`] for `order-created`.
pub struct MailWorker {
    pool: deadpool_postgres::Pool,
    ledger: SentLedger,
    ledger_reads: LedgerReads,
    ledger_ceiling: LedgerCeiling,
    in_flight: InFlight,
    transport: MailTransport,
    letterhead: Letterhead,
    group: String,
    retry: RetryPolicy,
}

impl MailWorker {
    /// The worker for `settings` (builds its SMTP transport).
    pub fn from_settings(
        pool: deadpool_postgres::Pool,
        settings: &MailSettings,
    ) -> anyhow::Result<MailWorker> {
        let transport = settings
            .target
            .transport(settings.pool_size, settings.limits)?;
        Ok(MailWorker::new(
            pool,
            transport,
            settings.letterhead.from.clone(),
            settings.retry.clone(),
        )
        .with_currency(settings.letterhead.currency.clone()))
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        transport: MailTransport,
        from: Mailbox,
        retry: RetryPolicy,
    ) -> MailWorker {
        MailWorker {
            ledger: SentLedger::spawn(pool.clone(), MAIL_GROUP.to_string()),
            ledger_reads: ledger::ledger_reads(pool.clone(), MAIL_GROUP.to_string()),
            ledger_ceiling: LedgerCeiling::default(),
            in_flight: InFlight::default(),
            pool,
            transport,
            letterhead: Letterhead {
                from,
                currency: Currency::default(),
            },
            group: MAIL_GROUP.to_string(),
            retry,
        }
    }

    /// Amounts shown in `currency` (default [`Currency::DEFAULT`]).
    pub fn with_currency(mut self, currency: Currency) -> MailWorker {
        self.letterhead.currency = currency;
        self
    }

    /// Handles one record to its end. Database errors are retried here
    /// too: giving up would commit past a record whose mail never went out.
    /// Its log lines carry the record's trace id (`trace_context`).
    pub async fn process(&self, record: &Record, lease: &Lease) -> Delivery {
        // The send is a span of the order's trace, child of the span that
        // placed the order; the mail's Traceparent names it.
        let order_span = TraceParent::from_headers(&record.headers);
        let trace = order_span.map(|t| t.child());
        let span = tracing::info_span!(
            "mail.send",
            trace_id = trace.map(|t| t.trace_id()).as_deref().unwrap_or(""),
            span_id = trace.map(|t| t.span_id()).as_deref().unwrap_or(""),
            parent_span_id = order_span.map(|t| t.span_id()).as_deref().unwrap_or(""),
            group = %self.group,
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            key = %clip(record.key.as_deref().unwrap_or("")),
        );
        self.process_in_span(record, lease, trace)
            .instrument(span)
            .await
    }

    async fn process_in_span(
        &self,
        record: &Record,
        lease: &Lease,
        trace: Option<TraceParent>,
    ) -> Delivery {
        // A restarted partition worker may hand us a record whose first
        // handling still runs (it was left to finish): wait for it, then
        // the ledger says what happened.
        let _turn = self
            .in_flight
            .enter((record.topic.clone(), record.partition, record.offset))
            .await;
        let mut db_backoff = 0;
        // Set once the database refused this record's bookkeeping for
        // itself (not a transient error): it is then parked with that
        // error, on its own, so it holds back nothing (the partition's
        // commits, other records' marks).
        let mut refused: Option<String> = None;
        let delivery = loop {
            let step = match &refused {
                None => self.try_process(record, lease, trace).await,
                Some(error) => {
                    self.park(
                        record,
                        lease,
                        "delivery bookkeeping refused",
                        0,
                        Some(error),
                    )
                    .await
                }
            };
            let error = match step {
                Ok(delivery) => break delivery,
                Err(error) => error,
            };
            if refused.is_none() && !crate::db::is_transient(&error) {
                refused = Some(clip_error(&error));
                continue;
            }
            tracing::warn!(
                offset = record.offset,
                partition = record.partition,
                error = %clip_error(&error),
                "mail delivery bookkeeping failed; retrying"
            );
            tokio::time::sleep(self.retry.backoff(db_backoff)).await;
            db_backoff += 1;
        };
        let metrics = metrics::mail_metrics();
        match &delivery {
            Delivery::Sent { attempts } => {
                metrics.sent.inc();
                tracing::debug!(attempts, "confirmation mail accepted");
            }
            Delivery::Parked { .. } => metrics.failed.with_label_values(&["parked"]).inc(),
            Delivery::OutcomeUnknown => metrics.failed.with_label_values(&["unknown"]).inc(),
            Delivery::AlreadySent | Delivery::AlreadySettled | Delivery::Fenced => {}
        }
        delivery
    }

    async fn try_process(
        &self,
        record: &Record,
        lease: &Lease,
        trace: Option<TraceParent>,
    ) -> anyhow::Result<Delivery> {
        // Sent by this process and still being recorded (its worker was
        // restarted meanwhile): wait for the record, never send again.
        let event = (record.topic.clone(), record.partition, record.offset);
        if let Some(mut written) = self.ledger.unrecorded(&event) {
            let _ = written.wait_for(|written| *written).await;
            return Ok(Delivery::AlreadySent);
        }
        let message_id = message_id(record);
        let ceiling = self
            .ledger_ceiling
            .get(&self.pool, &self.group, lease)
            .await?;
        let ledger = if record.offset > ceiling {
            None
        } else {
            self.ledger_reads
                .submit(event.clone())
                .await
                .map_err(|e| anyhow::Error::new(e).context("reading the delivery ledger"))?
        };
        // Whatever happens next writes the ledger at this offset.
        self.ledger_ceiling
            .raise(&record.topic, record.partition, record.offset)
            .await;
        let mut attempts: i32 = ledger.as_ref().map_or(0, |(_, attempts)| *attempts);
        match ledger.as_ref().map(|(status, _)| status.as_str()) {
            Some("sent") => return Ok(Delivery::AlreadySent),
            Some("failed") | Some("unknown") => return Ok(Delivery::AlreadySettled),
            _ => {}
        }
        // Decoded after the ledger: a record already settled stays settled
        // whatever a stricter decoder would say of it now.
        let (order, to) = match OrderCreated::decode(&record.payload) {
            Ok(decoded) => decoded,
            Err(reason) => return self.park(record, lease, &reason, attempts, None).await,
        };
        let message = match render(record, &order, &to, &self.letterhead, trace) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("cannot render: {e:#}");
                return self.park(record, lease, &reason, attempts, None).await;
            }
        };
        let name = format!(
            "order-{}.{}.{}.{}",
            order.order_id, record.topic, record.partition, record.offset
        );
        loop {
            // No transaction is open here: the SMTP exchange runs on its own.
            let started = std::time::Instant::now();
            let outcome = self.transport.send(message.clone(), &name).await;
            let metrics = metrics::mail_metrics();
            metrics
                .send_duration
                .observe(started.elapsed().as_secs_f64());
            let (error, unknown) = match outcome {
                SendOutcome::Sent => {
                    let since_order = (chrono::Utc::now() - record.created_at)
                        .to_std()
                        .unwrap_or_default();
                    metrics
                        .order_to_mail_seconds
                        .observe(since_order.as_secs_f64());
                    let mut written = self.ledger.record(SentMark {
                        topic: record.topic.clone(),
                        partition: record.partition,
                        offset: record.offset,
                        key: record.key.clone(),
                        message_id: message_id.clone(),
                        recipient: Some(to.as_str().to_string()),
                    });
                    let _ = written.wait_for(|written| *written).await;
                    return Ok(Delivery::Sent {
                        attempts: attempts + 1,
                    });
                }
                SendOutcome::Permanent(error) => {
                    let client = self.pool.get().await?;
                    let so_far = mark_attempt(
                        &**client,
                        lease,
                        record,
                        &message_id,
                        to.as_str(),
                        &error,
                        false,
                    )
                    .await?;
                    drop(client);
                    return match so_far {
                        None => Ok(self.fenced(record)),
                        // An earlier attempt may have delivered it: not a failure.
                        Some(so_far) if so_far.unknown_outcomes > 0 => {
                            self.settle_unknown(record, lease).await
                        }
                        Some(so_far) => {
                            self.park(
                                record,
                                lease,
                                "permanent SMTP failure",
                                so_far.attempts,
                                Some(&error),
                            )
                            .await
                        }
                    };
                }
                SendOutcome::Transient(error) => (error, false),
                SendOutcome::Unknown(error) => (error, true),
            };
            metrics::mail_metrics()
                .failed
                .with_label_values(&[if unknown {
                    "unknown_attempt"
                } else {
                    "transient"
                }])
                .inc();
            let client = self.pool.get().await?;
            let so_far = mark_attempt(
                &**client,
                lease,
                record,
                &message_id,
                to.as_str(),
                &error,
                unknown,
            )
            .await?;
            drop(client);
            let Some(so_far) = so_far else {
                return Ok(self.fenced(record));
            };
            attempts = so_far.attempts;
            if self.retry.spent(so_far.attempts, so_far.elapsed) {
                if so_far.unknown_outcomes > 0 {
                    return self.settle_unknown(record, lease).await;
                }
                return self
                    .park(record, lease, "retry budget spent", attempts, Some(&error))
                    .await;
            }
            tracing::info!(offset = record.offset, partition = record.partition, attempts, unknown, error = %error,
                "SMTP attempt did not deliver; will retry");
            tokio::time::sleep(self.retry.backoff(attempts - 1)).await;
        }
    }

    /// True while a `sent` mark for `record` waits to be written to the
    /// ledger (it is kept until it is, whatever happens to its worker).
    pub fn is_recording(&self, record: &Record) -> bool {
        let event = (record.topic.clone(), record.partition, record.offset);
        self.ledger.unrecorded(&event).is_some()
    }

    fn fenced(&self, record: &Record) -> Delivery {
        tracing::info!(topic = %record.topic, partition = record.partition, offset = record.offset,
            "partition lost or record settled by its new owner; leaving it to them");
        Delivery::Fenced
    }

    /// Ends the retries of a record whose outcome is unknown (fenced).
    async fn settle_unknown(&self, record: &Record, lease: &Lease) -> anyhow::Result<Delivery> {
        let updated = self
            .pool
            .get()
            .await?
            .execute(
                MARK_UNKNOWN,
                &[
                    &lease.group_id,
                    &record.topic,
                    &record.partition,
                    &record.offset,
                    &lease.member_id,
                    &lease.epoch,
                ],
            )
            .await?;
        if updated == 0 {
            return Ok(self.fenced(record));
        }
        tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
            "retries ended with the outcome unknown: the server may have the mail");
        Ok(Delivery::OutcomeUnknown)
    }

    /// Parks the record as a dead letter and marks the ledger `failed`, in
    /// one transaction that holds the partition's ownership (fenced; see
    /// [`crate::group::delivery::park`]).
    async fn park(
        &self,
        record: &Record,
        lease: &Lease,
        reason: &str,
        attempts: i32,
        last_error: Option<&str>,
    ) -> anyhow::Result<Delivery> {
        let parked = crate::group::delivery::park(
            &self.pool,
            lease,
            record,
            reason,
            attempts,
            last_error,
            Some(self),
        )
        .await?;
        Ok(match parked {
            Parked::Parked => Delivery::Parked {
                reason: reason.to_string(),
            },
            Parked::Fenced => self.fenced(record),
        })
    }

    /// Waits up to `within` for this process's `sent` marks to be written;
    /// those that cannot be are logged with their events, the duplicate
    /// window they open (README, "Not twice").
    pub async fn flush_sent_marks(&self, within: Duration) {
        let unwritten = self.ledger.flush(within).await;
        if unwritten.is_empty() {
            return;
        }
        let events: Vec<String> = unwritten
            .iter()
            .map(|(topic, partition, offset)| format!("{topic}/{partition}/{offset}"))
            .collect();
        tracing::error!(
            count = events.len(),
            events = %events.join(","),
            "stopping with sent mails whose marks are not written: these events would be mailed again"
        );
    }
}

/// The ledger says `failed` in the transaction that parks a record.
impl OnPark for MailWorker {
    fn on_park<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'_>,
        record: &'a Record,
        attempts: i32,
        last_error: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>> {
        Box::pin(async move {
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
            Ok(())
        })
    }
}

impl RecordHandler for MailWorker {
    async fn handle(&self, record: Record, lease: Arc<Lease>) {
        self.process(&record, &lease).await;
    }

    async fn stopped(&self) {
        self.flush_sent_marks(SENT_MARKS_FLUSH).await
    }
}

/// On stopping, how long `sent` marks not yet written may take.
const SENT_MARKS_FLUSH: Duration = Duration::from_secs(5);

/// The mail worker's SQL by name (all of it is the ledger's): tests/it/sql.rs
/// prepares each statement against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    ledger::statements()
}
